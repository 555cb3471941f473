"""Whole models built from this package load with ``torch.load(path, weights_only=True)``.

``weights_only=True`` (torch's default since 2.6) unpickles only classes registered with
``torch.serialization.add_safe_globals``.  Importing ``rezero_kernels`` registers ours, what they
are built from, and the containers the README puts our layers in.  A model that holds other
classes (its own modules, ``nn.Transformer``, ``nn.LayerNorm``...) still needs those added by
its owner: the error names each one.
"""
import torch
import torch.nn as nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

import python_ref

from .blocks import ReZeroBasicBlock, ReZeroFCBlock, ReZeroResNet
from .gate import ReZero
from .llama import RZLlamaLayer
from .transformer import RZTXDecoderLayer, RZTXEncoderLayer

SAFE_GLOBALS = [
    # ours
    RZTXEncoderLayer, RZTXDecoderLayer, python_ref.RZTXEncoderLayer, python_ref.RZTXDecoderLayer,
    RZLlamaLayer, python_ref.RZLlamaLayer, python_ref.llama.LlamaAttention,
    python_ref.llama.GatedMLP,
    ReZero, ReZeroFCBlock, ReZeroBasicBlock, ReZeroResNet,
    # what they hold
    nn.MultiheadAttention, NonDynamicallyQuantizableLinear, nn.Linear, nn.Conv2d, nn.BatchNorm2d,
    nn.Identity, nn.Sequential,
    # what the README stacks the layers in
    nn.TransformerEncoder, nn.TransformerDecoder, nn.ModuleList,
]

torch.serialization.add_safe_globals(SAFE_GLOBALS)
