"""Pieces every Triton kernel family shares: the dropout rule, math dtypes, block configs and
their pruning, autotuning keys, the launch (device guard), op registration and its eager route.

Dropout.  An op with ``p > 0`` draws one int64 seed with ``torch.randint`` on the data's device
(so ``torch.manual_seed`` reproduces a run and CUDA graphs replay a fresh draw) and passes the
1-element tensor to its kernels.  Every kernel views the op's output as ``(rows, C)`` (C its last
dimension) and keeps element ``(r, c)`` where

    word c % 4 of Philox4x32-10(key = seed, counter = (lo(c/4), hi(c/4), lo(r), hi(r)))

is below ``threshold(p) = min(2^32 - 1, floor((1 - p) 2^32))`` (the threshold of
``csrc/philox.h``).  One Philox call decides four adjacent elements of a row: tiles start at
multiples of 4 columns, so all four words of every call are used, and the counters are a row
and a column group, so no per-element 64-bit index feeds the generator.  Backward regenerates
the same keep-mask from the same seed; no mask is ever stored.  With ``p == 0`` no seed is drawn
(``seed`` is None) and the kernels are compiled without the dropout code (``DROPOUT=0``).

The threshold travels as an int32 kernel argument holding its 32 bits (``do_not_specialize``,
so every p runs the same compiled kernel); the scale ``1 / (1 - p)`` as two float32 arguments
(Triton passes Python floats as float32): its float32 rounding and the remainder, so float64
kernels rebuild it to ~1e-15.

Autotuning is keyed on the shape class, never on the exact row count (batch x sequence length
changes from call to call; re-tuning costs ~0.1 s per config and cannot run during CUDA-graph
capture): the channel count (elementwise) or N (GEMM), the row count rounded up to a power of
two (``bucket``), and the kernel's constexpr flags.  ``tuning.warmup`` tunes ahead of capture.
"""
import functools
import os

import numpy as np
import torch
import torch.autograd.forward_ad as forward_ad
import triton
import triton.language as tl
from torch._library.triton import set_wrap_triton_enabled
from torch.library import wrap_triton

from ..dispatch import triton_interpreting as interpreting
from ..validation import as_dtype, math_dtype  # noqa: F401  (for the op files)


# --- block configs -------------------------------------------------------------------------

def elementwise_configs(reduction: bool = False):
    """(BLOCK_M rows x BLOCK_C channels) tiles for the elementwise kernels, from wide rows to a
    few channels (BLOCK_C a multiple of 4: see the dropout rule).  The column reductions
    (backward) also hold their accumulators and, for gelu, its derivative: they spread the
    tiles over 8 warps (4 elements a thread instead of 8), which keeps them within registers in
    float64 and below the 64-register mark in float32, and leave out the 1 x 1024 tile, whose
    one-row loop kept a float64 value in local memory (tests/test_gpu_compile.py).  The
    interpreter pays per program, not per element, so it gets one large tile."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_C": 256}, num_warps=4)]
    if reduction:
        shapes = ((4, 256, 8), (8, 128, 8), (16, 64, 8), (32, 32, 8), (256, 4, 8))
    else:
        shapes = ((1, 1024, 4), (4, 256, 4), (8, 128, 4), (16, 64, 4), (4, 1024, 8),
                  (32, 32, 4), (256, 4, 4))
    return [triton.Config({"BLOCK_M": m, "BLOCK_C": c}, num_warps=w) for m, c, w in shapes]


# GEMM tiles (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps) by operand dtype and by
# whether Triton can load the operands in 16-byte vectors (``gemm_operands_aligned``), largest
# first.  The accumulator lives in registers (BLOCK_M * BLOCK_N fp32, or fp64, values over
# 32 * num_warps threads) beside the operand fragments and the epilogue (gelu_tanh with dropout
# and the stored pre-activation needs the most).  Unaligned operands (an odd in_features, a
# sliced view) are loaded element by element, each with its own 64-bit address and held in
# registers through the pipeline, so only small tiles fit there.  Listed are only tiles whose
# every variant compiles without spilling for sm_80 and sm_90 with Triton 3.6 and 3.9
# (tests/test_gpu_compile.py); left out for spilling, among others: 128x256x64 (16-bit, up to
# 1.2 KiB), 128x64 (16-bit and fp32), 128x128 fp32, 64x64x32 fp64, and every tile above
# 64x64 for unaligned operands (up to 3 KiB).  Shared memory is checked per device at launch.
GEMM_TILES = {
    ("16-bit", True): ((128, 128, 32, 4, 8), (64, 128, 32, 4, 4), (64, 64, 32, 4, 4),
                       (64, 32, 32, 5, 2), (32, 64, 64, 4, 4)),
    ("16-bit", False): ((64, 64, 32, 4, 4), (32, 64, 64, 4, 4)),
    ("fp32", True): ((64, 128, 32, 4, 8), (64, 64, 32, 4, 4), (32, 64, 32, 5, 2)),
    ("fp32", False): ((64, 64, 32, 4, 4),),
    ("fp64", True): ((64, 64, 16, 4, 4), (32, 64, 32, 4, 4), (32, 32, 32, 4, 2)),
    ("fp64", False): ((32, 64, 32, 4, 4), (32, 32, 32, 4, 2)),
}


def gemm_tile_class(dtype: torch.dtype) -> str:
    return {torch.float64: "fp64", torch.float32: "fp32"}.get(dtype, "16-bit")


def _vector_aligned(t: torch.Tensor) -> bool:
    """A 2-D operand Triton loads in 16-byte vectors along its unit-stride dimension: that
    dimension's extent and the other stride are multiples of 16 elements and it starts 16-byte
    aligned (as Triton's runtime specialises arguments; storage offset, not data_ptr, so that
    fake tensors answer too)."""
    (rows, cols), (row_stride, col_stride) = t.shape, t.stride()
    if col_stride == 1:
        extent, other = cols, row_stride
    elif row_stride == 1:
        extent, other = rows, col_stride
    else:
        return False
    start = t.storage_offset() * t.element_size()
    return extent % 16 == 0 and other % 16 == 0 and start % 16 == 0


def gemm_operands_aligned(a: torch.Tensor, b: torch.Tensor) -> bool:
    return _vector_aligned(a) and _vector_aligned(b)


def _gemm_config(m, n, k, stages, warps):
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8},
                         num_stages=stages, num_warps=warps)


def gemm_configs():
    """Every tile of GEMM_TILES once; gemm_prune picks a launch's share of them."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8})]
    tiles = dict.fromkeys(t for group in GEMM_TILES.values() for t in group)
    return [_gemm_config(*t) for t in tiles]


