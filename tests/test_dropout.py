"""The in-kernel dropout of the compiled backend: its statistics, its reproducibility, the same
mask in forward and backward, and agreement with the Philox rule documented in csrc/philox.h."""
import numpy as np
import pytest
import torch

import rezero_kernels as rzk

F = rzk.functional
pytestmark = pytest.mark.skipif(not rzk.backends()["cpu"], reason="compiled extension not built")


def philox4x32_10(counters: np.ndarray, key: int) -> np.ndarray:
    """Reference Philox4x32-10 in numpy: counters (n, 4) uint32 -> (n, 4) random words."""
    c = counters.astype(np.uint64)
    k0, k1 = np.uint64(key & 0xFFFFFFFF), np.uint64(key >> 32)
    mask32 = np.uint64(0xFFFFFFFF)
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c[:, 0]
        p1 = np.uint64(0xCD9E8D57) * c[:, 2]
        c = np.stack([(p1 >> np.uint64(32)) ^ c[:, 1] ^ k0, p1 & mask32,
                      (p0 >> np.uint64(32)) ^ c[:, 3] ^ k1, p0 & mask32], axis=1)
        k0 = (k0 + np.uint64(0x9E3779B9)) & mask32
        k1 = (k1 + np.uint64(0xBB67AE85)) & mask32
    return c.astype(np.uint32)


def test_mask_follows_the_documented_philox_rule():
    p, n = 0.3, 5000
    seed = torch.tensor([0x0123456789ABCDEF, 0x0FEDCBA987654321], dtype=torch.int64)
    out = torch.ops.rezero_kernels.residual(torch.zeros(n), torch.ones(n), torch.ones(1), p, seed)
    i = np.arange(n, dtype=np.uint64)
    base = int(seed[1])
    counters = np.stack([(i >> np.uint64(2)) & np.uint64(0xFFFFFFFF), i >> np.uint64(34),
                         np.full(n, base & 0xFFFFFFFF, np.uint64),
                         np.full(n, base >> 32, np.uint64)], axis=1)
    words = philox4x32_10(counters, int(seed[0]))[np.arange(n), (i % 4).astype(np.int64)]
    threshold = int((1 - p) * 2**32)
    expected = torch.from_numpy(words < threshold)
    assert torch.equal(out != 0, expected)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_keep_rate_and_scaling(p, dtype):
    n = 200_000
    out = F.rezero_residual(torch.zeros(n, dtype=dtype), torch.ones(n, dtype=dtype),
                            torch.ones(1), p)
    kept = out != 0
    rate = kept.double().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(rate - (1 - p)) < 5 * sigma
    expected = torch.tensor(1 / (1 - p), dtype=dtype)
    assert torch.all(out[kept] == expected)


def test_bias_act_dropout_keep_rate():
    out = F.bias_act_dropout(torch.ones(1000, 100), torch.zeros(100), "relu", 0.25)
    assert abs((out != 0).double().mean().item() - 0.75) < 5 * (0.25 * 0.75 / 1e5) ** 0.5


def test_reproducible_under_manual_seed_and_fresh_per_call():
    x, fx, a = torch.randn(64, 64), torch.randn(64, 64), torch.ones(1)
    torch.manual_seed(7)
    first = F.rezero_residual(x, fx, a, 0.5)
    second = F.rezero_residual(x, fx, a, 0.5)
    torch.manual_seed(7)
    again = F.rezero_residual(x, fx, a, 0.5)
    assert torch.equal(first, again)
    assert not torch.equal(first, second)


@pytest.mark.parametrize("op", ["residual", "bias_act", "linear"])
def test_backward_uses_the_forward_mask(op):
    """With fx = 1 and x = 0 the output is the scaled mask; the gradient of fx must be
    alpha * that same scaled mask (regenerated in backward, never stored)."""
    n = 4096
    if op == "residual":
        fx = torch.ones(4, n, requires_grad=True)
        out = F.rezero_residual(torch.zeros(4, n), fx, torch.ones(1), 0.4)
        (grad,) = torch.autograd.grad(out.sum(), fx)
    elif op == "bias_act":
        fx = torch.ones(4, n, requires_grad=True)
        out = F.bias_act_dropout(fx, torch.zeros(n), "identity", 0.4)
        (grad,) = torch.autograd.grad(out.sum(), fx)
    else:  # the GEMM output is inp @ I + 0 = inp
        fx = torch.ones(4, 64, requires_grad=True)
        out = F.rezero_linear(torch.zeros(4, 64), fx, torch.eye(64), torch.zeros(64),
                              torch.ones(1), 0.4)
        (grad,) = torch.autograd.grad(out.sum(), fx)
    assert (out != 0).any() and (out == 0).any()
    torch.testing.assert_close(grad, out)


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_no_dropout_when_not_training_or_p_zero(p):
    x, fx, a = torch.randn(32, 16), torch.randn(32, 16), torch.tensor([0.3])
    state = torch.get_rng_state()
    out = F.rezero_residual(x, fx, a, p, training=False)
    assert torch.equal(out, F.rezero_residual(x, fx, a, 0.0))
    torch.testing.assert_close(out, x + a * fx)
    assert torch.equal(torch.get_rng_state(), state), "the no-dropout path must not draw a seed"


def test_gradient_is_zero_where_dropped_and_alpha_over_keep_elsewhere():
    fx = torch.ones(100, 100, requires_grad=True)
    out = F.rezero_residual(torch.zeros(100, 100), fx, torch.tensor([2.0]), 0.2)
    (grad,) = torch.autograd.grad(out.sum(), fx)
    assert set(grad.unique().tolist()) <= {0.0, 2.0 / 0.8}
    torch.testing.assert_close(grad, out)  # out = alpha * mask / (1 - p) here
