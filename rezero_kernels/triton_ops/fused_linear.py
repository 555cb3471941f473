"""A Triton GEMM with a fused epilogue, and the two linear ops built on it.

``_linear_kernel`` computes ``out[m, n] = epilogue(sum_k a[m, k] * b[n, k])`` (any strides, so
``weight`` and transposed views are read in place) and, while the accumulator tile is in
registers: adds the bias, optionally stores that pre-activation, applies the activation and
dropout, and for the ReZero op scales by alpha and adds the residual tile of x; one store.
The same kernel with an empty epilogue computes the fp32 weight-gradient product below.

rezero_linear: ``y = x + alpha * dropout(inp @ W.T + b)``.  Backward never needs F = inp @ W.T + b:
with ``dy' = mask * dy / (1-p)`` (one elementwise pass that also sums its columns) and
``G = dy'^T inp`` (this kernel, fp32 output):
    dW = alpha[:, None] * G        dinp = dy' @ (alpha[:, None] * W)     dx = dy
    db = alpha * colsum(dy')       dalpha_n = sum_k W[n, k] G[n, k] + b_n colsum(dy')_n
(summed over n for a scalar alpha).  Kept: inp, W, b, alpha, seed.

linear_bias_act_dropout: ``y = dropout(act(inp @ W.T + b))``.  Kept for backward: inp, W and
  identity  the seed only (dz = mask * dy / (1-p))
  relu      the output y (y > 0 exactly where the gradient flows; no mask needed)
  gelu*     the pre-activation inp @ W.T + b, stored by the forward epilogue (only when a
            gradient will be needed) and the seed: recomputing it would cost a GEMM.
"""
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from python_ref.activations import code

from .bias_act import BACKWARD_NEEDS, activation, bias_act_grad
from .common import (as_dtype, bucket, define_op, dropout, dropout_args, empty_where_unwanted,
                     gemm_configs, gemm_grid, gemm_prune, interpreting, launch, math_dtype,
                     new_seed, only_wanted, skip_launch, to_math)


@triton.autotune(configs=gemm_configs(),
                 key=["N", "M_BUCKET", "K_BUCKET", "DOT", "HAS_BIAS", "STORE_PRE", "ACT",
                      "DROPOUT", "RESIDUAL", "PER_CHANNEL", "FP64"],
                 prune_configs_by={"early_config_prune": gemm_prune})
@triton.jit(do_not_specialize=["threshold", "M_BUCKET", "K_BUCKET"])
def _linear_kernel(a_ptr, b_ptr, bias_ptr, x_ptr, alpha_ptr, seed_ptr, out_ptr, pre_ptr,
                   M, N, K, M_BUCKET, K_BUCKET, stride_am, stride_ak, stride_bn, stride_bk,
                   stride_xm, stride_xn, threshold, scale, scale_lo, DOT: tl.constexpr,
                   HAS_BIAS: tl.constexpr, STORE_PRE: tl.constexpr, ACT: tl.constexpr,
                   DROPOUT: tl.constexpr, RESIDUAL: tl.constexpr, PER_CHANNEL: tl.constexpr,
                   FP64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # grouped program order: GROUP_M row-blocks share the column blocks they sweep (L2 reuse)
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rn[None, :].to(tl.int64) * stride_bn
    if DOT == 2:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] + k0 < K), other=0.0)
        b = tl.load(b_ptrs, mask=(rk[:, None] + k0 < K) & (rn[None, :] < N), other=0.0)
        if DOT == 0:  # 16-bit inputs
            acc = tl.dot(a, b, acc)
        elif DOT == 1:  # fp32, as eager fp32 matmul: no TF32
            acc = tl.dot(a, b, acc, input_precision="ieee")
        elif DOT == 2:  # fp64 (its accumulator type must be named, or Triton 3.6 rejects it)
            acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=tl.float64)
        else:  # bf16 in the interpreter, whose dot mistakes bf16 for integers
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # epilogue: 64-bit offsets once per row, 32-bit column offsets; dropout draws one Philox
    # call per 4 columns (common.keep_mask), the mask rule of the elementwise kernels
    acc = to_math(acc, FP64)
    inside = (rm[:, None] < M) & (rn[None, :] < N)
    offs = (rm.to(tl.int64) * N)[:, None] + rn[None, :]
    if HAS_BIAS:
        acc += to_math(tl.load(bias_ptr + rn, mask=rn < N, other=0.0), FP64)[None, :]
    if STORE_PRE:
        tl.store(pre_ptr + offs, acc.to(pre_ptr.dtype.element_ty), mask=inside)
    acc = activation(acc, ACT)
    acc = dropout(acc, seed_ptr, rm, pid_n * BLOCK_N, threshold, scale, scale_lo, DROPOUT, FP64,
                  BLOCK_N)
    if RESIDUAL:
        if PER_CHANNEL:
            gate = tl.load(alpha_ptr + rn, mask=rn < N, other=0.0)[None, :]
        else:
            gate = tl.load(alpha_ptr)
        x_ptrs = x_ptr + (rm.to(tl.int64) * stride_xm)[:, None] \
            + (rn.to(tl.int64) * stride_xn)[None, :]
        acc = to_math(tl.load(x_ptrs, mask=inside, other=0.0), FP64) + to_math(gate, FP64) * acc
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=inside)


