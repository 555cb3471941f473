"""Tensor and sequence parallelism for the fused layers on a DTensor device mesh, in
Megatron-LM's layout, with the ReZero epilogue applied once, after the reduction.

    mesh = init_device_mesh("cuda", (dp, tp), mesh_dim_names=("dp", "tp"))
    tensor_parallel(model, mesh["tp"])          # every RZTX*/RZLlamaLayer inside model
    for layer in model.layers: fully_shard(layer, mesh=mesh["dp"])   # optional, 2-D

``tensor_parallel`` shards the parameters of every ``RZTXEncoderLayer``, ``RZTXDecoderLayer``
and ``RZLlamaLayer`` inside a module over a 1-D mesh, in place, as DTensors (so FSDP2 on the
other mesh dimension and ``torch.distributed.checkpoint`` see ordinary sharded parameters),
and gives each layer a forward that works on its rank's shard:

- attention: the q/k/v projections column-parallel (each rank holds whole heads; with grouped-
  query attention whole key/value heads, each with its group of query heads), attention on
  the rank's heads, the output projection row-parallel;
- MLP: the first GEMM (gate and up, or ``linear1``) column-parallel, the second row-parallel;
- each row-parallel GEMM's partial sums are reduced first (an all-reduce; with
  ``sequence_parallel=True`` a reduce-scatter along the sequence), then the epilogue
  ``x + alpha * dropout(reduced + bias)`` runs once per element as ``rezero_residual``.  A
  ``rezero_linear`` on each rank's partial sum would add ``x`` and the bias once per rank and
  draw a mask per rank; adding them on one shard only would still drop out partial sums, which
  is not dropout of the sum.  So the row-parallel GEMM is a plain one and the epilogue is
  the fused residual op on the reduced result.

A layer's inputs and outputs are replicated tensors (the same on every rank of the mesh), or
with ``sequence_parallel=True`` each rank's contiguous chunk of the sequence (``shard_sequence``
and ``gather_sequence`` cut and join them); the sequence is gathered before attention and
the MLP and reduce-scattered after.

Dropout: a mask drawn on a replicated tensor is the same on every rank (``tensor_parallel``
makes torch's default generator equal across the mesh, from its first rank); a mask drawn on
a sharded one (attention probabilities and the MLP hidden always; the residual branches with
``sequence_parallel=True``) comes from a generator seeded from a shared draw and the rank, so it
differs per rank, and the shared generator moves on the same on every rank.

The gates and the row-parallel biases stay replicated.  Without sequence parallelism their
gradients are the same on every rank (the epilogue runs on replicated data); with it each rank
holds the gradient of its chunk, and an all-reduce in backward sums them.

State dicts keep the layers' parameter names.  ``nn.MultiheadAttention``'s packed
``in_proj_weight`` (3 * d_model, d_model) and ``in_proj_bias`` are held as (3, d_model, d_model)
and (3, d_model), sharded on the second dimension, so each rank holds its heads' q, k and v
rows and a checkpoint reshards between tensor-parallel degrees.

Under ``torch.compile`` the collectives are functional collectives, traced into the graph;
dropout on a sharded tensor sets a generator's state, a graph break (with dropout 0 a layer
compiles with ``fullgraph=True``).
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from python_ref.llama import stacked_linear

from . import functional
from .attention import check_inputs, multi_head_attention
from .llama import RZLlamaLayer
from .transformer import RZTXDecoderLayer, RZTXEncoderLayer

try:
    import torch.distributed._functional_collectives as funcol
    from torch.distributed import tensor as dtensor
except ImportError as e:  # torch built without distributed
    raise ImportError("rezero_kernels.parallel needs torch.distributed "
                      f"(torch.distributed.tensor): {e}") from None


class _TP(NamedTuple):
    group: str         # the mesh's process group, by name (what functional collectives take)
    rank: int          # in the mesh
    size: int
    sequence_parallel: bool


# --- communication --------------------------------------------------------------------------

# bytes one rank sends for a collective over `size` ranks on a tensor of `nbytes` (the full,
# unsharded size): the ring algorithms' payload, which NCCL and gloo use for large tensors
_RING_BYTES = {
    "all_reduce": lambda nbytes, size: 2 * (size - 1) * nbytes // size,
    "all_gather": lambda nbytes, size: (size - 1) * nbytes // size,
    "reduce_scatter": lambda nbytes, size: (size - 1) * nbytes // size,
}

_LOG = []  # the active communication_log()s' record lists


class Collective(NamedTuple):
    kind: str       # all_reduce, all_gather or reduce_scatter
    phase: str      # forward or backward
    shape: tuple    # of the full (reduced or gathered) tensor
    dtype: torch.dtype
    bytes_sent: int  # by one rank, ring algorithm


@contextlib.contextmanager
def communication_log():
    """Records every collective the tensor-parallel layers run inside the block (forward and
    backward) as ``Collective``s in the list it yields.  Eager mode only."""
    records = []
    _LOG.append(records)
    try:
        yield records
    finally:
        _LOG.remove(records)


def _collective(kind: str, t: torch.Tensor, tp: _TP, dim: int, phase: str) -> torch.Tensor:
    if kind == "identity":
        return t
    if kind == "chunk":  # this rank's part, no communication
        return t.chunk(tp.size, dim)[tp.rank].contiguous()
    full = list(t.shape)
    if kind == "all_gather":
        full[dim] *= tp.size
    if _LOG and not torch.compiler.is_compiling():
        nbytes = t.element_size() * int(torch.Size(full).numel())
        record = Collective(kind, phase, tuple(full), t.dtype, _RING_BYTES[kind](nbytes, tp.size))
        for records in _LOG:
            records.append(record)
    if kind == "all_reduce":
        out = funcol.all_reduce(t, "sum", tp.group)
    elif kind == "all_gather":
        out = funcol.all_gather_tensor(t.contiguous(), dim, tp.group)
    else:
        out = funcol.reduce_scatter_tensor(t.contiguous(), "sum", dim, tp.group)
    return funcol.wait_tensor(out)


class _Communicate(torch.autograd.Function):
    """One collective forward and its adjoint backward (Megatron-LM's f, g and their sequence-
    parallel forms): identity/all_reduce, all_reduce/identity, all_gather/reduce_scatter,
    reduce_scatter/all_gather, chunk/all_gather, all_gather/chunk."""

    @staticmethod
    def forward(ctx, t, tp, dim, kind, adjoint):
        ctx.tp, ctx.dim, ctx.adjoint = tp, dim, adjoint
        return _collective(kind, t, tp, dim, "forward")

    @staticmethod
    def backward(ctx, grad):
        return _collective(ctx.adjoint, grad, ctx.tp, ctx.dim, "backward"), None, None, None, None


def _enter(t, tp: _TP, dim: int):
    """A sublayer's input on every rank: the full sequence (gathered under sequence
    parallelism); backward sums the ranks' gradients."""
    if tp.sequence_parallel:
        return _Communicate.apply(t, tp, dim, "all_gather", "reduce_scatter")
    return _Communicate.apply(t, tp, dim, "identity", "all_reduce")


