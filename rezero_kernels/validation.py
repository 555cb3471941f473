"""Input checks shared by every backend: bad input gets an exception that names the problem."""
from __future__ import annotations

import torch

from python_ref.activations import lookup


def tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    return t


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def not_distributed(tensors: dict) -> None:
    """The ops take plain tensors: a DTensor (a sharded or replicated parameter, or activation)
    gets an error that says what to use instead of torch's generic mixed-tensor one."""
    for name, t in tensors.items():
        if type(t) not in _PLAIN and any(c.__name__ == "DTensor" for c in type(t).__mro__):
            raise TypeError(f"{name} is a DTensor: rezero_kernels' fused ops take plain tensors; "
                            "shard the fused layers with rezero_kernels.parallel."
                            "tensor_parallel, whose layers call them on each rank's local "
                            "shards")


def same_device(**tensors: torch.Tensor) -> torch.device:
    not_distributed(tensors)
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise RuntimeError(f"all tensors must be on one device, got {listed}")
    return first


def same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")


def dropout_p(p, training: bool) -> float:
    """The probability the kernels see: 0.0 when not training."""
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"dropout probability must be a float, got {type(p).__name__}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return float(p) if training else 0.0


def dropout_under_vmap(backend: str) -> None:
    """Dropout inside ``torch.func`` transforms.  The fused ops draw one seed per call, so under
    ``vmap`` every batch element gets the same mask: right for ``randomness="same"``; for
    ``"error"`` (vmap's default) raise as eager dropout does, and for ``"different"`` raise
    rather than hand out one mask as independent ones.  ``backend="torch"`` (eager dropout)
    supports all three."""
    if backend == "torch" or torch.compiler.is_compiling():
        return
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    for interpreter in retrieve_all_functorch_interpreters():
        if interpreter.key() != TransformType.Vmap:
            continue
        randomness = interpreter.randomness()
        if randomness == "error":
            raise RuntimeError("vmap: called random operation while in randomness error mode "
                               "(rezero_kernels' dropout): pass randomness='same' to vmap, "
                               "keep the dropout out of vmap, or use backend='torch'")
        if randomness == "different":
            raise NotImplementedError("rezero_kernels: dropout under torch.func.vmap("
                                      "randomness='different') is not implemented for the fused "
                                      "ops (they would give every batch element one mask); use "
                                      "randomness='same', or backend='torch'")


def channel_vector(name: str, v: torch.Tensor, channels: int, allow_scalar: bool) -> None:
    """``v`` is a gate (1 element, or ``channels``) or a bias (``channels``)."""
    ok = v.dim() == 1 and (v.shape[0] == channels or (allow_scalar and v.shape[0] == 1))
    if allow_scalar and v.dim() == 0:
        raise ValueError(f"{name} must be a 1-element tensor of shape (1,), not a 0-dim tensor; "
                         f"use {name}.reshape(1)")
    if not ok:
        want = f"(1,) or ({channels},)" if allow_scalar else f"({channels},)"
        raise ValueError(f"{name} must have shape {want} to match the last dimension "
                         f"({channels}) of the input, got {tuple(v.shape)}")


def last_dim(name: str, t: torch.Tensor) -> int:
    if t.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension, got a 0-dim tensor")
    return t.shape[-1]


def gate_up_halves(name: str, t: torch.Tensor) -> int:
    """``t`` holds ``[g | u]`` on its last dimension; returns the width of each half."""
    width = last_dim(name, t)
    if width % 2 != 0:
        raise ValueError(f"{name}'s last dimension must be even ([gate | up] halves of one "
                         f"width), got {width}")
    return width // 2


def gemm_operands(inp, weight) -> int:
    """``inp @ weight.T`` is well-formed; returns out_features."""
    tensor("inp", inp)
    tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if last_dim("inp", inp) != in_features:
        raise ValueError(f"inp's last dimension ({inp.shape[-1]}) must equal weight's "
                         f"in_features ({in_features})")
    return out_features


def activation(name) -> str:
    """``name`` if it is a row of python_ref's activation table, else a ValueError."""
    return lookup(name).name


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the kernels compute in for data of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the dispatch when it is a no-op (the usual case; on a GPU host time
    counts)."""
    return t if t.dtype == dtype else t.to(dtype)


def common_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype
