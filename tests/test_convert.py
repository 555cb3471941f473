"""``rezero_kernels.convert``: the original ``rezero`` package's layers and ``python_ref``'s become
the fused layers in place, with the same outputs and gradients (dropout 0), the same parameter
objects, train/eval state and dropout probability; the fused backend runs afterwards; what
cannot be converted faithfully is an error that leaves the model untouched."""
import copy
import logging
import os
import re

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import python_ref
import rezero_kernels as rzk

rezero_tx = pytest.importorskip("rezero.transformer", reason="the original rezero package")


def _randomise_gates(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "resweight" in name:
                p.copy_(0.2 + 0.6 * torch.rand(p.shape, generator=gen))


def _original_stack(layers, x, *rest, **masks):
    """The original layers run one after the other, as nn.TransformerEncoder/Decoder would if
    today's versions did not pass is_causal (which the original layers reject)."""
    for layer in layers:
        x = layer(x, *rest, **masks)
    return x


def _grads(out, model, inputs, seed=1):
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed),
                           dtype=out.dtype)
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(out, [p for _, p in model.named_parameters()] + inputs, grad_out)
    return dict(zip(names + [f"input{i}" for i in range(len(inputs))], grads))


def _assert_same(got, want, tol=1e-9):
    torch.testing.assert_close(got[0], want[0], rtol=tol, atol=tol)
    assert got[1].keys() == want[1].keys()
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], rtol=tol, atol=tol,
                                   msg=lambda m, n=name: f"grad of {n}: {m}")


class _OpNamespaces(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(func.namespace)
        return func(*args, **(kwargs or {}))


def _ran_fused_kernels(fn):
    with _OpNamespaces() as ops:
        fn()
    return "rezero_kernels" in ops.seen


def test_original_readme_encoder(caplog):
    # the original package's README, with dropout 0 so that outputs can be compared, in float64
    # so that they can be compared tightly, and a batch of 2 instead of 32
    torch.manual_seed(0)
    encoder_layer = rezero_tx.RZTXEncoderLayer(d_model=512, nhead=8, dropout=0.0)
    transformer_encoder = nn.TransformerEncoder(encoder_layer, num_layers=6,
                                                enable_nested_tensor=False).double()
    _randomise_gates(transformer_encoder)
    original = copy.deepcopy(transformer_encoder)
    src = torch.rand(10, 2, 512, dtype=torch.float64, requires_grad=True)
    out = _original_stack(original.layers, src)
    want = (out, _grads(out, original, [src]))

    params = {id(p) for p in transformer_encoder.parameters()}
    with caplog.at_level(logging.INFO, logger="rezero_kernels.conversion"):
        assert rzk.convert(transformer_encoder) is transformer_encoder
    assert "replaced 6 modules" in caplog.text
    assert all(type(m) is rzk.RZTXEncoderLayer for m in transformer_encoder.layers)
    assert {id(p) for p in transformer_encoder.parameters()} == params  # the same objects
    out = transformer_encoder(src)
    _assert_same((out, _grads(out, transformer_encoder, [src])), want)
    assert _ran_fused_kernels(lambda: transformer_encoder(src[:, :1]).sum().backward())


def test_original_readme_decoder():
    torch.manual_seed(0)
    decoder_layer = rezero_tx.RZTXDecoderLayer(d_model=512, nhead=8, dropout=0.0)
    transformer_decoder = nn.TransformerDecoder(decoder_layer, num_layers=6).double()
    _randomise_gates(transformer_decoder)
    original = copy.deepcopy(transformer_decoder)
    memory = torch.rand(10, 2, 512, dtype=torch.float64, requires_grad=True)
    tgt = torch.rand(20, 2, 512, dtype=torch.float64, requires_grad=True)
    out = _original_stack(original.layers, tgt, memory)
    want = (out, _grads(out, original, [tgt, memory]))

    rzk.convert(transformer_decoder)
    assert all(type(m) is rzk.RZTXDecoderLayer for m in transformer_decoder.layers)
    out = transformer_decoder(tgt, memory)
    _assert_same((out, _grads(out, transformer_decoder, [tgt, memory])), want)
    assert _ran_fused_kernels(lambda: transformer_decoder(tgt[:, :1], memory[:, :1]))


def test_nn_transformer_with_custom_encoder_and_decoder():
    torch.manual_seed(0)
    d, heads, ff = 64, 4, 128
    model = nn.Transformer(
        d, heads, custom_encoder=nn.TransformerEncoder(
            rezero_tx.RZTXEncoderLayer(d, heads, ff, dropout=0.0, activation="gelu"), 2,
            enable_nested_tensor=False),
        custom_decoder=nn.TransformerDecoder(rezero_tx.RZTXDecoderLayer(d, heads, ff, 0.0), 3)
    ).double()
    _randomise_gates(model)
    model.eval()  # and the state is kept
    original = copy.deepcopy(model)
    src = torch.randn(9, 4, d, dtype=torch.float64, requires_grad=True)
    tgt = torch.randn(7, 4, d, dtype=torch.float64, requires_grad=True)
    causal = nn.Transformer.generate_square_subsequent_mask(7, dtype=torch.float64)
    memory = _original_stack(original.encoder.layers, src)
    out = _original_stack(original.decoder.layers, tgt, memory, tgt_mask=causal)
    want = (out, _grads(out, original, [src, tgt]))

    rzk.convert(model, backend="cpu")
    assert not any(m.training for m in model.modules())
    layers = list(model.encoder.layers) + list(model.decoder.layers)
    assert [type(m) for m in layers] == [rzk.RZTXEncoderLayer] * 2 + [rzk.RZTXDecoderLayer] * 3
    assert layers[0].activation_name == "gelu" and all(m.backend == "cpu" for m in layers)
    out = model(src, tgt, tgt_mask=causal)
    _assert_same((out, _grads(out, model, [src, tgt])), want)


def test_python_ref_layers_and_settings_carry_over():
    torch.manual_seed(0)
    model = nn.Sequential(
        python_ref.RZTXEncoderLayer(32, 4, 64, dropout=0.0, activation="gelu_tanh",
                                    batch_first=True, share_alpha=False, dtype=torch.float64),
        python_ref.RZTXEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True,
                                    dtype=torch.float64))
    _randomise_gates(model)
    original = copy.deepcopy(model)
    x = torch.randn(3, 5, 32, dtype=torch.float64, requires_grad=True)
    out = original(x)
    want = (out, _grads(out, original, [x]))
    rzk.convert(model)
    assert [type(m) for m in model] == [rzk.RZTXEncoderLayer] * 2
    assert not model[0].share_alpha and model[0].activation_name == "gelu_tanh"
    assert model[0].batch_first and next(model.parameters()).dtype == torch.float64
    out = model(x)
    _assert_same((out, _grads(out, model, [x])), want)


