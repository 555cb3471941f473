"""``convert(model)``: replace the ReZero Transformer layers of the original ``rezero`` package
and of ``python_ref`` inside a model by the fused layers, in place.

The fused layer takes over the old layer's attention and linear modules and its gate parameters
themselves (the same ``nn.Parameter`` objects), so parameters, their device, dtype and
``requires_grad``, and an optimizer already holding them are kept; so is the train/eval state.
The original package's layers compute ``x + dropout(alpha * f(x))`` with one dropout
probability; the fused layer computes the same with that probability.
"""
from __future__ import annotations

import collections
import logging
import warnings

import torch.nn as nn
import torch.nn.functional as F

import python_ref

from . import dispatch
from .transformer import RZTXDecoderLayer, RZTXEncoderLayer

logger = logging.getLogger(__name__)

_ORIGINAL = "rezero.transformer.rztx"  # the original package's module defining its layers


def _name(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _attention_args(attn: nn.Module, where: str) -> dict:
    """d_model, nhead and layout of an nn.MultiheadAttention the fused attention can run."""
    if type(attn) is not nn.MultiheadAttention:
        raise TypeError(f"{where}: expected nn.MultiheadAttention, got {_name(type(attn))}")
    unsupported = {"kdim/vdim other than d_model": not attn._qkv_same_embed_dim,
                   "bias=False": attn.in_proj_bias is None or attn.out_proj.bias is None,
                   "add_bias_kv=True": attn.bias_k is not None,
                   "add_zero_attn=True": attn.add_zero_attn}
    found = [what for what, present in unsupported.items() if present]
    if found:
        raise ValueError(f"{where}: the fused attention does not support {', '.join(found)}")
    return {"d_model": attn.embed_dim, "nhead": attn.num_heads,
            "batch_first": bool(getattr(attn, "batch_first", False))}


def _original_args(layer: nn.Module, kind: str, where: str) -> dict:
    """Constructor arguments of the fused layer equal to a ``rezero.transformer`` layer."""
    attentions = ["self_attn"] + (["multihead_attn"] if kind == "decoder" else [])
    dropouts = ["dropout", "dropout1", "dropout2"] + (["dropout3"] if kind == "decoder" else [])
    args = _attention_args(layer.self_attn, f"{where}.self_attn")
    if (kind == "decoder"
            and _attention_args(layer.multihead_attn, f"{where}.multihead_attn") != args):
        raise ValueError(f"{where}: self_attn and multihead_attn differ in size or layout")
    probabilities = {name: getattr(layer, name).p for name in dropouts}
    probabilities.update({f"{name}.dropout": getattr(layer, name).dropout for name in attentions})
    if len(set(probabilities.values())) != 1:
        raise ValueError(f"{where}: the fused layer has one dropout probability, this layer has "
                         f"{probabilities}")
    activation = getattr(layer, "activation", F.relu)  # old pickles have none: relu
    names = {F.relu: "relu", F.gelu: "gelu"}
    if activation not in names:
        raise ValueError(f"{where}: unsupported activation {activation!r}; "
                         "expected F.relu or F.gelu")
    return dict(args, dim_feedforward=layer.linear1.out_features,
                dropout=probabilities["dropout"], activation=names[activation], share_alpha=True)


def _reference_args(layer: python_ref.RZTXEncoderLayer, kind: str, where: str) -> dict:
    args = _attention_args(layer.self_attn, f"{where}.self_attn")
    if args["batch_first"] != layer.batch_first:
        raise ValueError(f"{where}: batch_first differs between the layer and its attention")
    return dict(args, dim_feedforward=layer.linear1.out_features, dropout=layer.dropout_p,
                activation=layer.activation_name, share_alpha=layer.share_alpha)


# What convert() replaces: class name -> (the fused class, its kind, constructor arguments from
# the old layer, the old layer's own parts the fused layer leaves out)
_CONVERSIONS = {
    f"{_ORIGINAL}.RZTXEncoderLayer": (RZTXEncoderLayer, "encoder", _original_args,
                                      {"dropout", "dropout1", "dropout2"}),
    f"{_ORIGINAL}.RZTXDecoderLayer": (RZTXDecoderLayer, "decoder", _original_args,
                                      {"dropout", "dropout1", "dropout2", "dropout3"}),
    _name(python_ref.RZTXEncoderLayer): (RZTXEncoderLayer, "encoder", _reference_args, set()),
    _name(python_ref.RZTXDecoderLayer): (RZTXDecoderLayer, "decoder", _reference_args, set()),
}
_FUSED = (RZTXEncoderLayer, RZTXDecoderLayer)


def _has_hooks(module: nn.Module) -> bool:
    return any(getattr(module, attr, None) for attr in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
        "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
        "_load_state_dict_post_hooks"))


