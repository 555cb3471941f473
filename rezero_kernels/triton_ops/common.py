"""Pieces every Triton kernel family shares: the dropout generator, math dtypes, block configs,
op registration.

Dropout.  An op with ``p > 0`` draws one int64 seed with ``torch.randint`` on the data's device
(so ``torch.manual_seed`` reproduces a run and CUDA graphs replay a fresh draw), passes the
1-element tensor to its kernels, and a kernel keeps element ``i`` (the row-major index of the
op's output) where ``tl.rand(seed, i) >= p``.  Backward regenerates the same keep-mask from the
same seed and indices; no mask is ever stored.  With ``p == 0`` no seed is drawn (``seed`` is
None) and the kernels are compiled without the dropout code (``DROPOUT=0``).

The scale ``1 / (1 - p)`` travels as two float32 kernel arguments (Triton passes Python floats
as float32): its float32 rounding and the remainder, so float64 kernels rebuild it to ~1e-15.
"""
import os

import numpy as np
import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def elementwise_configs():
    """(BLOCK_M rows x BLOCK_C channels) tiles for the elementwise kernels.  The interpreter
    pays per program, not per element, so it gets one large tile."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_C": 256}, num_warps=4)]
    shapes = ((1, 1024, 4), (4, 256, 4), (8, 128, 4), (16, 64, 4), (4, 1024, 8), (32, 32, 4))
    return [triton.Config({"BLOCK_M": m, "BLOCK_C": c}, num_warps=w) for m, c, w in shapes]


def gemm_configs():
    if interpreting():
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8})]
    shapes = ((128, 128, 32, 4, 8), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 32, 4, 4),
              (128, 256, 64, 3, 8), (64, 32, 32, 5, 2), (32, 64, 64, 4, 4))
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8},
                          num_stages=s, num_warps=w) for m, n, k, s, w in shapes]


def row_groups(rows: int) -> int:
    """How many programs split the rows of a column reduction (each writes one fp32 partial
    row; the partials are then summed in a fixed order: deterministic, no atomics)."""
    if interpreting():
        return max(1, min(triton.cdiv(rows, 16), 2))
    return max(1, min(triton.cdiv(rows, 64), 256))


def new_seed(p: float, device: torch.device):
    """The dropout seed of one op call: None when there is no dropout."""
    if p == 0.0:
        return None
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def scale_args(p: float):
    """``1/(1-p)`` as (float32 part, remainder)."""
    scale = 1.0 / (1.0 - p)
    hi = float(np.float32(scale))
    return hi, scale - hi


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def skip_launch(*tensors) -> bool:
    """True while an op is traced with fake tensors under the interpreter (the interpreter
    cannot run a kernel on them; on a GPU ``wrap_triton`` handles fake tensors itself)."""
    return interpreting() and any(torch._subclasses.fake_tensor.is_fake(t) for t in tensors)


def define_op(name: str):
    """Register ``fn`` as ``rezero_kernels_triton::<name>``.  On a GPU: a ``triton_op``, whose
    kernels Inductor traces and compiles.  Under the interpreter ``wrap_triton`` cannot trace
    kernels, so the same function becomes an opaque ``custom_op`` with itself (launches skipped
    on fake tensors) as the fake kernel."""
    qualname = f"rezero_kernels_triton::{name}"

    def register(fn):
        if not interpreting():
            return torch.library.triton_op(qualname, fn, mutates_args=())
        op = torch.library.custom_op(qualname, fn, mutates_args=())
        op.register_fake(fn)
        return op

    return register


# --- in-kernel helpers -------------------------------------------------------------------

@triton.jit
def to_math(v, FP64: tl.constexpr):
    """float32 math (float64 for float64 data)."""
    if FP64:
        v = v.to(tl.float64)
    else:
        v = v.to(tl.float32)
    return v


@triton.jit
def dropout(v, seed_ptr, offsets, p, scale, scale_lo, DROPOUT: tl.constexpr, FP64: tl.constexpr):
    """``v * scale`` where the keep-mask of (seed, offsets) is set, else 0 (``DROPOUT=0``: just
    ``v * scale``, for callers whose input already carries the mask; scale is 1 when p == 0)."""
    if FP64:
        v = v * (tl.cast(scale, tl.float64) + tl.cast(scale_lo, tl.float64))
    else:
        v = v * scale
    if DROPOUT:
        keep = tl.rand(tl.load(seed_ptr), offsets) >= p
        v = tl.where(keep, v, 0.0)
    return v
