"""rezero-kernels: fused kernels and drop-in layers for ReZero residual networks.

    import rezero_kernels as rzk
    layer = rzk.RZTXEncoderLayer(d_model=512, nhead=8, dim_feedforward=2048, dropout=0.1,
                                 batch_first=True)
    layer = rzk.RZLlamaLayer(d_model=512, nhead=8, num_kv_heads=2, dim_feedforward=1408)
"""
from . import blocks, diagnostics, functional
from . import serialization  # noqa: F401  (torch.load(weights_only=True) of our modules)
from .blocks import ReZeroBasicBlock, ReZeroFCBlock, rezero_fc_net, rezero_resnet
from .conversion import convert
from .dispatch import backends
from .extension import cpu_capability
from .gate import ReZero
from .llama import KVCache, RZLlamaLayer
from .transformer import RZTXDecoderLayer, RZTXEncoderLayer

__all__ = ["functional", "backends", "cpu_capability", "convert", "ReZero", "RZTXEncoderLayer",
           "RZTXDecoderLayer", "RZLlamaLayer", "KVCache", "blocks", "diagnostics",
           "ReZeroFCBlock", "rezero_fc_net", "ReZeroBasicBlock", "rezero_resnet"]
__version__ = "0.1.0"