def _config_tile(config):
    kw = config.kwargs
    return kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], config.num_stages, config.num_warps


def gemm_shared_bytes(tile, element_size: int) -> int:
    """Shared memory the software pipeline of a tile needs: num_stages buffers of an A and a B
    tile (an upper bound of what Triton allocates; checked by tests/test_gpu_compile.py)."""
    m, n, k, stages, _ = tile
    return stages * (m + n) * k * element_size


def select_gemm_configs(configs, dtype: torch.dtype, aligned: bool, shared_limit: int):
    """The configs a GEMM on ``dtype`` operands (vector-``aligned`` or not) may launch on a
    device with ``shared_limit`` bytes of shared memory per block: its tiles in GEMM_TILES
    (none that spill) that fit, in that order.  Never empty for an A100 (163 KiB) or H100
    (227 KiB); tests/test_gpu_compile.py checks both."""
    order = {tile: i for i, tile in enumerate(GEMM_TILES[gemm_tile_class(dtype), aligned])}
    size = torch.empty((), dtype=dtype).element_size()
    kept = [c for c in configs if _config_tile(c) in order
            and gemm_shared_bytes(_config_tile(c), size) <= shared_limit]
    return sorted(kept, key=lambda c: order[_config_tile(c)])


_SHARED_LIMIT = {}


