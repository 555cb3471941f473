"""What is measured: every benchmark case and its baselines, defined once.

The CLI (``python -m bench``) and the pytest-benchmark files (``bench/test_bench_*.py``) both take
their cases from ``all_cases()``.  A case's ``build(cfg)`` creates its inputs and models (outside
any timed region) and returns a ``Built``: one zero-argument callable per variant, each doing
exactly what the case's name says.

Variants (names used in every table and file):
  ``rezero[<backend>]``  this package's fused op/layer on that backend (``cpu``; ``triton``/``cuda`` on GPU)
  ``eager``              the ``python_ref`` op/layer in eager PyTorch (the reference)
  ``compiled``           ``torch.compile`` of the reference (stacks: each layer compiled on its own);
                         compilation happens in ``build``: ``compile_s`` is its first call, which
                         compiles unless an earlier case compiled the same code and shapes.  Not in
                         the ``bwd`` mode: AOTAutograd's donated buffers forbid running a compiled
                         backward twice on one graph (``retain_graph=True``)
  ``nn.TEL`` / ``nn.TEL(norm_first)``  torch's ``nn.TransformerEncoderLayer`` (``nn.TransformerDecoderLayer``
                         for decoder cases), post-norm / pre-norm, same width, heads, dropout, relu
  ``floor``              the GEMMs (+ ``scaled_dot_product_attention`` for layers) alone: the same
                         matmuls with no elementwise work, a lower bound for any implementation
  ``copy``               ``out.copy_(x)`` on the op's tensor size, preallocated: the copy bandwidth

Modes: ``fwd`` is a training forward (inputs require grad, autograd records); ``bwd`` is
``torch.autograd.grad(out, inputs, grad_out, retain_graph=True)`` on an output computed once in
``build``; ``fwd+bwd`` / ``train`` is ``torch.autograd.grad(f(*inputs), inputs, grad_out)``
(gradients are returned, never accumulated into ``.grad``); ``infer`` is ``eval()`` under
``torch.no_grad()``.
"""
from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch._dynamo.config as dynamo_config
import torch.nn as nn

import python_ref
import rezero_kernels as rzk
from rezero_kernels import functional as fused

from . import roofline, timing
from .llama_baselines import PreNormLlama

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# layers' and stacks' training dtypes: (the parameters' and inputs' dtype, the autocast dtype);
# amp-bf16 is torch.autocast(bfloat16) around float32 parameters, bf16 is everything in bfloat16
TRAIN_DTYPES = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None),
                "amp-bf16": (torch.float32, torch.bfloat16)}
OPS = ("rezero_residual", "bias_act_dropout", "gated_act_dropout", "rezero_linear")
HOST_OPS = OPS + ("linear_bias_act_dropout", "rezero_fc")
HOST_SIZES = {"8x8": (8, 8), "64x256": (64, 256)}  # host-bound: the kernels cost next to nothing
OP_MODES = ("fwd", "bwd", "fwd+bwd")
DROPOUTS = (0.0, 0.1)
SIZES = ("small", "large")
ACTIVATION = "gelu"  # bias_act_dropout's activation in the op cases
GATED_ACTIVATION = "silu"  # gated_act_dropout's (SwiGLU)
DEPTHS = (12, 64, 128)

# one compiled reference op serves 2 dtypes x 2 sizes x several modes: allow the recompiles
dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, 64)


@dataclass(frozen=True)
class Config:
    device: str = "cpu"
    backends: tuple = ("cpu",)   # our backends to run
    compile: bool = True         # include the torch.compile baseline
    compile_only: str | None = None  # with compile: only in cases whose name matches this regex
    tiny: bool = False           # shrink every size (CI smoke test)
    seed: int = 0


def default_backends(device: str) -> tuple:
    """Our backends that run on ``device`` (the Triton interpreter is a test vehicle, not timed)."""
    avail = rzk.backends()
    wanted = ("triton", "cuda") if device.startswith("cuda") else ("cpu",)
    return tuple(b for b in wanted if avail.get(b))


@dataclass
class Built:
    variants: dict                                   # name -> zero-argument callable
    bytes: dict = field(default_factory=dict)        # name -> bytes moved per call (roofline)
    compile_s: dict = field(default_factory=dict)    # name -> seconds of compilation
    saved: dict = field(default_factory=dict)        # name -> (forward callable, params to exclude)
    tokens: int | None = None                        # tokens per call (layers, stacks)
    shape: str = ""                                  # human-readable sizes
    note: str = ""


