"""``y = dropout(act(h + bias))`` in one pass, its backward, and the activation helpers the GEMM
epilogue shares.

Activations are chosen by the constexpr ``ACT``, the activation's code in python_ref's table
(0 identity, 1 relu, 2 gelu (erf), 3 gelu_tanh, 4 silu); a code without a formula here fails to
compile.  Backward computes ``dz = mask * dy / (1-p) * act'(h + bias)`` and
``dbias = sum_rows(dz)`` from fp32 per-group partials summed in a fixed order (deterministic,
no atomics; only when the bias needs a gradient).  What is kept for backward:
  relu      the output y only: y > 0 exactly where the gradient flows (kept and h + bias > 0),
            so neither h, bias nor the mask is needed (the kernel runs with ``seed=None``: it
            applies the 1/(1-p) scale and no mask)
  others    h, bias and the seed (the mask is regenerated)
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from python_ref.activations import TABLE, code

from .common import (as_dtype, bucket, cdiv, define_op, dropout, dropout_args, elementwise_configs,
                     elementwise_grid, elementwise_prune, elementwise_tile, launch, math_dtype,
                     new_seed, only_wanted, partial_sums, reduction_grid, row_groups,
                     skip_launch, to_math)

BACKWARD_NEEDS = tuple(a.backward_needs for a in TABLE)  # by activation code


@triton.jit
def _tanh_gate(z):
    """gelu_tanh's 0.5 (1 + tanh(u)), u = sqrt(2/pi) (z + 0.044715 z^3), as the logistic
    sigmoid(2u) = 1 / (1 + exp(-2u)): one exp and one division, which keeps the GEMM epilogue
    within its registers (the exponent is capped at 80: no overflow, the gate then < 1e-34)."""
    return 1.0 / (1.0 + tl.exp(tl.minimum(-1.5957691216057308 * (z + 0.044715 * z * z * z),
                                          80.0)))


@triton.jit
def activation(z, ACT: tl.constexpr):
    if ACT == 0:
        y = z
    elif ACT == 1:
        y = tl.where(z < 0, 0.0, z)
    elif ACT == 2:
        y = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 3:
        y = z * _tanh_gate(z)
    elif ACT == 4:
        y = z / (1.0 + tl.exp(-z))
    else:
        tl.static_assert(False, "activation code without a Triton formula (bias_act.py)")
    return y


@triton.jit
def activation_grad(z, ACT: tl.constexpr):
    """d act(z) / dz; gelu_tanh: s + 2 z s (1 - s) u'(z) with s = _tanh_gate."""
    if ACT == 0:
        g = tl.full(z.shape, 1.0, z.dtype)
    elif ACT == 1:
        g = tl.where(z > 0, 1.0, 0.0)
    elif ACT == 2:
        g = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) \
            + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACT == 3:
        s = _tanh_gate(z)
        g = s + 1.5957691216057308 * z * s * (1.0 - s) * (1.0 + 0.134145 * z * z)
    elif ACT == 4:
        s = 1.0 / (1.0 + tl.exp(-z))
        g = s * (1.0 + z * (1.0 - s))
    else:
        tl.static_assert(False, "activation code without a Triton derivative (bias_act.py)")
    return g


@triton.autotune(configs=elementwise_configs(),
                 key=["C", "M_BUCKET", "ACT", "DROPOUT", "FP64"],
                 prune_configs_by={"early_config_prune": elementwise_prune})
@triton.jit(do_not_specialize=["threshold", "M_BUCKET"])
def _bias_act_fwd(h_ptr, bias_ptr, seed_ptr, out_ptr, M, C, M_BUCKET, threshold, scale, scale_lo,
                  ACT: tl.constexpr, DROPOUT: tl.constexpr, FP64: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    rows, col0, cols, inside, offs = elementwise_tile(M, C, BLOCK_M, BLOCK_C)
    z = to_math(tl.load(h_ptr + offs, mask=inside, other=0.0), FP64)
    z += to_math(tl.load(bias_ptr + cols, mask=cols < C, other=0.0), FP64)[None, :]
    y = dropout(activation(z, ACT), seed_ptr, rows, col0, threshold, scale, scale_lo, DROPOUT,
                FP64, BLOCK_C)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=inside)


@triton.autotune(configs=elementwise_configs(reduction=True),
                 key=["C", "M_BUCKET", "ACT", "ADD_BIAS", "DROPOUT", "STORE_GRAD", "REDUCE",
                      "FP64"],
                 prune_configs_by={"early_config_prune": elementwise_prune})
