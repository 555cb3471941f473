"""Plain-PyTorch reference implementations of every ``rezero_kernels`` op and layer."""
from .activations import ACTIVATIONS
from .functional import (bias_act_dropout, gated_act_dropout, linear_bias_act_dropout,
                         rezero_fc, rezero_gated_linear, rezero_linear, rezero_residual)
from .llama import KVCache, RZLlamaLayer
from .transformer import RZTXDecoderLayer, RZTXEncoderLayer, causal_mask

__all__ = ["ACTIVATIONS", "bias_act_dropout", "gated_act_dropout", "linear_bias_act_dropout",
           "rezero_fc", "rezero_gated_linear", "rezero_linear", "rezero_residual", "RZTXEncoderLayer", "RZTXDecoderLayer",
           "causal_mask", "RZLlamaLayer", "KVCache"]
