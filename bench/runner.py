"""Run one case: build it, time its variants interleaved, and turn the timings into result rows
(speed-ups, bandwidth, distance to the floor, tokens/s, memory)."""
from __future__ import annotations

import gc
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from . import cases, memory, roofline, timing


@dataclass(frozen=True)
class Plan:
    """How long to time: see ``timing.interleaved``."""
    rounds: int = 11
    min_rounds: int = 3
    warmup: int = 2
    min_sample_s: float = 0.05
    max_case_s: float = 60.0
    peak_groups: tuple = ("layer", "stack")  # case groups whose peak memory is measured


FULL = Plan()
QUICK = Plan(rounds=15, min_rounds=3, warmup=1, min_sample_s=0.02, max_case_s=6.0,
             peak_groups=("layer",))
TINY = Plan(rounds=3, min_rounds=3, warmup=1, min_sample_s=0.002, max_case_s=1.0)


def _layers(case: cases.Case) -> int:
    return case.params.get("depth", 1)


def run_case(case: cases.Case, cfg: cases.Config, plan: Plan) -> list:
    built = case.build(cfg)
    times = timing.interleaved(built.variants, rounds=plan.rounds, min_rounds=plan.min_rounds,
                               warmup=plan.warmup, min_sample_s=plan.min_sample_s,
                               max_case_s=plan.max_case_s, device=cfg.device)
    saved = memory.saved_per_layer(built, _layers(case)) if built.saved else {}
    peaks = _peaks(case, cfg, built) if case.group in plan.peak_groups and built.saved else {}
    eager = times.get("eager")
    floor = times.get("floor")
    copy_gbps = roofline.gbps(built.bytes.get("copy"), times["copy"].median_s) \
        if "copy" in times else None
    rows = []
    for v, t in times.items():
        gb = roofline.gbps(built.bytes.get(v), t.median_s)
        peak = peaks.get(v, {})
        rows.append({
            "case": case.name, "group": case.group, "title": case.title, "shape": built.shape,
            "variant": v, "median_ms": t.median_s * 1e3, "iqr_ms": t.iqr_s * 1e3,
            "rounds": t.rounds, "inner": t.inner, "samples_ms": [s * 1e3 for s in t.samples],
            "speedup_vs_eager": eager.median_s / t.median_s if eager else None,
            "gbps": gb, "frac_of_copy": gb / copy_gbps if gb and copy_gbps and v != "copy" else None,
            "x_floor": t.median_s / floor.median_s if floor and v != "floor" else None,
            "tokens_per_s": built.tokens / t.median_s if built.tokens else None,
            "compile_s": built.compile_s.get(v),
            "saved_bytes_per_layer": saved.get(v),
            "peak_bytes": peak.get("peak_bytes"), "step_peak_bytes": peak.get("step_bytes"),
            "peak_method": peak.get("method") or peak.get("error"),
            "note": built.note, **case.params,
        })
    del built
    gc.collect()
    return rows


def _peaks(case, cfg, built) -> dict:
    variants = [v for v in built.saved]  # training variants, compiled and floor excluded
    if cfg.device.startswith("cuda"):
        return {v: memory.peak_in_process(built, v, cfg.device) for v in variants}
    # fresh subprocesses; they only allocate, so running two at once does not skew them
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = pool.map(lambda v: memory.peak_subprocess(case, v, cfg), variants)
        return dict(zip(variants, results))
