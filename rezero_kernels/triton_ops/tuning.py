"""Tuning the Triton kernels before they are needed: ``warmup``.

Every kernel is autotuned per shape class: its channel count (N and K for a GEMM, K rounded up
to a power of two), its row count rounded up to a power of two, its constexpr flags and the
dtypes of its tensors (common.py).  The first launch of a new class benchmarks every config
(about 0.1 s each) before it runs; that benchmark cannot run while a CUDA graph is being
captured, and it costs a step's time in the middle of training.  ``warmup`` makes those first
launches up front, for the shapes a model will use:

    from rezero_kernels.triton_ops.tuning import warmup
    warmup(rows=[4096, 8192], features=512, hidden=2048, dtype=torch.bfloat16,
           activation="gelu", dropout_p=0.1)       # then capture

(rows: batch x sequence length of every step to be captured; one call per power-of-two bucket
is enough.)  Running the captured step once eagerly beforehand, as CUDA-graph capture requires
anyway, tunes the same kernels.
"""
from collections.abc import Iterable
from typing import Optional, Union

import torch

from .bias_act import bias_act_dropout
from .common import bucket
from .fused_linear import linear_bias_act_dropout, rezero_linear
from .gated_act import gated_act_dropout
from .residual import rezero_residual


def _run(fn, inputs, grad: bool):
    """fn(*inputs), and with ``grad`` its backward for a random output gradient."""
    if not grad:
        with torch.no_grad():
            fn(*inputs)
        return
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    torch.autograd.grad(out, leaves, torch.randn_like(out))


def warmup(rows: Union[int, Iterable[int]], features: int, hidden: Optional[int] = None, *,
           dtype: torch.dtype = torch.float32, device="cuda", activation: str = "gelu",
           dropout_p: float = 0.1, per_channel: bool = False,
           residual_dtype: Optional[torch.dtype] = None, grad: bool = True,
           frozen: bool = False) -> None:
    """Tune every kernel that the fused ops of a ReZero block launch on ``rows`` rows (an int or
    several; one per power-of-two bucket runs), forward and (``grad``) backward, with dropout
    ``dropout_p`` and without (evaluation):

        rezero_residual          (rows, features), gate of 1 or ``features`` (``per_channel``)
        rezero_linear            features -> features, and hidden -> features
        linear_bias_act_dropout  features -> hidden (inference and training variants)
        bias_act_dropout         (rows, hidden)
        gated_act_dropout        (rows, 2 hidden) -> (rows, hidden), a gated MLP's hidden

    ``hidden`` defaults to ``features``.  ``dtype`` is the dtype of the data and GEMM
    operands; ``residual_dtype`` that of the residual stream x and the gate when it differs
    (float32 under autocast with 16-bit operands).  ``frozen`` also tunes the backward of a
    frozen gate and bias (``requires_grad=False``), whose kernels skip the reductions.
    """
    hidden = hidden or features
    residual_dtype = residual_dtype or dtype
    sizes = [rows] if isinstance(rows, int) else list(rows)
    first_of_bucket = {}
    for m in sizes:
        first_of_bucket.setdefault(bucket(m), m)
    ps = dict.fromkeys([0.0, float(dropout_p)])
    for m in first_of_bucket.values():
        for p in ps:
            _block(m, features, hidden, dtype, torch.device(device), activation, p, per_channel,
                   residual_dtype, grad, frozen)


def _block(m, features, hidden, dtype, device, activation, p, per_channel, residual_dtype, grad,
           frozen):
    def randn(*shape, dt=dtype):
        return torch.randn(*shape, dtype=dt, device=device)

    x = randn(m, features, dt=residual_dtype)
    alpha = randn(features if per_channel else 1, dt=residual_dtype)
    _run(lambda x, fx, a: rezero_residual(x, fx, a, p), [x, randn(m, features, dt=residual_dtype),
                                                         alpha], grad)
    for n_in in dict.fromkeys([features, hidden]):
        _run(lambda x, i, w, b, a: rezero_linear(x, i, w, b, a, p),
             [x, randn(m, n_in), randn(features, n_in) / n_in ** 0.5, randn(features), alpha],
             grad)
    ff = [randn(m, features), randn(hidden, features) / features ** 0.5, randn(hidden)]
    _run(lambda i, w, b: linear_bias_act_dropout(i, w, b, activation, p), ff, False)
    if grad:
        _run(lambda i, w, b: linear_bias_act_dropout(i, w, b, activation, p), ff, True)
    bias = randn(hidden)
    _run(lambda h, b: bias_act_dropout(h, b, activation, p), [randn(m, hidden), bias], grad)
    _run(lambda gu: gated_act_dropout(gu, activation, p), [randn(m, 2 * hidden)], grad)
    if grad and frozen:  # alpha and bias fixed: closed over, not differentiated
        _run(lambda x, fx: rezero_residual(x, fx, alpha, p),
             [x, randn(m, features, dt=residual_dtype)], True)
        _run(lambda h: bias_act_dropout(h, bias, activation, p), [randn(m, hidden)], True)
        out_bias = randn(features)
        _run(lambda x, i, w: rezero_linear(x, i, w, out_bias, alpha, p),
             [x, randn(m, features), randn(features, features) / features ** 0.5], True)
        _run(lambda i, w: linear_bias_act_dropout(i, w, ff[2], activation, p), ff[:2], True)
