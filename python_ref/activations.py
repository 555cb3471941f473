"""The activations: one table, read by every op, layer, backend and test.

A row's position is its code, which the kernels share: csrc/activations.h lists the same
activations in the same order, and the Triton kernels take the code as a constexpr.

``backward_needs``: what the fused ops keep of an activation for its derivative: "nothing"
(identity), "output" (act'(z) is a function of act(z) alone: relu' = 1 where relu(z) > 0), or
"input" (z itself).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F


class Activation(NamedTuple):
    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    backward_needs: str


TABLE = (
    Activation("identity", lambda t: t, "nothing"),
    Activation("relu", F.relu, "output"),
    Activation("gelu", F.gelu, "input"),
    Activation("gelu_tanh", lambda t: F.gelu(t, approximate="tanh"), "input"),
    Activation("silu", F.silu, "input"),
)
ACTIVATIONS = tuple(a.name for a in TABLE)
_BY_NAME = {a.name: a for a in TABLE}


def lookup(name) -> Activation:
    """The row of activation ``name``; a ValueError naming the choices otherwise."""
    row = _BY_NAME.get(name) if isinstance(name, str) else None
    if row is None:
        raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")
    return row


def code(name: str) -> int:
    """The activation's code: its position in the table (csrc/activations.h's order)."""
    return ACTIVATIONS.index(lookup(name).name)