def test_dropout_probability_shared_layers_and_a_bare_layer():
    layer = rezero_tx.RZTXEncoderLayer(16, 2, 32)  # default dropout 0.1
    model = nn.ModuleList([layer, layer])
    rzk.convert(model)
    assert model[0] is model[1] and model[0].dropout_p == 0.1
    bare = rezero_tx.RZTXDecoderLayer(16, 2, 32, dropout=0.2)
    fused = rzk.convert(bare)  # the model itself: the new layer is returned
    assert type(fused) is rzk.RZTXDecoderLayer and fused.dropout_p == 0.2
    assert fused.linear1 is bare.linear1 and fused.resweight is bare.resweight


def test_what_cannot_be_converted_is_an_error_and_changes_nothing():
    class Custom(rezero_tx.RZTXEncoderLayer):
        pass

    def fails(model, error, match):
        before = [type(m) for m in model.modules()]
        with pytest.raises(error, match=match):
            rzk.convert(model)
        assert [type(m) for m in model.modules()] == before

    ok = rezero_tx.RZTXEncoderLayer(16, 2, 32)
    fails(nn.Sequential(ok, Custom(16, 2, 32)), TypeError, r"1: cannot convert .*Custom.*subclass")
    tanh = rezero_tx.RZTXEncoderLayer(16, 2, 32)
    tanh.activation = torch.tanh
    fails(nn.Sequential(ok, tanh), ValueError, "unsupported activation")
    mixed = rezero_tx.RZTXEncoderLayer(16, 2, 32)
    mixed.dropout2.p = 0.3
    fails(nn.Sequential(mixed), ValueError, "one dropout probability")
    hooked = rezero_tx.RZTXEncoderLayer(16, 2, 32)
    hooked.register_forward_hook(lambda *args: None)
    fails(nn.Sequential(hooked), ValueError, "has hooks")
    extra = rezero_tx.RZTXEncoderLayer(16, 2, 32)
    extra.norm = nn.LayerNorm(16)
    fails(nn.Sequential(extra), ValueError, r"extra parts \['norm'\]")
    with pytest.raises(ValueError, match="unknown backend"):
        rzk.convert(nn.Sequential(ok), backend="fast")


def test_nothing_to_convert_warns():
    with pytest.warns(UserWarning, match="no ReZero layer"):
        rzk.convert(nn.Sequential(nn.Linear(4, 4)))
    fused = nn.Sequential(rzk.RZTXEncoderLayer(16, 2, 32))
    assert rzk.convert(fused)[0] is fused[0]  # already fused: left as it is, no warning


class _LucidrainsRezero(nn.Module):
    """The lucidrains-style wrapper: the caller adds the residual; g may be 0-dim."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.g = nn.Parameter(torch.tensor(0.3))

    def forward(self, x):
        return self.fn(x) * self.g


def _readme_rename():
    """The README's checkpoint-renaming function, run as written there."""
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    (code,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S)
               if "def rename(model, state)" in b]
    scope = {"rzk": rzk}
    exec(code.split("\nmodel.load_state_dict")[0], scope)
    return scope["rename"]


def test_lucidrains_style_migration_as_the_readme_says():
    def block():
        return nn.Sequential(nn.Linear(8, 8), nn.GELU())

    torch.manual_seed(0)
    old = nn.ModuleList(_LucidrainsRezero(block()) for _ in range(2))
    new = nn.ModuleList(rzk.ReZero(block()) for _ in range(2))
    new.load_state_dict(_readme_rename()(new, old.state_dict()))
    x = torch.randn(4, 8)
    want = x
    for wrapper in old:
        want = want + wrapper(want)  # before
    got = x
    for gate in new:
        got = gate(got)  # after
    torch.testing.assert_close(got, want)
    # a reversible block's y1 = x1 + f(x2)
    x1, x2 = torch.randn(4, 8), torch.randn(4, 8)
    torch.testing.assert_close(rzk.functional.rezero_residual(x1, old[0].fn(x2), new[0].resweight),
                               x1 + old[0](x2))
