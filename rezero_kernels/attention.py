"""Multi-head attention on ``nn.MultiheadAttention``'s parameters through
``scaled_dot_product_attention`` (see ``scaled_dot_product`` for CPU training), with the output projection and the ReZero residual fused
into one ``rezero_linear``.  Mask semantics are ``nn.MultiheadAttention``'s: a bool mask is True
where attention is NOT allowed, a float mask is added to the scores; ``attn_mask`` is (L, S) or
(N * num_heads, L, S), ``key_padding_mask`` is (N, S)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from python_ref import causal_mask

from . import dispatch, functional


def _additive(mask: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not mask.is_floating_point():
        raise TypeError(f"{name} must be a bool or floating-point tensor, got {mask.dtype}")
    return mask.to(dtype)


def merged_mask(attn_mask, key_padding_mask, batch, heads, q_len, k_len, dtype):
    """One additive mask broadcastable to (batch, heads, q_len, k_len), or None."""
    merged = None
    if attn_mask is not None:
        merged = _additive(attn_mask, dtype, "attn_mask")
        if merged.dim() == 3:
            merged = merged.view(batch, heads, q_len, k_len)
        elif merged.dim() != 2:
            raise ValueError(f"attn_mask must be 2-D (L, S) or 3-D (N*num_heads, L, S), "
                             f"got {tuple(attn_mask.shape)}")
    if key_padding_mask is not None:
        if key_padding_mask.shape != (batch, k_len):
            raise ValueError(f"key_padding_mask must have shape {(batch, k_len)}, "
                             f"got {tuple(key_padding_mask.shape)}")
        pad = _additive(key_padding_mask, dtype, "key_padding_mask").view(batch, 1, 1, k_len)
        merged = pad if merged is None else merged + pad
    return merged


def scaled_dot_product(q, k, v, mask, causal, dropout_p, backend):
    """SDPA, except for CPU training with dropout on the compiled backend: there torch's SDPA
    falls back to its math path, whose bernoulli mask costs ~8 ns an element on one thread; the
    same math with the fused in-kernel dropout replaces it.  Like that math path, 16-bit inputs
    are widened to float32 for the scores, softmax and weighted sum (outside autocast, which
    would narrow the products again) and the result rounded back once.  Fewer key/value heads
    than query heads is grouped-query attention (each serves a group of query heads)."""
    fused_dropout = dropout_p > 0 and dispatch.uses_fused_cpu_dropout(backend, q.device)
    groups = q.shape[-3] // k.shape[-3]
    if not fused_dropout:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                              dropout_p=dropout_p, enable_gqa=groups != 1)
    dtype = q.dtype
    if dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    if groups != 1:
        k, v = k.repeat_interleave(groups, dim=-3), v.repeat_interleave(groups, dim=-3)
    with torch.autocast(q.device.type, enabled=False):
        scores = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        if causal:
            mask = _additive(causal_mask(q.shape[-2], k.shape[-2], q.device), q.dtype,
                             "causal mask")
        if mask is not None:
            scores = scores + mask
        # SDPA's own softmax: a row whose every key is masked (a left-padded query) gets zero
        # weights, not NaN
        probs = functional.bias_act_dropout(torch.ops.aten._safe_softmax(scores, -1), None,
                                            "identity", dropout_p, True, backend)
        return torch.matmul(probs, v).to(dtype)


def multi_head_attention(x, kv, in_weight, in_bias, heads, batch_first, dropout_p, *,
                         attn_mask=None, key_padding_mask=None, is_causal=False, backend="auto"):
    """Attention of ``x`` over ``kv`` with the packed ``[q; k; v]`` in-projection
    ``in_weight`` (3 * width, d_model) and ``in_bias``, ``heads`` heads of ``width // heads``,
    before the output projection: (.., width) in ``x``'s layout."""
    width = in_weight.shape[0] // 3
    if kv is x:
        q, k, v = F.linear(x, in_weight, in_bias).chunk(3, dim=-1)
    else:
        b_q, b_kv = (None, None) if in_bias is None else (in_bias[:width], in_bias[width:])
        q = F.linear(x, in_weight[:width], b_q)
        k, v = F.linear(kv, in_weight[width:], b_kv).chunk(2, dim=-1)

    def heads_view(t):  # (N, L, E) or (L, N, E) -> (N, H, L, D), a view
        t = t.unflatten(-1, (heads, width // heads))
        return t.permute(0, 2, 1, 3) if batch_first else t.permute(1, 2, 0, 3)

    q, k, v = heads_view(q), heads_view(k), heads_view(v)
    batch, _, q_len, _ = q.shape
    k_len = k.shape[2]
    causal = bool(is_causal) and key_padding_mask is None
    if is_causal and attn_mask is None and not causal:
        attn_mask = causal_mask(q_len, k_len, x.device)
    mask = None if causal else merged_mask(attn_mask, key_padding_mask, batch, heads, q_len,
                                           k_len, q.dtype)
    out = scaled_dot_product(q, k, v, mask, causal, dropout_p, backend)
    out = out.permute(0, 2, 1, 3) if batch_first else out.permute(2, 0, 1, 3)
    return out.flatten(-2)


def check_inputs(x, kv, embed):
    if x.dim() != 3 or kv.dim() != 3:
        raise ValueError(f"expected 3-D inputs, got {tuple(x.shape)} and {tuple(kv.shape)}")
    if x.shape[-1] != embed or kv.shape[-1] != embed:
        raise ValueError(f"inputs' last dimension must be d_model={embed}, "
                         f"got {x.shape[-1]} and {kv.shape[-1]}")


def rezero_attention(x, kv, attn: nn.MultiheadAttention, alpha, dropout_p, training, *,
                     attn_mask=None, key_padding_mask=None, is_causal=False, backend="auto"):
    """``x + alpha * dropout(MHA(x, kv, kv))`` with ``attn``'s weights, in ``x``'s layout."""
    check_inputs(x, kv, attn.embed_dim)
    out = multi_head_attention(x, kv, attn.in_proj_weight, attn.in_proj_bias, attn.num_heads,
                               attn.batch_first, attn.dropout if training else 0.0,
                               attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                               is_causal=is_causal, backend=backend)
    return functional.rezero_linear(x, out, attn.out_proj.weight, attn.out_proj.bias, alpha,
                                    dropout_p, training, backend)
