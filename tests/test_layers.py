"""The fused RZTX layers against python_ref's, inside nn.TransformerEncoder/Decoder with causal and
padding masks, state_dict compatibility with the original ``rezero`` package, and the ReZero gate."""
import warnings

import pytest
import torch
import torch.nn as nn

import python_ref
import rezero_kernels as rzk

BACKENDS = ["torch"] + [b for b in ("cpu",) if rzk.backends()[b]]
D, H, FF = 32, 4, 48


def pair(kind, backend, batch_first=True, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    fused_cls = rzk.RZTXEncoderLayer if kind == "encoder" else rzk.RZTXDecoderLayer
    ref_cls = python_ref.RZTXEncoderLayer if kind == "encoder" else python_ref.RZTXDecoderLayer
    kw = {"dropout": 0.0, "alpha_init": 0.4, **kw}
    fused = fused_cls(D, H, FF, batch_first=batch_first, dtype=dtype, backend=backend, **kw)
    ref = ref_cls(D, H, FF, batch_first=batch_first, dtype=dtype, **kw)
    ref.load_state_dict(fused.state_dict())
    return fused, ref


def grads(module, out, inputs):
    params = [p for p in module.parameters()]
    return torch.autograd.grad(out, inputs + params, torch.ones_like(out))


def assert_same(fused, ref, *args, **kwargs):
    inputs = [a for a in args if isinstance(a, torch.Tensor)]
    out_f, out_r = fused(*args, **kwargs), ref(*args, **kwargs)
    torch.testing.assert_close(out_f, out_r, rtol=1e-9, atol=1e-9)
    for gf, gr in zip(grads(fused, out_f, inputs), grads(ref, out_r, inputs)):
        torch.testing.assert_close(gf, gr, rtol=1e-9, atol=1e-9)


def padding(batch, length):
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[0, -2:] = True
    return mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("share_alpha", [True, False])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_in_transformer_encoder(backend, batch_first, share_alpha, activation):
    fused, ref = pair("encoder", backend, batch_first, share_alpha=share_alpha, activation=activation)
    enc_f = nn.TransformerEncoder(fused, 3, enable_nested_tensor=False)
    enc_r = nn.TransformerEncoder(ref, 3, enable_nested_tensor=False)
    enc_r.load_state_dict(enc_f.state_dict())
    shape = (2, 9, D) if batch_first else (9, 2, D)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    causal = nn.Transformer.generate_square_subsequent_mask(9, dtype=torch.float64)
    assert_same(enc_f, enc_r, x)
    assert_same(enc_f, enc_r, x, mask=causal, is_causal=True)
    assert_same(enc_f, enc_r, x, src_key_padding_mask=padding(2, 9))
    assert_same(enc_f, enc_r, x, mask=causal, src_key_padding_mask=padding(2, 9))
    assert_same(fused, ref, x, is_causal=True)  # causal hint without a mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_first", [True, False])
def test_decoder_in_transformer_decoder(backend, batch_first):
    fused, ref = pair("decoder", backend, batch_first, share_alpha=False)
    dec_f, dec_r = nn.TransformerDecoder(fused, 2), nn.TransformerDecoder(ref, 2)
    dec_r.load_state_dict(dec_f.state_dict())
    tgt = torch.randn((2, 6, D) if batch_first else (6, 2, D), dtype=torch.float64, requires_grad=True)
    mem = torch.randn((2, 8, D) if batch_first else (8, 2, D), dtype=torch.float64, requires_grad=True)
    causal = nn.Transformer.generate_square_subsequent_mask(6, dtype=torch.float64)
    assert_same(dec_f, dec_r, tgt, mem, tgt_mask=causal, tgt_is_causal=True,
                tgt_key_padding_mask=padding(2, 6), memory_key_padding_mask=padding(2, 8))
    bool_memory_mask = torch.rand(6, 8) > 0.7
    bool_memory_mask[:, 0] = False
    assert_same(dec_f, dec_r, tgt, mem, memory_mask=bool_memory_mask)


def test_per_head_3d_attention_mask():
    fused, ref = pair("encoder", BACKENDS[-1])
    x = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)
    mask = torch.randn(2 * H, 5, 5, dtype=torch.float64)
    assert_same(fused, ref, x, src_mask=mask)


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_state_dict_from_original_rezero_package(kind):
    rezero_tx = pytest.importorskip("rezero.transformer")
    torch.manual_seed(0)
    original_cls = rezero_tx.RZTXEncoderLayer if kind == "encoder" else rezero_tx.RZTXDecoderLayer
    original = original_cls(D, H, FF, dropout=0.0).double().eval()
    with torch.no_grad():
        original.resweight.fill_(0.7)
    fused_cls = rzk.RZTXEncoderLayer if kind == "encoder" else rzk.RZTXDecoderLayer
    fused = fused_cls(D, H, FF, dropout=0.0, dtype=torch.float64).eval()
    fused.load_state_dict(original.state_dict(), strict=True)
    x = torch.randn(7, 2, D, dtype=torch.float64)  # the original is sequence-first
    args = (x,) if kind == "encoder" else (x, torch.randn(5, 2, D, dtype=torch.float64))
    torch.testing.assert_close(fused(*args), original(*args), rtol=1e-9, atol=1e-9)


