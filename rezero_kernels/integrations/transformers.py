"""HF ``transformers`` decoder models on the fused ReZero layers, in one call:

    from rezero_kernels.integrations.transformers import rezero_
    model = rezero_(AutoModelForCausalLM.from_config(config))   # in place; returns the model

For training from scratch.  ``transformers`` is optional: this module imports it, the package
does not.  Supported (tested with transformers 5.24):

* ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` and their base models:
  every decoder layer becomes an ``RZLlamaLayer`` that takes over the layer's attention and MLP
  modules (the very ``nn.Linear`` objects, so the same ``nn.Parameter``s: optimizer state,
  devices and dtypes carry on, and the state_dict keys stay HF's) and drops its two RMSNorms.
  The rotary embedding stays the model's (its rope scaling included): the layer applies the
  ``position_embeddings`` HF hands it.
* ``GPT2LMHeadModel`` and ``GPT2Model``: every ``GPT2Block`` becomes an ``RZGPT2Block`` on the
  RZTX-style fused ops (``rezero_linear`` for both output projections,
  ``linear_bias_act_dropout`` for the MLP's first GEMM and its GELU), dropping ``ln_1`` and
  ``ln_2``.  GPT-2's ``Conv1D`` stores its weight as (in, out), the transpose of
  ``nn.Linear``'s: the ops get ``weight.t()``, a view (no copy; the gradient reaches the
  ``Conv1D`` weight through it).

Each new layer has one gate ``resweight`` (``alpha_init``, 0: every layer is the identity at
init).  ``final_norm``: ``"keep"`` the model's last norm (``norm`` / ``ln_f``) or ``"drop"``
it (an ``nn.Identity``).  The model keeps working through HF's API: ``model(input_ids,
attention_mask=..., labels=...)``, ``generate`` with the cache, ``save_pretrained`` (restore with
``rezero_`` on a model from the same config, then ``load_state_dict``), ``Trainer``, and HF's
gradient checkpointing.

What cannot be converted faithfully is a ``TypeError``/``ValueError`` naming it, raised before
anything is replaced: an unknown architecture, an attention implementation other than
``sdpa``/``eager`` (they compute the same), sliding-window attention, parameters already
sharded by a tensor-parallel plan (DTensors), adapters (LoRA...) or any other module in place
of a projection, an MLP bias, an activation outside our table, GPT-2's cross-attention or its
layer-wise attention scaling.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import transformers
    from transformers.modeling_layers import GradientCheckpointingLayer
    from transformers.pytorch_utils import Conv1D
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("rezero_kernels.integrations.transformers needs HF transformers: "
                      f"pip install transformers ({error})") from error

from .. import dispatch, functional
from ..attention import scaled_dot_product
from ..llama import RZLlamaLayer

log = logging.getLogger(__name__)

# HF's activation names -> ours (python_ref/activations.py)
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_LLAMA_FAMILY = ("llama", "mistral", "qwen2")
FINAL_NORMS = ("keep", "drop")


class _LayerCache:
    """One layer's view of HF's cache, as ``RZLlamaLayer`` uses a ``KVCache``."""

    def __init__(self, cache, layer_idx: int):
        self.cache, self.layer_idx = cache, layer_idx

    def __len__(self) -> int:
        return self.cache.get_seq_length(self.layer_idx)

    def update(self, keys, values):
        return self.cache.update(keys, values, self.layer_idx)


def _not_allowed(mask):
    """HF's attention mask in our convention: HF's bool masks are True where attention is
    allowed (ours: where it is not); additive float masks are the same in both."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return ~mask


class RZHFLlamaLayer(GradientCheckpointingLayer, RZLlamaLayer):
    """An ``RZLlamaLayer`` with the call signature of HF's Llama-family decoder layers."""

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None,
                use_cache=False, position_embeddings=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        # HF passes no mask where plain causal attention is meant, else one that includes it
        return super().forward(hidden_states, attn_mask=_not_allowed(attention_mask),
                               position_ids=position_ids,
                               cache=None if cache is None else _LayerCache(cache, self.layer_idx),
                               is_causal=attention_mask is None, rotary=position_embeddings)


