"""Backend selection: the one place that decides which implementation runs an op.

Every backend is a module exposing the same functions, called with inputs that
``validation`` has already checked (same device, common dtype, dropout_p already 0.0 when not
training, alpha a 1-element or last-dim-sized tensor, bias a tensor):

    rezero_residual(x, fx, alpha, dropout_p)
    bias_act_dropout(h, bias, activation, dropout_p)
    rezero_linear(x, inp, weight, bias, alpha, dropout_p)
    linear_bias_act_dropout(inp, weight, bias, activation, dropout_p)
    rezero_fc(x, weight, bias, alpha, activation, dropout_p)

Backends:
  "torch"  - ``python_ref``, plain eager PyTorch (the oracle; any device).
  "cpu"    - the compiled C++ extension, CPU tensors.
  "cuda"   - the compiled CUDA kernels in the same extension, CUDA tensors.
  "triton" - Triton kernels: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
"auto" picks, for CUDA tensors, cuda > triton > torch; for CPU tensors, cpu > torch
(the Triton interpreter is a test vehicle, never chosen automatically).  A fallback to "torch"
warns once, saying what to install or build.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings

import torch

BACKENDS = ("torch", "cpu", "cuda", "triton")
# cuda before triton: measured on an H100 (bench/results/gpu/), the CUDA kernels with the C++
# entry points ran every op and layer 2-5x faster than the Triton backend, whose launches cost
# tens of microseconds of Python each.
_AUTO_ORDER = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}
_MODULES = {"torch": "rezero_kernels.backend_torch", "cpu": "rezero_kernels.compiled_ops",
            "cuda": "rezero_kernels.compiled_ops", "triton": "rezero_kernels.triton_ops"}
_HOW_TO_GET = {
    "cpu": "build the C++ extension: `pip install --no-build-isolation -e .` in the source tree",
    "cuda": "build the extension on a machine with CUDA torch and nvcc (see README, REZERO_CUDA=1)",
    "triton": "install triton and use CUDA tensors (or set TRITON_INTERPRET=1 for CPU tensors)",
}


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _load(name: str):
    """(the backend's module, None) or (None, why it cannot run on this machine)."""
    if name in ("cpu", "cuda"):
        from . import extension
        if extension.load_error() is not None:
            return None, extension.load_error()
        if name == "cuda" and not extension.has_cuda():
            return None, "the extension has no CUDA kernels or no GPU is visible"
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return None, "triton is not installed"
        if not (torch.cuda.is_available() or _triton_interpreting()):
            return None, "no GPU is visible and TRITON_INTERPRET is not 1"
    try:
        return importlib.import_module(_MODULES[name]), None
    except ImportError as exc:  # reported by select() when the backend is asked for
        return None, f"importing {_MODULES[name]} failed: {exc}"


# Probed once, at import, so that torch.compile traces only dictionary look-ups here.
# (TRITON_INTERPRET must therefore be set before rezero_kernels is imported.)
_IMPLEMENTATIONS, _UNAVAILABLE = {}, {}
for _name in BACKENDS:
    _IMPLEMENTATIONS[_name], _UNAVAILABLE[_name] = _load(_name)


def _probe(name: str) -> bool:
    return _IMPLEMENTATIONS[name] is not None


def backends() -> dict:
    """What is usable on this machine: ``{"cpu": bool, "cuda": bool, "triton": bool}``."""
    return {name: _probe(name) for name in ("cpu", "cuda", "triton")}


def _supports_device(name: str, device: torch.device) -> bool:
    if name in ("torch",):
        return True
    if name == "triton":
        return device.type == "cuda" or (device.type == "cpu" and _triton_interpreting())
    return device.type == name


@functools.lru_cache(maxsize=None)
def _warn_fallback(device_type: str) -> None:
    wanted = _AUTO_ORDER.get(device_type, ())
    hints = "; or ".join(_HOW_TO_GET[w] for w in wanted) or "no fused backend exists for it"
    warnings.warn(f"rezero_kernels: no fused backend is available for {device_type} tensors, "
                  f"using the slow pure-PyTorch reference. To get the fused kernels, {hints}.",
                  RuntimeWarning, stacklevel=4)


def select(requested: str, device: torch.device) -> str:
    """Resolve ``backend=`` for tensors on ``device`` to a concrete backend name."""
    if requested == "auto":
        for name in _AUTO_ORDER.get(device.type, ()):
            if _probe(name):
                return name
        _warn_fallback(device.type)
        return "torch"
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; expected 'auto' or one of {BACKENDS}")
    if not _probe(requested):
        raise RuntimeError(f"backend {requested!r} is not available on this machine "
                           f"({_UNAVAILABLE[requested]}): {_HOW_TO_GET[requested]}")
    if not _supports_device(requested, device):
        raise ValueError(f"backend {requested!r} cannot run on {device.type} tensors")
    return requested


def implementation(name: str):
    """The module implementing backend ``name`` (a name ``select`` returned)."""
    return _IMPLEMENTATIONS[name]


def _fast_paths() -> dict:
    """{(backend asked for, tensor is on CUDA): the extension module} for every request that
    ``select`` resolves to the compiled "cpu" or "cuda" backend."""
    if _IMPLEMENTATIONS["cpu"] is None:
        return {}
    from . import _C
    table = {}
    for is_cuda, device in ((False, torch.device("cpu")), (True, torch.device("cuda"))):
        for requested in ("auto", "cpu", "cuda"):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    name = select(requested, device)
            except (RuntimeError, ValueError):
                continue
            if name in ("cpu", "cuda") and _supports_device(name, device):
                table[requested, is_cuda] = _C
    _warn_fallback.cache_clear()
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
