"""Every fused backend on every device it serves, against python_ref: one suite.

A target is a (backend, device) pair (targets.py: cpu-cpu, triton-cpu in Triton's interpreter,
triton-cuda, cuda-cuda); one that cannot run here is collected and skipped with the reason, so a
CPU machine and a GPU machine run the very same tests.

Checked for each op: the output and every gradient across dtypes, odd shapes, non-contiguous
inputs, zero/scalar/per-channel alpha, dropout on and off, with the kernel's own mask recovered
(``probe_mask``); dtype promotion; dropout statistics, one mask rule for all ops of a backend,
the forward mask reused by backward, reproducibility; deterministic reductions; gradients only
for the inputs that need them.  Tolerances are ``parity.check_results``'s: float64/float32
tightly against python_ref in float64; bfloat16/float16 within twice the error of python_ref run
eagerly in that dtype, plus one ulp of the largest value.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import python_ref
import rezero_kernels as rzk
from parity import LOW_PRECISION_FACTOR, assert_parity, probe_mask, reference, run
from targets import target  # noqa: F401  (the fixture)

F = rzk.functional
SEED = 1234
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
ACTIVATIONS = python_ref.ACTIVATIONS
ALPHAS = ["zero", "scalar", "vector"]
OPS = ["rezero_residual", "bias_act_dropout", "gated_act_dropout", "rezero_linear",
       "linear_bias_act_dropout", "rezero_fc"]


def shapes(target):
    """Odd shapes (odd channel counts: scalar tails, unaligned per-channel rows; 1-D; a single
    element); compiled targets also get whole 128-bit vectors and a row longer than a CPU kernel
    tile (8192).  The interpreter pays per program, so it gets the small ones only."""
    base = [(7, 33), (3, 5, 129), (1, 1), (5,)]
    return base if target.interpreted else base + [(2, 3, 64), (2, 8200)]


def randn(target, *shape):
    return torch.randn(*shape, dtype=torch.float64, device=target.device)


def make_alpha(target, kind, channels):
    if kind == "zero":
        return torch.zeros(1, dtype=torch.float64, device=target.device)
    return randn(target, 1 if kind == "scalar" else channels)


def dropout_setup(target, shape, p):
    """(mask for the reference, a kernel wrapper that re-seeds before the kernel draws)."""
    mask = probe_mask(shape, p, SEED, target.backend, target.device) if p > 0 else None

    def seeded(fn):
        def call(*args):
            torch.manual_seed(SEED)
            return fn(*args)
        return call
    return mask, seeded


def linear_inputs(target, lead, n_in, n_out):
    return (randn(target, *lead, n_out), randn(target, *lead, n_in),
            randn(target, n_out, n_in) / n_in ** 0.5, randn(target, n_out))


# --- parity with python_ref -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape_index", range(6))
@pytest.mark.parametrize("alpha_kind", ALPHAS)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("contiguous", [True, False])
def test_rezero_residual(target, dtype, shape_index, alpha_kind, p, contiguous):
    if shape_index >= len(shapes(target)):
        pytest.skip("large shape: compiled targets only")
    shape = shapes(target)[shape_index]
    torch.manual_seed(0)
    x, fx = randn(target, *shape), randn(target, *shape)
    alpha = make_alpha(target, alpha_kind, shape[-1])
    mask, seeded = dropout_setup(target, shape, p)
    ref = reference("rezero_residual", mask)
    assert_parity(seeded(lambda x, fx, a: F.rezero_residual(x, fx, a, p, backend=target.backend)),
                  lambda x, fx, a: ref(x, fx, a, p), [x, fx, alpha], randn(target, *shape), dtype,
                  contiguous, ["x", "fx", "alpha"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape_index", [0, 1, 2, 4, 5])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("contiguous", [True, False])
def test_bias_act_dropout(target, dtype, shape_index, activation, p, contiguous):
    if shape_index >= len(shapes(target)):
        pytest.skip("large shape: compiled targets only")
    shape = shapes(target)[shape_index]
    torch.manual_seed(0)
    h, bias = randn(target, *shape), randn(target, shape[-1])
    mask, seeded = dropout_setup(target, shape, p)
    ref = reference("bias_act_dropout", mask)
    assert_parity(seeded(lambda h, b: F.bias_act_dropout(h, b, activation, p,
                                                         backend=target.backend)),
                  lambda h, b: ref(h, b, activation, p), [h, bias], randn(target, *shape), dtype,
                  contiguous, ["h", "bias"])


def gated(shape):
    """The gate_up shape whose result has ``shape``: twice its last dimension."""
    return shape[:-1] + (2 * shape[-1],)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape_index", range(6))
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("contiguous", [True, False])
def test_gated_act_dropout(target, dtype, shape_index, activation, p, contiguous):
    """``dropout(act(g) * u)`` of ``[g | u]``; the shapes are the result's (odd widths: the
    halves start unaligned)."""
    if shape_index >= len(shapes(target)):
        pytest.skip("large shape: compiled targets only")
    shape = shapes(target)[shape_index]
    torch.manual_seed(0)
    gate_up = randn(target, *gated(shape))
    mask, seeded = dropout_setup(target, shape, p)
    ref = reference("gated_act_dropout", mask)
    assert_parity(seeded(lambda gu: F.gated_act_dropout(gu, activation, p,
                                                        backend=target.backend)),
                  lambda gu: ref(gu, activation, p), [gate_up], randn(target, *shape), dtype,
                  contiguous, ["gate_up"])


LINEAR_SHAPES = [((7,), 5, 3), ((2, 9), 33, 17), ((3, 4), 64, 129)]  # (leading, in, out)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dims", LINEAR_SHAPES, ids=str)
@pytest.mark.parametrize("alpha_kind", ALPHAS)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("contiguous", [True, False])
def test_rezero_linear(target, dtype, dims, alpha_kind, p, contiguous):
    torch.manual_seed(0)
    x, inp, weight, bias = linear_inputs(target, *dims)
    alpha = make_alpha(target, alpha_kind, dims[2])
    mask, seeded = dropout_setup(target, x.shape, p)
    ref = reference("rezero_linear", mask)
    assert_parity(seeded(lambda x, i, w, b, a: F.rezero_linear(x, i, w, b, a, p,
                                                               backend=target.backend)),
                  lambda x, i, w, b, a: ref(x, i, w, b, a, p), [x, inp, weight, bias, alpha],
                  randn(target, *x.shape), dtype, contiguous,
                  ["x", "inp", "weight", "bias", "alpha"])


GATED_LINEAR_SHAPES = [((7,), 5, 3), ((2, 9), 33, 17), ((3, 4), 64, 129)]  # (leading, hidden, out)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dims", GATED_LINEAR_SHAPES, ids=str)
@pytest.mark.parametrize("alpha_kind", ALPHAS)
@pytest.mark.parametrize("p_mlp,p", [(0.0, 0.0), (0.0, 0.3), (0.25, 0.0), (0.25, 0.3)])
def test_rezero_gated_linear(target, dtype, dims, alpha_kind, p_mlp, p):
    """Two dropout masks, drawn in order (the hidden's, then the residual branch's): both are
    recovered by probing in the same order after the same seed.  float64/float32 against
    python_ref tightly.  bfloat16/float16: the op is exactly the composition of the two public
    ops it stands for, ``rezero_linear(x, gated_act_dropout(gate_up))`` (each held to the
    suite's 16-bit rule by the tests above), forward and every gradient bit for bit: its hidden,
    recomputed in backward, is the one the composition keeps.  (Against the float64 reference
    the hidden's rounding to 16 bits is an error eager shares only by chance.)"""
    lead, hidden, out = dims
    torch.manual_seed(0)
    x, gate_up = randn(target, *lead, out), randn(target, *lead, 2 * hidden)
    weight = randn(target, out, hidden) / hidden ** 0.5
    alpha = make_alpha(target, alpha_kind, out)
    grad_out = randn(target, *lead, out)

    def fused(*t):
        torch.manual_seed(SEED)
        return F.rezero_gated_linear(*t, "silu", p_mlp, p, backend=target.backend)
    if dtype in (torch.float16, torch.bfloat16):
        def composed(x, gate_up, weight, alpha):
            torch.manual_seed(SEED)
            h = F.gated_act_dropout(gate_up, "silu", p_mlp, backend=target.backend)
            return F.rezero_linear(x, h, weight, None, alpha, p, backend=target.backend)
        inputs = [t.to(dtype) for t in (x, gate_up, weight, alpha)]
        for a, b in zip(run(fused, inputs, grad_out), run(composed, inputs, grad_out)):
            assert torch.equal(a, b)
        return
    torch.manual_seed(SEED)
    masks = [_probe_next(lead + (n,), q, target) if q > 0 else None
             for n, q in ((hidden, p_mlp), (out, p))]
    assert_parity(fused, lambda *t: python_ref.rezero_gated_linear(
        *t, "silu", p_mlp, p, mlp_mask=masks[0], mask=masks[1]),
        [x, gate_up, weight, alpha], grad_out, dtype, names=["x", "gate_up", "weight", "alpha"])


def _probe_next(shape, p, target):
    """The keep-mask the next op with dropout p draws for an output of ``shape`` (no reseeding:
    the caller seeds once and probes in the ops' order)."""
    ones = torch.ones(shape, device=target.device)
    return F.rezero_residual(torch.zeros_like(ones), ones, torch.ones(1, device=target.device), p,
                             backend=target.backend) != 0


def test_rezero_gated_linear_keeps_gate_up_not_the_hidden(target):
    """What backward keeps: gate_up, weight, alpha and seeds on the compiled backends; the
    hidden (act(g) * u) is recomputed, its gradients still exact (test above)."""
    if target.backend == "triton":
        pytest.skip("the triton backend composes two ops and keeps the hidden")
    torch.manual_seed(0)
    x = randn(target, 6, 5).float().requires_grad_()
    gate_up = randn(target, 6, 22).float().requires_grad_()
    weight, alpha = randn(target, 5, 11).float().requires_grad_(), torch.ones(1).requires_grad_()
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.rezero_gated_linear(x, gate_up, weight, alpha.to(target.device), "silu", 0.1, 0.1,
                              backend=target.backend)
    assert (6, 11) not in shapes and (6, 22) in shapes, shapes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_rezero_linear_alpha_gradient_accuracy_for_16_bit_data(target, dtype):
    """grad_alpha = sum(W * G) + b . colsum(dy) with G = dy^T inp.  On CUDA the kernels form G in
    float32 from the 16-bit values (cuBLAS's float32 output): a 16-bit G from cuBLAS cost up to
    20x eager's error there, and float32 math stays near 1e-9 of sum|W * G|.  The CPU's 16-bit
    GEMM accumulates in float32 and rounds G once, which must keep grad_alpha within the suite's
    factor of eager's own error (eager rounds F = inp @ W^T + b the same way), over several
    inputs and more rows than columns (the layers' case)."""
    def errors(seed, rows):
        torch.manual_seed(seed)
        x, inp, weight, bias = (t.to(dtype) for t in linear_inputs(target, (rows,), 256, 64))
        alpha = torch.full((1,), 0.5, device=target.device, requires_grad=True)
        grad = randn(target, rows, 64).to(dtype)
        g, i, w, b = (t.double() for t in (grad, inp, weight, bias))
        terms = torch.cat([(w * (g.t() @ i)).flatten(), b * g.sum(0)])
        out = []
        for fn in (lambda: F.rezero_linear(x, inp, weight, bias, alpha, backend=target.backend),
                   lambda: python_ref.rezero_linear(x, inp, weight, bias, alpha)):
            (got,) = torch.autograd.grad(fn(), alpha, grad)
            out.append((got.double() - terms.sum()).abs().item() / terms.abs().sum().item())
        return out
    ours, eager = zip(*(errors(seed, rows) for seed in range(4) for rows in (64, 1024)))
    if target.device.startswith("cuda"):
        assert max(ours) <= 2e-7, ours
    else:
        assert max(ours) <= LOW_PRECISION_FACTOR * max(eager), (ours, eager)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("contiguous", [True, False])
def test_linear_bias_act_dropout(target, dtype, activation, p, contiguous):
    torch.manual_seed(0)
    _, inp, weight, bias = linear_inputs(target, (3, 7), 33, 65)
    mask, seeded = dropout_setup(target, (3, 7, 65), p)
    ref = reference("linear_bias_act_dropout", mask)
    assert_parity(seeded(lambda i, w, b: F.linear_bias_act_dropout(i, w, b, activation, p,
                                                                   backend=target.backend)),
                  lambda i, w, b: ref(i, w, b, activation, p), [inp, weight, bias],
                  randn(target, 3, 7, 65), dtype, contiguous, ["inp", "weight", "bias"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead", [(7,), (3, 5)], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("alpha_kind", ALPHAS)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_rezero_fc(target, dtype, lead, activation, alpha_kind, p):
    torch.manual_seed(0)
    x, _, weight, bias = linear_inputs(target, lead, 33, 33)
    alpha = make_alpha(target, alpha_kind, 33)
    mask, seeded = dropout_setup(target, x.shape, p)
    ref = reference("rezero_fc", mask)
    assert_parity(seeded(lambda x, w, b, a: F.rezero_fc(x, w, b, a, activation, p,
                                                        backend=target.backend)),
                  lambda x, w, b, a: ref(x, w, b, a, activation, p), [x, weight, bias, alpha],
                  randn(target, *x.shape), dtype, True, ["x", "weight", "bias", "alpha"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_many_tiles(target, op, dtype):
    """Shapes that every target's tiles split into several programs along every axis (the
    interpreter's 32x256 elementwise and 64x64x64 GEMM tiles, its 2 reduction groups, the CPU
    kernels' row blocks), non-contiguous."""
    torch.manual_seed(0)
    p, shape = 0.3, (70, 300)
    if op in ("rezero_residual", "bias_act_dropout"):
        a, b, vec = randn(target, *shape), randn(target, *shape), randn(target, shape[-1])
        inputs, args = ([a, b, vec], ()) if op == "rezero_residual" else ([a, vec], ("gelu",))
    elif op == "gated_act_dropout":
        inputs, args = [randn(target, *gated(shape))], ("silu",)
    else:
        x, inp, weight, bias = linear_inputs(target, (70,), 130, 65)
        shape = x.shape
        if op == "rezero_linear":
            inputs, args = [x, inp, weight, bias, randn(target, 65)], ()
        elif op == "rezero_fc":
            _, x, weight, bias = linear_inputs(target, (70,), 130, 130)
            shape = x.shape
            inputs, args = [x, weight, bias, randn(target, 130)], ("gelu",)
        else:
            inputs, args = [inp, weight, bias], ("gelu_tanh",)
    mask, seeded = dropout_setup(target, shape, p)
    ref = reference(op, mask)
    kernel = seeded(lambda *t: getattr(F, op)(*t, *args, p, backend=target.backend))
    assert_parity(kernel, lambda *t: ref(*t, *args, p), inputs, randn(target, *shape), dtype,
                  False)


def test_long_one_dimensional_tensor(target):
    """A 1-D tensor is one row of numel columns, which the Triton grid splits into column blocks
    only (a 1-D tensor of more than 2^21 elements once exceeded a GPU grid's axis 1;
    tests/test_gpu_compile.py checks the grid limits for every size): per-channel gate and
    dropout, forward and backward."""
    torch.manual_seed(0)
    n, p = 5_003, 0.3
    inputs = [randn(target, n), randn(target, n), randn(target, n)]
    mask, seeded = dropout_setup(target, (n,), p)
    ref = reference("rezero_residual", mask)
    assert_parity(seeded(lambda x, fx, a: F.rezero_residual(x, fx, a, p, backend=target.backend)),
                  lambda x, fx, a: ref(x, fx, a, p), inputs, randn(target, n), torch.float32)


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("op", OPS + ["rezero_gated_linear"])
def test_gradcheck_float64(target, op, p):
    def leaf(*shape):
        return randn(target, *shape).requires_grad_(True)
    make = {"rezero_residual": lambda: ((leaf(4, 9), leaf(4, 9), leaf(9)), ()),
            "bias_act_dropout": lambda: ((leaf(3, 2, 11), leaf(11)), ("gelu",)),
            "gated_act_dropout": lambda: ((leaf(3, 2, 14),), ("silu",)),
            "rezero_gated_linear": lambda: ((leaf(2, 3, 5), leaf(2, 3, 8), leaf(5, 4),
                                             leaf(1)), ("gelu", 0.3)),
            "rezero_linear": lambda: ((leaf(2, 3, 6), leaf(2, 3, 5), leaf(6, 5), leaf(6),
                                       leaf(1)), ()),
            "linear_bias_act_dropout": lambda: ((leaf(4, 5), leaf(7, 5), leaf(7)), ("gelu",)),
            "rezero_fc": lambda: ((leaf(2, 3, 6), leaf(6, 6), leaf(6), leaf(6)), ("gelu_tanh",))}
    inputs, args = make[op]()
    _, seeded = dropout_setup(target, (1,), 0.0)
    fn = seeded(lambda *t: getattr(F, op)(*t, *args, p, backend=target.backend))
    assert torch.autograd.gradcheck(fn, inputs)


# --- gradients only where asked for ---------------------------------------------------------

CASES = {  # name: (op, shapes of its tensor inputs (None: an absent bias), extra args)
    "rezero_residual": ("rezero_residual", [(5, 17), (5, 17), (17,)], ()),
    "bias_act_dropout": ("bias_act_dropout", [(5, 17), (17,)], ("gelu",)),
    "bias_act_dropout no bias": ("bias_act_dropout", [(5, 17), None], ("gelu",)),
    "rezero_linear": ("rezero_linear", [(5, 17), (5, 9), (17, 9), (17,), (1,)], ()),
    "rezero_gated_linear": ("rezero_gated_linear", [(5, 17), (5, 18), (17, 9), (17,)],
                            ("silu", 0.0)),
    "linear_bias_act_dropout": ("linear_bias_act_dropout", [(5, 9), (17, 9), (17,)], ("relu",)),
    "rezero_fc relu": ("rezero_fc", [(5, 17), (17, 17), (17,), (1,)], ("relu",)),
    "rezero_fc gelu": ("rezero_fc", [(5, 17), (17, 17), (17,), (17,)], ("gelu",)),
    "rezero_fc gelu no bias": ("rezero_fc", [(5, 17), (17, 17), None, (1,)], ("gelu",)),
}


@pytest.mark.parametrize("case", CASES)
def test_only_the_gradients_asked_for(target, case):
    """Every subset of inputs that requires grad gets exactly its gradients, equal to
    python_ref's (with the kernel's mask); what nobody asked for is skipped (the GEMMs:
    test_host_path.py; the reductions behind a frozen gate or bias: the kernels' flags)."""
    op, shapes, args = CASES[case]
    torch.manual_seed(0)
    inputs = [None if s is None else randn(target, *s).float() / (4 if s == (17, 17) else 1)
              for s in shapes]
    shape = getattr(F, op)(*inputs, *args, backend=target.backend).shape
    mask, seeded = dropout_setup(target, shape, 0.2)
    ref = reference(op, mask)
    grad_out = randn(target, *shape).float()
    tensors = [i for i, t in enumerate(inputs) if t is not None]
    for wanted in itertools.product([False, True], repeat=len(tensors)):
        if not any(wanted):
            continue
        needs = dict(zip(tensors, wanted))

        def leaves(cast):
            return [None if t is None else cast(t).requires_grad_(needs[i])
                    for i, t in enumerate(inputs)]

        got_leaves, ref_leaves = leaves(torch.clone), leaves(torch.Tensor.double)
        out = seeded(lambda: getattr(F, op)(*got_leaves, *args, 0.2, backend=target.backend))()
        got = torch.autograd.grad(out, [t for t in got_leaves if t is not None and t.requires_grad],
                                  grad_out)
        want = torch.autograd.grad(ref(*ref_leaves, *args, 0.2),
                                   [t for t in ref_leaves if t is not None and t.requires_grad],
                                   grad_out.double())
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g.double(), w, rtol=2e-5, atol=2e-5)


# --- dtypes -------------------------------------------------------------------------------------

def _grads(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    return [out] + list(torch.autograd.grad(out, leaves, grad_out.to(out.dtype)))


def test_mixed_dtypes_promote_like_eager(target):
    x = randn(target, 4, 8).float()
    fx = randn(target, 4, 8).to(torch.bfloat16)
    alpha = torch.tensor([0.5], device=target.device)
    out = F.rezero_residual(x, fx, alpha, backend=target.backend)
    assert out.dtype == (x + alpha * fx).dtype == torch.float32
    torch.testing.assert_close(out, x + alpha * fx.float())


@pytest.mark.parametrize("x_dtype,gemm_dtype", [(torch.float32, torch.bfloat16),
                                                (torch.bfloat16, torch.float32)], ids=str)
def test_rezero_linear_mixed_dtypes_promote_like_eager(target, x_dtype, gemm_dtype):
    torch.manual_seed(0)
    x = randn(target, 5, 17).to(x_dtype)
    inp, weight = randn(target, 5, 33).to(gemm_dtype), (randn(target, 17, 33) / 6).to(gemm_dtype)
    bias, alpha = randn(target, 17).to(gemm_dtype), randn(target, 17).float()
    inputs, grad_out = [x, inp, weight, bias, alpha], randn(target, 5, 17)
    got = _grads(lambda *t: F.rezero_linear(*t, backend=target.backend), inputs, grad_out)
    want = _grads(python_ref.rezero_linear, [t.double() for t in inputs], grad_out)
    assert got[0].dtype == torch.promote_types(x_dtype, gemm_dtype)
    for g, t in zip(got[1:], inputs):
        assert g.dtype == t.dtype and g.shape == t.shape
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=2e-2, atol=2e-2 * w.abs().max().item())


def test_fp32_alpha_and_bias_with_bf16_data_get_fp32_grads(target):
    torch.manual_seed(0)
    x, fx = (randn(target, 7, 33).to(torch.bfloat16) for _ in range(2))
    alpha = randn(target, 33).float()
    ones = torch.ones(7, 33, device=target.device)
    out, _, _, galpha = _grads(lambda *t: F.rezero_residual(*t, backend=target.backend),
                               [x, fx, alpha], ones)
    assert out.dtype == torch.bfloat16 and galpha.dtype == torch.float32
    torch.testing.assert_close(galpha, fx.float().sum(0), rtol=1e-5, atol=1e-5)
    h, bias = randn(target, 7, 33).to(torch.bfloat16), randn(target, 33).float()
    _, _, gbias = _grads(lambda *t: F.bias_act_dropout(*t, "relu", backend=target.backend),
                         [h, bias], ones)
    assert gbias.dtype == torch.float32
    torch.testing.assert_close(gbias, (h.float() + bias > 0).float().sum(0))


@pytest.mark.parametrize("alpha", [0.1, "0-dim", "float32 gate"])
def test_alpha_forms_on_float64_data_are_exact(target, alpha):
    """A Python number, a 0-dim tensor and a float32 gate all work; a number on float64 data is
    not rounded to float32 (eager is exact there)."""
    x, fx = randn(target, 3, 4), randn(target, 3, 4)
    value = {0.1: 0.1, "0-dim": torch.tensor(0.1, dtype=torch.float64, device=target.device),
             "float32 gate": torch.full((1,), 0.1, device=target.device)}[alpha]
    out = F.rezero_residual(x, fx, value, backend=target.backend)
    want = x + (value if isinstance(value, float) else value.double()) * fx
    torch.testing.assert_close(out, want, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("block", ["encoder layer", "FC block"])
def test_bf16_autocast_matches_the_reference_under_autocast(target, block):
    """Under autocast the GEMMs run in bf16 and the residual stream keeps float32, as in eager;
    the error against float64 is within twice the reference's under the same autocast."""
    if target.interpreted and block == "encoder layer":
        pytest.skip("the interpreter runs the layer's GEMMs too slowly")
    torch.manual_seed(0)
    dev = target.device
    if block == "encoder layer":
        fused = rzk.RZTXEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, alpha_init=0.5,
                                     backend=target.backend, device=dev)
        ref = python_ref.RZTXEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True,
                                          alpha_init=0.5, device=dev)
    else:
        fused = rzk.ReZeroFCBlock(32, "gelu", alpha_init=0.5, backend=target.backend, device=dev)
        ref = rzk.ReZeroFCBlock(32, "gelu", alpha_init=0.5, backend="torch", device=dev)
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(2, 7, 32, device=dev)
    with torch.autocast(dev, dtype=torch.bfloat16):
        out_f, out_r = fused(x), ref(x)
    exact = ref.double()(x.double())
    assert out_f.dtype == out_r.dtype
    err_f = (out_f.double() - exact).abs().max().item()
    err_r = (out_r.double() - exact).abs().max().item()
    assert err_f <= 2 * err_r + 1e-3, (err_f, err_r)
    out_f.float().sum().backward()
    assert fused.resweight.grad.dtype == torch.float32


def test_python_float_alpha_and_missing_bias(target):
    x, inp, w = (randn(target, *s).float() for s in [(3, 4), (3, 5), (4, 5)])
    torch.testing.assert_close(F.rezero_residual(x, inp[:, :4], 0.25, backend=target.backend),
                               x + 0.25 * inp[:, :4])
    torch.testing.assert_close(F.rezero_linear(x, inp, w, None, 0.5, backend=target.backend),
                               x + 0.5 * inp @ w.T)


def test_transposed_weight_and_sliced_inputs(target):
    """Strided views reach the GEMM as they are (weight.T of a (in, out) tensor, a row slice)."""
    torch.manual_seed(0)
    x = randn(target, 6, 20)[:, 3:18].float()
    inp = randn(target, 12, 33)[::2].float()
    weight = randn(target, 33, 15).float().t()
    bias, alpha = randn(target, 15).float(), randn(target, 15).float()
    torch.testing.assert_close(F.rezero_linear(x, inp, weight, bias, alpha,
                                               backend=target.backend),
                               python_ref.rezero_linear(x, inp, weight, bias, alpha))
    torch.testing.assert_close(F.linear_bias_act_dropout(inp, weight, bias, "gelu",
                                                         backend=target.backend),
                               python_ref.linear_bias_act_dropout(inp, weight, bias, "gelu"))
    # and their gradients (a transposed weight is how GPT-2's Conv1D reaches the ops), with a
    # scalar gate and enough rows for the weight-sized products
    inp = randn(target, 40, 33).float()
    x = randn(target, 40, 15).float()
    grad_out = randn(target, 40, 15).float()
    for fn in (F.rezero_linear, python_ref.rezero_linear):
        leaves = [t.clone().requires_grad_() for t in (x, inp, weight, bias, alpha[:1])]
        out = fn(*leaves, **({"backend": target.backend} if fn is F.rezero_linear else {}))
        grads = torch.autograd.grad(out, leaves, grad_out)
        if fn is F.rezero_linear:
            got = grads
    for g, w in zip(got, grads):
        torch.testing.assert_close(g, w)


def test_empty_nan_and_no_input_features(target):
    dev = target.device
    empty = torch.empty(0, 16, device=dev)
    assert F.rezero_residual(empty, empty, torch.ones(1, device=dev), 0.1,
                             backend=target.backend).shape == (0, 16)
    assert F.bias_act_dropout(empty, torch.zeros(16, device=dev), "gelu", 0.1,
                              backend=target.backend).shape == (0, 16)
    assert F.rezero_linear(empty, torch.empty(0, 5, device=dev), torch.ones(16, 5, device=dev),
                           None, 1.0, backend=target.backend).shape == (0, 16)
    x = torch.tensor([[1.0, float("nan")]], device=dev)
    out = F.rezero_residual(x, torch.ones(1, 2, device=dev), torch.ones(1, device=dev),
                            backend=target.backend)
    assert out[0, 0] == 2.0 and out[0, 1].isnan()
    # in_features == 0: the GEMM is the bias alone, as in eager
    x, bias = torch.randn(3, 4, device=dev), torch.randn(4, device=dev)
    inp, w = torch.empty(3, 0, device=dev), torch.empty(4, 0, device=dev)
    torch.testing.assert_close(F.rezero_linear(x, inp, w, bias, 0.5, backend=target.backend),
                               x + 0.5 * bias)


# --- dropout ------------------------------------------------------------------------------------

def _rng_state(device):
    return torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state()


def _all_ops_outputs(target, shape, p, alpha=1.0):
    """Each op arranged so that its output is the scaled keep-mask: mask / (1 - p)."""
    dev, b, n = target.device, target.backend, shape[-1]
    zeros, ones = torch.zeros(shape, device=dev), torch.ones(shape, device=dev)
    inp = torch.zeros(shape[:-1] + (4,), device=dev)
    weight, bias = torch.zeros(n, 4, device=dev), torch.ones(n, device=dev)
    calls = {
        "rezero_residual": lambda: F.rezero_residual(zeros, ones, alpha, p, backend=b),
        "bias_act_dropout": lambda: F.bias_act_dropout(zeros, bias, "identity", p, backend=b),
        "gated_act_dropout": lambda: F.gated_act_dropout(
            torch.ones(shape[:-1] + (2 * n,), device=dev), "identity", p, backend=b),
        "rezero_linear": lambda: F.rezero_linear(zeros, inp, weight, bias, alpha, p, backend=b),
        "linear_bias_act_dropout": lambda: F.linear_bias_act_dropout(inp, weight, bias, "relu",
                                                                     p, backend=b),
        "rezero_fc": lambda: F.rezero_fc(zeros, torch.zeros(n, n, device=dev), bias, alpha,
                                         "identity", p, backend=b),
    }
    outs = {}
    for name, call in calls.items():
        torch.manual_seed(SEED)
        outs[name] = call()
    return outs


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate_scaling_and_one_mask_rule_for_all_ops(target, p):
    shape = (64, 96) if target.interpreted else (512, 1000)
    outs = _all_ops_outputs(target, shape, p)
    first = outs["rezero_residual"]
    keep = first != 0
    n = keep.numel()
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    assert torch.all(first[keep] == 1.0 / (1 - p))
    for name, out in outs.items():  # every op drops by output element index, one seed rule
        torch.testing.assert_close(out, first, msg=name)


def test_dropout_p0_and_eval_are_the_no_dropout_path_and_draw_no_seed(target):
    torch.manual_seed(0)
    x, fx, alpha = randn(target, 7, 33).float(), randn(target, 7, 33).float(), randn(target, 33)
    state = _rng_state(target.device)
    out_p0 = F.rezero_residual(x, fx, alpha.float(), 0.0, backend=target.backend)
    out_eval = F.rezero_residual(x, fx, alpha.float(), 0.5, training=False, backend=target.backend)
    assert torch.equal(_rng_state(target.device), state)
    assert torch.equal(out_p0, out_eval)
    torch.testing.assert_close(out_p0, x + alpha.float() * fx)


def test_reproducible_under_manual_seed_and_fresh_per_call(target):
    dev = target.device
    x, fx, alpha = torch.zeros(16, 40, device=dev), torch.ones(16, 40, device=dev), torch.ones(1, device=dev)
    torch.manual_seed(7)
    a, b = (F.rezero_residual(x, fx, alpha, 0.5, backend=target.backend) for _ in range(2))
    torch.manual_seed(7)
    c = F.rezero_residual(x, fx, alpha, 0.5, backend=target.backend)
    assert torch.equal(a, c) and not torch.equal(a, b)


P = 0.4


def _masked_case(target, op):
    """(kernel fn, reference fn taking ``mask=``, inputs): random inputs, but any residual x is
    zero, so that the output is nonzero exactly where the op kept an element."""
    torch.manual_seed(0)
    b = target.backend
    r = lambda *s: randn(target, *s).float()  # noqa: E731
    shape, n_in = (6, 37), 20
    zeros = torch.zeros(shape, device=target.device)
    if op == "rezero_residual":
        return (lambda *t: F.rezero_residual(*t, P, backend=b),
                lambda *t, mask: python_ref.rezero_residual(*t, P, mask=mask),
                [zeros, r(*shape), r(1)])
    if op == "bias_act_dropout":
        return (lambda *t: F.bias_act_dropout(*t, "gelu", P, backend=b),
                lambda *t, mask: python_ref.bias_act_dropout(*t, "gelu", P, mask=mask),
                [r(*shape), r(shape[-1])])
    if op == "gated_act_dropout":
        return (lambda *t: F.gated_act_dropout(*t, "gelu", P, backend=b),
                lambda *t, mask: python_ref.gated_act_dropout(*t, "gelu", P, mask=mask),
                [r(shape[0], 2 * shape[1])])
    inp, weight, bias = r(shape[0], n_in), r(shape[1], n_in), r(shape[1])
    if op == "rezero_linear":
        return (lambda *t: F.rezero_linear(*t, P, backend=b),
                lambda *t, mask: python_ref.rezero_linear(*t, P, mask=mask),
                [zeros, inp, weight, bias, r(shape[1])])
    if op == "rezero_fc":  # x enters the GEMM too: read the mask off a run with x = 0
        return (lambda *t: F.rezero_fc(*t, "gelu", P, backend=b),
                lambda *t, mask: python_ref.rezero_fc(*t, "gelu", P, mask=mask),
                [zeros, r(shape[1], shape[1]), r(shape[1]), r(shape[1])])
    return (lambda *t: F.linear_bias_act_dropout(*t, "gelu_tanh", P, backend=b),
            lambda *t, mask: python_ref.linear_bias_act_dropout(*t, "gelu_tanh", P, mask=mask),
            [inp, weight, bias])


@pytest.mark.parametrize("op", OPS)
def test_backward_uses_the_forward_mask(target, op):
    kernel, ref, inputs = _masked_case(target, op)
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    torch.manual_seed(SEED)
    out = kernel(*leaves)
    mask = out != 0  # every kept element of these inputs is nonzero
    assert 0.3 < mask.float().mean().item() < 0.9
    grad_out = torch.randn(out.shape, device=target.device)
    got = torch.autograd.grad(out, leaves, grad_out)
    leaves_ref = [t.clone().requires_grad_(True) for t in inputs]
    want_out = ref(*leaves_ref, mask=mask)
    want = torch.autograd.grad(want_out, leaves_ref, grad_out)
    torch.testing.assert_close(out, want_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_residual_grad_of_x_is_grad_output_itself_and_reductions_are_deterministic(target):
    torch.manual_seed(0)
    rows = 40 if target.interpreted else 4099
    x = randn(target, rows, 33).float().requires_grad_(True)
    fx = randn(target, rows, 33).float().requires_grad_(True)
    alpha = randn(target, 33).float().requires_grad_(True)
    h, bias = fx.detach().clone().requires_grad_(True), alpha.detach().clone().requires_grad_(True)
    seen = []
    x.register_hook(seen.append)
    grad_out = torch.randn(rows, 33, device=target.device)
    grads = []
    for _ in range(3):
        torch.manual_seed(SEED)
        out = F.rezero_residual(x, fx, alpha, 0.2, backend=target.backend)
        z = F.bias_act_dropout(h, bias, "gelu", 0.2, backend=target.backend)
        grads.append(torch.autograd.grad(out, [x, fx, alpha], grad_out)
                     + torch.autograd.grad(z, [h, bias], grad_out))
    assert seen[0].data_ptr() == grad_out.data_ptr()
    for again in grads[1:]:
        for a, b in zip(grads[0], again):
            assert torch.equal(a, b)