class RZGPT2Block(GradientCheckpointingLayer):
    """A ``GPT2Block`` without its LayerNorms, on the fused ops:
    ``x += a1 * drop(c_proj(attn(c_attn(x)))); x += a2 * drop(mlp(x))``.  Holds the block's own
    ``attn`` and ``mlp`` modules (HF's parameter names) and the gates."""

    def __init__(self, block, config, alpha_init=0.0, backend="auto"):
        super().__init__()
        self.attn, self.mlp = block.attn, block.mlp
        self.activation_name = _ACTIVATIONS[config.activation_function]
        self.layer_idx = block.attn.layer_idx
        self.backend = dispatch.check_name(backend)
        w = block.attn.c_proj.weight
        self.resweight = nn.Parameter(torch.full((1,), float(alpha_init), device=w.device,
                                                 dtype=w.dtype))
        self.train(block.training)

    def forward(self, hidden_states, cache=None, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, use_cache=False, past_key_values=None, **kwargs):
        if encoder_hidden_states is not None:
            raise ValueError("RZGPT2Block has no cross-attention")
        cache = cache if cache is not None else past_key_values
        a, m, x = self.attn, self.mlp, hidden_states
        batch, length, width = x.shape
        q, k, v = (t.view(batch, length, a.num_heads, a.head_dim).transpose(1, 2) for t in
                   F.linear(x, a.c_attn.weight.t(), a.c_attn.bias).split(width, dim=-1))
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        mask = attention_mask
        if mask is not None and mask.dtype == torch.bool:  # HF's: True where allowed
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(
                ~mask, float("-inf"))
        p = a.attn_dropout.p if self.training else 0.0
        out = scaled_dot_product(q, k, v, mask, mask is None and length > 1, p, self.backend)
        out = out.transpose(1, 2).reshape(batch, length, width)
        p_resid = a.resid_dropout.p
        x = functional.rezero_linear(x, out, a.c_proj.weight.t(), a.c_proj.bias, self.resweight,
                                     p_resid, self.training, self.backend)
        h = functional.linear_bias_act_dropout(x, m.c_fc.weight.t(), m.c_fc.bias,
                                               self.activation_name, 0.0, self.training,
                                               self.backend)
        return functional.rezero_linear(x, h, m.c_proj.weight.t(), m.c_proj.bias,
                                        self.resweight, m.dropout.p, self.training, self.backend)


