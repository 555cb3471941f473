"""Shared helpers of the paper reproductions (``bench/reproduce_*.py``): data, models, training
loops, result tables and plots.  The scripts import this module; nothing here is copied between
them.

Data never comes from the network at run time: the digits set ships with scikit-learn and the
Wikipedia XML excerpt with the gensim wheel.
"""
from __future__ import annotations

import argparse
import bz2
import csv
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # the scripts run from a source checkout without installing the package
    import rezero_kernels  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import rezero_kernels  # noqa: F401

import python_ref

ENWIKI_RESOURCE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


# ----------------------------------------------------------------------------------------------
# setup

def arg_parser(doc: str) -> argparse.ArgumentParser:
    """A reproduction script's command line: described by its docstring's first line, with the
    options every script has (``--smoke``, ``--out``); the script adds its own."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny setting that runs in seconds")
    p.add_argument("--out", default="bench_results", help="output directory")
    return p



def setup(threads: int, seed: int = 0) -> None:
    torch.set_num_threads(max(1, int(threads)))
    torch.manual_seed(seed)


def rezero_layer_source() -> str:
    """Which ReZero Transformer layer the runs use: the fused one once it exists."""
    return "rezero_kernels" if hasattr(rezero_kernels, "RZTXEncoderLayer") else "python_ref"


def rezero_encoder_layer_cls():
    return getattr(rezero_kernels, "RZTXEncoderLayer", None) or python_ref.RZTXEncoderLayer


# ----------------------------------------------------------------------------------------------
# data


def load_digits():
    """scikit-learn's 8x8 digits: standardised features ``(1797, 64)`` float32, labels long."""
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as err:
        raise ImportError("this reproduction needs scikit-learn (`pip install scikit-learn`), "
                          "which ships the digits data set") from err
    data = _load()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return x, torch.tensor(data.target, dtype=torch.long)


def enwiki_path():
    """The Wikipedia XML excerpt inside the installed gensim package (no download)."""
    try:
        import importlib.resources as resources
        path = resources.files("gensim") / ENWIKI_RESOURCE
    except ModuleNotFoundError as err:
        raise ImportError("this reproduction needs gensim (`pip install gensim`), whose wheel "
                          "ships the Wikipedia excerpt used as the corpus") from err
    if not path.is_file():
        raise FileNotFoundError(f"gensim is installed but {ENWIKI_RESOURCE} is missing from it")
    return path


def load_enwiki_bytes(val_fraction: float = 0.1):
    """The excerpt as byte ids: ``(train, val)`` 1-D long tensors (the last ``val_fraction`` of
    the file is held out)."""
    raw = bz2.decompress(enwiki_path().read_bytes())
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    cut = int(len(data) * (1.0 - val_fraction))
    return data[:cut], data[cut:]


def unigram_bpb(data: torch.Tensor) -> float:
    """Entropy (bits) of the byte frequencies of ``data``: the BPB of the best model that
    ignores context.  A language model that does not get below it has learnt no context."""
    p = torch.bincount(data, minlength=256).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log2()).sum())


def sample_batch(data: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator):
    """Random windows: inputs ``(batch, seq_len)`` and next-byte targets."""
    starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=gen)
    idx = starts[:, None] + torch.arange(seq_len + 1)
    windows = data[idx]
    return windows[:, :-1], windows[:, 1:]


# ----------------------------------------------------------------------------------------------
# fully connected networks (paper Table 1 rows 1, 2, 3 and 6; Fig. 5)

FC_KINDS = ("plain", "residual", "layernorm", "rezero")
FC_LABELS = {"plain": "FC", "residual": "FC + Residual", "layernorm": "FC + LayerNorm",
             "rezero": "FC + ReZero"}


class _FCLayer(nn.Module):
    """One hidden layer of the baselines: x -> relu(Wx+b), x + relu(Wx+b), LN(relu(Wx+b))."""

    def __init__(self, width: int, kind: str):
        super().__init__()
        self.kind = kind
        self.linear = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width) if kind == "layernorm" else None

    def forward(self, x):
        h = torch.relu(self.linear(x))
        if self.kind == "residual":
            return x + h
        if self.kind == "layernorm":
            return self.norm(h)
        return h


def make_fc_net(kind: str, depth: int, width: int, in_features: int, out_features: int,
                backend: str = "auto") -> nn.Module:
    """A ``depth``-layer, ``width``-wide ReLU network of the given kind, Xavier-uniform weights
    and zero biases for every variant (the ReZero one uses ``rezero_kernels.blocks``)."""
    if kind not in FC_KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {FC_KINDS}")
    if kind == "rezero":
        from rezero_kernels.blocks import rezero_fc_net
        net = rezero_fc_net(depth, width, in_features=in_features, out_features=out_features,
                            backend=backend)
    else:
        net = nn.Sequential(nn.Linear(in_features, width),
                            *[_FCLayer(width, kind) for _ in range(depth)],
                            nn.Linear(width, out_features))
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return net


# ----------------------------------------------------------------------------------------------
# byte-level Transformer language models (paper Table 2, Sec. 4.2)

LM_KINDS = ("postnorm", "prenorm", "rezero")


