"""ReZero Transformer layers in plain PyTorch: the oracle for ``rezero_kernels``' fused layers.

Same constructor, parameter names and forward signatures as the fused layers, so a state_dict
moves between them.  Attention is ``nn.MultiheadAttention`` itself; every sublayer is
``x + alpha * dropout(sublayer(x))`` with an unfused dropout.  ``share_alpha=True`` (the paper
and the original ``rezero`` package) uses one ``resweight`` for all sublayers of a layer;
``share_alpha=False`` adds ``resweight_cross`` (decoder only) and ``resweight_ff``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import functional as ref
from .activations import lookup

_SUBLAYER_GATES = {"encoder": ("resweight", "resweight_ff"),
                   "decoder": ("resweight", "resweight_cross", "resweight_ff")}


def check_layer_args(d_model, nhead, dim_feedforward, dropout, activation):
    if d_model <= 0 or nhead <= 0 or dim_feedforward <= 0:
        raise ValueError(f"d_model ({d_model}), nhead ({nhead}) and dim_feedforward "
                         f"({dim_feedforward}) must be positive")
    if d_model % nhead != 0:
        raise ValueError(f"d_model ({d_model}) must be divisible by nhead ({nhead})")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {dropout}")
    lookup(activation)


def causal_mask(query_len: int, key_len: int, device=None) -> torch.Tensor:
    """Boolean (query_len, key_len) mask, True where attention is not allowed (future keys)."""
    return torch.ones(query_len, key_len, dtype=torch.bool, device=device).triu(1)


class _RZTXLayerBase(nn.Module):
    """Parameters shared by both layer kinds (names match the original ``rezero`` package)."""

    kind = "encoder"

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation="relu",
                 batch_first=False, device=None, dtype=None, *, alpha_init=0.0, share_alpha=True):
        super().__init__()
        check_layer_args(d_model, nhead, dim_feedforward, dropout, activation)
        factory = {"device": device, "dtype": dtype}
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout,
                                               batch_first=batch_first, **factory)
        if self.kind == "decoder":
            self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout,
                                                        batch_first=batch_first, **factory)
        self.linear1 = nn.Linear(d_model, dim_feedforward, **factory)
        self.linear2 = nn.Linear(dim_feedforward, d_model, **factory)
        self.dropout_p = float(dropout)
        self.activation_name = activation
        self.batch_first = batch_first
        self.share_alpha = share_alpha
        names = _SUBLAYER_GATES[self.kind][:1] if share_alpha else _SUBLAYER_GATES[self.kind]
        for name in names:
            self.register_parameter(name, nn.Parameter(torch.full((1,), float(alpha_init), **factory)))

    def gate(self, name: str) -> torch.Tensor:
        """The alpha of one sublayer: ``resweight`` when shared."""
        return self.resweight if self.share_alpha else getattr(self, name)

    def _feed_forward(self, x):
        h = ref.bias_act_dropout(nn.functional.linear(x, self.linear1.weight), self.linear1.bias,
                                 self.activation_name, self.dropout_p, self.training)
        return ref.rezero_linear(x, h, self.linear2.weight, self.linear2.bias,
                                 self.gate("resweight_ff"), self.dropout_p, self.training)

    def _attend(self, attn, gate, x, kv, mask, key_padding_mask, is_causal):
        if is_causal and mask is None:
            seq = 1 if self.batch_first else 0
            mask = causal_mask(x.shape[seq], kv.shape[seq], x.device)
        out = attn(x, kv, kv, attn_mask=mask, key_padding_mask=key_padding_mask,
                   need_weights=False, is_causal=is_causal)[0]
        return ref.rezero_residual(x, out, gate, self.dropout_p, self.training)


class RZTXEncoderLayer(_RZTXLayerBase):
    kind = "encoder"

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        x = self._attend(self.self_attn, self.gate("resweight"), src, src, src_mask,
                         src_key_padding_mask, is_causal)
        return self._feed_forward(x)


class RZTXDecoderLayer(_RZTXLayerBase):
    kind = "decoder"

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, tgt_is_causal=False, memory_is_causal=False):
        x = self._attend(self.self_attn, self.gate("resweight"), tgt, tgt, tgt_mask,
                         tgt_key_padding_mask, tgt_is_causal)
        x = self._attend(self.multihead_attn, self.gate("resweight_cross"), x, memory, memory_mask,
                         memory_key_padding_mask, memory_is_causal)
        return self._feed_forward(x)
