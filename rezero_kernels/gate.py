"""``ReZero``: the generic gate ``x + alpha * dropout(module(x))`` around any block that keeps
its input's shape (fully-connected, convolutional, attention...)."""
from __future__ import annotations

import torch
import torch.nn as nn

from . import dispatch, functional


class ReZero(nn.Module):
    """Wraps ``module`` as a ReZero residual block with a learned gate ``resweight``.

    ``alpha_init=0`` makes the block the identity at initialisation.  ``channels`` gives a
    per-channel gate over the last dimension instead of one scalar; ``dropout`` applies to
    ``module(x)`` before the gate.  Extra arguments of ``forward`` go to ``module``.
    """

    def __init__(self, module: nn.Module, alpha_init: float = 0.0, *, channels: int | None = None,
                 dropout: float = 0.0, backend: str = "auto"):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {dropout}")
        self.module = module
        self.resweight = nn.Parameter(torch.full((channels or 1,), float(alpha_init)))
        self.dropout = float(dropout)
        self.backend = dispatch.check_name(backend)

    def forward(self, x, *args, **kwargs):
        fx = self.module(x, *args, **kwargs)
        if fx.shape != x.shape:
            raise ValueError(f"ReZero needs a width-preserving module: input {tuple(x.shape)}, "
                             f"module output {tuple(fx.shape)}")
        return functional.rezero_residual(x, fx, self.resweight, self.dropout, self.training,
                                          self.backend)

    def extra_repr(self) -> str:
        return f"dropout={self.dropout}, backend={self.backend!r}"