def _exit(t, tp: _TP, dim: int):
    """The sum of the ranks' partial outputs (reduce-scattered under sequence parallelism)."""
    if tp.sequence_parallel:
        return _Communicate.apply(t, tp, dim, "reduce_scatter", "all_gather")
    return _Communicate.apply(t, tp, dim, "all_reduce", "identity")


def _local(p):
    """A parameter's local shard (the tensor itself when it is not a DTensor)."""
    return p.to_local() if isinstance(p, dtensor.DTensor) else p


def _replicated(p, tp: _TP):
    """A replicated parameter's value; under sequence parallelism it meets one chunk of the
    data per rank, so backward sums its gradient over the ranks."""
    if p is None:
        return None
    p = _local(p)
    return _Communicate.apply(p, tp, 0, "identity", "all_reduce") if tp.sequence_parallel else p


def shard_sequence(x: torch.Tensor, mesh, dim: int = 1) -> torch.Tensor:
    """This rank's contiguous chunk of a replicated ``x`` along ``dim`` (the sequence), the
    first layer's input under ``sequence_parallel=True``; backward gathers the gradient."""
    tp = _state(mesh, True)
    _check_divides("the sequence length", x.shape[dim], tp.size)
    return _Communicate.apply(x, tp, dim, "chunk", "all_gather")


