"""``y = x + alpha * dropout(fx)`` in one pass, and its backward.

Backward: ``dx = dy`` (grad_output itself), ``dfx = alpha * mask * dy / (1-p)`` and
``dalpha = sum(dy * dropout(fx))`` (per channel for a per-channel alpha; only when alpha needs a
gradient: a frozen gate's backward neither reads fx nor reduces).  The backward kernel
splits the rows into ``row_groups`` groups; each program walks its group's rows for one block
of channels and writes an fp32 partial sum per channel; the partials (groups x C) are then summed
by ``torch.sum`` in a fixed order, so dalpha is deterministic and needs no atomics.

Both kernels run a 1-D grid (common.elementwise_grid, common.reduction_grid): program ``pid``
takes column block ``pid % col_blocks`` of row tile (group) ``pid // col_blocks``, so
neighbouring programs read neighbouring columns of the same rows.  Row and column indices are
64-bit where they could pass 2^31 (a flattened 1-D tensor is one row of ``numel`` columns).
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from .common import (as_dtype, bucket, cdiv, define_op, dropout, dropout_args, elementwise_configs,
                     elementwise_grid, elementwise_prune, elementwise_tile, launch, math_dtype,
                     new_seed, only_wanted, partial_sums, reduction_grid, row_groups,
                     skip_launch, to_math)


@triton.jit
def _load_alpha(alpha_ptr, cols, C, PER_CHANNEL: tl.constexpr, FP64: tl.constexpr):
    if PER_CHANNEL:
        a = tl.load(alpha_ptr + cols, mask=cols < C, other=0.0)[None, :]
    else:
        a = tl.load(alpha_ptr)
    return to_math(a, FP64)


@triton.autotune(configs=elementwise_configs(),
                 key=["C", "M_BUCKET", "PER_CHANNEL", "DROPOUT", "FP64"],
                 prune_configs_by={"early_config_prune": elementwise_prune})
@triton.jit(do_not_specialize=["threshold", "M_BUCKET"])
def _residual_fwd(x_ptr, fx_ptr, alpha_ptr, seed_ptr, out_ptr, M, C, M_BUCKET, threshold, scale,
                  scale_lo, PER_CHANNEL: tl.constexpr, DROPOUT: tl.constexpr, FP64: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    rows, col0, cols, inside, offs = elementwise_tile(M, C, BLOCK_M, BLOCK_C)
    x = to_math(tl.load(x_ptr + offs, mask=inside, other=0.0), FP64)
    fx = to_math(tl.load(fx_ptr + offs, mask=inside, other=0.0), FP64)
    fx = dropout(fx, seed_ptr, rows, col0, threshold, scale, scale_lo, DROPOUT, FP64, BLOCK_C)
    y = x + _load_alpha(alpha_ptr, cols, C, PER_CHANNEL, FP64) * fx
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=inside)


@triton.autotune(configs=elementwise_configs(reduction=True),
                 key=["C", "M_BUCKET", "PER_CHANNEL", "DROPOUT", "REDUCE", "FP64"],
                 prune_configs_by={"early_config_prune": elementwise_prune})
@triton.jit(do_not_specialize=["threshold", "M_BUCKET"])
def _residual_bwd(dy_ptr, fx_ptr, alpha_ptr, seed_ptr, dfx_ptr, part_ptr, M, C, M_BUCKET,
                  group_rows, threshold, scale, scale_lo, PER_CHANNEL: tl.constexpr,
                  DROPOUT: tl.constexpr, REDUCE: tl.constexpr, FP64: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    col_blocks = tl.cdiv(C, BLOCK_C)
    pid = tl.program_id(0)
    group = (pid // col_blocks).to(tl.int64)
    col0 = (pid % col_blocks).to(tl.int64) * BLOCK_C
    cols = col0 + tl.arange(0, BLOCK_C)
    a = _load_alpha(alpha_ptr, cols, C, PER_CHANNEL, FP64)
    first = group * group_rows
    # a (BLOCK_M, BLOCK_C) accumulator summed over rows once, after the loop: a sum per
    # iteration would cross warps through shared memory, with a barrier, every BLOCK_M rows
    acc = to_math(tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32), FP64)
    for start in range(0, group_rows, BLOCK_M):
        rows = first + start + tl.arange(0, BLOCK_M)
        inside = ((rows < M) & (rows < first + group_rows))[:, None] & (cols[None, :] < C)
        offs = rows[:, None] * C + cols[None, :]
        dy = to_math(tl.load(dy_ptr + offs, mask=inside, other=0.0), FP64)
        dy = dropout(dy, seed_ptr, rows, col0, threshold, scale, scale_lo, DROPOUT, FP64, BLOCK_C)
        tl.store(dfx_ptr + offs, (a * dy).to(dfx_ptr.dtype.element_ty), mask=inside)
        if REDUCE:
            fx = to_math(tl.load(fx_ptr + offs, mask=inside, other=0.0), FP64)
            acc += dy * fx
    if REDUCE:
        tl.store(part_ptr + group * C + cols, tl.sum(acc, axis=0), mask=cols < C)


@define_op("residual")
def residual(x: torch.Tensor, fx: torch.Tensor, alpha: torch.Tensor, p: float,
             seed: Optional[torch.Tensor]) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    C = x.shape[-1] if x.dim() else 1
    if out.numel() == 0 or skip_launch(x):
        return out
    M = out.numel() // C
    launch(_residual_fwd, elementwise_grid(M, C), x.device,
           x.contiguous(), fx.contiguous(), alpha, seed, out, M, C, bucket(M), *dropout_args(p),
           PER_CHANNEL=int(alpha.numel() > 1), DROPOUT=int(seed is not None),
           FP64=int(x.dtype == torch.float64))
    return out


@define_op("residual_backward")
def residual_backward(grad: torch.Tensor, fx: torch.Tensor, alpha: torch.Tensor, p: float,
                      seed: Optional[torch.Tensor], reduce: bool
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad of fx, grad of alpha); without ``reduce`` grad of alpha is an empty tensor and fx
    is not read."""
    C = fx.shape[-1] if fx.dim() else 1
    M = fx.numel() // C if C else 0
    groups = row_groups(M)
    grad_fx = torch.empty(fx.shape, dtype=fx.dtype, device=fx.device)
    launches = fx.numel() and not skip_launch(fx)
    partial = partial_sums(groups if reduce else 0, C, math_dtype(fx.dtype), fx.device, launches)
    if launches:
        launch(_residual_bwd, reduction_grid(groups, C), fx.device,
               grad.contiguous(), fx.contiguous(), alpha, seed, grad_fx, partial, M, C, bucket(M),
               cdiv(M, groups), *dropout_args(p), PER_CHANNEL=int(alpha.numel() > 1),
               DROPOUT=int(seed is not None), REDUCE=int(reduce),
               FP64=int(fx.dtype == torch.float64))
    if not reduce:
        return grad_fx, alpha.new_empty(0)
    grad_alpha = partial.sum(0) if alpha.numel() > 1 else partial.sum().reshape(1)
    return grad_fx, as_dtype(grad_alpha, alpha.dtype)


def _setup(ctx, inputs, output):
    x, fx, alpha, p, seed = inputs
    ctx.p = p
    ctx.save_for_backward(fx, alpha, seed)


def _backward(ctx, grad):
    fx, alpha, seed = ctx.saved_tensors
    mask = ctx.needs_input_grad[:3]
    grads = (grad, None, None)
    if mask[1] or mask[2]:
        grads = (grad, *residual_backward(grad, fx, alpha, ctx.p, seed, mask[2]))
    return (*only_wanted(grads, mask), None, None)


residual.register_autograd(_backward, setup_context=_setup)


def rezero_residual(x, fx, alpha, dropout_p):
    return residual(x, fx, alpha.contiguous(), dropout_p, new_seed(dropout_p, x.device))
