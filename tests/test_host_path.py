"""The host side of the compiled backend: canonical inputs take the one-call C++ path, the hot
path never synchronises or reads a tensor on the host, no seed is drawn without dropout, and
gradients nobody asked for cost nothing (a frozen weight skips its GEMM).  Speed itself is
measured by the benchmark (``host/...`` and ``fc/...`` cases), not here."""
import pytest
import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

import rezero_kernels as rzk
from rezero_kernels import compiled_ops, dispatch

pytestmark = pytest.mark.skipif(not rzk.backends()["cpu"], reason="compiled extension not built")
F = rzk.functional


def _aten_calls(fn):
    """{aten op name: count} of what fn runs on the host."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts = {}
    for e in prof.events():
        counts[e.name] = counts.get(e.name, 0) + 1
    return counts


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        rzk.RZTXEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True, alpha_init=0.1),
        rzk.blocks.ReZeroFCBlock(32, alpha_init=0.1),
        rzk.ReZero(nn.Linear(32, 32), alpha_init=0.1, dropout=0.1))


def test_canonical_inputs_take_the_compiled_entry_points(monkeypatch):
    """With the general path of the compiled backend disabled, the layers still run: every op of
    a training step went through rezero_kernels._C."""
    model = _model()
    for name in ("rezero_residual", "bias_act_dropout", "rezero_linear", "linear_bias_act_dropout",
                 "rezero_fc"):
        monkeypatch.setattr(compiled_ops, name, None)
    x = torch.randn(2, 5, 32)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert dispatch.fast_path("auto", x) is not None and dispatch.fast_path("torch", x) is None


def test_training_step_reads_nothing_back_to_the_host(monkeypatch):
    """No .item(), bool() or other host read of a tensor anywhere in forward and backward
    (on a GPU each would synchronise with the device)."""
    model = _model()
    x = torch.randn(2, 5, 32)
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail(".item() on the hot path"))
    calls = _aten_calls(lambda: model(x).sum().backward())
    assert "aten::_local_scalar_dense" not in calls and "aten::item" not in calls, calls


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_one_seed_per_op_with_dropout_and_none_without(p):
    """A training step of one op draws one seed (two numbers of the generator) with dropout and
    none without: no seed tensor is even allocated then."""
    x, fx = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    a = torch.ones(1, requires_grad=True)
    torch.manual_seed(0)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        torch.autograd.grad(F.rezero_residual(x, fx, a, p).sum(), fx)
    after = torch.rand(3)
    seeds = [e.input_shapes[-1] for e in prof.events() if e.name == "rezero_kernels::residual"]
    assert seeds == [[2] if p else []]
    torch.manual_seed(0)
    if p:
        torch.randint(0, 2**62, (2,))
    assert torch.equal(after, torch.rand(3))


def test_the_entry_points_draw_the_seed_torch_randint_draws():
    """On CPU the entry points draw the seed from the generator without torch.randint's dispatch:
    the same values and the same generator state afterwards, so the compiled entry points and
    the general path (compiled_ops.new_seed) give one mask for one torch.manual_seed."""
    from rezero_kernels import _C
    like = torch.empty(3)
    for s in (0, 1, 2**40 + 7):
        torch.manual_seed(s)
        ours = [_C.new_seed(0.1, like) for _ in range(3)] + [torch.rand(2)]
        torch.manual_seed(s)
        theirs = [torch.randint(0, 2**62, (2,)) for _ in range(3)] + [torch.rand(2)]
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b)
    assert _C.new_seed(0.0, like) is None  # no tensor at all without dropout


@pytest.mark.parametrize("rows", [6, 40])
@pytest.mark.parametrize("frozen", ["weight", "inp", "weight+alpha", "inp+alpha", "nothing"])
def test_frozen_inputs_skip_their_gemms(frozen, rows):
    """rezero_linear's backward (csrc/linear_residual.cpp) runs one GEMM per gradient it must
    produce.  Many rows: grad_inp needs dy @ W, grad_weight and grad_alpha need G = dy^T @ inp.
    Few rows (6 x 8 outputs x 5 inputs, scalar alpha): grad_weight needs dy^T @ inp, grad_inp
    and grad_alpha need H = dy @ W."""
    torch.manual_seed(0)
    x = torch.randn(rows, 8, requires_grad=True)
    inp = torch.randn(rows, 5, requires_grad="inp" not in frozen)
    w = torch.randn(8, 5, requires_grad="weight" not in frozen)
    b, a = torch.randn(8, requires_grad=True), torch.randn(1, requires_grad="alpha" not in frozen)
    out = F.rezero_linear(x, inp, w, b, a, 0.1)
    leaves = [t for t in (x, inp, w, b, a) if t.requires_grad]
    calls = _aten_calls(lambda: torch.autograd.grad(out.sum(), leaves))
    if rows * (8 + 2 * 5) < 3 * 8 * 5:
        want = int(w.requires_grad) + int(inp.requires_grad or a.requires_grad)
    else:
        want = int(inp.requires_grad) + int(w.requires_grad or a.requires_grad)
    assert calls.get("aten::mm", 0) == want, calls


@pytest.mark.parametrize("frozen", ["weight", "x", "weight+bias", "nothing"])
def test_rezero_fc_backward_runs_only_the_gemms_it_needs(frozen):
    """grad_x needs grad_F @ W (an addmm that also adds grad itself), grad_weight grad_F^T @ x."""
    torch.manual_seed(0)
    x = torch.randn(6, 8, requires_grad="x" not in frozen)
    w = torch.randn(8, 8, requires_grad="weight" not in frozen)
    b, a = torch.randn(8, requires_grad="bias" not in frozen), torch.randn(1, requires_grad=True)
    out = F.rezero_fc(x * 1 if x.requires_grad else x, w, b, a, "gelu", 0.1)
    leaves = [t for t in (x, w, b, a) if t.requires_grad]
    calls = _aten_calls(lambda: torch.autograd.grad(out.sum(), leaves))
    assert calls.get("aten::addmm", 0) == int(x.requires_grad), calls
    assert calls.get("aten::mm", 0) == int(w.requires_grad), calls


def _backward_masks(fn):
    """{backward op name: [output_mask of each call]} of what fn runs."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    masks = {}
    for e in prof.events():
        if e.name.startswith("rezero_kernels::") and e.name.endswith("_backward"):
            masks.setdefault(e.name.split("::")[1], []).append(e.concrete_inputs[-1])
    return masks


