"""Diagnostics for ReZero networks: input-output Jacobian spectrum and the gates' trajectories.

* ``jacobian_singular_values(model, x)`` - the singular values of d model(x) / d x (both
  flattened).  A ReZero stack at initialisation (all alpha = 0) is exactly the identity map, so
  every singular value is 1 ("dynamical isometry", the paper's Fig. 4); a deep post-norm
  Transformer's spread over orders of magnitude.
* ``AlphaRecorder(model)`` - records every gate's |alpha| per training step and draws the
  heat map of the paper's Fig. 8 (matplotlib, optional dependency).
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn as nn

__all__ = ["jacobian", "jacobian_singular_values", "AlphaRecorder", "gate_parameters"]


def jacobian(model, x: torch.Tensor, *, vectorize: bool = True) -> torch.Tensor:
    """The Jacobian of ``model`` at ``x`` as a 2-D ``(out.numel(), x.numel())`` matrix.

    ``model`` is called as ``model(x)`` and must return one tensor.  An ``nn.Module`` is put in
    eval mode (no dropout, BatchNorm uses running statistics) while measuring and restored
    afterwards.  ``vectorize=True`` batches the backward passes with vmap; models that vmap
    cannot handle fall back to one backward pass per output element.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point tensor")
    was_training = model.training if isinstance(model, nn.Module) else None
    if isinstance(model, nn.Module):
        model.eval()
    try:
        x = x.detach()
        if vectorize:
            try:
                jac = torch.autograd.functional.jacobian(model, x, vectorize=True)
            except (RuntimeError, NotImplementedError):
                jac = None
            if jac is not None:
                return jac.reshape(-1, x.numel())
        return _jacobian_loop(model, x)
    finally:
        if was_training is not None:
            model.train(was_training)


def _jacobian_loop(model, x: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        inp = x.clone().requires_grad_(True)
        out = model(inp).reshape(-1)
        rows = []
        for i in range(out.numel()):
            (g,) = torch.autograd.grad(out[i], inp, retain_graph=True, allow_unused=True)
            rows.append(torch.zeros(x.numel(), dtype=x.dtype, device=x.device) if g is None
                        else g.reshape(-1))
    return torch.stack(rows)


def jacobian_singular_values(model, x: torch.Tensor, *, vectorize: bool = True) -> torch.Tensor:
    """Singular values (descending, float64) of the input-output Jacobian of ``model`` at ``x``.

    Cost: one backward pass per output element, so keep ``x`` small (e.g. a 64-layer stack of
    width 16 on 8 tokens is a 128 x 128 Jacobian: well under a second on a CPU).
    """
    jac = jacobian(model, x, vectorize=vectorize)
    return torch.linalg.svdvals(jac.detach().to(torch.float64))


def gate_parameters(model: nn.Module, prefix: str = "resweight"):
    """``[(name, parameter)]`` of every ReZero gate: parameters whose own name (the last
    dotted component) starts with ``prefix``, in module registration order."""
    return [(name, p) for name, p in model.named_parameters()
            if name.rsplit(".", 1)[-1].startswith(prefix)]


class AlphaRecorder:
    """Records ``|alpha|`` of every ReZero gate (parameters named ``resweight*``) over training.

    ::

        rec = AlphaRecorder(model)
        for step in range(n):
            ...optimizer.step()
            rec.record(step)
        rec.history          # numpy array, (recorded steps, gates)
        rec.plot("alpha.png")

    A gate with more than one element (a per-channel gate) is recorded as its mean ``|alpha|``.
    """

    def __init__(self, model: nn.Module, prefix: str = "resweight"):
        self.gates = gate_parameters(model, prefix)
        if not self.gates:
            raise ValueError(f"model has no parameters named {prefix}*: nothing to record")
        self.names = [name for name, _ in self.gates]
        self.steps: list[int] = []
        self._rows: list[np.ndarray] = []

    def record(self, step: int | None = None) -> np.ndarray:
        """Append the current |alpha| of every gate (``step`` defaults to the row count)."""
        with torch.no_grad():
            row = np.array([p.detach().abs().float().mean().item() for _, p in self.gates])
        self.steps.append(len(self.steps) if step is None else int(step))
        self._rows.append(row)
        return row

    @property
    def history(self) -> np.ndarray:
        """Recorded |alpha|: shape ``(len(steps), len(names))``."""
        if not self._rows:
            return np.zeros((0, len(self.names)))
        return np.stack(self._rows)

    def plot(self, path, title: str | None = None, log: bool = False):
        """Write the heat map (gate index vertically, step horizontally) as a PNG to ``path``."""
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.colors import LogNorm
            from matplotlib.figure import Figure
        except ImportError as err:
            raise ImportError("AlphaRecorder.plot needs matplotlib, an optional dependency: "
                              "`pip install matplotlib`") from err
        hist = self.history
        if hist.shape[0] == 0:
            raise ValueError("nothing recorded yet: call record() first")
        fig = Figure(figsize=(7, 4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        steps = np.asarray(self.steps)
        norm = LogNorm(vmin=max(hist[hist > 0].min(), 1e-6) if (hist > 0).any() else 1e-6,
                       vmax=max(hist.max(), 1e-6)) if log else None
        img = ax.imshow(hist.T, aspect="auto", origin="lower", interpolation="nearest",
                        cmap="viridis", norm=norm,
                        extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, hist.shape[1] - 0.5))
        fig.colorbar(img, ax=ax, label="|alpha|")
        ax.set_xlabel("training step")
        ax.set_ylabel("gate (layer index)")
        ax.set_title(title or "ReZero gates |alpha| during training")
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
        fig.savefig(path, dpi=100)
        return path
