"""The "cpu" and "cuda" backends: the ops of the compiled extension (schemas in csrc/ops.cpp),
with their fake (meta) kernels and autograd formulas registered here, so that
``torch.compile(fullgraph=True)`` traces them and ``torch.library.opcheck`` passes.

What each op keeps for backward (never a dropout mask: the seed regenerates it):
  residual         fx, alpha, seed            (not x: its gradient is grad_output itself)
  bias_act_dropout h, bias, seed              (relu: its output instead, see below)
  linear_residual  inp, weight, bias, alpha, seed  (not the GEMM output, see linear_residual.cpp)
"""
from __future__ import annotations

import torch

from . import extension

if extension.load_error() is not None:
    raise ImportError(extension.load_error())

ops = torch.ops.rezero_kernels


def _math_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def new_seed(p: float, device: torch.device) -> torch.Tensor:
    """[key, counter_base] for the dropout generator, drawn from torch's generator for
    ``device`` (so ``torch.manual_seed`` reproduces runs); unused zeros when p == 0."""
    if p == 0.0:
        return torch.zeros(2, dtype=torch.int64, device=device)
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device)


# --- fake kernels: output metadata only ---------------------------------------------------

@torch.library.register_fake("rezero_kernels::residual")
def _(x, fx, alpha, p, seed):
    return torch.empty_like(x)


@torch.library.register_fake("rezero_kernels::residual_backward")
def _(grad, fx, alpha, p, seed):
    return torch.empty_like(fx), torch.empty_like(alpha)


@torch.library.register_fake("rezero_kernels::bias_act_dropout")
def _(h, bias, activation, p, seed):
    return torch.empty_like(h)


@torch.library.register_fake("rezero_kernels::bias_act_dropout_backward")
def _(grad, h, bias, activation, p, seed):
    return torch.empty_like(h), torch.empty_like(bias)


@torch.library.register_fake("rezero_kernels::linear_residual")
def _(x, inp, weight, bias, alpha, p, seed):
    return torch.empty_like(x)


@torch.library.register_fake("rezero_kernels::linear_residual_backward")
def _(grad, inp, weight, bias, alpha, p, seed):
    return (torch.empty_like(inp), torch.empty_like(weight), torch.empty_like(bias),
            torch.empty_like(alpha))


# --- autograd ---------------------------------------------------------------------------

def _keep(ctx, inputs, saved_positions):
    """Save inputs[saved_positions] for backward; the dropout p is the input before the seed."""
    ctx.save_for_backward(*(inputs[i] for i in saved_positions))
    ctx.p = inputs[-2]


def _residual_backward(ctx, grad):
    fx, alpha, seed = ctx.saved_tensors
    grad_fx, grad_alpha = ops.residual_backward(grad.contiguous(), fx, alpha, ctx.p, seed)
    return grad, grad_fx, grad_alpha, None, None


def _bias_act_dropout_setup(ctx, inputs, output):
    h, bias, activation, p, seed = inputs
    ctx.p, ctx.activation = p, activation
    if activation == "relu":
        # y = mask * scale * relu(h + bias) is > 0 exactly where the gradient flows, and relu of
        # y + 0 has that derivative: keep y (which the next GEMM keeps anyway), not h.
        ctx.save_for_backward(output, torch.zeros_like(bias), seed)
    else:
        ctx.save_for_backward(h, bias, seed)


def _bias_act_dropout_backward(ctx, grad):
    h, bias, seed = ctx.saved_tensors
    grad_h, grad_bias = ops.bias_act_dropout_backward(grad.contiguous(), h, bias, ctx.activation,
                                                      ctx.p, seed)
    return grad_h, grad_bias, None, None, None


def _linear_residual_backward(ctx, grad):
    inp, weight, bias, alpha, seed = ctx.saved_tensors
    grads = ops.linear_residual_backward(grad.contiguous(), inp, weight, bias, alpha, ctx.p, seed)
    return (grad, *grads, None, None)


torch.library.register_autograd("rezero_kernels::residual", _residual_backward,
                                setup_context=lambda ctx, inputs, output: _keep(ctx, inputs, (1, 2, 4)))
torch.library.register_autograd("rezero_kernels::bias_act_dropout", _bias_act_dropout_backward,
                                setup_context=_bias_act_dropout_setup)
torch.library.register_autograd("rezero_kernels::linear_residual", _linear_residual_backward,
                                setup_context=lambda ctx, inputs, output: _keep(ctx, inputs, (1, 2, 3, 4, 6)))


def _no_double_backward(ctx, *grads):
    raise NotImplementedError("rezero_kernels: double backward (create_graph=True, then a second "
                              "backward through the gradient) is not implemented for the "
                              "fused ops; use backend='torch' for it")


for _name in ("residual_backward", "bias_act_dropout_backward", "linear_residual_backward"):
    torch.library.register_autograd(f"rezero_kernels::{_name}", _no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)


# --- the backend interface (see dispatch.py) ---------------------------------------------

def rezero_residual(x, fx, alpha, dropout_p):
    alpha = alpha.to(_math_dtype(x)).contiguous()
    return ops.residual(x.contiguous(), fx.contiguous(), alpha, dropout_p,
                        new_seed(dropout_p, x.device))


def bias_act_dropout(h, bias, activation, dropout_p):
    bias = bias.to(_math_dtype(h)).contiguous()
    return ops.bias_act_dropout(h.contiguous(), bias, activation, dropout_p,
                                new_seed(dropout_p, h.device))


def rezero_linear(x, inp, weight, bias, alpha, dropout_p):
    out_dtype = torch.promote_types(x.dtype, inp.dtype)
    x = x.to(out_dtype).contiguous()
    alpha = alpha.to(_math_dtype(x)).contiguous()
    return ops.linear_residual(x, inp.contiguous(), weight.contiguous(), bias.contiguous(), alpha,
                               dropout_p, new_seed(dropout_p, x.device))


def linear_bias_act_dropout(inp, weight, bias, activation, dropout_p):
    return bias_act_dropout(torch.matmul(inp, weight.t()), bias, activation, dropout_p)