def shared_limit(device: torch.device) -> int:
    """Shared memory per block (opt-in) of a CUDA device, in bytes."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SHARED_LIMIT:
        props = triton.runtime.driver.active.utils.get_device_properties(index)
        _SHARED_LIMIT[index] = props["max_shared_mem"]
    return _SHARED_LIMIT[index]


def gemm_prune(configs, named_args, **kwargs):
    """``early_config_prune`` of the GEMM: runs before any config is compiled or launched."""
    if interpreting():
        return configs
    a, b = named_args["a_ptr"], named_args["b_ptr"]
    return pinned(select_gemm_configs(configs, a.dtype, gemm_operands_aligned(a, b),
                                      shared_limit(a.device)))


# Which of the configs that suit a launch the autotuner may choose from: all of them (None), or
# only the i-th (the last where fewer suit).  REZERO_TRITON_CONFIG=0 pins the first: a test run
# then compiles one variant of each kernel instead of up to seven, and benchmarks none
# (./dev.sh gpu); tests/test_gpu.py checks every config against the first.  Read when a launch
# of a new shape class is tuned; a change applies to the classes tuned after it.
def _pinned_config():
    value = os.environ.get("REZERO_TRITON_CONFIG", "")
    if value and not value.isdigit():
        raise ValueError(f"REZERO_TRITON_CONFIG must be a config index (0, 1, ...), got {value!r}")
    return int(value) if value else None


PINNED_CONFIG = _pinned_config()


def pinned(configs):
    if PINNED_CONFIG is None or not configs:
        return configs
    return [configs[min(PINNED_CONFIG, len(configs) - 1)]]


def bucket(n: int) -> int:
    """The power of two >= n that autotuning keys a row count by.  A symbolic size (a
    torch.compile trace with dynamic shapes) passes through: rounding it would specialise the
    graph on it, and Inductor tunes the kernels it compiles itself."""
    if not isinstance(n, int):
        return n
    return 1 << (max(n, 1) - 1).bit_length()


def cdiv(a, b):
    """``ceil(a / b)`` for sizes, as ``triton.cdiv`` (a plain function: ``triton.cdiv`` is a
    constexpr function whose call costs microseconds of host time)."""
    return (a + b - 1) // b


# --- grids ---------------------------------------------------------------------------------
#
# CUDA allows 2^31 - 1 programs on grid axis 0 but only 65535 on axes 1 and 2, so every kernel
# runs a 1-D grid and splits the program id itself: a (rows, C) tensor of 2^31 elements in
# 32 x 32 tiles still needs only 2^21 programs.

MAX_PROGRAMS = 2**31 - 1


def elementwise_grid(M: int, C: int):
    """One program per (BLOCK_M x BLOCK_C) tile."""
    return lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(C, meta["BLOCK_C"]),)


def elementwise_prune(configs, named_args, **kwargs):
    """``early_config_prune`` of the elementwise kernels: tiles that would need more than
    MAX_PROGRAMS programs for the largest row count of the tuning bucket (a 1-row tensor of
    2^36 elements in 32 x 32 tiles) are left out; the 1 x 1024 or 256 x 4 tile fits every
    tensor up to 2^38 elements."""
    rows, C = named_args["M_BUCKET"], named_args["C"]
    reduction = "group_rows" in named_args

    def programs(config):
        kw = config.kwargs
        row_blocks = row_groups(rows) if reduction else cdiv(rows, kw["BLOCK_M"])
        return row_blocks * cdiv(C, kw["BLOCK_C"])

    return pinned([c for c in configs if programs(c) <= MAX_PROGRAMS])


# Column reductions (grad of alpha / bias) split the rows into groups: a program walks its
# group's rows for one block of columns and writes one fp32 (fp64) partial row, which torch sums
# in a fixed order (deterministic, no atomics).  Groups of ROWS_PER_GROUP rows keep the partials
# at 1/32 of the data while giving a GPU enough programs: 4096 x 2048 makes 128 groups, so 1024
# (BLOCK_C 256) to 8192 (BLOCK_C 32) programs for 132 SMs.
ROWS_PER_GROUP = 32
MAX_GROUPS = 1024


def row_groups(rows: int) -> int:
    """How many groups split the rows of a column reduction (independent of the tile config, so
    that the partial buffer can be allocated before the autotuner picks one)."""
    if interpreting():
        return max(1, min(cdiv(rows, 16), 2))
    return max(1, min(cdiv(rows, ROWS_PER_GROUP), MAX_GROUPS))


def partial_sums(groups: int, C: int, dtype: torch.dtype, device: torch.device,
                 launched: bool) -> torch.Tensor:
    """The (groups, C) partial sums of a column reduction: left for the kernel, which writes
    every one, or zeros where no kernel runs (no rows)."""
    return (torch.empty if launched else torch.zeros)((groups, C), dtype=dtype, device=device)


def reduction_grid(groups: int, C: int):
    """One program per (row group, BLOCK_C columns)."""
    return lambda meta: (groups * cdiv(C, meta["BLOCK_C"]),)


def gemm_grid(M: int, N: int):
    return lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)


# --- dropout arguments -----------------------------------------------------------------------

def new_seed(p: float, device: torch.device):
    """The dropout seed of one op call: None when there is no dropout."""
    if p == 0.0:
        return None
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


@functools.lru_cache(maxsize=64)
def dropout_args(p: float):
    """(threshold as the int32 with its bits, 1/(1-p) as float32 part, remainder)."""
    threshold = min(2**32 - 1, int((1.0 - p) * 2**32))
    scale = 1.0 / (1.0 - p)
    hi = float(np.float32(scale))
    return threshold - 2**32 if threshold >= 2**31 else threshold, hi, scale - hi


# --- launching and registration -------------------------------------------------------------

# Set by tools that list the kernel variants the ops launch (tests/aot_compile.py): each
# launch is handed to it as (kernel, grid, device, args, kwargs) instead of being run.
launch_observer = None


def launch(kernel, grid, device: torch.device, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)`` on ``device``.  Triton launches on the current CUDA
    device, whatever the tensors' device, so a tensor on cuda:1 while cuda:0 is current needs
    the guard (as CUDAGuard in csrc/cuda/binding.cpp)."""
    if launch_observer is not None:
        launch_observer(kernel, grid, device, args, kwargs)
        return
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            wrap_triton(kernel)[grid](*args, **kwargs)
    else:  # the common case, without the guard's host time
        wrap_triton(kernel)[grid](*args, **kwargs)


