"""Interleaved median timing: the candidate and its baselines take turns, round after round.

On a shared machine a neighbour's burst slows whatever runs at that moment.  Running all variants
of a case once per round (in an order rotated every round) spreads such bursts over all of them,
and the median over rounds discards most of the rest.  One sample is ``inner`` back-to-back calls
timed with ``time.perf_counter`` (calibrated so that a sample lasts at least ``min_sample_s``),
divided by ``inner``.  Everything runs in this process with torch's current thread count (unlike
``torch.utils.benchmark.Timer``'s default of one thread).
"""
from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Timing:
    median_s: float
    samples: list = field(default_factory=list)  # seconds per call, one per round
    inner: int = 1

    @property
    def rounds(self) -> int:
        return len(self.samples)

    @property
    def iqr_s(self) -> float:
        if len(self.samples) < 4:
            return max(self.samples) - min(self.samples) if self.samples else 0.0
        q = statistics.quantiles(self.samples, n=4)
        return q[2] - q[0]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _one_sample(fn: Callable, inner: int, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / inner


def interleaved(fns: dict, *, rounds: int = 7, min_rounds: int = 3, warmup: int = 2,
                min_sample_s: float = 0.02, max_case_s: float = 30.0,
                device: str = "cpu") -> dict:
    """Time each zero-argument callable of ``fns`` ({name: fn}); return {name: Timing}.

    Warm-up calls run first (not timed).  Then up to ``rounds`` rounds, each calling every
    variant for one sample, the order rotated by one per round; after ``min_rounds`` rounds the
    loop stops once ``max_case_s`` seconds of sampling have passed.
    """
    names = list(fns)
    per_call = {}
    for name in names:
        for _ in range(max(1, warmup)):
            per_call[name] = _one_sample(fns[name], 1, device)
    inner = {n: max(1, math.ceil(min_sample_s / max(per_call[n], 1e-9))) for n in names}
    samples = {n: [] for n in names}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    started = time.perf_counter()
    try:
        for r in range(max(rounds, min_rounds)):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                samples[name].append(_one_sample(fns[name], inner[name], device))
            if r + 1 >= min_rounds and time.perf_counter() - started > max_case_s:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return {n: Timing(statistics.median(samples[n]), samples[n], inner[n]) for n in names}


def once(fn: Callable, device: str = "cpu") -> float:
    """Seconds of one call (e.g. a first call that compiles)."""
    return _one_sample(fn, 1, device)