@pytest.mark.parametrize("alpha_frozen", [False, True])
@pytest.mark.parametrize("fx_frozen", [False, True])
def test_a_frozen_gate_skips_its_reduction(alpha_frozen, fx_frozen):
    """grad_alpha (a reduction over every element that also reads fx) is asked of the kernel
    only when alpha requires grad."""
    x = torch.randn(4, 8, requires_grad=True)
    fx = torch.randn(4, 8, requires_grad=not fx_frozen)
    a = torch.ones(8, requires_grad=not alpha_frozen)
    leaves = [t for t in (x, fx, a) if t.requires_grad]
    masks = _backward_masks(
        lambda: torch.autograd.grad(F.rezero_residual(x, fx, a, 0.1).sum(), leaves))
    if fx_frozen and alpha_frozen:
        assert "residual_backward" not in masks  # grad_x is grad itself: no kernel at all
    else:
        assert masks["residual_backward"] == [[not fx_frozen, not alpha_frozen]]


@pytest.mark.parametrize("bias", ["trained", "frozen", "none"])
def test_a_frozen_or_absent_bias_skips_its_column_sums(bias):
    """bias_act_dropout and rezero_fc ask for the bias's column sums only when it trains (and
    rezero_fc for grad_alpha only when alpha trains); a missing bias is passed as None, not as
    a tensor of zeros."""
    trained = bias == "trained"
    h = torch.randn(4, 8, requires_grad=True)
    b = None if bias == "none" else torch.randn(8, requires_grad=trained)
    extra = [b] if trained else []
    masks = _backward_masks(
        lambda: torch.autograd.grad(F.bias_act_dropout(h, b, "gelu", 0.1).sum(), [h, *extra]))
    assert masks["bias_act_dropout_backward"] == [[True, trained]]
    w, a = torch.randn(8, 8, requires_grad=True), torch.ones(1)  # alpha frozen
    calls = _aten_calls(lambda: F.rezero_fc(h, w, b, a, "gelu", 0.1))
    assert "aten::zeros" not in calls, calls  # no zero bias is made
    masks = _backward_masks(lambda: torch.autograd.grad(
        F.rezero_fc(h, w, b, a, "gelu", 0.1).sum(), [h, w, *extra]))
    assert masks["rezero_fc_backward"] == [[True, True, trained, False]]
    assert masks["residual_backward"] == [[True, False]]
    assert masks["bias_act_dropout_backward"] == [[True, trained]]