def _fused_layer(old: nn.Module, where: str, backend: str) -> nn.Module:
    fused_cls, kind, read_args, left_out = _CONVERSIONS[_name(type(old))]
    args = read_args(old, kind, where)
    if _has_hooks(old):
        raise ValueError(f"{where}: has hooks, which convert() cannot move to the fused layer; "
                         "convert the model before registering them")
    # allocates nothing: every tensor of the new layer is replaced by the old layer's below
    new = fused_cls(args.pop("d_model"), args.pop("nhead"), device="meta", backend=backend,
                    **args)
    children = dict(old.named_children())
    parameters = dict(old.named_parameters(recurse=False))
    buffers = dict(old.named_buffers(recurse=False))
    expected = (set(dict(new.named_children())), set(dict(new.named_parameters(recurse=False))))
    extra = ((set(children) - left_out - expected[0]) | (set(parameters) - expected[1])
             | set(buffers))
    missing = (expected[0] - set(children)) | (expected[1] - set(parameters))
    if extra or missing:
        found = [extra and f"extra parts {sorted(extra)}",
                 missing and f"missing parts {sorted(missing)}"]
        raise ValueError(f"{where}: cannot convert a {_name(type(old))} with "
                         + ", ".join(filter(None, found)))
    for name in expected[0]:
        setattr(new, name, children[name])
    for name in expected[1]:
        setattr(new, name, parameters[name])
    assert not any(t.is_meta for t in new.state_dict().values()), "a tensor was not carried over"
    new.training = old.training  # the carried-over submodules keep their own
    return new


def _check_convertible_class(module: nn.Module, where: str) -> None:
    """A subclass of a class convert() knows may override forward: refuse rather than guess."""
    if isinstance(module, _FUSED) or _name(type(module)) in _CONVERSIONS:
        return
    for base in type(module).__mro__[1:]:
        if _name(base) in _CONVERSIONS:
            raise TypeError(f"{where}: cannot convert {_name(type(module))}, a subclass of "
                            f"{_name(base)} (it may change what the layer computes); replace it "
                            "by hand")


def convert(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Replaces, in place, every ``rezero.transformer.RZTXEncoderLayer``/``RZTXDecoderLayer``
    (the original ``rezero`` package) and every ``python_ref`` layer inside ``model`` by
    ``rezero_kernels.RZTXEncoderLayer``/``RZTXDecoderLayer`` running on ``backend``, and returns
    the model (the new layer when ``model`` itself is such a layer).

    The fused layer takes over the old one's submodules and parameters (the same objects: device,
    dtype, ``requires_grad`` and optimizer state are kept) and its train/eval state.  Fused
    layers already in the model are left as they are.  How many modules were replaced is logged
    at INFO level on the ``rezero_kernels.conversion`` logger; finding none warns.  A layer that
    cannot be converted faithfully (a subclass, an activation other than relu/gelu, different
    dropout probabilities, attention without biases, hooks, extra submodules) raises
    ``TypeError``/``ValueError`` naming it, and nothing is replaced.
    """
    if backend != "auto" and backend not in dispatch.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of "
                         f"{dispatch.BACKENDS}")
    # Build every replacement first, so that an error leaves the model untouched.
    replacements = {}  # id(old layer) -> (old, new): a layer held twice stays one layer
    plan = []  # (parent, or None for the model itself; attribute name; old layer)
    fused_already = 0
    for where, module in model.named_modules(remove_duplicate=False):
        where = where or type(model).__name__
        _check_convertible_class(module, where)
        if isinstance(module, _FUSED):
            fused_already += 1
    for parent_name, parent in [("", None)] + list(model.named_modules(remove_duplicate=False)):
        # _modules, not named_children(): that skips a second attribute holding the same layer
        children = [("", model)] if parent is None else list(parent._modules.items())
        for name, child in children:
            if child is None or _name(type(child)) not in _CONVERSIONS:
                continue
            where = ".".join(filter(None, [parent_name, name])) or type(model).__name__
            if id(child) not in replacements:
                replacements[id(child)] = (child, _fused_layer(child, where, backend))
            plan.append((parent, name, child))
    for parent, name, child in plan:
        if parent is not None:
            setattr(parent, name, replacements[id(child)][1])
    counts = collections.Counter(_name(type(old)) for old, _ in replacements.values())
    if counts:
        logger.info("convert: replaced %d modules (%s)", sum(counts.values()),
                    ", ".join(f"{n} x {c}" for c, n in counts.items()))
    elif not fused_already:
        warnings.warn(f"rezero_kernels.convert: {type(model).__name__} has no ReZero layer to "
                      "replace (rezero.transformer or python_ref RZTXEncoderLayer/"
                      "RZTXDecoderLayer)", stacklevel=2)
    return replacements[id(model)][1] if id(model) in replacements else model
