"""The compiled ops as torch operators: fp64 gradcheck (dropout on, with a fixed seed),
torch.library.opcheck and torch.compile(fullgraph=True) of layer stacks (autocast: test_parity.py)."""
import pytest
import torch
import torch.nn as nn

import rezero_kernels as rzk

pytestmark = pytest.mark.skipif(not rzk.backends()["cpu"], reason="compiled extension not built")
F = rzk.functional


def seeded(fn, seed=11):
    def call(*args):
        torch.manual_seed(seed)  # the same mask at every evaluation of gradcheck
        return fn(*args)
    return call


def f64(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("channels", [1, 9])
def test_gradcheck_residual(p, channels):
    fn = seeded(lambda x, fx, a: F.rezero_residual(x, fx, a, p))
    assert torch.autograd.gradcheck(fn, (f64(4, 9), f64(4, 9), f64(channels)))


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("activation", ["identity", "relu", "gelu", "gelu_tanh"])
def test_gradcheck_bias_act_dropout(p, activation):
    fn = seeded(lambda h, b: F.bias_act_dropout(h, b, activation, p))
    assert torch.autograd.gradcheck(fn, (f64(3, 2, 11), f64(11)))


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("channels", [1, 6])
def test_gradcheck_rezero_linear(p, channels):
    fn = seeded(lambda x, i, w, b, a: F.rezero_linear(x, i, w, b, a, p))
    assert torch.autograd.gradcheck(fn, (f64(2, 3, 6), f64(2, 3, 5), f64(6, 5), f64(6), f64(channels)))


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
def test_gradcheck_gated_act_dropout(p, activation):
    fn = seeded(lambda gu: F.gated_act_dropout(gu, activation, p))
    assert torch.autograd.gradcheck(fn, (f64(3, 2, 14),))


def test_gradcheck_linear_bias_act_dropout():
    fn = seeded(lambda i, w, b: F.linear_bias_act_dropout(i, w, b, "gelu", 0.25))
    assert torch.autograd.gradcheck(fn, (f64(4, 5), f64(7, 5), f64(7)))


def _seed(p):
    return torch.tensor([5, 6]) if p else torch.zeros(2, dtype=torch.int64)


def _opcheck_samples():
    x, fx, h = torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 8)
    inp, w, b = torch.randn(3, 5), torch.randn(8, 5), torch.randn(8)
    for p in (0.0, 0.3):
        for alpha in (torch.tensor([0.5]), torch.randn(8)):
            yield "residual", (x, fx, alpha, p, _seed(p))
            yield "linear_residual", (x, inp, w, b, alpha, p, _seed(p))
        for act in ("silu", "gelu_tanh"):
            yield "gated_act_dropout", (torch.randn(3, 2, 14), act, p, _seed(p))
            yield "gated_linear_residual", (x, torch.randn(3, 10), torch.randn(8, 5),
                                            torch.tensor([0.5]), act, 0.2, _seed(1), p, _seed(p))
        for act in ("relu", "gelu"):
            for bias in (b, None):
                yield "bias_act_dropout", (h, bias, act, p, _seed(p))
                yield "rezero_fc", (x, torch.randn(8, 8), bias, torch.tensor([0.5]), act, p,
                                    _seed(p))


@pytest.mark.parametrize("name,args", list(_opcheck_samples()))
def test_opcheck(name, args):
    import rezero_kernels.compiled_ops  # noqa: F401  (registers fake kernels and autograd)
    args = tuple(a.clone().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor)
                 else a for a in args)
    torch.library.opcheck(getattr(torch.ops.rezero_kernels, name), args)


MASKS2 = ([True, True], [True, False], [False, True])


def test_backward_ops_opcheck():
    import rezero_kernels.compiled_ops  # noqa: F401
    g, fx, h, b = torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 8), torch.randn(8)
    ops = torch.ops.rezero_kernels
    for mask in MASKS2:
        torch.library.opcheck(ops.residual_backward,
                              (g, fx, torch.tensor([0.5]), 0.3, _seed(1), mask))
        for bias in (b, None):
            torch.library.opcheck(ops.bias_act_dropout_backward,
                                  (g, h, bias, "gelu", 0.3, _seed(1), mask))
    for act in ("silu", "gelu"):
        torch.library.opcheck(ops.gated_act_dropout_backward,
                              (g, torch.randn(3, 16), act, 0.3, _seed(1)))
    for mask in ([True] * 3, [True, False, False], [False, True, True]):
        torch.library.opcheck(ops.gated_linear_residual_backward,
                              (g, torch.randn(3, 10), torch.randn(8, 5), torch.randn(8), "silu",
                               0.3, _seed(1), 0.2, _seed(1), mask))
    for act in ("relu", "gelu"):
        kept = torch.relu(fx) if act == "relu" else fx
        for bias in (b, None):
            torch.library.opcheck(ops.rezero_fc_backward,
                                  (g, h, torch.randn(8, 8), bias, torch.tensor([0.5]), kept, act,
                                   0.3, _seed(1), [True, True, bias is not None, True]))
    for mask in ([True] * 4, [True, False, True, False], [False, True, False, True]):
        torch.library.opcheck(ops.linear_residual_backward,
                              (g, torch.randn(3, 5), torch.randn(8, 5), b, torch.randn(8), 0.3,
                               _seed(1), mask))


