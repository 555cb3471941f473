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
    pytest.skip(f"the triton backend is not available: {rzk.dispatch._UNAVAILABLE['triton']} "
                "(TRITON_INTERPRET is read when rezero_kernels is first imported)",
                allow_module_level=True)
DEV = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"

F = rzk.functional
B = "triton"


OPCHECK_CASES = ["residual", "residual p=0", "residual_backward",
                 "residual_backward frozen alpha", "bias_act_dropout gelu",
                 "bias_act_dropout relu p=0", "bias_act_dropout_backward",
                 "bias_act_dropout_backward frozen bias", "linear_residual",
                 "linear_residual_backward", "linear_residual_backward frozen weight+alpha",
                 "linear_act gelu", "linear_act relu p=0", "linear_act_backward",
                 "linear_act_backward frozen bias", "gated_act_dropout silu",
                 "gated_act_dropout relu p=0", "gated_act_dropout_backward",
                 "gated_act_dropout_backward p=0"]


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
        "gated_act_dropout silu": (ops.gated_act_dropout, (r(7, 66), 4, 0.3, seed)),
        "gated_act_dropout relu p=0": (ops.gated_act_dropout, (r(2, 3, 34), 1, 0.0, None)),
        "gated_act_dropout_backward": (ops.gated_act_dropout_backward,
                                       (c(7, 33), c(7, 66), 2, 0.3, seed)),
        "gated_act_dropout_backward p=0": (ops.gated_act_dropout_backward,
                                           (c(2, 3, 17), c(2, 3, 34), 3, 0.0, None)),
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
    def f(x, fx, a, h, b, inp, w, bias, gate_up):
        y = F.rezero_residual(x, fx, a, 0.2, backend=B)
        z = F.bias_act_dropout(h, b, "gelu", 0.2, backend=B)
        u = F.rezero_linear(y, inp, w, bias, a, 0.2, backend=B)
        v = F.linear_bias_act_dropout(inp, w, bias, "gelu_tanh", 0.2, backend=B)
        s = F.gated_act_dropout(gate_up, "silu", 0.2, backend=B)
        return u.sum() + z.sum() + v.sum() + s.sum()

    torch.manual_seed(0)
    args = _every_op_args()
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


@pytest.fixture
def registered_calls(monkeypatch):
    """Names of the registered ops (``torch.library``) called, in order: the route that
    torch.compile, torch.func and double backward take, and eager calls must not."""
    from rezero_kernels.triton_ops import bias_act, fused_linear, gated_act, residual
    calls = []
    ops = [residual.residual, residual.residual_backward, bias_act.bias_act,
           bias_act.bias_act_backward, fused_linear.linear_residual,
           fused_linear.linear_residual_backward, fused_linear.linear_act,
           fused_linear.linear_act_backward, gated_act.gated_act, gated_act.gated_act_backward]
    for op in ops:
        def counted(*args, _registered=op.registered, _name=op.fn.__name__):
            calls.append(_name)
            return _registered(*args)
        monkeypatch.setattr(op, "registered", counted)
    return calls


def _every_op(args):
    x, fx, a, h, b, inp, w, bias, gate_up = args
    return (F.rezero_residual(x, fx, a, 0.2, backend=B).sum()
            + F.bias_act_dropout(h, b, "gelu", 0.2, backend=B).sum()
            + F.rezero_linear(x, inp, w, bias, a, 0.2, backend=B).sum()
            + F.linear_bias_act_dropout(inp, w, bias, "gelu_tanh", 0.2, backend=B).sum()
            + F.gated_act_dropout(gate_up, "silu", 0.2, backend=B).sum())


def _every_op_args(rows=5):
    """x, fx, alpha (per channel), h, bias, inp, weight, bias of the linear ops, gate_up."""
    return [torch.randn(s, device=DEV, requires_grad=True)
            for s in [(rows, 17), (rows, 17), (17,), (rows, 17), (17,), (rows, 33), (17, 33),
                      (17,), (rows, 34)]]


@pytest.fixture
def wrapping(monkeypatch):
    """Whether ``wrap_triton`` was enabled at each launch, in order."""
    from torch._library.triton import is_wrap_triton_enabled
    from rezero_kernels.triton_ops import common
    states = []

    def recording_wrap_triton(kernel):
        states.append(is_wrap_triton_enabled())
        return original(kernel)
    original = common.wrap_triton
    monkeypatch.setattr(common, "wrap_triton", recording_wrap_triton)
    return states


