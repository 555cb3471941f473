"""Backend selection: the one place that decides which implementation runs an op.

Every backend is a module exposing the same functions, called with inputs that
``validation`` has already checked (same device, common dtype, dropout_p already 0.0 when not
training, alpha a 1-element or last-dim-sized tensor, bias a tensor):

    rezero_residual(x, fx, alpha, dropout_p)
    bias_act_dropout(h, bias, activation, dropout_p)
    gated_act_dropout(gate_up, activation, dropout_p)
    rezero_gated_linear(x, gate_up, weight, alpha, activation, mlp_dropout_p, dropout_p)
    rezero_linear(x, inp, weight, bias, alpha, dropout_p)
    linear_bias_act_dropout(inp, weight, bias, activation, dropout_p)
    rezero_fc(x, weight, bias, alpha, activation, dropout_p)

The backends are the rows of ``REGISTRY`` below: its name, module, the device types it serves,
its place in ``auto``'s order per device type, and how to get it.  ``backends()``, ``select``,
its error messages and the README's backend table all come from it.  A fallback of ``auto`` to
"torch", or past a backend it prefers, warns once, saying what to install or build.
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import os
import warnings
from typing import Callable, NamedTuple, Optional

import torch


def triton_interpreting() -> bool:
    """Triton runs kernels on CPU tensors in its interpreter (a test vehicle)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _extension_missing() -> Optional[str]:
    from . import extension
    return extension.load_error()


def _cuda_missing() -> Optional[str]:
    why = _extension_missing()
    if why is not None:
        return why
    from . import extension
    if extension.has_cuda():
        return None
    return "the extension has no CUDA kernels or no GPU is visible"


def _release(version: str) -> tuple:
    """(major, minor) of a version string."""
    return tuple(int(part) for part in version.split(".")[:2])


def _triton_missing() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if not (torch.cuda.is_available() or triton_interpreting()):
        return "no GPU is visible and TRITON_INTERPRET is not 1"
    if triton_interpreting():
        # triton < 3.7's interpreter takes a loop bound with int() of a 1-element array, an
        # error since numpy 2.4: every kernel with a runtime loop bound would fail deep inside it
        triton, numpy = (importlib.metadata.version(d) for d in ("triton", "numpy"))
        if _release(triton) < (3, 7) and _release(numpy) >= (2, 4):
            return (f"the interpreter of triton {triton} cannot run with numpy {numpy}: use "
                    "numpy<2.4 or triton>=3.7")
    return None


class Backend(NamedTuple):
    name: str
    module: str            # implements the interface above
    runs: str              # what it is, for the README and messages
    serves: tuple          # device types whose tensors it takes; () = any
    auto: dict             # {device type: rank in auto's order}, lowest first; {} = never auto
    entry_points: bool     # has the one-call eager entry points of rezero_kernels._C
    how_to_get: str
    missing: Callable[[], Optional[str]]  # why it cannot run on this machine, or None


# auto ranks cuda before triton on CUDA tensors: measured on an H100 (bench/results/gpu/), the
# CUDA kernels with the C++ entry points ran every op and layer 2-5x faster than the Triton
# backend, whose launches cost tens of microseconds of Python each.  The Triton interpreter is a
# test vehicle, never chosen by auto.
REGISTRY = (
    Backend("torch", "rezero_kernels.backend_torch",
            "`python_ref`, the plain-PyTorch reference (any device)", (), {}, False, "",
            lambda: None),
    Backend("cpu", "rezero_kernels.compiled_ops",
            "the compiled C++ kernels (`csrc/cpu/`), CPU tensors", ("cpu",), {"cpu": 0}, True,
            "build the C++ extension: `pip install --no-build-isolation -e .` in the source tree",
            _extension_missing),
    Backend("cuda", "rezero_kernels.compiled_ops",
            "the compiled CUDA kernels (`csrc/cuda/`), CUDA tensors", ("cuda",), {"cuda": 0},
            True,
            "build the extension on a machine with CUDA torch and nvcc (see README, REZERO_CUDA=1)",
            _cuda_missing),
    Backend("triton", "rezero_kernels.triton_ops",
            "the Triton kernels (`rezero_kernels/triton_ops/`), CUDA tensors, or CPU tensors "
            "under `TRITON_INTERPRET=1`",
            ("cuda", "cpu") if triton_interpreting() else ("cuda",), {"cuda": 1}, False,
            "install triton and use CUDA tensors (or set TRITON_INTERPRET=1 for CPU tensors)",
            _triton_missing),
)
_BY_NAME = {b.name: b for b in REGISTRY}
BACKENDS = tuple(_BY_NAME)


@functools.lru_cache(maxsize=None)
def _auto_order(device_type: str) -> tuple:
    ranked = [b for b in REGISTRY if device_type in b.auto]
    return tuple(b.name for b in sorted(ranked, key=lambda b: b.auto[device_type]))


def _load(backend: Backend):
    """(the backend's module, None) or (None, why it cannot run on this machine)."""
    why = backend.missing()
    if why is not None:
        return None, why
    try:
        return importlib.import_module(backend.module), None
    except ImportError as exc:  # reported by select() when the backend is asked for
        return None, f"importing {backend.module} failed: {exc}"


