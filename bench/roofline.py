"""Rooflines, measured in the same run as the cases they bound.

* Elementwise ops: achieved bandwidth (bytes each input read once + each output written once,
  see ``cases._op_bytes``) beside the copy bandwidth ``out.copy_(x)`` of the same size,
  preallocated (2 bytes moved per byte copied).
* GEMM op and layers: the ``floor`` variant, the same GEMMs (+ ``scaled_dot_product_attention``
  forward and backward for layers) with nothing else; ``time / floor`` is how close a variant
  comes to it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from python_ref import llama


def copy_call(like: torch.Tensor):
    """(callable copying a tensor of ``like``'s size into a preallocated one, bytes moved)."""
    src = like.detach().clone()
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 2 * src.numel() * src.element_size()


def gemm_floor(inputs, mode):
    """``rezero_linear``'s GEMMs alone, into preallocated outputs: fwd ``inp @ W^T``; bwd
    ``grad^T @ inp`` (dW) and ``grad @ W`` (d_inp).  ``inputs``: (x, inp, weight, ...)."""
    x, inp, w = (t.detach() for t in inputs[:3])
    y, dw, dinp = torch.empty_like(x), torch.empty_like(w), torch.empty_like(inp)

    def fwd():
        torch.mm(inp, w.t(), out=y)

    def bwd():
        torch.mm(x.t(), inp, out=dw)
        torch.mm(x, w, out=dinp)

    def both():
        fwd()
        bwd()
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": both}[mode]


class LayerFloor(nn.Module):
    """A layer's GEMMs and attention alone: per attention block the in-projection,
    ``scaled_dot_product_attention`` (no mask, no dropout) and the out-projection, then linear1
    and linear2; no activation, dropout, residual or norm.  Uses the reference layer's
    parameters (its ReZero gates stay unused)."""

    def __init__(self, ref):
        super().__init__()
        self.ref = ref
        self.blocks = [ref.self_attn] + ([ref.multihead_attn] if hasattr(ref, "multihead_attn")
                                         else [])

    def forward(self, x, memory=None):
        for i, attn in enumerate(self.blocks):
            e, h = attn.embed_dim, attn.num_heads
            w, b = attn.in_proj_weight, attn.in_proj_bias
            if i == 0:
                q, k, v = F.linear(x, w, b).chunk(3, dim=-1)
            else:
                q = F.linear(x, w[:e], b[:e])
                k, v = F.linear(memory, w[e:], b[e:]).chunk(2, dim=-1)
            q, k, v = (t.unflatten(-1, (h, e // h)).transpose(1, 2) for t in (q, k, v))
            o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(-2)
            x = F.linear(o, attn.out_proj.weight, attn.out_proj.bias)
        return F.linear(F.linear(x, self.ref.linear1.weight, self.ref.linear1.bias),
                        self.ref.linear2.weight, self.ref.linear2.bias)


def gbps(nbytes, seconds):
    return None if not nbytes or not seconds else nbytes / seconds / 1e9


class LlamaFloor(nn.Module):
    """A stack of Llama-style layers' GEMMs and attention alone, on ``python_ref.RZLlamaLayer``s'
    parameters: per layer the q/k/v projections, causal ``scaled_dot_product_attention`` with
    grouped-query attention, the output projection, the gate/up GEMM (its weights stacked, as the
    layer runs it) and the down GEMM; no RoPE, activation, product, dropout, gate or residual.
    The down GEMM reads ``hidden`` (a tensor of the hidden's shape) instead of act(g) * u, so that
    nothing but GEMMs sits between them, and its output is the next layer's input; forward
    returns (the last down output, every layer's gate/up output), and a training step
    differentiates them all (``grad_outputs``)."""

    def __init__(self, refs, hidden: torch.Tensor):
        super().__init__()
        self.refs, self.hidden = list(refs), hidden

    def forward(self, x):
        gate_ups = []
        for r in self.refs:
            a = r.self_attn
            batch, length, _ = x.shape

            def heads(t, n):
                return t.view(batch, length, n, r.head_dim).transpose(1, 2)
            q = heads(F.linear(x, a.q_proj.weight, a.q_proj.bias), r.nhead)
            k = heads(F.linear(x, a.k_proj.weight, a.k_proj.bias), r.num_kv_heads)
            v = heads(F.linear(x, a.v_proj.weight, a.v_proj.bias), r.num_kv_heads)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               enable_gqa=r.num_kv_heads != r.nhead)
            h = F.linear(o.transpose(1, 2).reshape(batch, length, -1), a.o_proj.weight)
            gate_ups.append(llama.gate_up(r.mlp, h))
            x = F.linear(self.hidden, r.mlp.down_proj.weight)
        return (x, *gate_ups)