# the tensor types an eager call takes as they are (no subclass: fake, functional, DTensor, ...)
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def skip_launch(*tensors) -> bool:
    """True while an op is traced with fake tensors under the interpreter (the interpreter
    cannot run a kernel on them; on a GPU ``wrap_triton`` handles fake tensors itself)."""
    return any(type(t) not in _PLAIN and torch._subclasses.fake_tensor.is_fake(t)
               for t in tensors) and interpreting()


def only_wanted(grads, mask) -> tuple:
    """An autograd backward's gradients: None where ``mask`` (``ctx.needs_input_grad``) leaves
    one out (the backward ops return empty tensors there)."""
    return tuple(g if wanted else None for g, wanted in zip(grads, mask))


def empty_where_unwanted(grads, mask, like: torch.Tensor) -> tuple:
    """A backward op's outputs: an empty tensor (like ``like``) where its ``output_mask`` leaves
    one out (its schema returns tensors, never None)."""
    return tuple(g if wanted else like.new_empty(0) for g, wanted in zip(grads, mask))


# Eager calls skip torch.library.  A registered op's eager call goes through the dispatcher
# and torch.library's Python layers (argument normalisation, its autograd.Function, the
# redispatch), about 30 us of host time per call before the kernel launches, more than a small
# kernel takes on a GPU.  So an op called on plain tensors outside any tracing or transform runs
# its function directly, under an autograd.Function built from the same setup and backward; the
# registered op serves torch.compile, vmap, tensor subclasses and double backward.
def _plain_eager(args) -> bool:
    """No compile trace, and no tensor subclass (the caller has checked torch.func's
    transforms)."""
    return (not torch.compiler.is_compiling()
            and all(type(a) in _PLAIN for a in args if isinstance(a, torch.Tensor)))


