"""Loading the compiled extension ``rezero_kernels._C`` (C++ CPU kernels, optional CUDA)."""
from __future__ import annotations

import torch

BUILD_HINT = ("build it with `pip install --no-build-isolation -e .` (or `python setup.py "
              "build_ext --inplace`) from the source tree")


def _try_load() -> str | None:
    try:
        from . import _C  # noqa: F401  (loading registers the ops)
    except ImportError as exc:
        return f"rezero_kernels._C is not built or failed to load ({exc}); {BUILD_HINT}"
    return None


_LOAD_ERROR = _try_load()


def load_error() -> str | None:
    """None when the extension is loaded, else why it could not be."""
    return _LOAD_ERROR


def has_cpu() -> bool:
    return load_error() is None


def cpu_capability() -> str | None:
    """The instruction-set variant of the CPU kernels that runs here ("DEFAULT", "AVX2",
    "AVX512"; "NATIVE" for a REZERO_CPU_ARCH build), None without the extension.  Fixed by the
    first CPU kernel call: REZERO_CPU_CAPABILITY, else ATEN_CPU_CAPABILITY, else the best the
    CPU supports."""
    return torch.ops.rezero_kernels.cpu_capability() if has_cpu() else None


def has_cuda() -> bool:
    """The extension was built with CUDA kernels and a GPU is present."""
    return (has_cpu() and torch.cuda.is_available()
            and torch._C._dispatch_has_kernel_for_dispatch_key("rezero_kernels::residual", "CUDA"))
