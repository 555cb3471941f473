"""Bad input gets an exception naming the problem; backend selection is explicit and honest."""
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import rezero_kernels as rzk
from rezero_kernels import dispatch

F = rzk.functional
x, fx = torch.randn(4, 8), torch.randn(4, 8)
a1 = torch.ones(1)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: F.rezero_residual(x, fx[:, :7], a1), ValueError, "same shape"),
    (lambda: F.rezero_residual(x, fx, torch.ones(3)), ValueError, r"alpha must have shape \(1,\) or \(8,\)"),
    (lambda: F.rezero_residual(x, fx, a1, 1.0), ValueError, r"dropout probability must be in \[0, 1\)"),
    (lambda: F.rezero_residual(x, fx, a1, -0.1), ValueError, "dropout probability"),
    (lambda: F.rezero_residual(x, fx, a1, "0.1"), TypeError, "dropout probability must be a float"),
    (lambda: F.rezero_residual(x.long(), fx, a1), TypeError, "x must be a floating-point"),
    (lambda: F.rezero_residual(x.numpy(), fx, a1), TypeError, "x must be a torch.Tensor"),
    (lambda: F.rezero_residual(x, fx, a1, backend="magic"), ValueError, "unknown backend 'magic'"),
    (lambda: F.rezero_residual(x, fx.to("meta"), a1), RuntimeError, "one device"),
    (lambda: F.bias_act_dropout(x, torch.ones(8), "swish"), ValueError, "unknown activation 'swish'"),
    (lambda: F.bias_act_dropout(x, torch.ones(7)), ValueError, r"bias must have shape \(8,\)"),
    (lambda: F.bias_act_dropout(torch.tensor(1.0), torch.ones(1)), ValueError, "at least one dimension"),
    (lambda: F.rezero_linear(x, torch.randn(4, 5), torch.randn(8, 6), None, a1), ValueError, "in_features"),
    (lambda: F.rezero_linear(x, torch.randn(4, 5), torch.randn(8, 5, 1), None, a1), ValueError, "2-D"),
    (lambda: F.rezero_linear(torch.randn(3, 8), torch.randn(4, 5), torch.randn(8, 5), None, a1),
     ValueError, "x must have shape"),
    (lambda: F.linear_bias_act_dropout(x, torch.randn(3, 5), None), ValueError, "in_features"),
])
def test_bad_input_is_named(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_backends_reports_three_bools():
    status = rzk.backends()
    assert set(status) == {"cpu", "cuda", "triton"} and all(isinstance(v, bool) for v in status.values())


def test_readme_backend_table_is_the_registry():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert dispatch.readme_table() in readme


@pytest.mark.parametrize("make", [lambda b: rzk.ReZero(torch.nn.Identity(), backend=b),
                                  lambda b: rzk.RZTXEncoderLayer(8, 2, 16, backend=b),
                                  lambda b: rzk.blocks.ReZeroFCBlock(4, backend=b),
                                  lambda b: rzk.blocks.ReZeroBasicBlock(4, 4, backend=b)])
def test_modules_check_backend_names_at_construction(make):
    with pytest.raises(ValueError, match="unknown backend 'cuda:0'; expected 'auto' or one of"):
        make("cuda:0")


def test_auto_picks_compiled_cpu_when_built():
    expected = "cpu" if rzk.backends()["cpu"] else "torch"
    assert dispatch.select("auto", torch.device("cpu")) == expected


def test_explicit_unavailable_backend_is_an_error():
    if not rzk.backends()["cuda"]:
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
            F.rezero_residual(x, fx, a1, backend="cuda")
    if rzk.backends()["cpu"]:
        with pytest.raises(ValueError, match="cannot run on meta tensors"):
            dispatch.select("cpu", torch.device("meta"))


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setitem(dispatch._IMPLEMENTATIONS, "cpu", None)
    monkeypatch.setattr(dispatch, "_FAST_PATHS", {})
    dispatch._warn_fallback.cache_clear()
    with pytest.warns(RuntimeWarning, match="pip install --no-build-isolation"):
        out = F.rezero_residual(x, fx, a1)
    torch.testing.assert_close(out, x + fx)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F.rezero_residual(x, fx, a1)  # warned once only
    with pytest.raises(RuntimeError, match="backend 'cpu' is not available"):
        F.rezero_residual(x, fx, a1, backend="cpu")
    dispatch._warn_fallback.cache_clear()


@pytest.mark.parametrize("triton, numpy, usable", [
    ("3.6.0", "2.4.1", False), ("3.6.0", "2.3.5", True), ("3.7.0", "2.4.1", True),
    ("3.9.0", "2.4.6", True)])
def test_triton_interpreter_that_cannot_run_with_this_numpy_says_so(monkeypatch, triton, numpy,
                                                                     usable):
    """triton < 3.7's interpreter takes loop bounds with int() of a 1-element array, an error since
    numpy 2.4: the backend is then unavailable with that reason, not 900 failures deep inside
    the interpreter."""
    import importlib.metadata
    versions = {"triton": triton, "numpy": numpy}
    monkeypatch.setattr(importlib.metadata, "version", versions.__getitem__)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    why = dispatch._triton_missing()
    if usable:
        assert why is None
    else:
        assert why == ("the interpreter of triton 3.6.0 cannot run with numpy 2.4.1: use "
                       "numpy<2.4 or triton>=3.7")


@pytest.mark.skipif(rzk.backends()["cuda"] or not rzk.backends()["triton"],
                    reason="needs the triton backend without the CUDA kernels")
def test_auto_passing_over_the_cuda_backend_warns_once():
    """CUDA tensors without the CUDA kernels run on triton, which measured slower on an H100: one
    warning that says why and how to build them, not a silent choice (on a CPU machine the
    interpreter stands in for the GPU's triton)."""
    dispatch._warn_passed_over.cache_clear()
    with pytest.warns(RuntimeWarning, match="runs cuda tensors on 'triton'.*'cuda': .*nvcc"):
        assert dispatch.select("auto", torch.device("cuda")) == "triton"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.select("auto", torch.device("cuda")) == "triton"  # warned once only
    dispatch._warn_passed_over.cache_clear()


def test_unbuilt_checkout_imports_and_falls_back(tmp_path):
    """A source checkout that was never built imports, reports cpu=False, warns once on "auto"
    saying how to build, and refuses an explicit backend="cpu"."""
    script = """
import sys, warnings
sys.modules["rezero_kernels._C"] = None  # as if the extension was never built
import torch, rezero_kernels as rzk
assert rzk.backends()["cpu"] is False, rzk.backends()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    rzk.functional.rezero_residual(torch.ones(2), torch.ones(2), torch.ones(1))
assert any("pip install --no-build-isolation" in str(w.message) for w in caught), caught
try:
    rzk.functional.rezero_residual(torch.ones(2), torch.ones(2), torch.ones(1), backend="cpu")
except RuntimeError as exc:
    assert "not available" in str(exc)
else:
    raise AssertionError("backend='cpu' without the extension must raise")
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


FUSED_ON_CPU = [pytest.param(b, marks=pytest.mark.skipif(not rzk.backends()[b],
                                                         reason=f"backend {b!r} not available"))
                for b in ("cpu", "triton")]  # triton: the interpreter (tests/conftest.py)


@pytest.mark.parametrize("backend", FUSED_ON_CPU)
@pytest.mark.parametrize("transform", ["grad", "vjp", "jvp"])
def test_torch_func_transforms_name_the_way_out(transform, backend):
    """torch.func cannot differentiate through the fused ops' autograd (the compiled ops' C++
    nodes, the Triton ops' autograd.Function): a clear error that names rezero_kernels and
    backend='torch', which works there.  vmap alone works."""
    x, fx, a = torch.randn(4, 8), torch.randn(4, 8), torch.ones(1)

    def f(fx, backend=backend):
        return F.rezero_residual(x, fx, a, 0.0, backend=backend).sum()
    run = {"grad": lambda fn: torch.func.grad(fn)(fx),
           "vjp": lambda fn: torch.func.vjp(fn, fx)[1](torch.tensor(1.0))[0],
           "jvp": lambda fn: torch.func.jvp(fn, (fx,), (torch.ones(4, 8),))[1]}[transform]
    with pytest.raises(NotImplementedError, match="rezero_kernels.*backend='torch'"):
        run(f)
    want = torch.tensor(32.0) if transform == "jvp" else torch.ones(4, 8)
    torch.testing.assert_close(run(lambda fx: f(fx, "torch")), want)
    torch.testing.assert_close(torch.func.vmap(f)(fx.expand(3, 4, 8)), (x + fx).sum().expand(3))


@pytest.mark.parametrize("backend", FUSED_ON_CPU)
def test_forward_mode_ad_names_the_way_out(backend):
    """Dual tensors (forward-mode AD) cannot go through the fused ops: a clear error, not a
    missing tangent; backend='torch' computes it."""
    import torch.autograd.forward_ad as fwAD
    x, fx, a = torch.randn(4, 8), torch.randn(4, 8), torch.full((1,), 0.5)
    with fwAD.dual_level():
        dual = fwAD.make_dual(fx, torch.ones(4, 8))
        with pytest.raises(NotImplementedError, match="forward-mode AD.*backend='torch'"):
            F.rezero_residual(x, dual, a, 0.0, backend=backend)
        tangent = fwAD.unpack_dual(F.rezero_residual(x, dual, a, 0.0, backend="torch")).tangent
    torch.testing.assert_close(tangent, torch.full((4, 8), 0.5))


@pytest.mark.skipif(not rzk.backends()["cpu"], reason="compiled extension not built")
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_editing_a_kept_tensor_in_place_makes_backward_raise(activation):
    """bias_act_dropout keeps its output (relu) or its input h (other activations) for backward
    (README, "What is kept for backward"); changing that tensor in place after forward makes
    backward raise, never return a wrong gradient."""
    base, bias = torch.randn(4, 8, requires_grad=True), torch.zeros(8, requires_grad=True)
    h = base * 1
    y = F.bias_act_dropout(h, bias, activation, 0.1)
    with torch.no_grad():
        (y if activation == "relu" else h).add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad((y * 1).sum(), base)


@pytest.mark.parametrize("backend", FUSED_ON_CPU)
def test_dropout_under_vmap_follows_its_randomness_mode(backend):
    """torch.func.vmap's randomness: "error" (its default) raises as eager dropout does;
    "different" raises (the fused ops draw one seed per call, so every batch element would get
    one mask); "same" gives every batch element the same mask."""
    xs, fxs, a = torch.zeros(3, 4, 8), torch.ones(3, 4, 8), torch.ones(1)

    def f(x, fx):
        return F.rezero_residual(x, fx, a, 0.5, backend=backend)
    with pytest.raises(RuntimeError, match="randomness error mode"):
        torch.func.vmap(f)(xs, fxs)
    with pytest.raises(NotImplementedError, match="randomness='different'"):
        torch.func.vmap(f, randomness="different")(xs, fxs)
    same = torch.func.vmap(f, randomness="same")(xs, fxs)
    assert torch.equal(same[0], same[1]) and torch.equal(same[0], same[2])
    assert 0 < (same[0] == 0).float().mean() < 1
    different = torch.func.vmap(lambda x, fx: F.rezero_residual(x, fx, a, 0.5, backend="torch"),
                                randomness="different")(xs, fxs)
    assert not torch.equal(different[0], different[1])  # eager's, for comparison


@pytest.mark.parametrize("backend", FUSED_ON_CPU + ["torch"])
def test_zero_dim_residual_broadcasts_like_eager(backend):
    """0-dim x and fx with a (1,) gate: eager's x + alpha * fx has shape (1,); a 0-dim or
    Python-number gate keeps the result 0-dim."""
    x, fx = torch.tensor(1.0), torch.tensor(2.0)
    for alpha in (torch.full((1,), 0.5), torch.tensor(0.5), 0.5):
        want = x + alpha * fx
        got = F.rezero_residual(x, fx, alpha, backend=backend)
        assert got.shape == want.shape, (alpha, got.shape, want.shape)
        torch.testing.assert_close(got, want)


def test_transformers_is_optional():
    """The package imports without HF transformers; the integration says how to get it."""
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import rezero_kernels\n"
            "try:\n"
            "    import rezero_kernels.integrations.transformers\n"
            "except ImportError as e:\n"
            "    print('ImportError:', e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "needs HF transformers: pip install transformers" in res.stdout, res.stdout
