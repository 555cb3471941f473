"""Llama-style layers with the norms ReZero removes, written out in plain PyTorch on a
``python_ref.RZLlamaLayer``'s projections, RoPE and SDPA: the baselines of the benchmark (where
HF ``transformers`` is absent) and of the depth reproduction (``reproduce_deep_lm.py``)."""
from __future__ import annotations

import torch.nn as nn

from python_ref import llama


def _attention(r, h):
    """Causal self-attention of ``r`` (an RZLlamaLayer) on ``h``: its output projection's
    output, no residual."""
    a = r.self_attn
    batch, length, _ = h.shape

    def heads(t, n):
        return t.view(batch, length, n, r.head_dim).transpose(1, 2)
    q, k, v = heads(a.q_proj(h), r.nhead), heads(a.k_proj(h), r.num_kv_heads), \
        heads(a.v_proj(h), r.num_kv_heads)
    cos, sin = llama.rotary_cos_sin(llama.rotary_table(r.head_dim, r.rope_theta), None, 0,
                                    length, r.max_positions, h.device, q.dtype)
    q, k = llama.apply_rotary(q, cos, sin), llama.apply_rotary(k, cos, sin)
    o = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                   enable_gqa=r.num_kv_heads != r.nhead)
    return a.o_proj(o.transpose(1, 2).reshape(batch, length, -1))


def _mlp(r, h):
    m = r.mlp
    return m.down_proj(nn.functional.silu(m.gate_proj(h)) * m.up_proj(h))


class _Normed(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        dev, dt = layer.resweight.device, layer.resweight.dtype
        self.input_layernorm = nn.RMSNorm(layer.d_model, eps=1e-6, device=dev, dtype=dt)
        self.post_attention_layernorm = nn.RMSNorm(layer.d_model, eps=1e-6, device=dev, dtype=dt)


class PreNormLlama(_Normed):
    """The layer a user trains without ReZero (Llama's): ``x + Attn(RMSNorm(x))``, then
    ``x + MLP(RMSNorm(x))``, SiLU, no dropout; the layer's gates are unused."""

    def forward(self, x):
        x = x + _attention(self.layer, self.input_layernorm(x))
        return x + _mlp(self.layer, self.post_attention_layernorm(x))


class PostNormLlama(_Normed):
    """The same sublayers in the original Transformer's arrangement: ``RMSNorm(x + Attn(x))``,
    then ``RMSNorm(x + MLP(x))``."""

    def forward(self, x):
        x = self.input_layernorm(x + _attention(self.layer, x))
        return self.post_attention_layernorm(x + _mlp(self.layer, x))
