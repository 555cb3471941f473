"""Checking a backend's op against ``python_ref``: forward and every gradient.

The reference runs in float64 on the very values the backend gets (the inputs and grad_output
rounded to the tested dtype), with the backend's own dropout mask (recovered by ``probe_mask``),
so what is measured is the error of the computation, not the rounding of the inputs, which every
implementation shares (and which eager's own rounding errors can cancel by chance).
float32/float64 results must match it tightly.  For bfloat16/float16 the
tolerance is argued from eager PyTorch: the backend's error against the float64 reference may be
at most ``LOW_PRECISION_FACTOR`` times the error of ``python_ref`` run eagerly in the same dtype,
plus one unit in the last place of the largest value (so an eager result that happens to be
exact does not demand exactness).
"""
from __future__ import annotations

import torch

import python_ref
import rezero_kernels as rzk

LOW_PRECISION_FACTOR = 2.0
TIGHT = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-5)}


def probe_mask(shape, p, seed, backend, device="cpu"):
    """The keep-mask a backend's op draws for an output of ``shape`` after ``manual_seed(seed)``
    (every op draws its dropout seed the same way, and drops by output element index)."""
    torch.manual_seed(seed)
    ones = torch.ones(shape, dtype=torch.float32, device=device)
    out = rzk.functional.rezero_residual(torch.zeros_like(ones), ones,
                                         torch.ones(1, device=device), p, backend=backend)
    return out != 0


def run(fn, inputs, grad_out):
    """fn(*inputs) and the gradients of <fn, grad_out> with respect to every input."""
    leaves = [t.detach().requires_grad_(True) for t in inputs]  # keeps the strides
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return [out.detach()] + [g.detach() for g in grads]


def non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values laid out with strides (every other element of a wider tensor)."""
    wide = torch.empty(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def assert_parity(kernel_fn, ref_fn, inputs, grad_out, dtype, contiguous=True, names=None):
    """kernel_fn and ref_fn take the same positional tensors; inputs are float64 masters."""
    cast = [t.to(dtype) for t in inputs]
    ref = run(ref_fn, [t.double() for t in cast], grad_out.to(dtype).double())
    if not contiguous:
        cast = [non_contiguous(t) if t.dim() >= 2 else t for t in cast]
        assert not any(t.is_contiguous() for t in cast if t.dim() >= 2 and t.shape[-1] > 1)
    got = run(kernel_fn, cast, grad_out.to(dtype))
    names = names or [f"input {i}" for i in range(len(inputs))]
    labels = ["output"] + [f"grad of {n}" for n in names]
    check_results(labels, got, ref, dtype, lambda: run(ref_fn, cast, grad_out.to(dtype)))


def check_results(labels, got, ref, dtype, eager):
    """Each of ``got`` against its float64 ``ref``: tightly for float32/64; for bfloat16/float16
    within LOW_PRECISION_FACTOR x the error of ``eager()`` (python_ref run in ``dtype``)."""
    if dtype in TIGHT:
        for label, g, r in zip(labels, got, ref):
            torch.testing.assert_close(g.double(), r, **TIGHT[dtype], msg=lambda m: f"{label}: {m}")
        return
    ulp = torch.finfo(dtype).eps
    for label, g, e, r in zip(labels, got, eager(), ref):
        err_kernel = (g.double() - r).abs().max().item()
        err_eager = (e.double() - r).abs().max().item()
        bound = LOW_PRECISION_FACTOR * err_eager + ulp * r.abs().max().item()
        assert err_kernel <= bound, (f"{label}: {dtype} kernel error {err_kernel:.3g} exceeds "
                                     f"{LOW_PRECISION_FACTOR} x eager error {err_eager:.3g} + 1 ulp")


def reference(op_name, mask):
    """python_ref's op with the given mask (None: no dropout)."""
    op = getattr(python_ref, op_name)
    return lambda *args, **kw: op(*args, **kw, mask=mask)
