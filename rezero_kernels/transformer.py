"""Drop-in ReZero Transformer layers running on the fused ops.

Constructor, parameter names (``self_attn``, ``multihead_attn``, ``linear1``, ``linear2``,
``resweight``) and forward methods are those of ``python_ref``'s layers (the base classes), which
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

import python_ref

from . import dispatch, functional
from .attention import rezero_attention


class _FusedSublayers:
    """Replaces the reference layers' two sublayer methods by fused ones; their ``forward``
    (which calls them) is shared."""

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation="relu",
                 batch_first=False, device=None, dtype=None, *, alpha_init=0.0, share_alpha=True,
                 backend="auto"):
        super().__init__(d_model, nhead, dim_feedforward, dropout, activation, batch_first,
                         device, dtype, alpha_init=alpha_init, share_alpha=share_alpha)
        self.backend = dispatch.check_name(backend)

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


class RZTXEncoderLayer(_FusedSublayers, python_ref.RZTXEncoderLayer):
    """ReZero encoder layer: ``x += a * drop(SelfAttn(x)); x += a * drop(FF(x))``."""


class RZTXDecoderLayer(_FusedSublayers, python_ref.RZTXDecoderLayer):
    """ReZero decoder layer: self-attention, cross-attention on ``memory``, feed-forward."""