def _gemm(a, b, out, bias=None, x=None, alpha=None, seed=None, pre=None, act=0, p=0.0):
    """``out (M, N) = epilogue(a (M, K) @ b (N, K).T)``; out and pre contiguous."""
    M, K = a.shape
    N = b.shape[0]
    if out.numel() == 0 or skip_launch(a):
        return
    dot = {torch.float64: 2, torch.float32: 1}.get(a.dtype, 0)
    if dot == 0 and a.dtype == torch.bfloat16 and interpreting():
        dot = 3
    launch(_linear_kernel, gemm_grid(M, N), out.device,
           a, b, bias, x, alpha, seed, out, pre, M, N, K, bucket(M), bucket(K), a.stride(0),
           a.stride(1), b.stride(0), b.stride(1), x.stride(0) if x is not None else 0,
           x.stride(1) if x is not None else 0, *dropout_args(p), DOT=dot,
           HAS_BIAS=int(bias is not None), STORE_PRE=int(pre is not None), ACT=act,
           DROPOUT=int(seed is not None), RESIDUAL=int(x is not None),
           PER_CHANNEL=int(alpha is not None and alpha.numel() > 1),
           FP64=int(out.dtype == torch.float64))


def _rows(t: torch.Tensor) -> int:
    return math.prod(t.shape[:-1])


# --- x + alpha * dropout(inp @ W.T + b) ---------------------------------------------------------

@define_op("linear_residual")
def linear_residual(x: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    alpha: torch.Tensor, p: float, seed: Optional[torch.Tensor]) -> torch.Tensor:
    N, K = weight.shape
    M = _rows(x)
    out = torch.empty_like(x)
    _gemm(inp.reshape(M, K), weight, out.view(M, N), bias=bias, x=x.reshape(M, N), alpha=alpha,
          seed=seed, p=p)
    return out