def _check_differentiable_here(args) -> None:
    """torch.func's grad/vjp/jvp and forward-mode AD cannot differentiate through the ops (the
    registered op's error names neither the op nor a way out; dual tensors would lose their
    tangent silently): say so, as the compiled backends do.  vmap alone is fine."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    if any(i.key() in (TransformType.Grad, TransformType.Jvp)
           for i in retrieve_all_functorch_interpreters()):
        raise NotImplementedError("rezero_kernels: torch.func transforms that differentiate "
                                  "(grad, vjp, jvp, jacrev, ...) cannot run through the fused "
                                  "ops; use backend='torch' inside them")
    if any(isinstance(a, torch.Tensor) and forward_ad.unpack_dual(a).tangent is not None
           for a in args):
        raise NotImplementedError("rezero_kernels: forward-mode AD (dual tensors) is not "
                                  "implemented for the fused ops; use backend='torch' for it")


class Op:
    """``rezero_kernels_triton::<name>``, registered from ``fn``, and callable like it.

    Registered: on a GPU a ``triton_op``, whose kernels Inductor traces and compiles.  Under the
    interpreter ``wrap_triton`` cannot trace kernels, so the same function becomes an opaque
    ``custom_op`` with itself (launches skipped on fake tensors) as the fake kernel; its real
    kernel launches with ``wrap_triton`` off, as a ``triton_op``'s does (torch 2.11 cannot
    launch an interpreted kernel through the higher-order op).

    Called: plain eager tensors run ``fn`` itself, under ``function`` (an autograd.Function
    from the op's setup and backward) when a gradient is wanted; anything else runs the
    registered op.  A backward op has no autograd: it runs ``fn`` unless its inputs require
    grad (``create_graph=True``), where the registered op raises that double backward is not
    supported.  A forward op under torch.func's grad/jvp or with dual tensors raises."""

    def __init__(self, name: str, fn):
        qualname = f"rezero_kernels_triton::{name}"
        self.fn = fn
        self.function = None
        if interpreting():
            self.registered = torch.library.custom_op(
                qualname, self._run, mutates_args=(),
                schema=torch.library.infer_schema(fn, mutates_args=()))
            self.registered.register_fake(fn)
        else:
            self.registered = torch.library.triton_op(qualname, fn, mutates_args=())

    def register_autograd(self, backward, setup_context):
        self.registered.register_autograd(backward, setup_context=setup_context)
        run = self._run

        def forward(ctx, *args):
            out = run(*args)
            setup_context(ctx, args, out)
            return out

        self.function = type(f"{self.fn.__name__}_function", (torch.autograd.Function,),
                             {"forward": staticmethod(forward),
                              "backward": staticmethod(backward)})

    def _run(self, *args):
        # launches straight to Triton, as triton_op's own eager kernel does: with wrap_triton
        # enabled an eager launch goes through a higher-order op, which costs about 1 ms
        with set_wrap_triton_enabled(False):
            return self.fn(*args)

    def __call__(self, *args):
        transforms = torch._C._are_functorch_transforms_active()
        if self.function is not None and (transforms or forward_ad._current_level >= 0):
            _check_differentiable_here(args)
        if transforms or not _plain_eager(args):
            return self.registered(*args)
        if torch.is_grad_enabled() and any(
                a.requires_grad for a in args if isinstance(a, torch.Tensor)):
            return self.registered(*args) if self.function is None else self.function.apply(*args)
        return self._run(*args)


def define_op(name: str):
    """Decorator: ``fn`` as the op ``rezero_kernels_triton::<name>`` (see ``Op``)."""
    return lambda fn: Op(name, fn)


# --- in-kernel helpers -------------------------------------------------------------------

@triton.jit
def elementwise_tile(M, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's (BLOCK_M, BLOCK_C) tile of a row-major (M, C) tensor, on the 1-D grid of
    ``elementwise_grid`` (program = row tile * column blocks + column block): (rows, first
    column, columns, in-bounds mask, element offsets), 64-bit."""
    col_blocks = tl.cdiv(C, BLOCK_C)
    pid = tl.program_id(0)
    rows = (pid // col_blocks).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = (pid % col_blocks).to(tl.int64) * BLOCK_C
    cols = col0 + tl.arange(0, BLOCK_C)
    inside = (rows[:, None] < M) & (cols[None, :] < C)
    return rows, col0, cols, inside, rows[:, None] * C + cols[None, :]


@triton.jit
def to_math(v, FP64: tl.constexpr):
    """float32 math (float64 for float64 data)."""
    if FP64:
        v = v.to(tl.float64)
    else:
        v = v.to(tl.float32)
    return v


@triton.jit
def _halves(v):
    """(low, high) 32 bits of an integer tensor."""
    if tl.constexpr(v.dtype.primitive_bitwidth) > 32:
        lo = v.to(tl.uint32)
        hi = (v >> 32).to(tl.uint32)
    else:
        lo = v.to(tl.uint32, bitcast=True)
        hi = lo * 0
    return lo, hi


@triton.jit
def keep_mask(seed_ptr, rows, col0, threshold, BLOCK_C: tl.constexpr):
    """The keep-mask of the tile ``rows x [col0, col0 + BLOCK_C)`` (col0 % 4 == 0): one Philox
    call per 4 columns of a row, its words interleaved back into column order."""
    groups = col0 // 4 + tl.arange(0, BLOCK_C // 4)
    g_lo, g_hi = _halves(groups)
    r_lo, r_hi = _halves(rows)
    w0, w1, w2, w3 = tl.philox(tl.load(seed_ptr), g_lo[None, :], g_hi[None, :], r_lo[:, None],
                               r_hi[:, None])
    t = threshold.to(tl.uint32, bitcast=True)
    # join(join(w0, w2), join(w1, w3))[.., j, i] is word 2 j + i: row-major order is 0, 1, 2, 3
    keep = tl.join(tl.join(w0 < t, w2 < t), tl.join(w1 < t, w3 < t))
    return tl.reshape(keep, (rows.shape[0], BLOCK_C))


@triton.jit
def dropout(v, seed_ptr, rows, col0, threshold, scale, scale_lo, DROPOUT: tl.constexpr,
            FP64: tl.constexpr, BLOCK_C: tl.constexpr):
    """``v * scale`` where the keep-mask of the tile (rows, [col0, col0 + BLOCK_C)) is set, else
    0 (``DROPOUT=0``: just ``v * scale``, for callers whose input already carries the mask;
    scale is 1 when p == 0)."""
    if FP64:
        v = v * (tl.cast(scale, tl.float64) + tl.cast(scale_lo, tl.float64))
    else:
        v = v * scale
    if DROPOUT:
        v = tl.where(keep_mask(seed_ptr, rows, col0, threshold, BLOCK_C), v, 0.0)
    return v
