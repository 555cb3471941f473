"""The functional ops in plain PyTorch: the oracle every kernel is tested against.

Each op computes in the dtype of its main input, exactly as an eager user would write it.
``alpha`` and ``bias`` are cast to that dtype first, so the result dtype is the input's.

``mask`` (optional, bool, the shape of the dropped tensor) replaces the random dropout mask:
tests recover a kernel's mask and check that the kernel's numbers and gradients are those of
this reference with the same mask.  ``mask=None`` draws one with ``torch.nn.functional.dropout``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .activations import lookup


def dropout(t: torch.Tensor, p: float, training: bool = True, mask: torch.Tensor | None = None):
    """Inverted dropout; with ``mask`` given, keep exactly where ``mask`` is True."""
    if not training or p == 0.0:
        return t
    if mask is None:
        return F.dropout(t, p, training=True)
    return t * mask.to(t.dtype) / (1.0 - p)


def activation(t: torch.Tensor, name: str) -> torch.Tensor:
    """``name`` (a row of ``activations.TABLE``) applied to ``t``."""
    return lookup(name).fn(t)


def rezero_residual(x, fx, alpha, dropout_p=0.0, training=True, mask=None):
    """``x + alpha * dropout(fx)``; alpha is a 1-element or last-dimension-sized tensor."""
    return x + alpha.to(x.dtype) * dropout(fx, dropout_p, training, mask)


def bias_act_dropout(h, bias, activation_name="gelu", dropout_p=0.0, training=True, mask=None):
    """``dropout(act(h + bias))`` (``bias`` may be None)."""
    z = h if bias is None else h + bias.to(h.dtype)
    return dropout(activation(z, activation_name), dropout_p, training, mask)


def rezero_linear(x, inp, weight, bias, alpha, dropout_p=0.0, training=True, mask=None):
    """``x + alpha * dropout(inp @ weight.T + bias)``."""
    return rezero_residual(x, F.linear(inp, weight, bias), alpha, dropout_p, training, mask)


def linear_bias_act_dropout(inp, weight, bias, activation_name="gelu", dropout_p=0.0,
                            training=True, mask=None):
    """``dropout(act(inp @ weight.T + bias))``."""
    return bias_act_dropout(F.linear(inp, weight), bias, activation_name, dropout_p, training, mask)


def gated_act_dropout(gate_up, activation_name="silu", dropout_p=0.0, training=True, mask=None):
    """``dropout(act(g) * u)`` with ``g, u = gate_up.chunk(2, dim=-1)``: a gated MLP's hidden
    (SwiGLU for silu, GeGLU for gelu), ``gate_up`` being one GEMM's output ``[g | u]``."""
    g, u = gate_up.chunk(2, dim=-1)
    return dropout(activation(g, activation_name) * u, dropout_p, training, mask)


def rezero_gated_linear(x, gate_up, weight, alpha, activation_name="silu", mlp_dropout_p=0.0,
                        dropout_p=0.0, training=True, mlp_mask=None, mask=None):
    """``x + alpha * dropout(dropout_mlp(act(g) * u) @ weight.T)``: a gated MLP's tail (no bias);
    ``mlp_mask`` is the hidden's dropout mask, ``mask`` the residual branch's."""
    h = gated_act_dropout(gate_up, activation_name, mlp_dropout_p, training, mlp_mask)
    return rezero_linear(x, h, weight, None, alpha, dropout_p, training, mask)


def rezero_fc(x, weight, bias, alpha, activation_name="relu", dropout_p=0.0, training=True,
              mask=None):
    """``x + alpha * dropout(act(x @ weight.T + bias))``: a ReZero fully connected block."""
    return rezero_residual(x, activation(F.linear(x, weight, bias), activation_name), alpha,
                           dropout_p, training, mask)
