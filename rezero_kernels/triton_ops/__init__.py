"""The "triton" backend: Triton kernels for CUDA tensors (or CPU tensors under
``TRITON_INTERPRET=1``, a slow test vehicle).  See ``dispatch`` for the interface.

    residual.py      x + alpha * dropout(fx)                   (one pass; backward one pass)
    bias_act.py      dropout(act(h + bias))                    (one pass; backward one pass)
    gated_act.py     dropout(act(g) * u), [g | u] = gate_up    (one pass; backward one pass)
    fused_linear.py  x + alpha * dropout(inp @ W.T + b) and dropout(act(inp @ W.T + b)):
                     a GEMM with the epilogue fused into it
    common.py        dropout rule, block configs and their pruning, grids, launch, registration
    tuning.py        warmup(): autotune for given shapes before CUDA-graph capture

Every op is registered as ``rezero_kernels_triton::<name>`` (a ``torch.library.triton_op`` on
GPU machines, so ``torch.compile(fullgraph=True)`` traces into the kernels) with its autograd
formula; eager calls on plain tensors skip the registration's host time (``common.Op``).
TRITON_INTERPRET must be set before this module is imported.
"""
try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the machine
    raise ImportError("rezero_kernels' triton backend needs the `triton` package "
                      f"(pip install triton): {error}") from error

import torch

from .bias_act import bias_act_dropout
from .fused_linear import linear_bias_act_dropout, rezero_linear
from .gated_act import gated_act_dropout
from .residual import rezero_residual

__all__ = ["rezero_residual", "bias_act_dropout", "gated_act_dropout", "rezero_linear",
           "rezero_gated_linear", "linear_bias_act_dropout", "rezero_fc"]


def rezero_gated_linear(x, gate_up, weight, alpha, activation, mlp_dropout_p, dropout_p):
    """A gated MLP's tail from two fused ops: the gated activation, then the GEMM with the
    residual epilogue (which keeps the hidden for backward; the compiled backends recompute
    it instead)."""
    bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    return rezero_linear(x, gated_act_dropout(gate_up, activation, mlp_dropout_p), weight, bias,
                         alpha, dropout_p)


def rezero_fc(x, weight, bias, alpha, activation, dropout_p):
    """The FC block from two fused ops: the GEMM with its activation epilogue, then the
    residual with dropout (one mask rule, so the mask is the other ops')."""
    return rezero_residual(x, linear_bias_act_dropout(x, weight, bias, activation, 0.0), alpha,
                           dropout_p)