@define_op("linear_residual_backward")
def linear_residual_backward(grad: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor, alpha: torch.Tensor, p: float,
                             seed: Optional[torch.Tensor], output_mask: list[bool]
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grads of (inp, weight, bias, alpha); those ``output_mask`` leaves out are empty tensors,
    and their GEMMs and column sums are skipped."""
    want_inp, want_weight, want_bias, want_alpha = output_mask
    N, K = weight.shape
    M = _rows(grad)
    grad2 = grad.reshape(M, N)
    # dy' = mask * dy / (1-p) in the GEMM dtype, and its column sums
    cast = seed is not None or grad.dtype != inp.dtype
    sums = want_bias or want_alpha
    dyp, colsum = bias_act_grad(grad2, None, None, 0, p, seed, inp.dtype, cast, sums)
    dyp = dyp if cast else grad2
    acc_dtype = math_dtype(inp.dtype)
    a = as_dtype(alpha, acc_dtype).view(-1, 1)
    # the weight in fp32 (a copy for 16-bit weights), for the alpha and inp gradients only
    w = as_dtype(weight, acc_dtype) if want_alpha or want_inp else None
    grad_inp = grad_weight = grad_bias = grad_alpha = None
    if want_weight or want_alpha:
        g = torch.empty((N, K), dtype=acc_dtype, device=grad.device)
        _gemm(dyp.t(), inp.reshape(M, K).t(), g)  # G = dy'^T inp, fp32 (every element written)
    if sums:
        colsum = as_dtype(colsum, acc_dtype)
    if want_alpha:  # sum_k W G + b colsum, per channel or in all
        b = as_dtype(bias, acc_dtype)
        if alpha.numel() == 1:
            grad_alpha = torch.dot(w.reshape(-1), g.reshape(-1)) + torch.dot(b, colsum)
        else:
            grad_alpha = (w * g).sum(1) + b * colsum
        grad_alpha = as_dtype(grad_alpha.reshape(alpha.shape), alpha.dtype)
    if want_weight:  # alpha G, scaling G in place when it has the weight's dtype
        grad_weight = g.mul_(a) if weight.dtype == acc_dtype else (g * a).to(weight.dtype)
    if want_bias:
        grad_bias = as_dtype(a.view(-1) * colsum, bias.dtype)
    if want_inp:
        grad_inp = torch.matmul(dyp, as_dtype(a * w, inp.dtype)).reshape(inp.shape)
    return empty_where_unwanted((grad_inp, grad_weight, grad_bias, grad_alpha), output_mask, grad)


def _residual_setup(ctx, inputs, output):
    x, inp, weight, bias, alpha, p, seed = inputs
    ctx.p = p
    ctx.save_for_backward(inp, weight, bias, alpha, seed)


def _residual_backward(ctx, grad):
    inp, weight, bias, alpha, seed = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[1:5])
    grads = (linear_residual_backward(grad, inp, weight, bias, alpha, ctx.p, seed, mask)
             if any(mask) else (None,) * 4)
    return (*only_wanted((grad, *grads), ctx.needs_input_grad[:5]), None, None)


linear_residual.register_autograd(_residual_backward, setup_context=_residual_setup)


# --- dropout(act(inp @ W.T + b)) -----------------------------------------------------------------

@define_op("linear_act")
def linear_act(inp: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, act: int, p: float,
               seed: Optional[torch.Tensor], save_pre: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, pre-activation inp @ W.T + b if save_pre else an empty tensor)."""
    N, K = weight.shape
    M = _rows(inp)
    shape = inp.shape[:-1] + (N,)
    out = torch.empty(shape, dtype=inp.dtype, device=inp.device)
    pre = torch.empty(shape if save_pre else (0,), dtype=inp.dtype, device=inp.device)
    _gemm(inp.reshape(M, K), weight, out.view(M, N), bias=bias, seed=seed,
          pre=pre.view(M, N) if save_pre else None, act=act, p=p)
    return out, pre


@define_op("linear_act_backward")
def linear_act_backward(grad: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor,
                        z: Optional[torch.Tensor], act: int, p: float,
                        seed: Optional[torch.Tensor], output_mask: list[bool]
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grads of (inp, weight) and the column sums of dz (the grad of bias before its cast);
    those ``output_mask`` leaves out are empty tensors, and their GEMMs or sums are skipped."""
    want_inp, want_weight, want_bias = output_mask
    N, K = weight.shape
    M = _rows(grad)
    grad2 = grad.reshape(M, N)
    reads_z = BACKWARD_NEEDS[act] != "nothing"
    store = reads_z or seed is not None or grad.dtype != inp.dtype
    dz, colsum = bias_act_grad(grad2, z.reshape(M, N) if reads_z else None, None, act, p, seed,
                               inp.dtype, store, want_bias)
    dz = dz if store else grad2
    grad_inp = torch.matmul(dz, weight).reshape(inp.shape) if want_inp else None
    grad_weight = torch.matmul(dz.t(), inp.reshape(M, K)) if want_weight else None
    return empty_where_unwanted((grad_inp, grad_weight, colsum), output_mask, grad)


def _act_setup(ctx, inputs, output):
    inp, weight, bias, act, p, seed, save_pre = inputs
    out, pre = output
    ctx.mark_non_differentiable(pre)
    ctx.act, ctx.p, ctx.bias_dtype = act, p, bias.dtype
    if BACKWARD_NEEDS[act] == "output":
        ctx.save_for_backward(inp, weight, out, None)
    else:
        ctx.save_for_backward(inp, weight, pre if BACKWARD_NEEDS[act] == "input" else None, seed)


def _act_backward(ctx, grad, grad_pre):
    inp, weight, z, seed = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:3])
    if not any(mask):
        return (None,) * 7
    grad_inp, grad_weight, grad_bias = linear_act_backward(grad, inp, weight, z, ctx.act, ctx.p,
                                                           seed, mask)
    return (*only_wanted((grad_inp, grad_weight, as_dtype(grad_bias, ctx.bias_dtype)), mask),
            None, None, None, None)


linear_act.register_autograd(_act_backward, setup_context=_act_setup)


# --- the backend interface ---------------------------------------------------------------

def rezero_linear(x, inp, weight, bias, alpha, dropout_p):
    return linear_residual(x, inp, weight, bias.contiguous(), alpha.contiguous(), dropout_p,
                           new_seed(dropout_p, x.device))


def linear_bias_act_dropout(inp, weight, bias, activation_name, dropout_p):
    act = code(activation_name)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (inp, weight, bias))
    save_pre = int(needs_grad and BACKWARD_NEEDS[act] == "input")
    out, _ = linear_act(inp, weight, bias.contiguous(), act, dropout_p,
                        new_seed(dropout_p, inp.device), save_pre)
    return out
