"""A ReZero decoder layer of the Llama family in plain PyTorch: the oracle for
``rezero_kernels.RZLlamaLayer``, which subclasses it.

    x = x + a1 * dropout(o_proj(attention(rope(q_proj(x)), rope(k_proj(x)), v_proj(x))))
    x = x + a2 * dropout(down_proj(dropout_mlp(act(gate(x)) * up(x))))

No norms (ReZero replaces the pre-RMSNorms), causal self-attention with rotary position
embeddings (RoPE, in the rotate-half form HF ``transformers`` uses), grouped-query attention
(``num_kv_heads`` key/value heads shared by groups of query heads; 1 is multi-query), a gated MLP
whose gate and up projections run as one GEMM (``gate_up``, output ``[gate | up]``),
bias-free projections except optional q/k/v biases (Qwen2).  Parameter names are HF's
``LlamaDecoderLayer``'s (``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``), so its
weights load as they are; the gates are ``resweight`` (one per layer, the paper's) or
``resweight`` and ``resweight_ff`` with ``share_alpha=False``.

Inputs are batch-first ``(batch, seq, d_model)``.  Masks follow the rest of the library (and
``nn.MultiheadAttention``): a bool mask is True where attention is NOT allowed, a float mask is
added to the scores; ``attn_mask`` is ``(L, S)``, ``(N, L, S)`` or ``(N, heads, L, S)``,
``key_padding_mask`` ``(N, S)``.  Causality is by position in the sequence (key j is visible
to query i when j <= i, counting cached keys first); ``position_ids`` only choose the rotations.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import functional as ref
from .activations import lookup


def default_hidden(d_model: int, multiple_of: int = 256) -> int:
    """The gated MLP's hidden size when none is given: 8/3 of the width (so that the three
    matrices cost what a 4x two-matrix MLP costs), rounded up to a multiple of ``multiple_of``
    (Llama's rule)."""
    hidden = int(8 * d_model / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


# --- rotary position embeddings ----------------------------------------------------------------

class _RotaryTable:
    """cos and sin of ``position * inv_freq`` for positions [0, length), computed once in float64
    (then rounded to each dtype asked for), per device and dtype, and grown by doubling when a
    longer sequence comes.  One table serves every layer with the same head size and base."""

    def __init__(self, head_dim: int, theta: float):
        self.head_dim, self.theta = head_dim, theta
        self.tables = {}  # (device, dtype) -> (cos, sin), each (length, head_dim)

    def get(self, length: int, device: torch.device, dtype: torch.dtype):
        key = (device, dtype)
        cached = self.tables.get(key)
        if cached is None or cached[0].shape[0] < length:
            size = max(256, 1 << (max(length, 1) - 1).bit_length())
            inv_freq = 1.0 / self.theta ** (
                torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim)
            freqs = torch.outer(torch.arange(size, dtype=torch.float64), inv_freq)
            angles = torch.cat([freqs, freqs], dim=-1)
            cached = (angles.cos().to(device=device, dtype=dtype),
                      angles.sin().to(device=device, dtype=dtype))
            self.tables[key] = cached
        return cached


_ROTARY_TABLES = {}


def rotary_table(head_dim: int, theta: float) -> _RotaryTable:
    key = (head_dim, float(theta))
    if key not in _ROTARY_TABLES:
        _ROTARY_TABLES[key] = _RotaryTable(head_dim, theta)
    return _ROTARY_TABLES[key]


def rotate_half(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of ``t`` (batch, heads, seq, head_dim) with cos/sin broadcastable to it."""
    return t * cos + rotate_half(t) * sin


def rotary_cos_sin(table: _RotaryTable, position_ids, start: int, length: int,
                   max_positions: int, device: torch.device, dtype: torch.dtype):
    """(cos, sin) shaped (1 or batch, 1, length, head_dim): positions ``start + [0, length)``
    when ``position_ids`` is None, else ``position_ids`` ((length,) or (batch, length)), which
    must lie below ``max_positions`` (checked for CPU tensors outside torch.compile: elsewhere
    the check would wait for the device)."""
    cos, sin = table.get(max(max_positions, start + length), device, dtype)
    if position_ids is None:
        return cos[start:start + length][None, None], sin[start:start + length][None, None]
    if position_ids.dim() not in (1, 2) or position_ids.shape[-1] != length:
        raise ValueError(f"position_ids must have shape ({length},) or (batch, {length}), got "
                         f"{tuple(position_ids.shape)}")
    if position_ids.is_floating_point() or position_ids.is_complex():
        raise TypeError(f"position_ids must be an integer tensor, got {position_ids.dtype}")
    if (position_ids.device.type == "cpu" and not torch.compiler.is_compiling()
            and position_ids.numel() and not 0 <= int(position_ids.min())
            <= int(position_ids.max()) < max_positions):
        raise ValueError(f"position_ids must lie in [0, max_positions={max_positions}), got "
                         f"[{int(position_ids.min())}, {int(position_ids.max())}]")
    ids = position_ids.to(device)
    cos, sin = cos[ids], sin[ids]
    return (cos[None, None], sin[None, None]) if ids.dim() == 1 else (cos[:, None], sin[:, None])


# --- key/value cache ----------------------------------------------------------------------------

class KVCache:
    """The keys (after RoPE) and values one layer has seen, for generation one step at a time:
    pass the same cache to every call of that layer; each call appends its keys and values and
    attends to all of them.  ``len(cache)`` is the number of positions held."""

    def __init__(self):
        self.keys = None
        self.values = None

    def __len__(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def update(self, keys: torch.Tensor, values: torch.Tensor):
        """Appends (batch, kv_heads, new, head_dim) keys and values; returns all of them."""
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            if keys.shape[:2] != self.keys.shape[:2]:
                raise ValueError(f"the cache holds batch x kv_heads {tuple(self.keys.shape[:2])}, "
                                 f"got {tuple(keys.shape[:2])}")
            self.keys = torch.cat([self.keys, keys], dim=-2)
            self.values = torch.cat([self.values, values], dim=-2)
        return self.keys, self.values


# --- masks --------------------------------------------------------------------------------------

def _additive(mask: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            mask, float("-inf"))
    if not mask.is_floating_point():
        raise TypeError(f"{name} must be a bool or floating-point tensor, got {mask.dtype}")
    return mask.to(dtype)


def attention_mask(attn_mask, key_padding_mask, causal: bool, batch: int, q_len: int,
                   k_len: int, device, dtype):
    """What ``scaled_dot_product_attention`` gets: (mask or None, is_causal).  Queries are the
    last ``q_len`` of ``k_len`` positions (the others come from a cache)."""
    past = k_len - q_len
    if attn_mask is None and key_padding_mask is None:
        if not causal or q_len == 1:  # one new token sees every key
            return None, False
        if past == 0:
            return None, True
    merged = None
    if causal:
        future = torch.ones(q_len, k_len, dtype=torch.bool, device=device).triu(past + 1)
        merged = _additive(future, dtype, "causal mask")
    if attn_mask is not None:
        if attn_mask.dim() not in (2, 3, 4) or tuple(attn_mask.shape[-2:]) != (q_len, k_len):
            raise ValueError(f"attn_mask must be (L, S), (N, L, S) or (N, heads, L, S) with "
                             f"L={q_len}, S={k_len}, got {tuple(attn_mask.shape)}")
        m = _additive(attn_mask, dtype, "attn_mask").to(device)
        m = m[:, None] if m.dim() == 3 else m
        merged = m if merged is None else merged + m
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (batch, k_len):
            raise ValueError(f"key_padding_mask must have shape {(batch, k_len)}, "
                             f"got {tuple(key_padding_mask.shape)}")
        pad = _additive(key_padding_mask, dtype, "key_padding_mask").to(device)[:, None, None]
        merged = pad if merged is None else merged + pad
    return merged, False


# --- the layer ----------------------------------------------------------------------------------

class LlamaAttention(nn.Module):
    """The attention projections of one layer (HF's names); the attention itself is the
    layer's."""

    def __init__(self, d_model, nhead, num_kv_heads, head_dim, qkv_bias, factory):
        super().__init__()
        self.q_proj = nn.Linear(d_model, nhead * head_dim, bias=qkv_bias, **factory)
        self.k_proj = nn.Linear(d_model, num_kv_heads * head_dim, bias=qkv_bias, **factory)
        self.v_proj = nn.Linear(d_model, num_kv_heads * head_dim, bias=qkv_bias, **factory)
        self.o_proj = nn.Linear(nhead * head_dim, d_model, bias=False, **factory)


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` (HF's module names); the layer runs gate and up as one
    GEMM (``gate_up``)."""

    def __init__(self, d_model, hidden, factory):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False, **factory)
        self.up_proj = nn.Linear(d_model, hidden, bias=False, **factory)
        self.down_proj = nn.Linear(hidden, d_model, bias=False, **factory)


def _stack(a, b, dtype):
    """``cat([a, b]).to(dtype)`` in one pass: each weight converted straight into its half of the
    stacked one (a float32 cat and then its cast would write and read a weight-sized float32
    copy in between)."""
    w = a.new_empty((a.shape[0] + b.shape[0],) + a.shape[1:], dtype=dtype)
    w[:a.shape[0]].copy_(a)
    w[a.shape[0]:].copy_(b)
    return w


class _StackedLinear(torch.autograd.Function):
    """``x @ cat([a, b]).T`` that does not keep the stacked weight for backward (F.linear on it
    would, a weight-sized tensor per layer): backward stacks it again.  Under autocast the
    weight is stacked in the autocast dtype and the forward GEMM runs in it; backward computes
    in the gradient's dtype and returns each gradient in its input's dtype, as autocast's
    F.linear does."""

    @staticmethod
    def forward(ctx, x, a, b):
        ctx.save_for_backward(x, a, b)
        device = x.device.type
        dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                 else a.dtype)
        return F.linear(x, _stack(a, b, dtype))

    @staticmethod
    def backward(ctx, grad):
        x, a, b = ctx.saved_tensors
        dt = grad.dtype
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ _stack(a, b, dt)).to(x.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            g2 = grad.reshape(-1, grad.shape[-1])
            grad_w = g2.t() @ x.reshape(-1, x.shape[-1]).to(dt)
            grad_a, grad_b = (g.to(a.dtype) for g in grad_w.split([a.shape[0], b.shape[0]]))
        return grad_x, grad_a, grad_b


def stacked_linear(x, a, b):
    """``x @ cat([a, b]).T`` as one GEMM, the stacked weight (a weight-sized copy per call) not
    kept for backward."""
    return _StackedLinear.apply(x, a, b)


def gate_up(mlp, x):
    """``[gate(x) | up(x)]`` from one GEMM on ``mlp``'s two weights stacked: the gated
    activation's input.  ``mlp`` is a ``GatedMLP`` or any module with bias-free ``gate_proj``
    and ``up_proj`` linears (HF's ``LlamaMLP``)."""
    return stacked_linear(x, mlp.gate_proj.weight, mlp.up_proj.weight)


_GATES = ("resweight", "resweight_ff")


class RZLlamaLayer(nn.Module):
    """ReZero decoder layer of the Llama family (see the module docstring).

    ``dropout``: the residual branches' dropout (before each gate); ``attn_dropout``: on the
    attention probabilities; ``mlp_dropout``: on the gated MLP's hidden ``act(g) * u``.
    ``dim_feedforward``: the MLP's hidden size (default ``default_hidden(d_model)``);
    ``head_dim``: default ``d_model // nhead``; ``max_positions``: the rotary table's length
    (longer sequences grow it; ``position_ids`` must stay below it).

    ``dropout_masks`` (this reference only): None, or the keep-masks the next forward applies
    instead of drawing them, by site: ``"attn"`` (the attention probabilities), ``"attn_out"``,
    ``"mlp"`` (the hidden), ``"mlp_out"``; tests hand it the masks a fused layer drew.
    """

    dropout_masks = None

    def __init__(self, d_model, nhead, num_kv_heads=None, dim_feedforward=None,
                 activation="silu", rope_theta=10000.0, qkv_bias=False, dropout=0.0,
                 attn_dropout=0.0, mlp_dropout=0.0, device=None, dtype=None, *, head_dim=None,
                 max_positions=4096, alpha_init=0.0, share_alpha=True):
        super().__init__()
        num_kv_heads = nhead if num_kv_heads is None else num_kv_heads
        dim_feedforward = default_hidden(d_model) if dim_feedforward is None else dim_feedforward
        if head_dim is None:
            if nhead <= 0 or d_model % nhead != 0:
                raise ValueError(f"d_model ({d_model}) must be a positive multiple of nhead "
                                 f"({nhead}), or give head_dim")
            head_dim = d_model // nhead
        if min(d_model, nhead, num_kv_heads, dim_feedforward, head_dim) <= 0:
            raise ValueError(f"d_model ({d_model}), nhead ({nhead}), num_kv_heads "
                             f"({num_kv_heads}), dim_feedforward ({dim_feedforward}) and "
                             f"head_dim ({head_dim}) must be positive")
        if nhead % num_kv_heads != 0:
            raise ValueError(f"nhead ({nhead}) must be a multiple of num_kv_heads "
                             f"({num_kv_heads}): each key/value head serves a group of query "
                             "heads")
        if head_dim % 2 != 0:
            raise ValueError(f"head_dim ({head_dim}) must be even for rotary embeddings")
        if rope_theta <= 0 or max_positions <= 0:
            raise ValueError(f"rope_theta ({rope_theta}) and max_positions ({max_positions}) "
                             "must be positive")
        for name, p in (("dropout", dropout), ("attn_dropout", attn_dropout),
                        ("mlp_dropout", mlp_dropout)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} probability must be in [0, 1), got {p}")
        self.activation_name = lookup(activation).name
        factory = {"device": device, "dtype": dtype}
        self.self_attn = LlamaAttention(d_model, nhead, num_kv_heads, head_dim, qkv_bias, factory)
        self.mlp = GatedMLP(d_model, dim_feedforward, factory)
        self.d_model, self.nhead, self.num_kv_heads = d_model, nhead, num_kv_heads
        self.head_dim, self.rope_theta = head_dim, float(rope_theta)
        self.max_positions = int(max_positions)
        self.dropout_p, self.attn_dropout, self.mlp_dropout = (
            float(dropout), float(attn_dropout), float(mlp_dropout))
        self.share_alpha = share_alpha
        for name in _GATES[:1] if share_alpha else _GATES:
            self.register_parameter(
                name, nn.Parameter(torch.full((1,), float(alpha_init), **factory)))

    def gate(self, name: str) -> torch.Tensor:
        """The alpha of one sublayer: ``resweight`` when shared."""
        return self.resweight if self.share_alpha else getattr(self, name)

    def extra_repr(self) -> str:
        return (f"heads={self.nhead}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"activation={self.activation_name!r}, rope_theta={self.rope_theta:g}, "
                f"dropout={self.dropout_p}, attn_dropout={self.attn_dropout}, "
                f"mlp_dropout={self.mlp_dropout}, share_alpha={self.share_alpha}")

    def forward(self, x, attn_mask=None, key_padding_mask=None, position_ids=None, cache=None,
                is_causal=True, rotary=None):
        """``x``: (batch, seq, d_model).  ``cache``: a ``KVCache`` (its keys come before ``x``'s
        positions, which then start at ``len(cache)`` unless ``position_ids`` says otherwise).
        ``rotary``: (cos, sin), each (batch or 1, seq, head_dim), computed by the caller (HF's
        rotary embedding, with its rope scaling) instead of the layer's own table."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be (batch, seq, d_model={self.d_model}), "
                             f"got {tuple(x.shape)}")
        x = self._attend(x, attn_mask, key_padding_mask, position_ids, cache, is_causal, rotary)
        return self._feed_forward(x)

    # The two sublayers; the fused layer replaces _attention_output, _scaled_dot_product and
    # _feed_forward, the tensor-parallel one (rezero_kernels.parallel) also _sublayer_input
    # and _project.

    def _sublayer_input(self, x):
        return x

    def _project(self, linear, inp):
        return linear(inp)

    def _attend(self, x, attn_mask, key_padding_mask, position_ids, cache, is_causal, rotary):
        inp = self._sublayer_input(x)
        batch, length, _ = inp.shape
        attn = self.self_attn

        def heads(proj):  # (batch, heads, length, head_dim)
            return self._project(proj, inp).view(batch, length, -1, self.head_dim).transpose(1, 2)

        q, k, v = heads(attn.q_proj), heads(attn.k_proj), heads(attn.v_proj)
        past = 0 if cache is None else len(cache)
        if rotary is None:
            cos, sin = rotary_cos_sin(rotary_table(self.head_dim, self.rope_theta), position_ids,
                                      past, length, self.max_positions, x.device, q.dtype)
        else:
            cos, sin = (t.to(q.dtype)[:, None] for t in rotary)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)
        mask, causal = attention_mask(attn_mask, key_padding_mask, is_causal, batch, length,
                                      k.shape[-2], x.device, q.dtype)
        p = self.attn_dropout if self.training else 0.0
        out = self._scaled_dot_product(q, k, v, mask, causal, p)
        return self._attention_output(x, out.transpose(1, 2).reshape(batch, length, -1))

    def _mask(self, site):
        return None if self.dropout_masks is None else self.dropout_masks.get(site)

    def _scaled_dot_product(self, q, k, v, mask, causal, p):
        keep = self._mask("attn") if p > 0 else None
        if keep is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                  dropout_p=p, enable_gqa=k.shape[1] != q.shape[1])
        groups = q.shape[1] // k.shape[1]  # SDPA's math, with the given mask
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        if causal:  # SDPA's is_causal: query i sees keys j <= i
            future = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device)
            mask = _additive(future.triu(1), q.dtype, "causal mask")
        if mask is not None:
            scores = scores + mask
        # (SDPA's softmax: zero weights, not NaN, where every key is masked)
        return ref.dropout(torch.ops.aten._safe_softmax(scores, -1), p, True, keep) @ v

    def _attention_output(self, x, out):
        o_proj = self.self_attn.o_proj
        return ref.rezero_linear(x, out, o_proj.weight, o_proj.bias, self.gate("resweight"),
                                 self.dropout_p, self.training, self._mask("attn_out"))

    def _feed_forward(self, x):
        gu = gate_up(self.mlp, x)
        h = ref.gated_act_dropout(gu, self.activation_name, self.mlp_dropout, self.training,
                                  self._mask("mlp"))
        return ref.rezero_linear(x, h, self.mlp.down_proj.weight, None, self.gate("resweight_ff"),
                                 self.dropout_p, self.training, self._mask("mlp_out"))
