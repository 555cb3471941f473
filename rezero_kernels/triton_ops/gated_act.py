"""``y = dropout(act(g) * u)`` with ``[g | u] = gate_up`` in one pass, and its backward: a gated
MLP's hidden (SwiGLU for silu, GeGLU for gelu) after the one GEMM that computes gate and up.

``gate_up`` is (rows, 2H): row r holds g at ``r * 2H + c`` and u at ``r * 2H + H + c``; the output
is (rows, H).  Both kernels run the 1-D grid of one program per (BLOCK_M, BLOCK_C) tile of the
(rows, H) output (common.elementwise_grid), so the dropout mask is the one of every other op's
(rows, H) output: element (r, c) of y (common.py's rule), the same in forward and backward.
The activation is the constexpr ``ACT`` (bias_act.py's codes and formulas); math in fp32, fp64
for float64 data.

Backward, with ``d = mask * dy / (1-p)`` regenerated from the seed:

    dg = d * u * act'(g)        du = d * act(g)

written side by side into one (rows, 2H) gradient; no reductions.  What is kept for backward:
gate_up and the seed, never the product act(g) * u or the mask (relu included: its output y
cannot give u back).
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from python_ref.activations import code

from .bias_act import activation, activation_grad
from .common import (bucket, define_op, dropout, dropout_args, elementwise_configs,
                     elementwise_grid, elementwise_prune, elementwise_tile, launch, new_seed,
                     skip_launch, to_math)


@triton.autotune(configs=elementwise_configs(),
                 key=["C", "M_BUCKET", "ACT", "DROPOUT", "FP64"],
                 prune_configs_by={"early_config_prune": elementwise_prune})
@triton.jit(do_not_specialize=["threshold", "M_BUCKET"])
def _gated_act_fwd(gate_up_ptr, seed_ptr, out_ptr, M, C, M_BUCKET, threshold, scale, scale_lo,
                   ACT: tl.constexpr, DROPOUT: tl.constexpr, FP64: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    # C = H, the output's width; g and u of output element (r, c) lie H apart in gate_up's row r
    rows, col0, cols, inside, offs = elementwise_tile(M, C, BLOCK_M, BLOCK_C)
    g_offs = rows[:, None] * (2 * C) + cols[None, :]
    g = to_math(tl.load(gate_up_ptr + g_offs, mask=inside, other=0.0), FP64)
    u = to_math(tl.load(gate_up_ptr + g_offs + C, mask=inside, other=0.0), FP64)
    y = dropout(activation(g, ACT) * u, seed_ptr, rows, col0, threshold, scale, scale_lo,
                DROPOUT, FP64, BLOCK_C)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=inside)


@triton.autotune(configs=elementwise_configs(),
                 key=["C", "M_BUCKET", "ACT", "DROPOUT", "FP64"],
                 prune_configs_by={"early_config_prune": elementwise_prune})
@triton.jit(do_not_specialize=["threshold", "M_BUCKET"])
def _gated_act_bwd(dy_ptr, gate_up_ptr, seed_ptr, grad_ptr, M, C, M_BUCKET, threshold, scale,
                   scale_lo, ACT: tl.constexpr, DROPOUT: tl.constexpr, FP64: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    # the forward's tile of the (M, C) output; its gradient's halves go where g and u were read
    rows, col0, cols, inside, offs = elementwise_tile(M, C, BLOCK_M, BLOCK_C)
    g_offs = rows[:, None] * (2 * C) + cols[None, :]
    d = to_math(tl.load(dy_ptr + offs, mask=inside, other=0.0), FP64)
    d = dropout(d, seed_ptr, rows, col0, threshold, scale, scale_lo, DROPOUT, FP64, BLOCK_C)
    g = to_math(tl.load(gate_up_ptr + g_offs, mask=inside, other=0.0), FP64)
    u = to_math(tl.load(gate_up_ptr + g_offs + C, mask=inside, other=0.0), FP64)
    tl.store(grad_ptr + g_offs, (d * u * activation_grad(g, ACT)).to(grad_ptr.dtype.element_ty),
             mask=inside)
    tl.store(grad_ptr + g_offs + C, (d * activation(g, ACT)).to(grad_ptr.dtype.element_ty),
             mask=inside)


def _launch(kernel, out: torch.Tensor, gate_up: torch.Tensor, *tensors, act: int, p: float,
            seed: Optional[torch.Tensor]) -> None:
    """``kernel`` on ``tensors``, one program per tile of ``out``, the (rows, H) output or its
    gradient (both kernels' grid); data type and device are gate_up's.  No launch for an empty
    tensor, nor for fake tensors under the interpreter."""
    if out.numel() == 0 or skip_launch(out, gate_up):
        return
    C = out.shape[-1]
    M = out.numel() // C
    launch(kernel, elementwise_grid(M, C), gate_up.device, *tensors, M, C, bucket(M),
           *dropout_args(p), ACT=act, DROPOUT=int(seed is not None),
           FP64=int(gate_up.dtype == torch.float64))


@define_op("gated_act_dropout")
def gated_act(gate_up: torch.Tensor, act: int, p: float,
              seed: Optional[torch.Tensor]) -> torch.Tensor:
    out = torch.empty(gate_up.shape[:-1] + (gate_up.shape[-1] // 2,), dtype=gate_up.dtype,
                      device=gate_up.device)
    gate_up = gate_up.contiguous()
    _launch(_gated_act_fwd, out, gate_up, gate_up, seed, out, act=act, p=p, seed=seed)
    return out


@define_op("gated_act_dropout_backward")
def gated_act_backward(grad: torch.Tensor, gate_up: torch.Tensor, act: int, p: float,
                       seed: Optional[torch.Tensor]) -> torch.Tensor:
    """The gradient of gate_up: ``[dg | du]``, gate_up's shape and dtype."""
    grad_gate_up = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
    gate_up = gate_up.contiguous()
    _launch(_gated_act_bwd, grad, gate_up, grad.contiguous(), gate_up, seed, grad_gate_up,
            act=act, p=p, seed=seed)
    return grad_gate_up


def _setup(ctx, inputs, output):
    gate_up, act, p, seed = inputs
    ctx.act, ctx.p = act, p
    ctx.save_for_backward(gate_up, seed)


def _backward(ctx, grad):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    gate_up, seed = ctx.saved_tensors
    return gated_act_backward(grad, gate_up, ctx.act, ctx.p, seed), None, None, None


gated_act.register_autograd(_backward, setup_context=_setup)


def gated_act_dropout(gate_up, activation_name, dropout_p):
    # contiguous before the op, so that the tensor backward keeps is the one the kernels read
    return gated_act(gate_up.contiguous(), code(activation_name), dropout_p,
                     new_seed(dropout_p, gate_up.device))
