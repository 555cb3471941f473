"""The "cpu" and "cuda" backends: the ops of the compiled extension (schemas in csrc/ops.cpp,
autograd in csrc/autograd.cpp, which also says what each op keeps for backward), with their fake
(meta) kernels registered here, so that ``torch.compile(fullgraph=True)`` traces them and
``torch.library.opcheck`` passes.

Per op, its fake kernel(s) and its backend function, the interface of ``dispatch``: the general
path, for inputs the eager entry points (csrc/fast_path.cpp) do not take, and for
``torch.compile``.  The registered names (``rezero_kernels::<name>``) and the public ops they
serve are listed in the README ("Layout").
"""
from __future__ import annotations

import torch

from . import extension
from .validation import math_dtype

if extension.load_error() is not None:
    raise ImportError(extension.load_error())

ops = torch.ops.rezero_kernels


def new_seed(p: float, device: torch.device) -> torch.Tensor:
    """[key, counter_base] for the dropout generator, drawn from torch's generator for
    ``device`` (so ``torch.manual_seed`` reproduces runs); an empty tensor, never read, when
    p == 0."""
    if p == 0.0:
        return torch.empty(0, dtype=torch.int64, device=device)
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device)


def _wanted(likes, output_mask):
    """A backward op's fake outputs: one like each of ``likes`` where output_mask asks for it,
    else None (the op returns an undefined tensor there)."""
    return tuple(torch.empty_like(t) if wanted else None for t, wanted in zip(likes, output_mask))


# --- rezero_residual: rezero_kernels::residual ---------------------------------------------

@torch.library.register_fake("rezero_kernels::residual")
def _(x, fx, alpha, p, seed):
    return torch.empty_like(x)


@torch.library.register_fake("rezero_kernels::residual_backward")
def _(grad, fx, alpha, p, seed, output_mask):
    return _wanted((fx, alpha), output_mask)


def rezero_residual(x, fx, alpha, dropout_p):
    alpha = alpha.to(math_dtype(x.dtype)).contiguous()
    return ops.residual(x.contiguous(), fx.contiguous(), alpha, dropout_p,
                        new_seed(dropout_p, x.device))


# --- bias_act_dropout (and linear_bias_act_dropout: a GEMM, then this op) -------------------

@torch.library.register_fake("rezero_kernels::bias_act_dropout")
def _(h, bias, activation, p, seed):
    return torch.empty_like(h)


@torch.library.register_fake("rezero_kernels::bias_act_dropout_backward")
def _(grad, h, bias, activation, p, seed, output_mask):
    return _wanted((h, h.new_empty(h.shape[-1], dtype=math_dtype(h.dtype))), output_mask)


def bias_act_dropout(h, bias, activation, dropout_p):
    bias = bias.to(math_dtype(h.dtype)).contiguous()
    return ops.bias_act_dropout(h.contiguous(), bias, activation, dropout_p,
                                new_seed(dropout_p, h.device))


def linear_bias_act_dropout(inp, weight, bias, activation, dropout_p):
    return bias_act_dropout(torch.matmul(inp, weight.t()), bias, activation, dropout_p)


# --- gated_act_dropout ----------------------------------------------------------------------

@torch.library.register_fake("rezero_kernels::gated_act_dropout")
def _(gate_up, activation, p, seed):
    return gate_up.new_empty(gate_up.shape[:-1] + (gate_up.shape[-1] // 2,))


@torch.library.register_fake("rezero_kernels::gated_act_dropout_backward")
def _(grad, gate_up, activation, p, seed):
    return torch.empty_like(gate_up)


def gated_act_dropout(gate_up, activation, dropout_p):
    return ops.gated_act_dropout(gate_up.contiguous(), activation, dropout_p,
                                 new_seed(dropout_p, gate_up.device))


# --- rezero_linear: rezero_kernels::linear_residual -----------------------------------------

@torch.library.register_fake("rezero_kernels::linear_residual")
def _(x, inp, weight, bias, alpha, p, seed):
    return torch.empty_like(x)


@torch.library.register_fake("rezero_kernels::linear_residual_backward")
def _(grad, inp, weight, bias, alpha, p, seed, output_mask):
    return _wanted((inp, weight, bias, alpha), output_mask)


def rezero_linear(x, inp, weight, bias, alpha, dropout_p):
    alpha = alpha.to(math_dtype(x.dtype)).contiguous()
    return ops.linear_residual(x.contiguous(), inp.contiguous(), weight.contiguous(),
                               bias.contiguous(), alpha, dropout_p, new_seed(dropout_p, x.device))


# --- rezero_gated_linear: rezero_kernels::gated_linear_residual --------------------------------

@torch.library.register_fake("rezero_kernels::gated_linear_residual")
def _(x, gate_up, weight, alpha, activation, p_mlp, seed_mlp, p, seed):
    return torch.empty_like(x)


@torch.library.register_fake("rezero_kernels::gated_linear_residual_backward")
def _(grad, gate_up, weight, alpha, activation, p_mlp, seed_mlp, p, seed, output_mask):
    return _wanted((gate_up, weight, alpha), output_mask)


def rezero_gated_linear(x, gate_up, weight, alpha, activation, mlp_dropout_p, dropout_p):
    alpha = alpha.to(math_dtype(x.dtype)).contiguous()
    seed_mlp = new_seed(mlp_dropout_p, x.device)  # the hidden's first, as the entry point draws
    return ops.gated_linear_residual(x.contiguous(), gate_up.contiguous(), weight, alpha,
                                     activation, mlp_dropout_p, seed_mlp, dropout_p,
                                     new_seed(dropout_p, x.device))


# --- rezero_fc ------------------------------------------------------------------------------

@torch.library.register_fake("rezero_kernels::rezero_fc")
def _(x, weight, bias, alpha, activation, p, seed):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.register_fake("rezero_kernels::rezero_fc_backward")
def _(grad, x, weight, bias, alpha, kept, activation, p, seed, output_mask):
    return _wanted((x, weight, weight.new_empty(weight.shape[0]), alpha), output_mask)


def rezero_fc(x, weight, bias, alpha, activation, dropout_p):
    alpha = alpha.to(math_dtype(x.dtype)).contiguous()
    return ops.rezero_fc(x.contiguous(), weight, bias, alpha, activation, dropout_p,
                         new_seed(dropout_p, x.device))[0]
