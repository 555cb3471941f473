"""Every functional op of the compiled CPU backend against python_ref: output and all gradients,
across dtypes, odd shapes, non-contiguous inputs, scalar/per-channel/zero alpha, dropout on/off."""
import pytest
import torch

import rezero_kernels as rzk
from parity import assert_parity, probe_mask, reference

F = rzk.functional
BACKENDS = [b for b in ("cpu",) if rzk.backends()[b]]
pytestmark = pytest.mark.skipif(not BACKENDS, reason="compiled extension not built")

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(7, 33), (3, 5, 129), (1, 1), (2, 8200)]  # 8200 > one row of the CPU kernels' tiling
ALPHAS = ["zero", "scalar", "vector"]


def make_alpha(kind, channels):
    if kind == "zero":
        return torch.zeros(1, dtype=torch.float64)
    return torch.randn(1 if kind == "scalar" else channels, dtype=torch.float64)


def dropout_setup(shape, p, backend, seed=1234):
    """(mask for the reference, a function that re-seeds before the kernel draws)."""
    mask = probe_mask(shape, p, seed, backend) if p > 0 else None
    return mask, (lambda: torch.manual_seed(seed))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("alpha_kind", ALPHAS)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("contiguous", [True, False])
def test_rezero_residual(backend, dtype, shape, alpha_kind, p, contiguous):
    torch.manual_seed(0)
    x, fx = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    alpha = make_alpha(alpha_kind, shape[-1])
    mask, reseed = dropout_setup(shape, p, backend)

    def kernel(x, fx, alpha):
        reseed()
        return F.rezero_residual(x, fx, alpha, p, backend=backend)

    ref = reference("rezero_residual", mask)
    assert_parity(kernel, lambda x, fx, a: ref(x, fx, a, p), [x, fx, alpha],
                  torch.randn(shape, dtype=torch.float64), dtype, contiguous, ["x", "fx", "alpha"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=str)
@pytest.mark.parametrize("activation", ["identity", "relu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("contiguous", [True, False])
def test_bias_act_dropout(backend, dtype, shape, activation, p, contiguous):
    torch.manual_seed(0)
    h, bias = torch.randn(shape, dtype=torch.float64), torch.randn(shape[-1], dtype=torch.float64)
    mask, reseed = dropout_setup(shape, p, backend)

    def kernel(h, bias):
        reseed()
        return F.bias_act_dropout(h, bias, activation, p, backend=backend)

    ref = reference("bias_act_dropout", mask)
    assert_parity(kernel, lambda h, b: ref(h, b, activation, p), [h, bias],
                  torch.randn(shape, dtype=torch.float64), dtype, contiguous, ["h", "bias"])


LINEAR_SHAPES = [((7,), 5, 3), ((2, 9), 33, 17), ((3, 4), 64, 129)]  # (leading, in, out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dims", LINEAR_SHAPES, ids=str)
@pytest.mark.parametrize("alpha_kind", ALPHAS)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("contiguous", [True, False])
def test_rezero_linear(backend, dtype, dims, alpha_kind, p, contiguous):
    lead, n_in, n_out = dims
    torch.manual_seed(0)
    x = torch.randn(*lead, n_out, dtype=torch.float64)
    inp = torch.randn(*lead, n_in, dtype=torch.float64)
    weight = torch.randn(n_out, n_in, dtype=torch.float64) / n_in ** 0.5
    bias = torch.randn(n_out, dtype=torch.float64)
    alpha = make_alpha(alpha_kind, n_out)
    mask, reseed = dropout_setup(x.shape, p, backend)

    def kernel(x, inp, w, b, a):
        reseed()
        return F.rezero_linear(x, inp, w, b, a, p, backend=backend)

    ref = reference("rezero_linear", mask)
    assert_parity(kernel, lambda x, i, w, b, a: ref(x, i, w, b, a, p),
                  [x, inp, weight, bias, alpha], torch.randn(x.shape, dtype=torch.float64), dtype,
                  contiguous, ["x", "inp", "weight", "bias", "alpha"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_linear_bias_act_dropout(backend, dtype, activation, p):
    torch.manual_seed(0)
    inp = torch.randn(3, 7, 33, dtype=torch.float64)
    weight = torch.randn(65, 33, dtype=torch.float64) / 33 ** 0.5
    bias = torch.randn(65, dtype=torch.float64)
    mask, reseed = dropout_setup((3, 7, 65), p, backend)

    def kernel(inp, w, b):
        reseed()
        return F.linear_bias_act_dropout(inp, w, b, activation, p, backend=backend)

    ref = reference("linear_bias_act_dropout", mask)
    assert_parity(kernel, lambda i, w, b: ref(i, w, b, activation, p), [inp, weight, bias],
                  torch.randn(3, 7, 65, dtype=torch.float64), dtype, True, ["inp", "weight", "bias"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_promote_like_eager(backend):
    x = torch.randn(4, 8)
    fx = torch.randn(4, 8, dtype=torch.bfloat16)
    alpha = torch.tensor([0.5])
    out = F.rezero_residual(x, fx, alpha, backend=backend)
    assert out.dtype == (x + alpha * fx).dtype == torch.float32
    torch.testing.assert_close(out, x + alpha * fx.float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_python_float_alpha_and_missing_bias(backend):
    x, inp, w = torch.randn(3, 4), torch.randn(3, 5), torch.randn(4, 5)
    torch.testing.assert_close(F.rezero_residual(x, inp[:, :4], 0.25, backend=backend),
                               x + 0.25 * inp[:, :4])
    torch.testing.assert_close(F.rezero_linear(x, inp, w, None, 0.5, backend=backend),
                               x + 0.5 * inp @ w.T)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_nan_behave_like_eager(backend):
    empty = torch.empty(0, 16)
    assert F.rezero_residual(empty, empty, torch.ones(1), 0.1, backend=backend).shape == (0, 16)
    assert F.bias_act_dropout(empty, torch.zeros(16), "gelu", 0.1, backend=backend).shape == (0, 16)
    x = torch.tensor([[1.0, float("nan")]])
    out = F.rezero_residual(x, torch.ones(1, 2), torch.ones(1), backend=backend)
    assert out[0, 0] == 2.0 and out[0, 1].isnan()