def test_eager_calls_skip_the_registered_ops(registered_calls, wrapping):
    """Plain tensors in eager mode run the ops' functions directly, forward and backward, with
    and without grad: the dispatcher and torch.library's Python layers cost ~30 us a call.  Their
    launches go straight to Triton, as triton_op's eager kernel does (with ``wrap_triton``
    enabled, an eager launch on a GPU goes through a higher-order op: about 1 ms)."""
    args = _every_op_args()
    torch.autograd.grad(_every_op(args), args)
    with torch.no_grad():
        _every_op(args)
    assert registered_calls == []
    assert len(wrapping) >= 15 and not any(wrapping), wrapping


def test_registered_ops_called_eagerly_launch_straight_to_triton(wrapping):
    """A registered op called on real tensors (vmap's per-sample fallback, a tensor subclass
    that unwraps to them) launches with ``wrap_triton`` off too: a triton_op's eager kernel
    does this itself, and under the interpreter the custom_op does it as well (torch 2.11
    cannot launch an interpreted kernel through the higher-order op: 'function' object has no
    attribute 'fn')."""
    from python_ref.activations import code
    from rezero_kernels.triton_ops import bias_act, fused_linear, gated_act, residual
    x, fx, a, h, b, inp, w, bias, gate_up = (t.detach() for t in _every_op_args())
    residual.residual.registered(x, fx, a, 0.0, None)
    bias_act.bias_act.registered(h, b, code("gelu"), 0.0, None)
    fused_linear.linear_residual.registered(x, inp, w, bias, a, 0.0, None)
    fused_linear.linear_act.registered(inp, w, bias, code("relu"), 0.0, None, 0)
    gated_act.gated_act.registered(gate_up, code("silu"), 0.0, None)
    assert len(wrapping) == 5 and not any(wrapping), wrapping


def test_compile_and_double_backward_take_the_registered_ops(registered_calls):
    """torch.compile traces the registered ops (test_compiles_with_fullgraph checks it computes
    what eager does); create_graph=True gives the backward ops inputs that require grad, and
    the registered backward op then raises instead of returning a gradient without a graph."""
    args = _every_op_args()
    torch.compile(_every_op, fullgraph=True, backend="aot_eager")(args)
    assert {"residual", "bias_act", "linear_residual", "linear_act",
            "gated_act"} <= set(registered_calls)
    registered_calls.clear()
    x, fx, a = args[:3]
    (grad_fx,) = torch.autograd.grad(F.rezero_residual(x, fx, a, 0.2, backend=B).sum(), (fx,),
                                     create_graph=True)
    assert registered_calls == ["residual_backward"]
    with pytest.raises(RuntimeError, match="no autograd formula"):
        torch.autograd.grad(grad_fx.sum(), (a,))


@pytest.mark.parametrize("rows", [5, 0])
def test_buffers_left_uninitialised_are_written_whole(rows, monkeypatch):
    """The ops allocate with torch.empty the outputs, partial sums and gradient products their
    kernels write in full.  With every such buffer poisoned with NaN, every output and gradient of
    every op still equals the run with fresh buffers, with rows and without (0 rows: no kernel
    runs, so the partial sums must be zeros)."""
    def run():
        torch.manual_seed(0)
        args = _every_op_args(rows)
        x, fx, a, h, b, inp, w, bias, gate_up = args
        outs = [F.rezero_residual(x, fx, a, 0.2, backend=B),
                F.rezero_residual(x, fx, a[:1], 0.0, backend=B),
                F.bias_act_dropout(h, b, "gelu", 0.2, backend=B),
                F.rezero_linear(x, inp, w, bias, a[:1], 0.2, backend=B),
                F.linear_bias_act_dropout(inp, w, bias, "relu", 0.0, backend=B),
                F.gated_act_dropout(gate_up, "gelu", 0.2, backend=B)]
        loss = sum((o * torch.linspace(-1, 1, o.numel(), device=DEV).view(o.shape)).sum()
                   for o in outs)
        return outs + list(torch.autograd.grad(loss, args))

    fresh = run()
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))
    for got, want in zip(run(), fresh):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
