"""What is particular to the Triton backend's registration: ``torch.library.opcheck`` of every op
and a ``torch.compile(fullgraph=True)`` trace.  Its parity with python_ref is in test_parity.py
(target ``triton-cpu`` here, ``triton-cuda`` on a GPU).

Without a GPU the kernels run on CPU tensors in Triton's interpreter, which must be switched on
before triton or rezero_kernels is first imported: tests/conftest.py sets TRITON_INTERPRET=1 (the
line below covers running this file on its own).  On a GPU the same tests run on CUDA tensors.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import rezero_kernels as rzk  # noqa: E402

if not rzk.backends()["triton"]:
    pytest.skip("the triton backend needs a GPU, or TRITON_INTERPRET=1 set before rezero_kernels "
                "is first imported", allow_module_level=True)
DEV = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"

F = rzk.functional
B = "triton"


OPCHECK_CASES = ["residual", "residual p=0", "residual_backward",
                 "residual_backward frozen alpha", "bias_act_dropout gelu",
                 "bias_act_dropout relu p=0", "bias_act_dropout_backward",
                 "bias_act_dropout_backward frozen bias", "linear_residual",
                 "linear_residual_backward", "linear_residual_backward frozen weight+alpha",
                 "linear_act gelu", "linear_act relu p=0", "linear_act_backward",
                 "linear_act_backward frozen bias"]


def _opcheck_case(name):
    def r(*shape, grad=True):
        return torch.randn(*shape, device=DEV, requires_grad=grad)

    def c(*shape):  # backward ops are not differentiable themselves
        return r(*shape, grad=False)

    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=DEV)
    ops = torch.ops.rezero_kernels_triton
    return {
        "residual": (ops.residual, (r(3, 5, 33), r(3, 5, 33), r(33), 0.3, seed)),
        "residual p=0": (ops.residual, (r(3, 5, 33), r(3, 5, 33), r(1), 0.0, None)),
        "residual_backward": (ops.residual_backward,
                              (c(3, 5, 33), c(3, 5, 33), c(1), 0.3, seed, True)),
        "residual_backward frozen alpha": (ops.residual_backward,
                                           (c(3, 5, 33), c(3, 5, 33), c(1), 0.3, seed, False)),
        "bias_act_dropout gelu": (ops.bias_act_dropout, (r(7, 33), r(33), 2, 0.3, seed)),
        "bias_act_dropout relu p=0": (ops.bias_act_dropout, (r(7, 33), r(33), 1, 0.0, None)),
        "bias_act_dropout_backward": (ops.bias_act_dropout_backward,
                                      (c(7, 33), c(7, 33), c(33), 3, 0.3, seed, True)),
        "bias_act_dropout_backward frozen bias": (ops.bias_act_dropout_backward,
                                                  (c(7, 33), c(7, 33), c(33), 3, 0.3, seed,
                                                   False)),
        "linear_residual": (ops.linear_residual,
                            (r(2, 9, 17), r(2, 9, 33), r(17, 33), r(17), r(17), 0.3, seed)),
        "linear_residual_backward": (ops.linear_residual_backward,
                                     (c(2, 9, 17), c(2, 9, 33), c(17, 33), c(17), c(1), 0.3, seed,
                                      [True] * 4)),
        "linear_residual_backward frozen weight+alpha": (
            ops.linear_residual_backward,
            (c(2, 9, 17), c(2, 9, 33), c(17, 33), c(17), c(1), 0.3, seed,
             [True, False, True, False])),
        "linear_act gelu": (ops.linear_act, (r(2, 9, 33), r(17, 33), r(17), 2, 0.3, seed, 1)),
        "linear_act relu p=0": (ops.linear_act, (r(2, 9, 33), r(17, 33), r(17), 1, 0.0, None, 0)),
        "linear_act_backward": (ops.linear_act_backward,
                                (c(2, 9, 17), c(2, 9, 33), c(17, 33), c(2, 9, 17), 3, 0.3, seed,
                                 [True] * 3)),
        "linear_act_backward frozen bias": (ops.linear_act_backward,
                                            (c(2, 9, 17), c(2, 9, 33), c(17, 33), c(2, 9, 17), 3,
                                             0.3, seed, [True, True, False])),
    }[name]


@pytest.mark.parametrize("name", OPCHECK_CASES)
def test_opcheck(name):
    """Schema, autograd registration, fake (meta) kernel and AOT dispatch of every op.  Under the
    interpreter the ops are registered as opaque custom ops (see common.define_op); on a GPU they
    are triton_ops and this checks the traced-kernel path."""
    op, args = _opcheck_case(name)
    torch.library.opcheck(op, args)


def test_compiles_with_fullgraph():
    """Dynamo traces the whole backend (seed draw, ops, autograd) without a graph break; the
    compiled run reproduces eager, mask included ("aot_eager": Inductor's own RNG would draw a
    different seed unless torch._inductor.config.fallback_random is set)."""
    def f(x, fx, a, h, b, inp, w, bias):
        y = F.rezero_residual(x, fx, a, 0.2, backend=B)
        z = F.bias_act_dropout(h, b, "gelu", 0.2, backend=B)
        u = F.rezero_linear(y, inp, w, bias, a, 0.2, backend=B)
        v = F.linear_bias_act_dropout(inp, w, bias, "gelu_tanh", 0.2, backend=B)
        return u.sum() + z.sum() + v.sum()

    torch.manual_seed(0)
    args = [torch.randn(s, device=DEV, requires_grad=True)
            for s in [(5, 17), (5, 17), (17,), (5, 17), (17,), (5, 33), (17, 33), (17,)]]
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, f):
        torch.manual_seed(3)
        out = fn(*args)
        results.append([out, *torch.autograd.grad(out, args)])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


def test_mask_follows_the_documented_rule():
    """triton_ops/common.py: element (r, c) of the (rows, C) output is kept where word c % 4 of
    Philox4x32-10(key = seed, counter = (lo(c/4), hi(c/4), lo(r), hi(r))) is below
    min(2^32 - 1, floor((1 - p) 2^32)): one call per 4 columns, all four words used."""
    from test_dropout import philox4x32_10
    import numpy as np

    p, rows, cols = 0.3, 9, 70
    torch.manual_seed(5)
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
    out = torch.ops.rezero_kernels_triton.residual(
        torch.zeros(rows, cols, device=DEV), torch.ones(rows, cols, device=DEV),
        torch.ones(1, device=DEV), p, seed.to(DEV)).cpu()
    r, c = (a.ravel().astype(np.uint64) for a in np.meshgrid(np.arange(rows), np.arange(cols),
                                                              indexing="ij"))
    group, low = c >> np.uint64(2), np.uint64(0xFFFFFFFF)
    counters = np.stack([group & low, group >> np.uint64(32), r & low, r >> np.uint64(32)], 1)
    words = philox4x32_10(counters, int(seed))[np.arange(rows * cols), (c % 4).astype(np.int64)]
    expected = words < min(2**32 - 1, int((1 - p) * 2**32))
    assert torch.equal(out != 0, torch.from_numpy(expected).reshape(rows, cols))