@triton.jit(do_not_specialize=["threshold", "M_BUCKET"])
def _bias_act_bwd(dy_ptr, z_ptr, bias_ptr, seed_ptr, dz_ptr, part_ptr, M, C, M_BUCKET,
                  group_rows, threshold, scale, scale_lo, ACT: tl.constexpr,
                  ADD_BIAS: tl.constexpr, DROPOUT: tl.constexpr, STORE_GRAD: tl.constexpr,
                  REDUCE: tl.constexpr, FP64: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_C: tl.constexpr):
    col_blocks = tl.cdiv(C, BLOCK_C)
    pid = tl.program_id(0)
    group = (pid // col_blocks).to(tl.int64)
    col0 = (pid % col_blocks).to(tl.int64) * BLOCK_C
    cols = col0 + tl.arange(0, BLOCK_C)
    first = group * group_rows
    # a (BLOCK_M, BLOCK_C) accumulator summed over rows once, after the loop: a sum per
    # iteration would cross warps through shared memory, with a barrier, every BLOCK_M rows
    acc = to_math(tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32), FP64)
    for start in range(0, group_rows, BLOCK_M):
        rows = first + start + tl.arange(0, BLOCK_M)
        inside = ((rows < M) & (rows < first + group_rows))[:, None] & (cols[None, :] < C)
        offs = rows[:, None] * C + cols[None, :]
        dz = to_math(tl.load(dy_ptr + offs, mask=inside, other=0.0), FP64)
        dz = dropout(dz, seed_ptr, rows, col0, threshold, scale, scale_lo, DROPOUT, FP64, BLOCK_C)
        if ACT != 0:
            z = to_math(tl.load(z_ptr + offs, mask=inside, other=0.0), FP64)
            if ADD_BIAS:
                z += to_math(tl.load(bias_ptr + cols, mask=cols < C, other=0.0), FP64)[None, :]
            dz = tl.where(inside, dz * activation_grad(z, ACT), 0.0)
        if STORE_GRAD:
            tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=inside)
        if REDUCE:
            acc += dz
    if REDUCE:
        tl.store(part_ptr + group * C + cols, tl.sum(acc, axis=0), mask=cols < C)


def bias_act_grad(grad: torch.Tensor, z: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                  act: int, p: float, seed: Optional[torch.Tensor], dtype: torch.dtype,
                  store: bool, reduce: bool = True):
    """``dz = mask * grad / (1-p) * act'(z [+ bias])`` (mask only where ``seed`` is given; z is
    not read for identity) as ``dtype`` (None unless ``store``), and its column sums (fp32, or
    fp64 for float64; None unless ``reduce``)."""
    C = grad.shape[-1]
    M = grad.numel() // C if C else 0
    groups = row_groups(M)
    sum_dtype = math_dtype(torch.promote_types(grad.dtype, dtype))
    launches = grad.numel() and (store or reduce) and not skip_launch(grad)
    partial = partial_sums(groups if reduce else 0, C, sum_dtype, grad.device, launches)
    dz = torch.empty(grad.shape, dtype=dtype, device=grad.device) if store else None
    if launches:
        launch(_bias_act_bwd, reduction_grid(groups, C), grad.device,
               grad.contiguous(), z.contiguous() if act else None, bias, seed, dz, partial, M, C,
               bucket(M), cdiv(M, groups), *dropout_args(p), ACT=act,
               ADD_BIAS=int(bias is not None), DROPOUT=int(seed is not None),
               STORE_GRAD=int(store), REDUCE=int(reduce), FP64=int(sum_dtype == torch.float64))
    return dz, partial.sum(0) if reduce else None


@define_op("bias_act_dropout")
def bias_act(h: torch.Tensor, bias: torch.Tensor, act: int, p: float,
             seed: Optional[torch.Tensor]) -> torch.Tensor:
    out = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    C = h.shape[-1]
    if out.numel() == 0 or skip_launch(h):
        return out
    M = out.numel() // C
    launch(_bias_act_fwd, elementwise_grid(M, C), h.device,
           h.contiguous(), bias, seed, out, M, C, bucket(M), *dropout_args(p), ACT=act,
           DROPOUT=int(seed is not None), FP64=int(h.dtype == torch.float64))
    return out


@define_op("bias_act_dropout_backward")
def bias_act_backward(grad: torch.Tensor, z: torch.Tensor, bias: Optional[torch.Tensor],
                      act: int, p: float, seed: Optional[torch.Tensor], reduce: bool
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad of h, column sums of it in fp32/fp64: the grad of bias before its cast; an empty
    tensor without ``reduce``)."""
    grad_h, grad_bias = bias_act_grad(grad, z, bias, act, p, seed, z.dtype, True, reduce)
    return grad_h, grad_h.new_empty(0) if grad_bias is None else grad_bias


def _setup(ctx, inputs, output):
    h, bias, act, p, seed = inputs
    ctx.act, ctx.p, ctx.bias_dtype = act, p, bias.dtype
    if BACKWARD_NEEDS[act] == "output":
        ctx.save_for_backward(output, None, None)
    else:
        ctx.save_for_backward(h, bias, seed)


def _backward(ctx, grad):
    z, bias, seed = ctx.saved_tensors
    mask = ctx.needs_input_grad[:2]
    if not any(mask):
        return (None,) * 5
    grad_h, grad_bias = bias_act_backward(grad, z, bias, ctx.act, ctx.p, seed, mask[1])
    return (*only_wanted((grad_h, as_dtype(grad_bias, ctx.bias_dtype)), mask), None, None, None)


bias_act.register_autograd(_backward, setup_context=_setup)


def bias_act_dropout(h, bias, activation_name, dropout_p):
    return bias_act(h, bias.contiguous(), code(activation_name), dropout_p,
                    new_seed(dropout_p, h.device))