def test_original_package_fails_inside_current_transformer_encoder():
    """Why this package exists: the original layer breaks in today's nn.TransformerEncoder."""
    rezero_tx = pytest.importorskip("rezero.transformer")
    encoder = nn.TransformerEncoder(rezero_tx.RZTXEncoderLayer(D, H, FF), 2,
                                    enable_nested_tensor=False)
    with pytest.raises(TypeError, match="is_causal"):
        encoder(torch.randn(5, 2, D))


def test_identity_at_init_and_alpha_shared():
    layer = rzk.RZTXEncoderLayer(D, H, FF, batch_first=True)
    x = torch.randn(2, 5, D)
    torch.testing.assert_close(layer(x), x)  # alpha = 0: dynamical isometry at init
    assert [n for n, _ in layer.named_parameters() if "resweight" in n] == ["resweight"]
    split = rzk.RZTXDecoderLayer(D, H, FF, share_alpha=False)
    assert {n for n, _ in split.named_parameters() if "resweight" in n} == {
        "resweight", "resweight_cross", "resweight_ff"}


def test_dropout_training_differs_eval_deterministic():
    layer = rzk.RZTXEncoderLayer(D, H, FF, dropout=0.3, alpha_init=1.0, batch_first=True)
    x = torch.randn(2, 5, D)
    assert not torch.equal(layer(x), layer(x))
    layer.eval()
    assert torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("bad, match", [
    (dict(d_model=30, nhead=4), "divisible"),
    (dict(dropout=1.0), "dropout"),
    (dict(activation="swish"), "activation"),
    (dict(backend="magic"), "backend"),
])
def test_layer_argument_errors(bad, match):
    args = {"d_model": D, "nhead": H, "dim_feedforward": FF, **bad}
    with pytest.raises(ValueError, match=match):
        rzk.RZTXEncoderLayer(**args)


def test_layer_input_width_error():
    layer = rzk.RZTXEncoderLayer(D, H, FF)
    with pytest.raises(ValueError, match="d_model"):
        layer(torch.randn(5, 2, D + 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rezero_gate(backend):
    block = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    gate = rzk.ReZero(block, alpha_init=0.0, backend=backend)
    x = torch.randn(3, 8, requires_grad=True)
    torch.testing.assert_close(gate(x), x)
    with torch.no_grad():
        gate.resweight.fill_(0.5)
    out = gate(x)
    torch.testing.assert_close(out, x + 0.5 * block(x))
    out.sum().backward()
    assert gate.resweight.grad is not None and block[0].weight.grad is not None
    per_channel = rzk.ReZero(nn.Conv2d(4, 4, 3, padding=1), channels=None)
    assert per_channel(torch.randn(1, 4, 5, 5)).shape == (1, 4, 5, 5)
    with pytest.raises(ValueError, match="width-preserving"):
        rzk.ReZero(nn.Linear(8, 4))(torch.randn(2, 8))


def test_nested_tensor_warning_is_torchs_own():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nn.TransformerEncoder(rzk.RZTXEncoderLayer(D, H, FF), 2, enable_nested_tensor=False)


@pytest.mark.skipif(not rzk.backends()["cpu"], reason="compiled extension not built")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_attention_dropout_is_sdpa_math_with_the_fused_mask(causal, dtype):
    """CPU training replaces SDPA's slow bernoulli dropout by the fused one; same math (16-bit
    inputs widened to float32, as SDPA's math path does), forward and gradients against float64
    with the mask recovered."""
    from parity import assert_parity, probe_mask
    from rezero_kernels.attention import scaled_dot_product
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, dtype=torch.float64) for _ in range(3))
    pad = torch.zeros(2, 1, 1, 5, dtype=torch.float64)
    pad[0, ..., -1] = float("-inf")
    p, seed = 0.3, 99
    keep = probe_mask((2, 3, 5, 5), p, seed, "cpu")
    future = torch.ones(5, 5, dtype=torch.bool).triu(1)
    causal_add = torch.zeros(5, 5, dtype=torch.float64).masked_fill(future, float("-inf"))

    def fused(q, k, v):
        torch.manual_seed(seed)
        return scaled_dot_product(q, k, v, None if causal else pad.to(q.dtype), causal, p, "cpu")

    def expected(q, k, v):
        mask = (causal_add if causal else pad).to(q.dtype)
        probs = torch.softmax(q @ k.transpose(-2, -1) / 8 ** 0.5 + mask, -1)
        return (probs * keep.to(q.dtype) / (1 - p)) @ v

    assert_parity(fused, expected, [q, k, v], torch.randn(2, 3, 5, 8, dtype=torch.float64),
                  dtype, names=["q", "k", "v"])


@pytest.mark.skipif(not rzk.backends()["cpu"], reason="compiled extension not built")
def test_cpu_attention_dropout_keeps_float32_math_under_autocast():
    """Inside bf16 autocast the widened scores and weighted sum stay float32 (autocast would
    narrow the matmuls of the widened inputs again): the same result as outside autocast."""
    from rezero_kernels.attention import scaled_dot_product
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 33, 16, dtype=torch.bfloat16) for _ in range(3))
    outs = []
    for enabled in (False, True):
        torch.manual_seed(7)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            outs.append(scaled_dot_product(q, k, v, None, True, 0.2, "cpu"))
    assert outs[1].dtype == torch.bfloat16
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
