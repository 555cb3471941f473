"""``RZLlamaLayer``: a ReZero decoder layer of the Llama family (RoPE, grouped-query attention,
gated MLP, no biases, no norms) on the fused ops.

Constructor, parameter names and forward are ``python_ref.RZLlamaLayer``'s (the base class),
so a state_dict moves between them.  Per sublayer: attention: q/k/v projections (called as
modules), RoPE, ``scaled_dot_product_attention`` with grouped-query attention, then the output
projection, its dropout, the gate and the residual as one ``rezero_linear``; MLP: one GEMM for
gate and up, then ``rezero_gated_linear``: act(g) * u and its dropout (``gated_act_dropout``),
the down projection, its dropout, the gate and the residual, keeping for backward only the
gate/up GEMM's output (the compiled backends recompute the hidden from it).
"""
from __future__ import annotations

import python_ref
from python_ref.llama import KVCache, gate_up  # noqa: F401  (rezero_kernels.KVCache)

from . import dispatch, functional
from .attention import scaled_dot_product


class RZLlamaLayer(python_ref.RZLlamaLayer):
    """ReZero Llama-style decoder layer:
    ``x += a1 * drop(Attn(x)); x += a2 * drop(MLP(x))`` (see ``python_ref.llama``)."""

    def __init__(self, d_model, nhead, num_kv_heads=None, dim_feedforward=None,
                 activation="silu", rope_theta=10000.0, qkv_bias=False, dropout=0.0,
                 attn_dropout=0.0, mlp_dropout=0.0, device=None, dtype=None, *, head_dim=None,
                 max_positions=4096, alpha_init=0.0, share_alpha=True, backend="auto"):
        super().__init__(d_model, nhead, num_kv_heads, dim_feedforward, activation, rope_theta,
                         qkv_bias, dropout, attn_dropout, mlp_dropout, device, dtype,
                         head_dim=head_dim, max_positions=max_positions, alpha_init=alpha_init,
                         share_alpha=share_alpha)
        self.backend = dispatch.check_name(backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"

    def _scaled_dot_product(self, q, k, v, mask, causal, p):
        return scaled_dot_product(q, k, v, mask, causal, p, self.backend)

    def _attention_output(self, x, out):
        o_proj = self.self_attn.o_proj
        return functional.rezero_linear(x, out, o_proj.weight, o_proj.bias, self.gate("resweight"),
                                        self.dropout_p, self.training, self.backend)

    def _feed_forward(self, x):
        return functional.rezero_gated_linear(x, gate_up(self.mlp, x),
                                              self.mlp.down_proj.weight, self.gate("resweight_ff"),
                                              self.activation_name, self.mlp_dropout,
                                              self.dropout_p, self.training, self.backend)