def gather_sequence(x: torch.Tensor, mesh, dim: int = 1) -> torch.Tensor:
    """The full sequence from every rank's chunk (the last layer's output under
    ``sequence_parallel=True``); backward keeps this rank's chunk of the gradient."""
    return _Communicate.apply(x, _state(mesh, True), dim, "all_gather", "chunk")


# --- dropout on sharded tensors ---------------------------------------------------------------

_RANK_STRIDE = 0x9E3779B97F4A7C15  # odd: distinct ranks get distinct seeds


def _default_generator(device: torch.device):
    if device.type == "cpu":
        return torch.default_generator
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.default_generators[index]


@contextlib.contextmanager
def rank_generator(tp: _TP, device: torch.device, active: bool = True):
    """Inside the block, torch's default generator for ``device`` is seeded from one draw of the
    CPU generator (the same on every rank; a CPU draw, so no device synchronisation) and the
    rank, so dropout on a sharded tensor draws a different mask per rank; after it the
    generators are where that one draw left them, on every rank."""
    if not active:
        yield
        return
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=torch.default_generator))
    gen = _default_generator(device)
    after = gen.get_state()
    gen.manual_seed((seed + tp.rank * _RANK_STRIDE) % 2 ** 63)
    try:
        yield
    finally:
        gen.set_state(after)


# --- the layers -------------------------------------------------------------------------------

def _epilogue(layer, tp, x, partial, bias, gate, seq_dim):
    """``x + alpha * dropout(reduce(partial) + bias)``, once per element."""
    reduced = _exit(partial, tp, seq_dim)
    if bias is not None:
        reduced = reduced + _replicated(bias, tp)
    p = layer.dropout_p if layer.training else 0.0
    with rank_generator(tp, x.device, tp.sequence_parallel and p > 0):
        return functional.rezero_residual(x, reduced, _replicated(gate, tp), layer.dropout_p,
                                          layer.training, layer.backend)


class _TensorParallelLlama:
    """RZLlamaLayer on its rank's heads and hidden units (see the module docstring)."""

    _tp: _TP

    def _attend(self, x, attn_mask, key_padding_mask, position_ids, cache, is_causal, rotary):
        if cache is not None and self._tp.sequence_parallel:
            raise ValueError("a KVCache needs the whole sequence on every rank: generate with "
                             "sequence_parallel=False")
        return super()._attend(x, attn_mask, key_padding_mask, position_ids, cache, is_causal,
                               rotary)

    def _sublayer_input(self, x):
        return _enter(x, self._tp, 1)

    def _project(self, linear, inp):
        return F.linear(inp, _local(linear.weight), _local(linear.bias))

    def _scaled_dot_product(self, q, k, v, mask, causal, p):
        with rank_generator(self._tp, q.device, p > 0):
            return super()._scaled_dot_product(q, k, v, mask, causal, p)

    def _attention_output(self, x, out):
        o_proj = self.self_attn.o_proj
        return _epilogue(self, self._tp, x, F.linear(out, _local(o_proj.weight)), o_proj.bias,
                         self.gate("resweight"), 1)

    def _feed_forward(self, x):
        tp, mlp = self._tp, self.mlp
        gu = stacked_linear(_enter(x, tp, 1), _local(mlp.gate_proj.weight),
                            _local(mlp.up_proj.weight))
        with rank_generator(tp, x.device, self.training and self.mlp_dropout > 0):
            h = functional.gated_act_dropout(gu, self.activation_name, self.mlp_dropout,
                                             self.training, self.backend)
        return _epilogue(self, tp, x, F.linear(h, _local(mlp.down_proj.weight)), None,
                         self.gate("resweight_ff"), 1)


