"""Drop-in ReZero Transformer layers running on the fused ops.

Constructor, parameter names (``self_attn``, ``multihead_attn``, ``linear1``, ``linear2``,
``resweight``) and forward signatures are those of ``python_ref`` (shared base class), which
match the original ``rezero`` package, so its state_dicts load with ``strict=True``.  The
forward signatures are those ``nn.TransformerEncoder`` / ``nn.TransformerDecoder`` call
(``is_causal``, ``tgt_is_causal``, ``memory_is_causal``).

Per sublayer:  attention: in-projection GEMM, ``scaled_dot_product_attention``, then the output
projection, dropout and ReZero residual as one ``rezero_linear``;  feed-forward:
``linear_bias_act_dropout`` then ``rezero_linear``.  ``nn.TransformerEncoder`` warns that its
nested-tensor fast path needs ``nn.TransformerEncoderLayer``; pass ``enable_nested_tensor=False``
to silence it.
"""
from __future__ import annotations

from python_ref.transformer import _RZTXLayerBase

from . import dispatch, functional
from .attention import rezero_attention


class _FusedRZTXLayer(_RZTXLayerBase):
    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation="relu",
                 batch_first=False, device=None, dtype=None, *, alpha_init=0.0, share_alpha=True,
                 backend="auto"):
        super().__init__(d_model, nhead, dim_feedforward, dropout, activation, batch_first,
                         device, dtype, alpha_init=alpha_init, share_alpha=share_alpha)
        if backend != "auto" and backend not in dispatch.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of "
                             f"{dispatch.BACKENDS}")
        self.backend = backend

    def extra_repr(self) -> str:
        return (f"activation={self.activation_name!r}, dropout={self.dropout_p}, "
                f"share_alpha={self.share_alpha}, backend={self.backend!r}")

    def _feed_forward(self, x):
        h = functional.linear_bias_act_dropout(x, self.linear1.weight, self.linear1.bias,
                                               self.activation_name, self.dropout_p,
                                               self.training, self.backend)
        return functional.rezero_linear(x, h, self.linear2.weight, self.linear2.bias,
                                        self.gate("resweight_ff"), self.dropout_p, self.training,
                                        self.backend)

    def _attend(self, attn, gate, x, kv, mask, key_padding_mask, is_causal):
        return rezero_attention(x, kv, attn, gate, self.dropout_p, self.training,
                                attn_mask=mask, key_padding_mask=key_padding_mask,
                                is_causal=is_causal, backend=self.backend)


class RZTXEncoderLayer(_FusedRZTXLayer):
    """ReZero encoder layer: ``x += a * drop(SelfAttn(x)); x += a * drop(FF(x))``."""
    kind = "encoder"

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        x = self._attend(self.self_attn, self.gate("resweight"), src, src, src_mask,
                         src_key_padding_mask, is_causal)
        return self._feed_forward(x)


class RZTXDecoderLayer(_FusedRZTXLayer):
    """ReZero decoder layer: self-attention, cross-attention on ``memory``, feed-forward."""
    kind = "decoder"

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, tgt_is_causal=False, memory_is_causal=False):
        x = self._attend(self.self_attn, self.gate("resweight"), tgt, tgt, tgt_mask,
                         tgt_key_padding_mask, tgt_is_causal)
        x = self._attend(self.multihead_attn, self.gate("resweight_cross"), x, memory,
                         memory_mask, memory_key_padding_mask, memory_is_causal)
        return self._feed_forward(x)