class ByteLM(nn.Module):
    """Decoder-only byte LM: embedding + learned positions, ``n_layers`` causal self-attention
    layers of the given kind, a linear head over 256 bytes.

    ``postnorm``: ``nn.TransformerEncoderLayer`` (Vaswani et al.), ``prenorm``: the same with
    ``norm_first=True`` and a final LayerNorm, ``rezero``: the ReZero layer (no LayerNorm at all).
    """

    def __init__(self, kind: str, n_layers: int, d_model: int, nhead: int, dim_ff: int,
                 seq_len: int, dropout: float = 0.0, alpha_init: float = 0.0,
                 backend: str = "auto"):
        super().__init__()
        if kind not in LM_KINDS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {LM_KINDS}")
        self.kind = kind
        self.embed = nn.Embedding(256, d_model)
        self.pos = nn.Parameter(torch.randn(seq_len, d_model) * 0.02)
        if kind == "rezero":
            cls = rezero_encoder_layer_cls()
            extra = {"backend": backend} if cls is not python_ref.RZTXEncoderLayer else {}
            self.layers = nn.ModuleList(
                cls(d_model, nhead, dim_ff, dropout, "relu", batch_first=True,
                    alpha_init=alpha_init, **extra) for _ in range(n_layers))
        else:
            self.layers = nn.ModuleList(
                nn.TransformerEncoderLayer(d_model, nhead, dim_ff, dropout, "relu",
                                           batch_first=True, norm_first=(kind == "prenorm"))
                for _ in range(n_layers))
        self.final_norm = nn.LayerNorm(d_model) if kind == "prenorm" else nn.Identity()
        self.head = nn.Linear(d_model, 256)
        self.register_buffer("mask", python_ref.causal_mask(seq_len, seq_len), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.embed(idx) + self.pos[:t]
        mask = self.mask[:t, :t]
        for layer in self.layers:
            x = layer(x, src_mask=mask, is_causal=True)
        return self.head(self.final_norm(x))


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def evaluate_bpb(model: nn.Module, batches) -> float:
    """Mean bits per byte of ``model`` over fixed ``(x, y)`` batches."""
    was = model.training
    model.eval()
    total = sum(lm_loss(model, x, y).item() for x, y in batches) / len(batches)
    model.train(was)
    return total / math.log(2.0)


def fixed_batches(data: torch.Tensor, n: int, batch: int, seq_len: int, seed: int = 1234):
    gen = torch.Generator().manual_seed(seed)
    return [sample_batch(data, batch, seq_len, gen) for _ in range(n)]


def warmup_factor(step: int, warmup: int) -> float:
    """Linear warm-up from 1/warmup to 1 over ``warmup`` steps (1 when warmup is 0)."""
    return 1.0 if warmup <= 0 else min(1.0, (step + 1) / warmup)


def train_lm(model: nn.Module, train: torch.Tensor, val_batches, *, steps: int, batch: int,
             seq_len: int, lr: float, warmup: int = 0, eval_every: int = 50, seed: int = 0,
             stop_bpb: float | None = None, time_limit: float | None = None, clip: float = 0.0,
             on_step=None):
    """Adam training of a byte LM.  Returns a dict: ``evals`` [(step, val_bpb)], ``losses``
    (train loss per step, nats), ``diverged`` (non-finite loss), ``seconds``, ``steps``.

    Stops early at a non-finite loss, when ``stop_bpb`` is reached, or after ``time_limit``
    seconds (checked at evaluation points).
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_factor(s, warmup))
    evals, losses, diverged = [(0, evaluate_bpb(model, val_batches))], [], False
    start = time.perf_counter()
    step = 0
    for step in range(1, steps + 1):
        x, y = sample_batch(train, batch, seq_len, gen)
        loss = lm_loss(model, x, y)
        if not torch.isfinite(loss):
            diverged = True
            losses.append(float("nan"))
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step)
        if step % eval_every == 0 or step == steps:
            bpb = evaluate_bpb(model, val_batches)
            evals.append((step, bpb))
            if not math.isfinite(bpb):
                diverged = True
                break
            if stop_bpb is not None and bpb <= stop_bpb:
                break
            if time_limit is not None and time.perf_counter() - start > time_limit:
                break
    return {"evals": evals, "losses": losses, "diverged": diverged,
            "seconds": time.perf_counter() - start, "steps": step}


def first_crossing(points, threshold: float):
    """The first step whose value is <= threshold in ``[(step, value)]``, else None."""
    for step, value in points:
        if math.isfinite(value) and value <= threshold:
            return step
    return None


# ----------------------------------------------------------------------------------------------
# output


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "not reached"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "nan"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(columns, rows) -> str:
    """A markdown table of ``rows`` (lists of cells, formatted with :func:`fmt`)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_table(out_dir, name: str, columns, rows, preamble: str = "") -> str:
    """Write ``rows`` (lists of cells) as ``name.md`` (markdown, after ``preamble``) and
    ``name.csv`` under ``out_dir``; print and return the markdown."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cells = [[fmt(c) for c in row] for row in rows]
    table = markdown_table(columns, cells)
    text = (preamble.rstrip() + "\n\n" if preamble else "") + table + "\n"
    (out / f"{name}.md").write_text(text)
    with open(out / f"{name}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(cells)
    print(text, flush=True)
    return text


def plot_curves(path, curves: dict, *, xlabel: str, ylabel: str, title: str = "",
                threshold: float | None = None, logy: bool = False) -> bool:
    """Line plot of ``{label: (xs, ys)}`` to a PNG; returns False (and says so) without
    matplotlib, since plotting is optional."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print(f"matplotlib is not installed: skipping the plot {path}", file=sys.stderr)
        return False
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, label=label)
    if threshold is not None:
        ax.axhline(threshold, color="gray", linestyle="--", linewidth=1, label="threshold")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    fig.savefig(path, dpi=100)
    return True
