"""``RZLlamaLayer`` (rezero_kernels/llama.py) against its reference ``python_ref.RZLlamaLayer``
on every target: forward and the gradients of the input and every parameter (float64 and
float32 tightly, bfloat16/float16 by parity.check_results' rule), grouped-query and multi-query
attention, odd sizes, masks, ``position_ids``, dropout with the fused layer's masks recovered,
the key/value cache against the full forward; and the reference itself against HF
``transformers``' ``LlamaDecoderLayer`` (its norms taken out), torch.compile, activation
checkpointing and errors.  FSDP2 and DDP: two_ranks.Net; weights_only loading:
test_serialization.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.utils.checkpoint as ckpt
from torch.func import functional_call

import python_ref
import rezero_kernels as rzk
from parity import assert_parity
from targets import target  # noqa: F401  (the fixture)

F = rzk.functional
F_linear = torch.nn.functional.linear
SEED = 4321
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# (d_model, heads, kv heads, hidden, head_dim, seq): GQA, MQA, MHA with q/k/v biases, and odd
# sizes (width 36 = 6 heads of 6, hidden 37, 7 tokens)
CONFIGS = {
    "gqa": dict(d_model=32, nhead=4, num_kv_heads=2, dim_feedforward=48),
    "mqa": dict(d_model=32, nhead=4, num_kv_heads=1, dim_feedforward=40, activation="gelu"),
    "mha qkv-bias": dict(d_model=24, nhead=2, dim_feedforward=32, qkv_bias=True,
                         activation="gelu_tanh", share_alpha=False),
    "odd": dict(d_model=36, nhead=6, num_kv_heads=3, dim_feedforward=37),
}


def pair(target, config, alpha=0.5, **kw):
    """(fused layer on the target, its reference) with the same float64 parameters."""
    torch.manual_seed(0)
    kw = {**CONFIGS[config], **kw}
    fused = rzk.RZLlamaLayer(**kw, alpha_init=alpha, backend=target.backend,
                             device=target.device, dtype=torch.float64)
    ref = python_ref.RZLlamaLayer(**kw, alpha_init=alpha, device=target.device,
                                  dtype=torch.float64)
    with torch.no_grad():  # q/k/v biases and the gates: not zero
        for p in fused.parameters():
            if p.dim() == 1:
                p.uniform_(0.2, 0.8)
    ref.load_state_dict(fused.state_dict())
    return fused, ref


def as_function(layer, **kwargs):
    """f(x, *params) = layer(x) with those parameters (for gradients of every parameter)."""
    names = [n for n, _ in layer.named_parameters()]

    def f(x, *params):
        return functional_call(layer, dict(zip(names, params)), (x,), kwargs)
    return f, [p.detach() for p in layer.parameters()], ["x"] + names


def _probe(shape, p, target):
    """The keep-mask the next fused op with dropout p draws for an output of ``shape`` (every op
    of a backend draws one seed the same way and drops by output element)."""
    ones = torch.ones(shape, device=target.device)
    return F.rezero_residual(torch.zeros_like(ones), ones, torch.ones(1, device=target.device), p,
                             backend=target.backend) != 0


def recovered_masks(target, layer, batch, length, seed):
    """The masks the fused layer draws after ``manual_seed(seed)``, by site, in the order it
    draws them; attention-probability dropout is fused (and recoverable) only on the CPU
    backend, which runs it through bias_act_dropout."""
    sites = [("attn", (batch, layer.nhead, length, length), layer.attn_dropout),
             ("attn_out", (batch, length, layer.d_model), layer.dropout_p),
             ("mlp", (batch, length, layer.mlp.down_proj.in_features), layer.mlp_dropout),
             ("mlp_out", (batch, length, layer.d_model), layer.dropout_p)]
    torch.manual_seed(seed)
    return {name: _probe(shape, p, target) for name, shape, p in sites if p > 0}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dropout", ["off", "residual+mlp", "attention"])
def test_layer_matches_reference(target, dtype, config, dropout):
    if dropout == "attention" and (target.backend != "cpu" or dtype not in (torch.float64,
                                                                            torch.float32)):
        pytest.skip("attention-probability dropout is SDPA's own there (the cpu backend fuses "
                    "it for float32/64 only): its mask is not ours")
    if target.interpreted and (dtype in (torch.bfloat16, torch.float16) or config != "gqa"):
        pytest.skip("the interpreter runs float64/float32 of one configuration (GEMMs are slow)")
    p = {"off": {}, "residual+mlp": dict(dropout=0.3, mlp_dropout=0.2),
         "attention": dict(dropout=0.1, attn_dropout=0.4)}[dropout]
    fused, ref = pair(target, config, **p)
    batch, length = 2, 7
    x = torch.randn(batch, length, fused.d_model, dtype=torch.float64, device=target.device)
    ref.dropout_masks = recovered_masks(target, fused, batch, length, SEED) if p else None
    f_fused, params, names = as_function(fused)
    f_ref, _, _ = as_function(ref)

    def seeded(*args):
        torch.manual_seed(SEED)
        return f_fused(*args)
    assert_parity(seeded, f_ref, [x, *params], torch.randn_like(x), dtype, names=names)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_gradcheck_float64(target, p):
    if target.interpreted:
        pytest.skip("gradcheck's many evaluations are too slow in the interpreter")
    torch.manual_seed(0)  # tiny: gradcheck perturbs every element of every parameter
    fused = rzk.RZLlamaLayer(8, 2, 1, 6, dropout=p, mlp_dropout=p,
                             attn_dropout=p if target.backend == "cpu" else 0.0, alpha_init=0.5,
                             backend=target.backend, device=target.device, dtype=torch.float64)
    f, params, _ = as_function(fused)

    def seeded(*args):
        torch.manual_seed(SEED)
        return f(*args)
    x = torch.randn(2, 4, 8, dtype=torch.float64, device=target.device)
    inputs = [t.clone().requires_grad_(True) for t in [x, *params]]
    assert torch.autograd.gradcheck(seeded, inputs)


# --- the reference's semantics -------------------------------------------------------------

def test_reference_is_hf_llama_decoder_layer_without_its_norms():
    """With its two RMSNorms replaced by identities, HF's LlamaDecoderLayer is ``x + Attn(x)``,
    ``x + MLP(x)``: our layer at alpha = 1 (same RoPE, GQA grouping, causal SDPA)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama import modeling_llama as hf
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=48,
                                      rope_theta=500.0, attention_dropout=0.0)
    config._attn_implementation = "sdpa"
    theirs = hf.LlamaDecoderLayer(config, layer_idx=0).double().eval()
    theirs.input_layernorm = theirs.post_attention_layernorm = nn.Identity()
    ours = python_ref.RZLlamaLayer(32, 4, 2, 48, rope_theta=500.0, alpha_init=1.0,
                                   dtype=torch.float64)
    state = {k: v for k, v in theirs.state_dict().items() if "layernorm" not in k}
    ours.load_state_dict({**state, "resweight": torch.ones(1, dtype=torch.float64)})
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    positions = torch.arange(3, 12)[None].expand(2, -1)  # offset positions
    rotary = hf.LlamaRotaryEmbedding(config).double()
    out = theirs(x, position_embeddings=rotary(x, positions), position_ids=positions)
    out = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(ours(x, position_ids=positions), out, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_left_padding_with_position_ids_is_the_unpadded_sequence(backend):
    """A sequence left-padded by two masked keys, with positions counted from its first real
    token, gives the unpadded sequence's outputs at its real tokens."""
    if not rzk.backends().get(backend, True):
        pytest.skip("compiled extension not built")
    torch.manual_seed(0)
    layer = rzk.RZLlamaLayer(32, 4, 2, 48, alpha_init=0.7, backend=backend, dtype=torch.float64)
    x = torch.randn(1, 6, 32, dtype=torch.float64)
    padded = torch.cat([torch.randn(1, 2, 32, dtype=torch.float64), x], dim=1)
    pad = torch.tensor([[True, True] + [False] * 6])
    positions = (torch.arange(8) - 2).clamp(min=0)[None]
    out = layer(padded, key_padding_mask=pad, position_ids=positions)
    torch.testing.assert_close(out[:, 2:], layer(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_packed_sequences_are_independent(backend):
    """Two sequences packed into one row, with restarting position_ids and a block-diagonal
    mask, give what each gives alone."""
    if not rzk.backends().get(backend, True):
        pytest.skip("compiled extension not built")
    torch.manual_seed(0)
    layer = rzk.RZLlamaLayer(32, 4, 1, 48, alpha_init=0.7, backend=backend, dtype=torch.float64)
    a, b = torch.randn(1, 4, 32, dtype=torch.float64), torch.randn(1, 5, 32, dtype=torch.float64)
    positions = torch.cat([torch.arange(4), torch.arange(5)])
    segment = torch.tensor([0] * 4 + [1] * 5)
    other = segment[:, None] != segment[None, :]  # True: not allowed (and causal on top)
    out = layer(torch.cat([a, b], dim=1), attn_mask=other, position_ids=positions)
    torch.testing.assert_close(out[:, :4], layer(a), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out[:, 4:], layer(b), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mask", ["bool 2-D", "float 3-D", "bool 4-D", "padding", "not causal"])
def test_masks_match_the_reference(target, mask):
    if target.interpreted:
        pytest.skip("covered by the cpu target (same Python path; the interpreter is slow)")
    fused, ref = pair(target, "gqa")
    batch, length, dev = 2, 6, target.device
    x = torch.randn(batch, length, 32, dtype=torch.float64, device=dev, requires_grad=True)
    kwargs = {
        "bool 2-D": lambda: dict(attn_mask=torch.rand(length, length, device=dev) > 0.6),
        "float 3-D": lambda: dict(attn_mask=torch.randn(batch, length, length,
                                                        dtype=torch.float64, device=dev)),
        "bool 4-D": lambda: dict(attn_mask=torch.rand(batch, 4, length, length, device=dev) > 0.7,
                                 is_causal=False),
        "padding": lambda: dict(key_padding_mask=torch.tensor([[False] * 4 + [True] * 2,
                                                               [False] * 6], device=dev)),
        "not causal": lambda: dict(is_causal=False),
    }[mask]()
    out_f, out_r = fused(x, **kwargs), ref(x, **kwargs)
    torch.testing.assert_close(out_f, out_r, rtol=1e-10, atol=1e-10)
    for a, b in zip(torch.autograd.grad(out_f.sum(), [x, *fused.parameters()]),
                    torch.autograd.grad(out_r.sum(), [x, *ref.parameters()])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# --- the key/value cache --------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("config", ["gqa", "mqa"])
def test_cache_one_token_at_a_time_is_the_full_forward(backend, config):
    """A 3-layer stack: a 5-token prompt, then 4 tokens one at a time through each layer's
    cache, gives the full causal forward's outputs at every position."""
    if not rzk.backends().get(backend, True):
        pytest.skip("compiled extension not built")
    torch.manual_seed(0)
    layers = [rzk.RZLlamaLayer(**CONFIGS[config], alpha_init=0.6, backend=backend,
                               dtype=torch.float64).eval() for _ in range(3)]
    x = torch.randn(2, 9, 32, dtype=torch.float64)

    def stack(h, caches=None):
        for i, layer in enumerate(layers):
            h = layer(h, cache=None if caches is None else caches[i])
        return h

    full = stack(x)
    caches = [rzk.KVCache() for _ in layers]
    steps = [stack(x[:, :5], caches)] + [stack(x[:, t:t + 1], caches) for t in range(5, 9)]
    assert [len(c) for c in caches] == [9, 9, 9]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-10, atol=1e-10)


def test_cache_with_a_chunk_of_several_tokens():
    """Two tokens at once after a cached prompt: causal within the chunk, all of the prompt."""
    torch.manual_seed(0)
    layer = python_ref.RZLlamaLayer(32, 4, 2, 48, alpha_init=0.6, dtype=torch.float64)
    x = torch.randn(1, 7, 32, dtype=torch.float64)
    cache = python_ref.KVCache()
    got = torch.cat([layer(x[:, :4], cache=cache), layer(x[:, 4:6], cache=cache),
                     layer(x[:, 6:], cache=cache)], dim=1)
    torch.testing.assert_close(got, layer(x), rtol=1e-10, atol=1e-10)


# --- the layer in training set-ups ------------------------------------------------------------

def test_identity_at_init_and_gates():
    layer = rzk.RZLlamaLayer(32, 4, 2, 48)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(layer(x), x)  # alpha = 0
    assert [n for n, _ in layer.named_parameters() if "resweight" in n] == ["resweight"]
    split = rzk.RZLlamaLayer(32, 4, 2, 48, share_alpha=False)
    assert {n for n, _ in split.named_parameters() if "resweight" in n} == {
        "resweight", "resweight_ff"}
    assert rzk.RZLlamaLayer(48, 4).mlp.down_proj.in_features == 256  # 8/3 * 48 -> 256


def test_rotary_table_is_shared_and_not_rebuilt():
    a, b = rzk.RZLlamaLayer(32, 4, 2, 48), rzk.RZLlamaLayer(32, 4, 1, 40)
    table = python_ref.llama.rotary_table(8, 10000.0)
    x = torch.randn(1, 5, 32)
    a(x)
    first = table.tables[(x.device, x.dtype)]
    b(x)
    a(torch.randn(3, 9, 32))
    assert table.tables[(x.device, x.dtype)] is first  # one table for both, kept


@pytest.mark.skipif(not rzk.backends()["cpu"], reason="compiled extension not built")
def test_compile_fullgraph_stack_matches_eager():
    torch.manual_seed(0)
    model = nn.Sequential(*[rzk.RZLlamaLayer(32, 4, 2, 48, alpha_init=0.3) for _ in range(3)])
    x = torch.randn(2, 10, 32, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out_c, out_e = compiled(x), model(x)
    torch.testing.assert_close(out_c, out_e)
    for a, b in zip(torch.autograd.grad(out_c.sum(), [x, *model.parameters()]),
                    torch.autograd.grad(out_e.sum(), [x, *model.parameters()])):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("compiled", [False, True])
def test_stacked_gate_up_under_autocast_is_autocasts_linear(compiled):
    """The gate/up GEMM stacks its two weights straight into the autocast dtype: the same
    result and gradients (bit for bit) as autocast's F.linear on the float32 stacked weight,
    eagerly and under torch.compile(fullgraph=True)."""
    from python_ref.llama import stacked_linear
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, requires_grad=True)
    a, b = (torch.randn(24, 16, requires_grad=True) for _ in range(2))
    grad = torch.randn(3, 5, 48, dtype=torch.bfloat16)
    fn = torch.compile(stacked_linear, fullgraph=True, backend="aot_eager") if compiled \
        else stacked_linear
    results = []
    for f in (fn, lambda x, a, b: F_linear(x, torch.cat([a, b]))):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = f(x, a, b)
        results.append([out, *torch.autograd.grad(out, (x, a, b), grad)])
    assert results[0][0].dtype == torch.bfloat16
    assert [t.dtype for t in results[0][1:]] == [torch.float32] * 3
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.skipif(not rzk.backends()["cpu"], reason="compiled extension not built")
def test_compile_inductor_with_dropout_trains():
    torch.manual_seed(0)
    model = nn.Sequential(*[rzk.RZLlamaLayer(16, 2, 1, 24, dropout=0.1, attn_dropout=0.1,
                                             mlp_dropout=0.1, alpha_init=0.1)
                            for _ in range(2)])
    compiled = torch.compile(model, fullgraph=True)
    compiled(torch.randn(2, 6, 16)).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_activation_checkpointing_with_dropout_is_exact(backend):
    """torch.utils.checkpoint with preserve_rng_state=True (its default) replays the dropout
    seeds in the recompute: the gradients equal the plain run's, dropout on."""
    if not rzk.backends().get(backend, True):
        pytest.skip("compiled extension not built")
    torch.manual_seed(0)
    layers = nn.ModuleList(rzk.RZLlamaLayer(32, 4, 2, 48, dropout=0.2, attn_dropout=0.2,
                                            mlp_dropout=0.2, alpha_init=0.5, backend=backend)
                           for _ in range(2))
    x = torch.randn(2, 7, 32, requires_grad=True)

    def run(checkpointed):
        torch.manual_seed(7)
        h = x
        for layer in layers:
            h = ckpt.checkpoint(layer, h, use_reentrant=False) if checkpointed else layer(h)
        return torch.autograd.grad(h.square().sum(), [x, *layers.parameters()])

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bad, match", [
    (dict(nhead=4, num_kv_heads=3), "multiple of num_kv_heads"),
    (dict(d_model=30, nhead=4), "multiple of nhead"),
    (dict(d_model=30, nhead=2, head_dim=5), "even"),
    (dict(dropout=1.0), "dropout"),
    (dict(attn_dropout=-0.1), "attn_dropout"),
    (dict(activation="swish"), "activation"),
    (dict(backend="magic"), "backend"),
])
def test_argument_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        rzk.RZLlamaLayer(**{"d_model": 32, "nhead": 4, **bad})


def test_input_errors():
    layer = rzk.RZLlamaLayer(32, 4, 2, 48, max_positions=16)
    x = torch.randn(2, 5, 32)
    with pytest.raises(ValueError, match="d_model=32"):
        layer(torch.randn(2, 5, 31))
    with pytest.raises(ValueError, match="position_ids must have shape"):
        layer(x, position_ids=torch.arange(4))
    with pytest.raises(ValueError, match=r"position_ids must lie in \[0, max_positions=16\)"):
        layer(x, position_ids=torch.arange(300, 305))
    with pytest.raises(TypeError, match="integer"):
        layer(x, position_ids=torch.arange(5.0))
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        layer(x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask must be"):
        layer(x, attn_mask=torch.zeros(4, 4, dtype=torch.bool))
    cache = rzk.KVCache()
    layer(x, cache=cache)
    with pytest.raises(ValueError, match="batch x kv_heads"):
        layer(torch.randn(3, 1, 32), cache=cache)