@pytest.mark.parametrize("mask", MASKS2)
def test_backward_ops_return_what_the_mask_asks_for(mask):
    """An output the mask leaves out comes back as None; the others are the full gradients."""
    ops = torch.ops.rezero_kernels
    g, fx, b = torch.randn(3, 8), torch.randn(3, 8), torch.randn(8)
    seed, alpha = _seed(1), torch.tensor([0.5])
    full = ops.residual_backward(g, fx, alpha, 0.3, seed, [True, True])
    for got, want, wanted in zip(ops.residual_backward(g, fx, alpha, 0.3, seed, mask), full, mask):
        assert (got is None) == (not wanted)
        if wanted:
            assert torch.equal(got, want)
    full = ops.bias_act_dropout_backward(g, fx, b, "gelu", 0.3, seed, [True, True])
    masked = ops.bias_act_dropout_backward(g, fx, b, "gelu", 0.3, seed, mask)
    for got, want, wanted in zip(masked, full, mask):
        assert (got is None) == (not wanted)
        if wanted:
            assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("channels", [1, 257])
def test_residual_into_fx_writes_what_residual_returns(dtype, p, channels):
    """rezero_linear's CPU epilogue writes y over its GEMM result: the same values, bit for bit,
    as the out-of-place op (odd width, more rows than one thread's block, both gate shapes)."""
    ops = torch.ops.rezero_kernels
    x, fx = (torch.randn(301, 257, dtype=dtype) for _ in range(2))
    alpha = torch.randn(channels, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    want = ops.residual(x, fx, alpha, p, _seed(p))
    ops.residual_into_fx(x, fx, alpha, p, _seed(p))
    assert torch.equal(fx, want)


def test_rezero_linear_returns_a_new_tensor_on_the_cpu():
    """The result written over the GEMM's own output aliases none of the inputs."""
    x, inp, w = torch.randn(4, 8), torch.randn(4, 5), torch.randn(8, 5)
    before = x.clone()
    y = F.rezero_linear(x, inp, w, None, torch.tensor(0.5), backend="cpu")
    assert torch.equal(x, before)
    assert all(y.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
               for t in (x, inp, w))
    torch.testing.assert_close(y, x + 0.5 * inp @ w.T)


def test_compile_fullgraph_stack_matches_eager():
    torch.manual_seed(0)
    layer = rzk.RZTXEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, alpha_init=0.3)
    model = nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=False)
    x = torch.randn(2, 10, 32, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out_c = compiled(x, is_causal=True, mask=nn.Transformer.generate_square_subsequent_mask(10))
    out_e = model(x, is_causal=True, mask=nn.Transformer.generate_square_subsequent_mask(10))
    torch.testing.assert_close(out_c, out_e)
    g_c = torch.autograd.grad(out_c.sum(), [x, *model.parameters()])
    g_e = torch.autograd.grad(out_e.sum(), [x, *model.parameters()])
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b)


def test_compile_inductor_with_dropout_trains():
    torch.manual_seed(0)
    model = nn.Sequential(*[rzk.RZTXEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True,
                                                 alpha_init=0.1) for _ in range(2)],
                          rzk.ReZeroFCBlock(16, "gelu", alpha_init=0.1))
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(torch.randn(2, 6, 16))
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("op", ["residual", "bias_act", "gated", "linear", "fc"])
def test_double_backward_is_a_clear_error(op):
    x, fx = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    alpha, w = torch.ones(1, requires_grad=True), torch.randn(8, 8, requires_grad=True)
    out = {"residual": lambda: F.rezero_residual(x, fx, alpha, 0.1),
           "bias_act": lambda: F.bias_act_dropout(fx, alpha.expand(8), "gelu", 0.1),
           "gated": lambda: F.gated_act_dropout(fx * alpha, "silu", 0.1),
           "linear": lambda: F.rezero_linear(x, fx, w, None, alpha, 0.1),
           "fc": lambda: F.rezero_fc(fx, w, None, alpha, "gelu", 0.1)}[op]()
    (grad,) = torch.autograd.grad(out.sum(), (fx,), create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(grad.sum(), (alpha,))