# Probed once, at import, so that torch.compile traces only dictionary look-ups here.
# (TRITON_INTERPRET must therefore be set before rezero_kernels is imported.)
_IMPLEMENTATIONS, _UNAVAILABLE = {}, {}
for _backend in REGISTRY:
    _IMPLEMENTATIONS[_backend.name], _UNAVAILABLE[_backend.name] = _load(_backend)


def _probe(name: str) -> bool:
    return _IMPLEMENTATIONS[name] is not None


def backends() -> dict:
    """What is usable on this machine, per fused backend (those ``auto`` can pick):
    ``{"cpu": bool, "cuda": bool, "triton": bool}``."""
    return {b.name: _probe(b.name) for b in REGISTRY if b.auto}


def _supports_device(name: str, device: torch.device) -> bool:
    serves = _BY_NAME[name].serves
    return not serves or device.type in serves


def check_name(requested: str) -> str:
    """``requested`` if it names a backend or is "auto"; a ValueError otherwise (what the
    modules call at construction, before any tensor is seen)."""
    if requested != "auto" and requested not in _BY_NAME:
        raise ValueError(f"unknown backend {requested!r}; expected 'auto' or one of {BACKENDS}")
    return requested


def _how_to_get(names) -> str:
    return "; or ".join(_BY_NAME[n].how_to_get for n in names)


@functools.lru_cache(maxsize=None)
def _warn_fallback(device_type: str) -> None:
    hints = _how_to_get(_auto_order(device_type))
    warnings.warn(f"rezero_kernels: no fused backend is available for {device_type} tensors, "
                  f"using the slow pure-PyTorch reference. To get the fused kernels, "
                  f"{hints or 'no fused backend exists for it'}.", RuntimeWarning, stacklevel=4)


@functools.lru_cache(maxsize=None)
def _warn_passed_over(device_type: str, chosen: str) -> None:
    order = _auto_order(device_type)
    missing = order[:order.index(chosen)]
    reasons = "; ".join(f"{m!r}: {_UNAVAILABLE[m]}" for m in missing)
    warnings.warn(f"rezero_kernels: backend 'auto' runs {device_type} tensors on {chosen!r}, "
                  f"because the backend it prefers is not available ({reasons}). To get it, "
                  f"{_how_to_get(missing)}.", RuntimeWarning, stacklevel=4)


def select(requested: str, device: torch.device) -> str:
    """Resolve ``backend=`` for tensors on ``device`` to a concrete backend name.  ``auto``
    takes the first available backend of its order, warning once when it passes one over (the
    order is by measured speed) or has to use the reference."""
    if requested == "auto":
        order = _auto_order(device.type)
        for name in order:
            if _probe(name):
                if name != order[0]:
                    _warn_passed_over(device.type, name)
                return name
        _warn_fallback(device.type)
        return "torch"
    check_name(requested)
    if not _probe(requested):
        raise RuntimeError(f"backend {requested!r} is not available on this machine "
                           f"({_UNAVAILABLE[requested]}): {_BY_NAME[requested].how_to_get}")
    if not _supports_device(requested, device):
        raise ValueError(f"backend {requested!r} cannot run on {device.type} tensors")
    return requested


def readme_table() -> str:
    """The README's backend table, from the registry (a test checks that the README has it)."""
    rows = ["| `backend=` | runs |", "| --- | --- |"]
    rows += [f'| `"{b.name}"` | {b.runs} |' for b in REGISTRY]
    devices = list(dict.fromkeys(d for b in REGISTRY for d in b.auto))
    order = "; ".join(f"{d.upper()} tensors: " + ", else ".join(
        f"`{n}`" for n in _auto_order(d) + ("torch",)) for d in devices)
    return "\n".join(rows + [f'| `"auto"` | {order} |'])


def uses_fused_cpu_dropout(requested: str, device: torch.device) -> bool:
    """Whether attention-probability dropout on ``device`` runs through the compiled CPU kernel
    (``attention.scaled_dot_product``) for a call with ``backend=requested``."""
    return device.type == "cpu" and select(requested, device) == "cpu"


def implementation(name: str):
    """The module implementing backend ``name`` (a name ``select`` returned)."""
    return _IMPLEMENTATIONS[name]


def _fast_paths() -> dict:
    """{(backend asked for, tensor is on CUDA): the extension module} for every request that
    ``select`` resolves to a backend with the eager entry points."""
    compiled = tuple(b.name for b in REGISTRY if b.entry_points and _probe(b.name))
    if not compiled:
        return {}
    from . import _C
    table = {}
    for is_cuda, device in ((False, torch.device("cpu")), (True, torch.device("cuda"))):
        for requested in ("auto",) + compiled:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    name = select(requested, device)
            except (RuntimeError, ValueError):
                continue
            if name in compiled:
                table[requested, is_cuda] = _C
    _warn_fallback.cache_clear()
    _warn_passed_over.cache_clear()
    return table


_FAST_PATHS = _fast_paths()


def fast_path(requested: str, x):
    """The compiled backend's eager entry points (``rezero_kernels._C``) when a call with
    ``backend=requested`` on ``x``'s device runs on it, else None.  Under ``torch.compile`` always
    None: the ops are then traced through ``torch.ops``."""
    if torch.compiler.is_compiling():
        return None
    try:
        return _FAST_PATHS.get((requested, x.is_cuda))
    except (AttributeError, TypeError):  # x is not a tensor, or requested is unhashable
        return None
