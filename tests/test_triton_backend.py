"""The Triton backend against python_ref: output and every gradient, across dtypes, odd shapes,
non-contiguous inputs, scalar/per-channel/zero alpha, dropout on/off; dropout statistics, one
mask for forward and backward, reproducibility, and ``torch.library.opcheck`` of every op.

Without a GPU the kernels run on CPU tensors in Triton's interpreter, which must be switched on
before triton or rezero_kernels is first imported: tests/conftest.py sets TRITON_INTERPRET=1 (the
line below covers running this file on its own).  Shapes stay small: the interpreter costs about
a millisecond per program.

Tolerances (``parity.assert_parity``): the reference is python_ref in float64 with the kernel's
own mask; float64/float32 must match it tightly (1e-10 / 2e-5); bfloat16/float16 results may
differ from it by at most twice the error of python_ref run eagerly in that dtype, plus one ulp
of the largest value (the kernels compute in fp32, so they are usually more accurate than eager).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import python_ref  # noqa: E402
import rezero_kernels as rzk  # noqa: E402
from parity import assert_parity, probe_mask, reference  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1" or not rzk.backends()["triton"]:
    pytest.skip("these tests run the triton backend on CPU tensors in Triton's interpreter: "
                "TRITON_INTERPRET=1 must be set before rezero_kernels is first imported",
                allow_module_level=True)

F = rzk.functional
B = "triton"
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(7, 33), (3, 5, 129), (1, 1)]
ALPHAS = ["zero", "scalar", "vector"]
ACTIVATIONS = ["identity", "relu", "gelu", "gelu_tanh"]
SEED = 1234


def make_alpha(kind, channels):
    if kind == "zero":
        return torch.zeros(1, dtype=torch.float64)
    return torch.randn(1 if kind == "scalar" else channels, dtype=torch.float64)


def mask_for(shape, p):
    """The mask every op of this backend draws for an output of ``shape`` after
    ``manual_seed(SEED)`` (None without dropout)."""
    return probe_mask(shape, p, SEED, B) if p > 0 else None


def linear_inputs(lead, n_in, n_out):
    x = torch.randn(*lead, n_out, dtype=torch.float64)
    inp = torch.randn(*lead, n_in, dtype=torch.float64)
    weight = torch.randn(n_out, n_in, dtype=torch.float64) / n_in ** 0.5
    return x, inp, weight, torch.randn(n_out, dtype=torch.float64)


# --- parity with python_ref -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("alpha_kind", ALPHAS)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("contiguous", [True, False])
def test_rezero_residual(dtype, shape, alpha_kind, p, contiguous):
    torch.manual_seed(0)
    x, fx = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    alpha = make_alpha(alpha_kind, shape[-1])
    ref = reference("rezero_residual", mask_for(shape, p))

    def kernel(x, fx, alpha):
        torch.manual_seed(SEED)
        return F.rezero_residual(x, fx, alpha, p, backend=B)

    assert_parity(kernel, lambda x, fx, a: ref(x, fx, a, p), [x, fx, alpha],
                  torch.randn(shape, dtype=torch.float64), dtype, contiguous, ["x", "fx", "alpha"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:2], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("contiguous", [True, False])
def test_bias_act_dropout(dtype, shape, activation, p, contiguous):
    torch.manual_seed(0)
    h, bias = torch.randn(shape, dtype=torch.float64), torch.randn(shape[-1], dtype=torch.float64)
    ref = reference("bias_act_dropout", mask_for(shape, p))

    def kernel(h, bias):
        torch.manual_seed(SEED)
        return F.bias_act_dropout(h, bias, activation, p, backend=B)

    assert_parity(kernel, lambda h, b: ref(h, b, activation, p), [h, bias],
                  torch.randn(shape, dtype=torch.float64), dtype, contiguous, ["h", "bias"])


LINEAR_SHAPES = [((7,), 5, 3), ((2, 9), 33, 17), ((3, 4), 64, 129)]  # (leading, in, out)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dims", LINEAR_SHAPES, ids=str)
@pytest.mark.parametrize("alpha_kind", ALPHAS)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("contiguous", [True, False])
def test_rezero_linear(dtype, dims, alpha_kind, p, contiguous):
    torch.manual_seed(0)
    x, inp, weight, bias = linear_inputs(*dims)
    alpha = make_alpha(alpha_kind, dims[2])
    ref = reference("rezero_linear", mask_for(x.shape, p))

    def kernel(x, inp, w, b, a):
        torch.manual_seed(SEED)
        return F.rezero_linear(x, inp, w, b, a, p, backend=B)

    assert_parity(kernel, lambda x, i, w, b, a: ref(x, i, w, b, a, p),
                  [x, inp, weight, bias, alpha], torch.randn(x.shape, dtype=torch.float64), dtype,
                  contiguous, ["x", "inp", "weight", "bias", "alpha"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("contiguous", [True, False])
def test_linear_bias_act_dropout(dtype, activation, p, contiguous):
    torch.manual_seed(0)
    _, inp, weight, bias = linear_inputs((3, 7), 33, 65)
    ref = reference("linear_bias_act_dropout", mask_for((3, 7, 65), p))

    def kernel(inp, w, b):
        torch.manual_seed(SEED)
        return F.linear_bias_act_dropout(inp, w, b, activation, p, backend=B)

    assert_parity(kernel, lambda i, w, b: ref(i, w, b, activation, p), [inp, weight, bias],
                  torch.randn(3, 7, 65, dtype=torch.float64), dtype, contiguous,
                  ["inp", "weight", "bias"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", ["rezero_residual", "bias_act_dropout", "rezero_linear",
                                "linear_bias_act_dropout"])
def test_many_tiles(op, dtype):
    """Shapes that the interpreter's tiles (32x256 elementwise, 64x64x64 GEMM, 2 reduction
    groups) split into several programs along every axis, with several row tiles per group."""
    torch.manual_seed(0)
    p, shape = 0.3, (70, 300)
    if op in ("rezero_residual", "bias_act_dropout"):
        a, b = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
        extra = [torch.randn(shape[-1], dtype=torch.float64)]
        inputs = [a, b] + extra if op == "rezero_residual" else [a] + extra
        args = () if op == "rezero_residual" else ("gelu",)
    else:
        x, inp, weight, bias = linear_inputs((70,), 130, 65)
        shape = x.shape
        if op == "rezero_linear":
            inputs, args = [x, inp, weight, bias, torch.randn(65, dtype=torch.float64)], ()
        else:
            inputs, args = [inp, weight, bias], ("gelu_tanh",)
    ref = reference(op, mask_for(shape, p))

    def kernel(*tensors):
        torch.manual_seed(SEED)
        return getattr(F, op)(*tensors, *args, p, backend=B)

    assert_parity(kernel, lambda *t: ref(*t, *args, p), inputs,
                  torch.randn(shape, dtype=torch.float64), dtype, False)


def test_transposed_weight_and_sliced_inputs():
    """Strided views reach the GEMM as they are (weight.T of a (in, out) tensor, a row slice)."""
    torch.manual_seed(0)
    x = torch.randn(6, 20)[:, 3:18]
    inp = torch.randn(12, 33)[::2]
    weight = torch.randn(33, 15).t()
    bias, alpha = torch.randn(15), torch.randn(15)
    torch.testing.assert_close(F.rezero_linear(x, inp, weight, bias, alpha, backend=B),
                               python_ref.rezero_linear(x, inp, weight, bias, alpha))
    torch.testing.assert_close(F.linear_bias_act_dropout(inp, weight, bias, "gelu", backend=B),
                               python_ref.linear_bias_act_dropout(inp, weight, bias, "gelu"))


# --- dtype handling ----------------------------------------------------------------------------

def _grads(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    return [out] + list(torch.autograd.grad(out, leaves, grad_out.to(out.dtype)))


@pytest.mark.parametrize("x_dtype,gemm_dtype", [(torch.float32, torch.bfloat16),
                                                (torch.bfloat16, torch.float32)], ids=str)
def test_rezero_linear_mixed_dtypes_promote_like_eager(x_dtype, gemm_dtype):
    torch.manual_seed(0)
    x = torch.randn(5, 17, dtype=x_dtype)
    inp, weight = torch.randn(5, 33, dtype=gemm_dtype), torch.randn(17, 33, dtype=gemm_dtype) / 6
    bias, alpha = torch.randn(17, dtype=gemm_dtype), torch.randn(17)
    inputs, grad_out = [x, inp, weight, bias, alpha], torch.randn(5, 17, dtype=torch.float64)
    got = _grads(lambda *t: F.rezero_linear(*t, backend=B), inputs, grad_out)
    want = _grads(python_ref.rezero_linear, [t.double() for t in inputs], grad_out)
    assert got[0].dtype == torch.promote_types(x_dtype, gemm_dtype)
    for g, w, t in zip(got[1:], want[1:], inputs):
        assert g.dtype == t.dtype and g.shape == t.shape
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=2e-2, atol=2e-2 * w.abs().max().item())


def test_fp32_alpha_and_bias_with_bf16_data_get_fp32_grads():
    torch.manual_seed(0)
    x, fx = torch.randn(7, 33, dtype=torch.bfloat16), torch.randn(7, 33, dtype=torch.bfloat16)
    alpha = torch.randn(33)
    out, gx, gfx, galpha = _grads(lambda *t: F.rezero_residual(*t, backend=B), [x, fx, alpha],
                                  torch.ones(7, 33))
    assert out.dtype == torch.bfloat16 and galpha.dtype == torch.float32
    torch.testing.assert_close(galpha, fx.float().sum(0), rtol=1e-5, atol=1e-5)
    h, bias = torch.randn(7, 33, dtype=torch.bfloat16), torch.randn(33)
    out, gh, gbias = _grads(lambda *t: F.bias_act_dropout(*t, "relu", backend=B), [h, bias],
                            torch.ones(7, 33))
    assert gbias.dtype == torch.float32
    torch.testing.assert_close(gbias, (h.float() + bias > 0).float().sum(0))


# --- dropout ------------------------------------------------------------------------------------

def _all_ops_outputs(shape, p, alpha=1.0):
    """Each op arranged so that its output is the scaled keep-mask: mask / (1 - p)."""
    n = shape[-1]
    zeros, ones = torch.zeros(shape), torch.ones(shape)
    inp, weight, bias = torch.zeros(shape[:-1] + (4,)), torch.zeros(n, 4), torch.ones(n)
    calls = {
        "rezero_residual": lambda: F.rezero_residual(zeros, ones, alpha, p, backend=B),
        "bias_act_dropout": lambda: F.bias_act_dropout(zeros, bias, "identity", p, backend=B),
        "rezero_linear": lambda: F.rezero_linear(zeros, inp, weight, bias, alpha, p, backend=B),
        "linear_bias_act_dropout": lambda: F.linear_bias_act_dropout(inp, weight, bias, "relu",
                                                                     p, backend=B),
    }
    outs = {}
    for name, call in calls.items():
        torch.manual_seed(SEED)
        outs[name] = call()
    return outs


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate_scaling_and_one_mask_rule_for_all_ops(p):
    shape = (64, 96)
    outs = _all_ops_outputs(shape, p)
    first = outs["rezero_residual"]
    keep = first != 0
    n = keep.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
    assert torch.all(first[keep] == torch.tensor(1.0 / (1 - p), dtype=torch.float32))
    for name, out in outs.items():  # every op drops by output element index, one seed rule
        torch.testing.assert_close(out, first, msg=name)


def test_dropout_p0_and_eval_are_the_no_dropout_path_and_draw_no_seed():
    torch.manual_seed(0)
    x, fx, alpha = torch.randn(7, 33), torch.randn(7, 33), torch.randn(33)
    state = torch.get_rng_state()
    out_p0 = F.rezero_residual(x, fx, alpha, 0.0, backend=B)
    out_eval = F.rezero_residual(x, fx, alpha, 0.5, training=False, backend=B)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(out_p0, out_eval) and torch.equal(out_p0, x + alpha * fx)


def test_reproducible_under_manual_seed_and_fresh_per_call():
    x, fx, alpha = torch.zeros(16, 40), torch.ones(16, 40), torch.ones(1)
    torch.manual_seed(7)
    a, b = (F.rezero_residual(x, fx, alpha, 0.5, backend=B) for _ in range(2))
    torch.manual_seed(7)
    c = F.rezero_residual(x, fx, alpha, 0.5, backend=B)
    assert torch.equal(a, c) and not torch.equal(a, b)


P = 0.4


def _masked_case(op):
    """(kernel fn, reference fn taking ``mask=``, inputs): random inputs, but any residual x is
    zero, so that the output is nonzero exactly where the op kept an element."""
    torch.manual_seed(0)
    shape, n_in = (6, 37), 20
    if op == "rezero_residual":
        inputs = [torch.zeros(shape), torch.randn(shape), torch.randn(1)]
        return (lambda *t: F.rezero_residual(*t, P, backend=B),
                lambda *t, mask: python_ref.rezero_residual(*t, P, mask=mask), inputs)
    if op == "bias_act_dropout":
        inputs = [torch.randn(shape), torch.randn(shape[-1])]
        return (lambda *t: F.bias_act_dropout(*t, "gelu", P, backend=B),
                lambda *t, mask: python_ref.bias_act_dropout(*t, "gelu", P, mask=mask), inputs)
    inp, weight = torch.randn(shape[0], n_in), torch.randn(shape[1], n_in)
    bias = torch.randn(shape[1])
    if op == "rezero_linear":
        inputs = [torch.zeros(shape), inp, weight, bias, torch.randn(shape[1])]
        return (lambda *t: F.rezero_linear(*t, P, backend=B),
                lambda *t, mask: python_ref.rezero_linear(*t, P, mask=mask), inputs)
    return (lambda *t: F.linear_bias_act_dropout(*t, "gelu_tanh", P, backend=B),
            lambda *t, mask: python_ref.linear_bias_act_dropout(*t, "gelu_tanh", P, mask=mask),
            [inp, weight, bias])


@pytest.mark.parametrize("op", ["rezero_residual", "bias_act_dropout", "rezero_linear",
                                "linear_bias_act_dropout"])
def test_backward_uses_the_forward_mask(op):
    kernel, ref, inputs = _masked_case(op)
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    torch.manual_seed(SEED)
    out = kernel(*leaves)
    mask = out != 0  # every kept element of these inputs is nonzero
    keep_rate = mask.float().mean().item()
    assert 0.3 < keep_rate < 0.9
    grad_out = torch.randn(out.shape)
    got = torch.autograd.grad(out, leaves, grad_out)
    leaves_ref = [t.clone().requires_grad_(True) for t in inputs]
    want_out = ref(*leaves_ref, mask=mask)
    want = torch.autograd.grad(want_out, leaves_ref, grad_out)
    torch.testing.assert_close(out, want_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_residual_grad_of_x_is_grad_output_itself_and_reductions_are_deterministic():
    torch.manual_seed(0)
    x = torch.randn(40, 33, requires_grad=True)
    fx, alpha = torch.randn(40, 33, requires_grad=True), torch.randn(33, requires_grad=True)
    seen = []
    x.register_hook(seen.append)
    grad_out = torch.randn(40, 33)
    grads = []
    for _ in range(2):
        torch.manual_seed(SEED)
        out = F.rezero_residual(x, fx, alpha, 0.2, backend=B)
        grads.append(torch.autograd.grad(out, [x, fx, alpha], grad_out))
    assert seen[0].data_ptr() == grad_out.data_ptr()
    for a, b in zip(*grads):
        assert torch.equal(a, b)


# --- edge cases and registration --------------------------------------------------------------

def test_empty_float_alpha_and_missing_bias():
    empty = torch.empty(0, 16)
    assert F.rezero_residual(empty, empty, torch.ones(1), 0.1, backend=B).shape == (0, 16)
    assert F.bias_act_dropout(empty, torch.zeros(16), "gelu", 0.1, backend=B).shape == (0, 16)
    assert F.rezero_linear(empty, torch.empty(0, 5), torch.ones(16, 5), None, 1.0,
                           backend=B).shape == (0, 16)
    x, inp, w = torch.randn(3, 4), torch.randn(3, 5), torch.randn(4, 5)
    torch.testing.assert_close(F.rezero_residual(x, inp[:, :4], 0.25, backend=B),
                               x + 0.25 * inp[:, :4])
    torch.testing.assert_close(F.rezero_linear(x, inp, w, None, 0.5, backend=B),
                               x + 0.5 * inp @ w.T)


OPCHECK_CASES = ["residual", "residual p=0", "residual_backward", "bias_act_dropout gelu",
                 "bias_act_dropout relu p=0", "bias_act_dropout_backward", "linear_residual",
                 "linear_residual_backward", "linear_act gelu", "linear_act relu p=0",
                 "linear_act_backward"]


def _opcheck_case(name):
    def r(*shape, grad=True):
        return torch.randn(*shape, requires_grad=grad)

    def c(*shape):  # backward ops are not differentiable themselves
        return r(*shape, grad=False)

    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
    ops = torch.ops.rezero_kernels_triton
    return {
        "residual": (ops.residual, (r(3, 5, 33), r(3, 5, 33), r(33), 0.3, seed)),
        "residual p=0": (ops.residual, (r(3, 5, 33), r(3, 5, 33), r(1), 0.0, None)),
        "residual_backward": (ops.residual_backward, (c(3, 5, 33), c(3, 5, 33), c(1), 0.3, seed)),
        "bias_act_dropout gelu": (ops.bias_act_dropout, (r(7, 33), r(33), 2, 0.3, seed)),
        "bias_act_dropout relu p=0": (ops.bias_act_dropout, (r(7, 33), r(33), 1, 0.0, None)),
        "bias_act_dropout_backward": (ops.bias_act_dropout_backward,
                                      (c(7, 33), c(7, 33), c(33), 3, 0.3, seed)),
        "linear_residual": (ops.linear_residual,
                            (r(2, 9, 17), r(2, 9, 33), r(17, 33), r(17), r(17), 0.3, seed)),
        "linear_residual_backward": (ops.linear_residual_backward,
                                     (c(2, 9, 17), c(2, 9, 33), c(17, 33), c(17), c(1), 0.3, seed)),
        "linear_act gelu": (ops.linear_act, (r(2, 9, 33), r(17, 33), r(17), 2, 0.3, seed, 1)),
        "linear_act relu p=0": (ops.linear_act, (r(2, 9, 33), r(17, 33), r(17), 1, 0.0, None, 0)),
        "linear_act_backward": (ops.linear_act_backward,
                                (c(2, 9, 17), c(2, 9, 33), c(17, 33), c(2, 9, 17), 3, 0.3, seed)),
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
    args = [torch.randn(s, requires_grad=True)
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
    out = torch.ops.rezero_kernels_triton.residual(torch.zeros(rows, cols), torch.ones(rows, cols),
                                                   torch.ones(1), p, seed)
    r, c = (a.ravel().astype(np.uint64) for a in np.meshgrid(np.arange(rows), np.arange(cols),
                                                              indexing="ij"))
    group, low = c >> np.uint64(2), np.uint64(0xFFFFFFFF)
    counters = np.stack([group & low, group >> np.uint64(32), r & low, r >> np.uint64(32)], 1)
    words = philox4x32_10(counters, int(seed))[np.arange(rows * cols), (c % 4).astype(np.int64)]
    expected = words < min(2**32 - 1, int((1 - p) * 2**32))
    assert torch.equal(out != 0, torch.from_numpy(expected).reshape(rows, cols))


def test_one_dimensional_tensor_is_one_row_of_column_blocks():
    """A flattened 1-D tensor is one row of numel columns, which the 1-D grid splits into column
    blocks only (on a GPU a 1-D tensor of more than 2^21 elements used to exceed grid axis 1;
    tests/test_gpu_compile.py checks the grid limits for every size), here with a per-channel
    gate and dropout, forward and backward."""
    torch.manual_seed(0)
    n, p = 5_003, 0.3
    inputs = [torch.randn(n, dtype=torch.float64) for _ in range(3)]
    ref = reference("rezero_residual", mask_for((n,), p))

    def kernel(x, fx, a):
        torch.manual_seed(SEED)
        return F.rezero_residual(x, fx, a, p, backend=B)

    assert_parity(kernel, lambda x, fx, a: ref(x, fx, a, p), inputs,
                  torch.randn(n, dtype=torch.float64), torch.float32)