def _base(model):
    """(model type, the module holding the layers) of a supported model."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if not isinstance(model, transformers.PreTrainedModel) or kind not in _LLAMA_FAMILY + ("gpt2",):
        raise TypeError(f"rezero_ converts LlamaForCausalLM, MistralForCausalLM, "
                        f"Qwen2ForCausalLM, GPT2LMHeadModel and their base models; got "
                        f"{type(model).__name__} (model_type {kind!r})")
    inner = "transformer" if kind == "gpt2" else "model"
    return kind, getattr(model, inner, model) if hasattr(model, inner) else model


def _check(model, kind, base) -> None:
    """Everything that would make the conversion unfaithful, before anything is replaced."""
    config = model.config
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in ("sdpa", "eager"):
        raise ValueError(f"attention implementation {impl!r} cannot be converted: the fused "
                         "layers compute 'sdpa' / 'eager' attention; load the model with "
                         "attn_implementation='sdpa'")
    window = getattr(config, "sliding_window", None)
    if window is not None and (kind != "qwen2" or getattr(config, "use_sliding_window", False)):
        raise ValueError(f"sliding-window attention (config.sliding_window={window}) is not "
                         "supported by the fused layers: set config.sliding_window = None "
                         "before building the model")
    if any("sliding" in t for t in getattr(config, "layer_types", None) or ()):
        raise ValueError("sliding-window attention (config.layer_types) is not supported")
    for name, param in model.named_parameters():
        if _is_dtensor(param):
            raise ValueError(f"parameter {name} is a DTensor: a tensor-parallel plan (or FSDP) "
                             "is applied; convert the model before parallelising it")
    layers = base.h if kind == "gpt2" else base.layers
    expected = ("GPT2Block" if kind == "gpt2" else
                {"llama": "LlamaDecoderLayer", "mistral": "MistralDecoderLayer",
                 "qwen2": "Qwen2DecoderLayer"}[kind])
    for i, layer in enumerate(layers):
        if type(layer).__name__ != expected:
            raise TypeError(f"layer {i} is a {type(layer).__name__}, not HF's {expected} "
                            "(converted already, or wrapped)")
        if kind == "gpt2":
            _check_gpt2_block(i, layer, config)
        else:
            _check_llama_layer(i, layer, config)


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - a torch without distributed
        return False
    return isinstance(t, DTensor)


def _exactly(i, module, name, cls):
    if type(module) is not cls:
        raise TypeError(f"layer {i}'s {name} is a {type(module).__name__}, not {cls.__name__}: "
                        "an adapter (LoRA...) or other module there cannot be converted; "
                        "convert before attaching it")


def _check_llama_layer(i, layer, config):
    attn, mlp = layer.self_attn, layer.mlp
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        _exactly(i, getattr(attn, name), f"self_attn.{name}", nn.Linear)
    for name in ("gate_proj", "up_proj", "down_proj"):
        _exactly(i, getattr(mlp, name), f"mlp.{name}", nn.Linear)
        if getattr(mlp, name).bias is not None:
            raise ValueError(f"layer {i}'s mlp.{name} has a bias (mlp_bias): not supported")
    if (attn.q_proj.bias is None) != (attn.k_proj.bias is None) or \
            (attn.q_proj.bias is None) != (attn.v_proj.bias is None):
        raise ValueError(f"layer {i}: q, k and v projections must all have biases or none")
    if _ACTIVATIONS.get(config.hidden_act) is None:
        raise ValueError(f"activation {config.hidden_act!r} is not one the fused layers have "
                         f"({sorted(_ACTIVATIONS)})")


def _check_gpt2_block(i, block, config):
    if hasattr(block, "crossattention"):
        raise ValueError("GPT-2 with cross-attention (add_cross_attention) is not supported")
    if config.scale_attn_by_inverse_layer_idx or config.reorder_and_upcast_attn:
        raise ValueError("GPT-2's scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn "
                         "are not supported")
    if not config.scale_attn_weights:
        raise ValueError("GPT-2 without scale_attn_weights is not supported")
    for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        _exactly(i, block.get_submodule(name), name, Conv1D)
    if _ACTIVATIONS.get(config.activation_function) is None:
        raise ValueError(f"activation {config.activation_function!r} is not one the fused layers "
                         f"have ({sorted(_ACTIVATIONS)})")


def _llama_layer(layer, config, alpha_init, backend):
    attn, mlp = layer.self_attn, layer.mlp
    weight = attn.q_proj.weight
    new = RZHFLlamaLayer(
        config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
        config.intermediate_size, _ACTIVATIONS[config.hidden_act],
        qkv_bias=attn.q_proj.bias is not None, attn_dropout=float(config.attention_dropout),
        device="meta", head_dim=attn.head_dim, alpha_init=alpha_init, backend=backend)
    new.self_attn, new.mlp = attn, mlp  # HF's modules: the same parameters, HF's names
    new.resweight = nn.Parameter(torch.full((1,), float(alpha_init), device=weight.device,
                                            dtype=weight.dtype))
    new.layer_idx = attn.layer_idx
    new.train(layer.training)
    return new


def _record_hidden_states(layers) -> None:
    """``output_hidden_states=True``: transformers 5 records each layer's output with a forward
    hook on the layers of HF's own class, installed once per model; ours get the same hook."""
    try:
        from transformers.utils.output_capturing import install_output_capuring_hook
    except ImportError:  # older transformers collect them in the model's own loop
        return
    for layer in layers:
        install_output_capuring_hook(layer, "hidden_states", 0)


def rezero_(model, *, alpha_init=0.0, final_norm="keep", backend="auto"):
    """Replace ``model``'s decoder layers by fused ReZero layers, in place (module docstring);
    returns ``model``."""
    if final_norm not in FINAL_NORMS:
        raise ValueError(f"final_norm must be one of {FINAL_NORMS}, got {final_norm!r}")
    dispatch.check_name(backend)
    kind, base = _base(model)
    _check(model, kind, base)
    if kind == "gpt2":
        base.h = nn.ModuleList(RZGPT2Block(b, model.config, alpha_init, backend) for b in base.h)
        layers, norm = base.h, "ln_f"
    else:
        base.layers = nn.ModuleList(_llama_layer(layer, model.config, alpha_init, backend)
                                    for layer in base.layers)
        layers, norm = base.layers, "norm"
    if final_norm == "drop":
        setattr(base, norm, nn.Identity())
    _record_hidden_states(layers)
    log.info("rezero_: %d %s layers replaced by %s (their two norms dropped), final norm %s",
             len(layers), kind, type(layers[0]).__name__ if len(layers) else "-",
             "kept" if final_norm == "keep" else "dropped")
    return model