@dataclass(frozen=True)
class Case:
    name: str        # unique id, "group/what/mode/dtype/size[/p]"
    group: str       # "op" | "layer" | "stack"
    title: str       # short human label
    params: dict
    baselines: tuple  # baseline variant names (our backends come from the Config)
    build: Callable  # build(cfg, only=None) -> Built; ``only``: variant names to build (None: all)

    def variant_names(self, cfg: Config, only=None) -> list:
        """The variants ``build`` creates: ours, then the baselines (``compiled`` only when
        ``cfg.compile``), restricted to ``only`` when given."""
        import re
        compiled = (cfg.compile and self.params.get("mode") != "bwd"
                    and (cfg.compile_only is None or re.search(cfg.compile_only, self.name)))
        names = [f"rezero[{b}]" for b in cfg.backends] + [
            b for b in self.baselines if b != "compiled" or compiled]
        return [n for n in names if only is None or n in only]


# ---------------------------------------------------------------------------------------------
# ops

def op_shape(op: str, dtype: str, size: str, tiny: bool, device: str = "cpu") -> dict:
    """Small: about 1 MiB per main tensor (stays in cache); large: 32 MiB per main tensor on
    the CPU, 128 MiB on a GPU (more than an H100's 50 MB or an H200's 60 MB of L2, so the copy
    baseline and the kernels stream from memory)."""
    elt = torch.finfo(DTYPES[dtype]).bits // 8
    if size in HOST_SIZES:
        rows, cols = HOST_SIZES[size]
        return {"rows": rows, "cols": cols, "k": cols}
    if tiny:
        return {"rows": 64, "cols": 256, "k": 64}
    if size == "small":
        return {"rows": 256 * 4 // elt, "cols": 1024, "k": 256}
    mib = 128 if device.startswith("cuda") else 32
    return {"rows": (mib << 20) // (2048 * elt), "cols": 2048, "k": 512}


def _op_bytes(op: str, mode: str, n: int, elt: int):
    """Bytes an op must move: each input read once, each output written once (None for the
    GEMM op, whose roofline is its ``floor``).  residual: fwd reads x, fx, writes y; bwd reads
    grad, fx, writes grad_fx (grad_x is grad itself).  bias_act_dropout: fwd reads h, writes y;
    bwd reads grad, h, writes grad_h.  gated_act_dropout (n: elements of gate_up): fwd reads
    gate_up, writes y (n / 2); bwd reads grad (n / 2), gate_up, writes grad_gate_up.
    Per-channel vectors are negligible and not counted."""
    per = {"rezero_residual": (3, 3), "bias_act_dropout": (2, 3),
           "gated_act_dropout": (1.5, 2.5)}.get(op)
    if per is None:
        return None
    fwd, bwd = per
    return int(n * elt * {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode])


def _op_inputs(op, dtype, shp, device):
    g = torch.Generator(device="cpu").manual_seed(0)

    def t(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(device=device, dtype=dt) \
            .requires_grad_()
    r, c, k = shp["rows"], shp["cols"], shp["k"]
    alpha = torch.full((1,), 0.5, device=device, requires_grad=True)
    if op == "rezero_residual":
        return (t(r, c), t(r, c), alpha)
    if op == "bias_act_dropout":
        return (t(r, c), t(c))
    if op == "gated_act_dropout":  # gate_up: the main tensor; the result has c / 2 columns
        return (t(r, c),)
    if op == "linear_bias_act_dropout":
        return (t(r, k), t(c, k) / k ** 0.5, t(c))
    if op == "rezero_fc":
        return (t(r, c), t(c, c) / c ** 0.5, t(c), alpha)
    return (t(r, c), t(r, k), t(c, k) / k ** 0.5, t(c), alpha)


def _op_fn(op: str, p: float, variant: str):
    """f(*inputs) for one variant of one op."""
    if variant.startswith("rezero["):
        b = variant[len("rezero["):-1]
        return {"rezero_residual": lambda x, fx, a: fused.rezero_residual(x, fx, a, p, True, b),
                "bias_act_dropout": lambda h, bias: fused.bias_act_dropout(h, bias, ACTIVATION, p, True, b),
                "gated_act_dropout": lambda gu: fused.gated_act_dropout(gu, GATED_ACTIVATION, p,
                                                                        True, b),
                "rezero_linear": lambda x, i, w, bias, a: fused.rezero_linear(x, i, w, bias, a, p, True, b),
                "linear_bias_act_dropout": lambda i, w, bias: fused.linear_bias_act_dropout(
                    i, w, bias, ACTIVATION, p, True, b),
                "rezero_fc": lambda x, w, bias, a: fused.rezero_fc(x, w, bias, a, ACTIVATION, p,
                                                                   True, b),
                }[op]
    return {"rezero_residual": lambda x, fx, a: python_ref.rezero_residual(x, fx, a, p, True),
            "bias_act_dropout": lambda h, bias: python_ref.bias_act_dropout(h, bias, ACTIVATION, p, True),
            "gated_act_dropout": lambda gu: python_ref.gated_act_dropout(gu, GATED_ACTIVATION, p,
                                                                         True),
            "rezero_linear": lambda x, i, w, bias, a: python_ref.rezero_linear(x, i, w, bias, a, p, True),
            "linear_bias_act_dropout": lambda i, w, bias: python_ref.linear_bias_act_dropout(
                i, w, bias, ACTIVATION, p, True),
            "rezero_fc": lambda x, w, bias, a: python_ref.rezero_fc(x, w, bias, a, ACTIVATION, p,
                                                                    True),
            }[op]


_COMPILED = {}     # (op, p) -> compiled function, shared by the cases of that op
_COMPILE_S = {}    # (op, p, dtype, size, tiny) -> seconds of the first fwd+bwd call


def _compiled_op(op, p):
    if (op, p) not in _COMPILED:
        _COMPILED[(op, p)] = torch.compile(_op_fn(op, p, "eager"), dynamic=False)
    return _COMPILED[(op, p)]


def _mode_call(f, inputs, mode, grad_out=None):
    """The callable that times ``mode`` of ``f`` on ``inputs``."""
    if mode == "fwd":
        return lambda: f(*inputs)
    if mode == "bwd":
        out = f(*inputs)  # computed once, outside the timed region
        return lambda: torch.autograd.grad(out, inputs, grad_out, retain_graph=True)
    return lambda: torch.autograd.grad(f(*inputs), inputs, grad_out)


_LABELS = {"rezero_residual": "residual", "bias_act_dropout": f"bias+{ACTIVATION}+dropout",
           "gated_act_dropout": f"{GATED_ACTIVATION}(g)*u+dropout",
           "rezero_linear": "linear+residual", "linear_bias_act_dropout": f"linear+{ACTIVATION}+dropout",
           "rezero_fc": f"FC block ({ACTIVATION})"}


def _make_op_case(op, mode, dtype, size, p):
    """An op case: ``op/...`` at the small and large sizes (kernel-bound, with a bandwidth or
    GEMM-floor roofline), ``host/...`` at the host-bound sizes (8x8, 64x256)."""
    group = "host" if size in HOST_SIZES else "op"
    name = f"{group}/{op}/{mode}/{dtype}/{size}/p{p:g}"
    title = f"{_LABELS[op]} {mode} {dtype} {size} p={p:g}"
    gemm = op in ("rezero_linear", "linear_bias_act_dropout", "rezero_fc")
    baselines = ("eager", "compiled") if group == "host" else (
        "eager", "compiled", "floor" if gemm else "copy")

    def build(cfg: Config, only=None) -> Built:
        want = case.variant_names(cfg, only)
        shp = op_shape(op, dtype, size, cfg.tiny, cfg.device)
        inputs = _op_inputs(op, DTYPES[dtype], shp, cfg.device)
        out_like = _op_fn(op, p, "eager")(*inputs).detach()
        grad_out = torch.randn_like(out_like) if mode != "fwd" else None
        main = inputs[0]
        nbytes = _op_bytes(op, mode, main.numel(), main.element_size())
        built = Built({}, shape=f"{shp['rows']}x{shp['cols']}" + (f" (K={shp['k']})" if gemm else ""))
        for v in want:
            if v.startswith("rezero[") or v == "eager":
                built.variants[v] = _mode_call(_op_fn(op, p, v), inputs, mode, grad_out)
            elif v == "compiled":
                f = _compiled_op(op, p)
                key = (op, p, dtype, size, cfg.tiny)
                if key not in _COMPILE_S:  # first fwd+bwd call: compiles both graphs
                    first = _mode_call(f, inputs, "fwd+bwd", torch.randn_like(out_like))
                    _COMPILE_S[key] = timing.once(first, cfg.device)
                built.compile_s[v] = _COMPILE_S[key]
                built.variants[v] = _mode_call(f, inputs, mode, grad_out)
            elif v == "floor":
                built.variants[v] = roofline.gemm_floor(inputs, mode)
            elif v == "copy":
                built.variants[v], built.bytes[v] = roofline.copy_call(main)
            if nbytes is not None and v != "copy":
                built.bytes[v] = nbytes
        return built

    case = Case(name, group, title, {"op": op, "mode": mode, "dtype": dtype, "size": size,
                                     "dropout": p}, baselines, build)
    return case


# ---------------------------------------------------------------------------------------------
# layers

@dataclass(frozen=True)
class LayerShape:
    d_model: int
    nhead: int
    dim_ff: int
    batch: int
    seq: int
    dropout: float = 0.1

    def text(self) -> str:
        return (f"d{self.d_model} h{self.nhead} ff{self.dim_ff} {self.batch}x{self.seq} tokens "
                f"p={self.dropout:g}")


LAYER = LayerShape(512, 8, 2048, 32, 128)
STACK_12 = LayerShape(512, 8, 2048, 8, 128)
STACK_DEEP = LayerShape(128, 4, 512, 8, 64)   # 64 and 128 layers: small width/tokens for CPU
STACK_NARROW = LayerShape(64, 4, 256, 8, 64)  # "encoder64-d64": host-bound on any machine
TINY_LAYER = LayerShape(64, 4, 128, 2, 16)
TINY_STACK = LayerShape(32, 2, 64, 2, 8)


def _layer_kwargs(s: LayerShape, device, dtype=torch.float32):
    return dict(d_model=s.d_model, nhead=s.nhead, dim_feedforward=s.dim_ff, dropout=s.dropout,
                activation="relu", batch_first=True, device=device, dtype=dtype)


def _reference_layer(kind, s, device, dtype=torch.float32):
    cls = python_ref.RZTXEncoderLayer if kind == "encoder" else python_ref.RZTXDecoderLayer
    return cls(**_layer_kwargs(s, device, dtype), alpha_init=0.5)


def _make_layer(variant, kind, s, device, reference, dtype=torch.float32):
    """One layer of ``variant``; ours and the reference's copies share the reference's weights."""
    if variant.startswith("rezero["):
        cls = rzk.RZTXEncoderLayer if kind == "encoder" else rzk.RZTXDecoderLayer
        layer = cls(**_layer_kwargs(s, device, dtype), backend=variant[len("rezero["):-1])
        layer.load_state_dict(reference.state_dict())
        return layer
    if variant in ("eager", "compiled"):
        return copy.deepcopy(reference)
    if variant.startswith("nn.TEL"):
        cls = nn.TransformerEncoderLayer if kind == "encoder" else nn.TransformerDecoderLayer
        return cls(**_layer_kwargs(s, device, dtype), norm_first=variant.endswith("(norm_first)"))
    raise ValueError(variant)


def autocast(device, amp):
    """torch.autocast to ``amp`` on ``device``, or nothing when ``amp`` is None."""
    return torch.autocast(device, dtype=amp, enabled=amp is not None)


def _layer_call(model, args, train: bool, grad_out, amp=None):
    device = args[0].device.type
    if train:
        inputs = [a for a in args if a.requires_grad] + [p for p in model.parameters()
                                                          if p.requires_grad]
        unused = isinstance(model, roofline.LayerFloor)  # the floor leaves the ReZero gates out

        def step():
            with autocast(device, amp):
                out = model(*args)
            return torch.autograd.grad(out, inputs, grad_out, allow_unused=unused)
        return step

    def infer():
        with torch.no_grad(), autocast(device, amp):
            return model(*args)
    return infer


def _make_layer_case(kind, mode, dtype="fp32"):
    name = f"layer/{kind}/{mode}/{dtype}"
    title = f"{kind} layer {'training step' if mode == 'train' else 'inference'} {dtype}"
    dt, amp = TRAIN_DTYPES[dtype]

    def build(cfg: Config, only=None) -> Built:
        s = TINY_LAYER if cfg.tiny else LAYER
        train = mode == "train"
        want = case.variant_names(cfg, only)
        torch.manual_seed(cfg.seed)
        reference = _reference_layer(kind, s, cfg.device, dt)
        x = torch.randn(s.batch, s.seq, s.d_model, device=cfg.device, dtype=dt, requires_grad=train)
        args = (x,) if kind == "encoder" else (
            x, torch.randn(s.batch, s.seq, s.d_model, device=cfg.device, dtype=dt,
                           requires_grad=train))
        grad_out = torch.randn_like(x) if train else None
        built = Built({}, tokens=s.batch * s.seq, shape=s.text())
        for v in want:
            model = roofline.LayerFloor(reference) if v == "floor" else _make_layer(
                v, kind, s, cfg.device, reference, dt)
            model.train(train)
            if v == "compiled":
                model = torch.compile(model, dynamic=False)
            call = _layer_call(model, args, train, grad_out, amp)
            if v == "compiled":
                built.compile_s[v] = timing.once(call, cfg.device)
            built.variants[v] = call
            if train and v not in ("compiled", "floor"):
                def forward(model=model):
                    with autocast(cfg.device, amp):
                        return model(*args)
                built.saved[v] = (forward, list(model.parameters()))
        return built

    case = Case(name, "layer", title, {"kind": kind, "mode": mode, "dtype": dtype},
                ("eager", "compiled", "nn.TEL", "nn.TEL(norm_first)", "floor"), build)
    return case


# ---------------------------------------------------------------------------------------------
# stacks


def stack_shape(depth: int, tiny: bool) -> LayerShape:
    return TINY_STACK if tiny else (STACK_12 if depth <= 12 else STACK_DEEP)


def _make_stack_case(depth, dtype="fp32", shape=None, tag=""):
    name = f"stack/encoder{depth}{tag}/train/{dtype}"
    dt, amp = TRAIN_DTYPES[dtype]

    def layer_shape(tiny):
        return TINY_STACK if tiny else (shape or stack_shape(depth, tiny))
    title = f"{depth}-layer encoder stack training step {dtype}" + (
        f" [d{shape.d_model}]" if shape else "")

    def build(cfg: Config, only=None) -> Built:
        s = layer_shape(cfg.tiny)
        want = case.variant_names(cfg, only)
        torch.manual_seed(cfg.seed)
        refs = [_reference_layer("encoder", s, cfg.device, dt) for _ in range(depth)]
        x = torch.randn(s.batch, s.seq, s.d_model, device=cfg.device, dtype=dt)
        grad_out = torch.randn_like(x)
        built = Built({}, tokens=s.batch * s.seq, shape=f"{depth} layers, {s.text()}",
                      note="training step = forward + autograd.grad w.r.t. all parameters "
                           "(no optimizer); compiled = each layer torch.compile'd")
        for v in want:
            layers = [_make_layer(v, "encoder", s, cfg.device, r, dt) for r in refs]
            if v == "compiled":
                for layer in layers:
                    layer.compile(dynamic=False)  # all layers share one compiled graph
            model = nn.Sequential(*layers).train()
            call = _layer_call(model, (x,), True, grad_out, amp)
            if v == "compiled":
                built.compile_s[v] = timing.once(call, cfg.device)
            built.variants[v] = call
            if v != "compiled":
                def forward(model=model):
                    with autocast(cfg.device, amp):
                        return model(x)
                built.saved[v] = (forward, list(model.parameters()))
        return built

    case = Case(name, "stack", title, {"depth": depth, "mode": "train", "dtype": dtype},
                ("eager", "compiled", "nn.TEL", "nn.TEL(norm_first)"), build)
    return case


# ---------------------------------------------------------------------------------------------
# Llama-style decoder layers (RZLlamaLayer) against the layers people train today


@dataclass(frozen=True)
class LlamaShape:
    d_model: int
    nhead: int
    kv_heads: int
    hidden: int
    batch: int
    seq: int

    def kwargs(self) -> dict:
        return dict(d_model=self.d_model, nhead=self.nhead, num_kv_heads=self.kv_heads,
                    dim_feedforward=self.hidden)

    def text(self, p) -> str:
        return (f"d{self.d_model} h{self.nhead} kv{self.kv_heads} hidden{self.hidden} "
                f"{self.batch}x{self.seq} tokens p={p:g}")


LLAMA = LlamaShape(512, 8, 2, 1408, 8, 128)
LLAMA_STACK = {1: LLAMA, 12: LLAMA, 64: LlamaShape(512, 8, 2, 1408, 2, 128)}
TINY_LLAMA = LlamaShape(32, 4, 2, 48, 2, 8)
HF_DTYPES = ("fp32", "amp-bf16")  # the HF model's cases (of TRAIN_DTYPES)


# the layer a user would otherwise train: HF's, or the plain equivalent, named as such
_PRENORM = ("hf.Llama" if importlib.util.find_spec("transformers") is not None
            else "prenorm(plain)")


def _hf_llama_layers(s: LlamaShape, depth: int, p: float, device, dtype):
    """HF transformers' LlamaDecoderLayers (pre-norm RMSNorm, SDPA attention) built from a
    LlamaConfig, no download, and its rotary embedding."""
    from transformers import LlamaConfig
    from transformers.models.llama import modeling_llama as hf
    config = LlamaConfig(hidden_size=s.d_model, num_attention_heads=s.nhead,
                         num_key_value_heads=s.kv_heads, intermediate_size=s.hidden,
                         num_hidden_layers=depth, attention_dropout=p)
    config._attn_implementation = "sdpa"
    layers = [hf.LlamaDecoderLayer(config, layer_idx=i).to(device=device, dtype=dtype)
              for i in range(depth)]
    return layers, hf.LlamaRotaryEmbedding(config).to(device)


class HFStack(nn.Module):
    """HF decoder layers in sequence, with the rotary embedding computed once per forward as
    HF's model does (causal: no attention mask, SDPA's is_causal)."""

    def __init__(self, layers, rotary):
        super().__init__()
        self.layers, self.rotary = nn.ModuleList(layers), rotary

    def forward(self, x):
        positions = torch.arange(x.shape[1], device=x.device)[None]
        embeddings = self.rotary(x, positions)
        for layer in self.layers:
            out = layer(x, position_embeddings=embeddings, position_ids=positions)
            x = out[0] if isinstance(out, tuple) else out
        return x


def _make_llama_case(depth, dtype, p):
    what = "layer" if depth == 1 else f"stack{depth}"
    name = f"llama/{what}/train/{dtype}/p{p:g}"
    title = (f"Llama-style {'layer' if depth == 1 else f'{depth}-layer stack'} training step "
             f"{dtype} p={p:g}")
    dt, amp = TRAIN_DTYPES[dtype]
    # the layer a user would otherwise train (its own dropout is attention-only: compared at p 0)
    others = (_PRENORM,) if p == 0 else ()
    floor = ("floor",) if depth in (1, 64) else ()  # the targets' cases

    def build(cfg: Config, only=None) -> Built:
        s = TINY_LLAMA if cfg.tiny else LLAMA_STACK[depth]
        d = min(depth, 2) if cfg.tiny else depth
        want = case.variant_names(cfg, only)
        torch.manual_seed(cfg.seed)
        kw = dict(s.kwargs(), dropout=p, attn_dropout=p, mlp_dropout=p, device=cfg.device,
                  dtype=dt)
        refs = [python_ref.RZLlamaLayer(**kw, alpha_init=0.5) for _ in range(d)]
        x = torch.randn(s.batch, s.seq, s.d_model, device=cfg.device, dtype=dt)
        grad_out = torch.randn_like(x)
        # the rotary table every layer shares: state like the parameters, not activations
        table = python_ref.llama.rotary_table(refs[0].head_dim, refs[0].rope_theta)
        shared = [t for table_dt in {dt, amp or dt}
                  for t in table.get(refs[0].max_positions, torch.device(cfg.device), table_dt)]
        built = Built({}, tokens=s.batch * s.seq, shape=f"{d} layer(s), {s.text(p)}",
                      note="training step = forward + autograd.grad w.r.t. all parameters "
                           "(no optimizer); amp-bf16 = torch.autocast(bfloat16) around fp32 "
                           "parameters, bf16 = bfloat16 parameters; p = residual, attention and "
                           "MLP dropout; hf.Llama = HF transformers' LlamaDecoderLayer "
                           "(pre-RMSNorm; prenorm(plain): the "
                           "same written out, when transformers is absent), at p = 0 only")
        for v in want:
            if v == "floor":
                hidden = torch.randn(s.batch, s.seq, s.hidden, device=cfg.device, dtype=dt,
                                     requires_grad=True)
                model = roofline.LlamaFloor(refs, hidden)
                params = [x, hidden] + [q for r in refs for q in r.parameters() if q.dim() > 1]
                grads = (grad_out, *(torch.randn(s.batch, s.seq, 2 * s.hidden, device=cfg.device,
                                                 dtype=amp or dt) for _ in refs))

                def call(model=model, params=params, grads=grads):
                    with autocast(cfg.device, amp):
                        return torch.autograd.grad(model(x), params, grads)
                built.variants[v] = call
                continue
            if v == "hf.Llama":
                model = HFStack(*_hf_llama_layers(s, d, p, cfg.device, dt))
            elif v == "prenorm(plain)":
                model = nn.Sequential(*[PreNormLlama(copy.deepcopy(r)) for r in refs])
            elif v.startswith("rezero["):
                model = nn.Sequential(*[rzk.RZLlamaLayer(**kw, backend=v[len("rezero["):-1])
                                        for _ in refs])
                model.load_state_dict(nn.Sequential(*refs).state_dict())
            else:
                model = nn.Sequential(*[copy.deepcopy(r) for r in refs])
                if v == "compiled":
                    for layer in model:
                        layer.compile(dynamic=False)  # the layers share one compiled graph
            model.train()
            inputs = [x.requires_grad_()] + list(model.parameters())

            def call(model=model, inputs=inputs):
                with autocast(cfg.device, amp):
                    out = model(x)
                return torch.autograd.grad(out, inputs, grad_out)
            if v == "compiled":
                built.compile_s[v] = timing.once(call, cfg.device)
            built.variants[v] = call
            if v != "compiled":
                def forward(model=model):
                    with autocast(cfg.device, amp):
                        return model(x)
                built.saved[v] = (forward, list(model.parameters()) + shared)
        return built

    case = Case(name, "llama", title, {"depth": depth, "mode": "train", "dtype": dtype,
                                       "dropout": p},
                ("eager", "compiled") + others + floor, build)
    return case


HF_MODEL = dict(vocab_size=4096, hidden_size=512, num_attention_heads=8, num_key_value_heads=2,
                intermediate_size=1408, num_hidden_layers=12)
HF_BATCH, HF_SEQ = 4, 256


def _make_hf_case(dtype):
    """A whole HF ``LlamaForCausalLM`` training step (loss + backward), converted by
    ``rezero_`` against the model as HF builds it (pre-RMSNorm, SDPA)."""
    name = f"hf/llama12/train/{dtype}"
    amp = TRAIN_DTYPES[dtype][1]

    def build(cfg: Config, only=None) -> Built:
        from transformers import LlamaConfig, LlamaForCausalLM

        from rezero_kernels.integrations.transformers import rezero_
        want = case.variant_names(cfg, only)
        kw = dict(HF_MODEL, num_hidden_layers=2, hidden_size=64, intermediate_size=96,
                  vocab_size=256) if cfg.tiny else HF_MODEL
        config = LlamaConfig(**kw)
        config._attn_implementation = "sdpa"
        torch.manual_seed(cfg.seed)
        hf = LlamaForCausalLM(config).to(cfg.device).train()
        batch, seq = (2, 16) if cfg.tiny else (HF_BATCH, HF_SEQ)
        ids = torch.randint(0, config.vocab_size, (batch, seq), device=cfg.device)
        built = Built({}, tokens=batch * seq,
                      shape=f"12 layers d512 h8 kv2 hidden1408, vocab {config.vocab_size}, "
                            f"{batch}x{seq} tokens, dropout 0",
                      note="training step = loss (labels = inputs) + autograd.grad w.r.t. all "
                           "parameters; ours/eager = rezero_(model, backend=cpu/torch), "
                           "alpha 0.5; hf.Llama = the unconverted model")
        for v in want:
            model = copy.deepcopy(hf)
            if v != "hf.Llama":
                backend = v[len("rezero["):-1] if v.startswith("rezero[") else "torch"
                rezero_(model, alpha_init=0.5, backend=backend)
            params = [q for q in model.parameters() if q.requires_grad]

            def forward(model=model):
                with autocast(cfg.device, amp):
                    return model(ids, labels=ids).loss

            built.variants[v] = lambda forward=forward, params=params: torch.autograd.grad(
                forward(), params)
            built.saved[v] = (forward, params)
        return built

    case = Case(name, "hf", f"HF LlamaForCausalLM (12 layers) training step {dtype}",
                {"depth": 12, "mode": "train", "dtype": dtype}, ("eager", "hf.Llama"), build)
    return case


# ---------------------------------------------------------------------------------------------
# deep fully connected ReZero nets (the paper's 10,000-layer claim): host-bound

FC_DEPTHS = (1000, 10000)
FC_WIDTHS = (64, 256)
FC_BATCH = 128


class PlainReZeroFC(nn.Module):
    """The block a user would write in plain PyTorch: ``x + alpha * relu(linear(x))``."""

    def __init__(self, width, device=None):
        super().__init__()
        self.linear = nn.Linear(width, width, device=device)
        self.alpha = nn.Parameter(torch.zeros(1, device=device))

    def forward(self, x):
        return x + self.alpha * torch.relu(self.linear(x))


def _fc_net(variant, depth, width, device):
    """The ``rezero_fc_net`` of ``variant``: ours on a backend, ``eager`` = backend "torch"
    (python_ref's ops), ``compiled`` = the eager net with each block torch.compile'd, ``nn`` =
    the same net from ``PlainReZeroFC`` blocks."""
    if variant == "nn":
        return nn.Sequential(nn.Linear(width, width, device=device),
                             *[PlainReZeroFC(width, device) for _ in range(depth)],
                             nn.Linear(width, 10, device=device))
    backend = variant[len("rezero["):-1] if variant.startswith("rezero[") else "torch"
    net = rzk.rezero_fc_net(depth, width, in_features=width, out_features=10, device=device,
                            backend=backend)
    if variant == "compiled":
        for block in net[1:-1]:
            block.compile(dynamic=False)  # every block shares one compiled graph
    return net


def _make_fc_case(depth, width):
    name = f"fc/depth{depth}/width{width}/train/fp32"
    title = f"ReZero FC net training step, {depth} layers, width {width}"

    def build(cfg: Config, only=None) -> Built:
        d = 20 if cfg.tiny else depth
        want = case.variant_names(cfg, only)
        torch.manual_seed(cfg.seed)
        x = torch.randn(FC_BATCH, width, device=cfg.device)
        built = Built({}, tokens=FC_BATCH, shape=f"{d} layers, width {width}, batch {FC_BATCH}",
                      note="training step = forward + autograd.grad of the output w.r.t. all "
                           "parameters; alpha = 0 (the initialisation); compiled: blocks "
                           "compiled one by one (the blocks share one graph: compiling takes "
                           "seconds at any depth)")
        grad_out = torch.randn(FC_BATCH, 10, device=cfg.device)
        for v in want:
            net = _fc_net(v, d, width, cfg.device).train()
            params = list(net.parameters())
            call = lambda net=net, params=params: torch.autograd.grad(net(x), params, grad_out)
            if v == "compiled":
                built.compile_s[v] = timing.once(call, cfg.device)
            built.variants[v] = call
        return built

    case = Case(name, "fc", title, {"depth": depth, "width": width, "mode": "train",
                                    "dtype": "fp32"}, ("eager", "compiled", "nn"), build)
    return case


# ---------------------------------------------------------------------------------------------

def all_cases() -> list:
    cases = [_make_op_case(op, mode, dt, size, p) for op in OPS for mode in OP_MODES
             for dt in DTYPES for size in SIZES for p in DROPOUTS]
    cases += [_make_op_case(op, mode, "fp32", size, p) for op in HOST_OPS
              for mode in ("fwd", "fwd+bwd") for size in HOST_SIZES for p in DROPOUTS]
    cases += [_make_layer_case(kind, mode, dt) for kind in ("encoder", "decoder")
              for mode in ("train", "infer") for dt in TRAIN_DTYPES]
    cases += [_make_stack_case(d, dt) for d in DEPTHS for dt in TRAIN_DTYPES]
    cases += [_make_stack_case(64, "fp32", STACK_NARROW, "-d64")]
    cases += [_make_fc_case(d, w) for d in FC_DEPTHS for w in FC_WIDTHS]
    cases += [_make_llama_case(d, dt, p) for d in LLAMA_STACK for dt in TRAIN_DTYPES
              for p in DROPOUTS]
    if importlib.util.find_spec("transformers") is not None:
        cases += [_make_hf_case(dt) for dt in HF_DTYPES]
    return headline_first(cases)


# The headline (first table of ``--quick``, the demo), in this order.
HEADLINE = (
    "op/rezero_residual/fwd+bwd/fp32/large/p0",
    "op/rezero_residual/fwd+bwd/fp32/large/p0.1",
    "layer/encoder/train/fp32",
    "fc/depth1000/width64/train/fp32",
)
# ``--quick``: the headline, the roofline of the residual forward, the host-bound cases of the
# issue targets, the 64-layer stacks, a Llama-style layer in fp32 with dropout and in bf16, the
# encoder layer in bf16 autocast, and the gated activation.
QUICK = HEADLINE + (
    "op/rezero_residual/fwd/fp32/large/p0",
    "host/rezero_residual/fwd+bwd/fp32/8x8/p0",
    "host/rezero_residual/fwd+bwd/fp32/8x8/p0.1",
    "stack/encoder64-d64/train/fp32",
    "stack/encoder64/train/fp32",
    "llama/layer/train/fp32/p0.1",
    "llama/layer/train/amp-bf16/p0",
    "layer/encoder/train/amp-bf16",
    "op/gated_act_dropout/fwd+bwd/fp32/large/p0.1",
)
# ``--gpu``: what a GPU run measures (bench/results/gpu/), in about three minutes: bandwidth of
# the elementwise ops as a share of a copy, the fused GEMM epilogue against matmul + eager
# epilogue and torch.compile, triton against cuda everywhere, the host-bound ops and nets, a
# layer and bf16 stacks.
GPU = HEADLINE[:2] + (
    "layer/encoder/train/bf16",
    "stack/encoder12/train/bf16",
    "stack/encoder64/train/bf16",
    "fc/depth1000/width64/train/fp32",
    "op/rezero_residual/fwd/fp32/large/p0",
) + tuple(f"op/{op}/{mode}/bf16/large/p0.1" for op in ("rezero_residual", "bias_act_dropout")
          for mode in ("fwd", "bwd")) + tuple(
    f"op/rezero_linear/fwd+bwd/bf16/large/p{p:g}" for p in DROPOUTS
) + ("stack/encoder64-d64/train/fp32", "fc/depth10000/width64/train/fp32") + tuple(
    f"host/{op}/fwd+bwd/fp32/8x8/p{p:g}" for op in HOST_OPS for p in DROPOUTS) + (
    "host/rezero_residual/fwd/fp32/8x8/p0", "host/rezero_residual/fwd+bwd/fp32/64x256/p0",
    "llama/layer/train/amp-bf16/p0", "llama/layer/train/amp-bf16/p0.1",
    "llama/stack12/train/amp-bf16/p0", "op/gated_act_dropout/fwd+bwd/bf16/large/p0.1",
    "host/gated_act_dropout/fwd+bwd/fp32/8x8/p0")
# torch.compile baselines of a --gpu run: the fused GEMM epilogue, the layer and the stacks
# (elementwise ops are measured against the copy roofline instead; compiling the FC nets block by
# block takes longer than the whole run may)
GPU_COMPILE = r"^(op/rezero_linear|layer|stack|llama)/"


def headline_first(cases):
    order = {n: i for i, n in enumerate(HEADLINE)}
    return sorted(cases, key=lambda c: order.get(c.name, len(order)))


def by_name(name: str) -> Case:
    for c in all_cases():
        if c.name == name:
            return c
    raise KeyError(name)


def select(quick: bool, pattern: str | None = None, preset: tuple | None = None) -> list:
    """The cases of a run: ``preset`` (e.g. ``QUICK``, ``GPU``) in its order, or all, then those
    whose name matches ``pattern`` (a regular expression, searched)."""
    import re
    cases = all_cases()
    preset = QUICK if quick and preset is None else preset
    if preset is not None:
        cases = [c for c in cases if c.name in preset]
        cases.sort(key=lambda c: preset.index(c.name))
    if pattern:
        rx = re.compile(pattern)
        cases = [c for c in cases if rx.search(c.name)]
    return cases