class _TensorParallelRZTX:
    """RZTXEncoderLayer / RZTXDecoderLayer on its rank's heads and feed-forward units."""

    _tp: _TP

    def _attend(self, attn, gate, x, kv, mask, key_padding_mask, is_causal):
        tp, dim = self._tp, 1 if self.batch_first else 0
        check_inputs(x, kv, attn.embed_dim)
        inp = _enter(x, tp, dim)
        inp_kv = inp if kv is x else _enter(kv, tp, dim)
        heads = attn.num_heads // tp.size
        if mask is not None and mask.dim() == 3:  # (N * heads, L, S): this rank's heads
            mask = mask.unflatten(0, (-1, attn.num_heads))[
                :, tp.rank * heads:(tp.rank + 1) * heads].flatten(0, 1)
        bias = attn.in_proj_bias
        p = attn.dropout if self.training else 0.0
        with rank_generator(tp, x.device, p > 0):
            out = multi_head_attention(
                inp, inp_kv, _local(attn.in_proj_weight).flatten(0, 1),
                None if bias is None else _local(bias).flatten(), heads, attn.batch_first, p,
                attn_mask=mask, key_padding_mask=key_padding_mask, is_causal=is_causal,
                backend=self.backend)
        return _epilogue(self, tp, x, F.linear(out, _local(attn.out_proj.weight)),
                         attn.out_proj.bias, gate, dim)

    def _feed_forward(self, x):
        tp, dim = self._tp, 1 if self.batch_first else 0
        inp = _enter(x, tp, dim)
        with rank_generator(tp, x.device, self.training and self.dropout_p > 0):
            h = functional.linear_bias_act_dropout(inp, _local(self.linear1.weight),
                                                   _local(self.linear1.bias),
                                                   self.activation_name, self.dropout_p,
                                                   self.training, self.backend)
        return _epilogue(self, tp, x, F.linear(h, _local(self.linear2.weight)),
                         self.linear2.bias, self.gate("resweight_ff"), dim)


# --- the plans ----------------------------------------------------------------------------------

# how a parameter is sharded: "column" Shard(0) (output units), "row" Shard(1) (input units),
# "qkv" a packed [q; k; v] held as (3, ...) and Shard(1); a parameter not named is replicated
def _attention_plan(prefix):
    return {f"{prefix}.in_proj_weight": "qkv", f"{prefix}.in_proj_bias": "qkv",
            f"{prefix}.out_proj.weight": "row"}


_FEED_FORWARD_PLAN = {"linear1.weight": "column", "linear1.bias": "column",
                      "linear2.weight": "row"}


class _Plan(NamedTuple):
    mixin: type
    placements: dict
    divisible: tuple  # the layer's sizes that the degree must divide: (attribute path, why)


_PLANS = {
    RZLlamaLayer: _Plan(
        _TensorParallelLlama,
        {**{f"self_attn.{n}_proj.{w}": "column" for n in "qkv" for w in ("weight", "bias")},
         "self_attn.o_proj.weight": "row", "mlp.gate_proj.weight": "column",
         "mlp.up_proj.weight": "column", "mlp.down_proj.weight": "row"},
        (("nhead", "each rank holds whole query heads"),
         ("num_kv_heads", "each rank holds whole key/value heads, each with its group of query "
          "heads"),
         ("mlp.down_proj.in_features", "each rank holds an equal part of the MLP's hidden"))),
    RZTXEncoderLayer: _Plan(
        _TensorParallelRZTX, {**_attention_plan("self_attn"), **_FEED_FORWARD_PLAN},
        (("self_attn.num_heads", "each rank holds whole heads"),
         ("linear1.out_features", "each rank holds an equal part of the feed-forward"))),
    RZTXDecoderLayer: _Plan(
        _TensorParallelRZTX, {**_attention_plan("self_attn"), **_attention_plan("multihead_attn"),
                              **_FEED_FORWARD_PLAN},
        (("self_attn.num_heads", "each rank holds whole heads"),
         ("linear1.out_features", "each rank holds an equal part of the feed-forward"))),
}


def _plan_of(module):
    for cls in type(module).__mro__:
        if cls in _PLANS:
            return _PLANS[cls]
    return None


def _check_divides(what, size, degree, why=""):
    if size % degree:
        raise ValueError(f"{what} ({size}) must be a multiple of the tensor-parallel degree "
                         f"({degree}){': ' + why if why else ''}")


def _state(mesh, sequence_parallel) -> _TP:
    from torch.distributed.device_mesh import DeviceMesh
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"mesh must be a torch.distributed DeviceMesh, got {type(mesh).__name__}")
    if mesh.ndim != 1:
        raise ValueError(f"tensor parallelism takes a 1-D mesh, got {mesh.ndim}-D "
                         f"{mesh.mesh_dim_names}: pass its tensor-parallel dimension, e.g. "
                         "mesh['tp']")
    return _TP(mesh.get_group().group_name, mesh.get_local_rank(), mesh.size(),
               bool(sequence_parallel))


def _sync_generators(mesh, device_type):
    """torch's default generator(s) on every rank of ``mesh`` set to its first rank's."""
    import torch.distributed as dist
    group, src = mesh.get_group(), int(mesh.mesh.flatten()[0])
    gens = [torch.default_generator]
    if device_type == "cuda":
        gens.append(torch.cuda.default_generators[torch.cuda.current_device()])
    for gen in gens:
        state = gen.get_state()
        moved = state.to(device_type) if device_type != "cpu" else state
        dist.broadcast(moved, src=src, group=group)
        gen.set_state(moved.cpu())


def _attribute(module, path):
    for name in path.split("."):
        module = getattr(module, name)
    return module


def _shard_parameters(layer, plan, mesh):
    tensor = dtensor
    for name, param in list(layer.named_parameters()):
        kind = plan.placements.get(name)
        data = param.data
        if kind == "qkv":
            data = data.unflatten(0, (3, -1))
        placement = {None: tensor.Replicate(), "column": tensor.Shard(0),
                     "row": tensor.Shard(1), "qkv": tensor.Shard(1)}[kind]
        owner, _, leaf = name.rpartition(".")
        sharded = nn.Parameter(tensor.distribute_tensor(data, mesh, [placement]),
                               requires_grad=param.requires_grad)
        setattr(_attribute(layer, owner) if owner else layer, leaf, sharded)


_CLASSES = {}


def _parallel_class(cls, mixin):
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"TensorParallel{cls.__name__}", (mixin, cls),
                             {"__doc__": f"{cls.__name__} sharded by rezero_kernels.parallel"})
    return _CLASSES[cls]


def tensor_parallel(module: nn.Module, mesh, *, sequence_parallel: bool = False) -> nn.Module:
    """Shards every fused layer inside ``module`` (``module`` itself included) over the 1-D
    DeviceMesh ``mesh``, in place (see the module docstring); returns ``module``.

    A function rather than a ``parallelize_module`` plan: the plan styles shard ``nn.Linear``s
    and hook their calls, but the fused layers call their weights inside fused ops and must
    reduce before the epilogue, so the layer's own forward has to change.  Apply it before
    ``fully_shard`` and before ``torch.compile``; every rank calls it."""
    import python_ref
    tp = _state(mesh, sequence_parallel)
    layers = []
    for name, sub in module.named_modules():
        plan = _plan_of(sub)
        if plan is None:
            if isinstance(sub, (python_ref.RZLlamaLayer, python_ref.RZTXEncoderLayer,
                                python_ref.RZTXDecoderLayer)):
                raise TypeError(f"{name or 'module'} is a python_ref layer (the reference): "
                                "build rezero_kernels' layers (backend='torch' runs eager)")
            continue
        where = name or type(sub).__name__
        if getattr(sub, "_tp", None) is not None:
            raise ValueError(f"{where} is already tensor-parallel")
        if any(isinstance(p, dtensor.DTensor) for p in sub.parameters()):
            raise ValueError(f"{where} has DTensor parameters already (fully_shard or another "
                             "plan): apply tensor_parallel first")
        for path, why in plan.divisible:
            _check_divides(f"{where}: {path}", _attribute(sub, path), tp.size, why)
        devices = {p.device.type for p in sub.parameters()}
        if devices != {mesh.device_type}:
            raise ValueError(f"{where} has parameters on {sorted(devices)}, the mesh is on "
                             f"{mesh.device_type}")
        layers.append(sub)
    if not layers:
        raise ValueError("no RZTXEncoderLayer, RZTXDecoderLayer or RZLlamaLayer in the module: "
                         "nothing to make tensor-parallel")
    _sync_generators(mesh, mesh.device_type)
    for layer in layers:
        plan = _plan_of(layer)
        _shard_parameters(layer, plan, mesh)
        layer.__class__ = _parallel_class(type(layer), plan.mixin)
        layer._tp = tp
    return module
