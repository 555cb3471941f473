"""Memory of a training step: bytes saved for backward, and peak memory.

Saved for backward: ``rezero_kernels.saved_memory.saved_bytes`` on one forward, parameters
excluded (they are kept whatever a layer saves), divided by the number of layers.

Peak: on GPU ``torch.cuda.max_memory_allocated`` around one training step, in this process.  On
CPU the peak resident set size of a fresh subprocess per (case, variant): it first runs one step
of a ``--tiny`` build of the same variant (so that thread pools, kernels and libraries are loaded
before measuring, without leaving large freed blocks behind), then builds only that variant,
resets the kernel's high-water mark (``/proc/self/clear_refs``), and runs one step.  Reported:
the absolute peak (``VmHWM``) and the step's rise over the resident size before it (the
activation memory of the step plus the returned gradients).  Where ``clear_refs`` is not
writable the peak is ``ru_maxrss`` and includes set-up.  Compiled variants are left out (their
build already ran a step).

    python -m bench.memory CASE VARIANT [--tiny] [--device D] [--backend B]   (prints JSON)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys

import torch

from rezero_kernels.saved_memory import saved_bytes

from . import cases


def saved_per_layer(built: cases.Built, layers: int) -> dict:
    """{variant: bytes saved for backward per layer}."""
    out = {}
    for v, (forward, params) in built.saved.items():
        out[v] = saved_bytes(forward, exclude=params) // max(1, layers)
    return out


def _proc_status(key: str):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def _reset_high_water() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status("VmHWM") is not None
    except OSError:
        return False


def peak_in_process(built: cases.Built, variant: str, device: str) -> dict:
    """GPU: peak allocated bytes of one call beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    built.variants[variant]()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"method": "torch.cuda.max_memory_allocated", "peak_bytes": peak,
            "step_bytes": peak - before}


def peak_subprocess(case: cases.Case, variant: str, cfg: cases.Config, timeout=600) -> dict:
    """CPU: run this module in a fresh interpreter for one (case, variant)."""
    cmd = [sys.executable, "-m", "bench.memory", case.name, variant, "--device", cfg.device,
           "--backends", ",".join(cfg.backends)]
    if cfg.tiny:
        cmd.append("--tiny")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    try:
        res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True,
                             timeout=timeout)
        if res.returncode != 0:
            return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else
                    f"exit {res.returncode}"}
        return json.loads(res.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.memory")
    ap.add_argument("case")
    ap.add_argument("variant")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backends", default="cpu")
    a = ap.parse_args(argv)
    cfg = cases.Config(device=a.device, backends=tuple(filter(None, a.backends.split(","))),
                       compile=False, tiny=a.tiny)
    case = cases.by_name(a.case)
    warm = case.build(cases.Config(**{**cfg.__dict__, "tiny": True}), only={a.variant})
    warm.variants[a.variant]()
    del warm
    gc.collect()
    built = case.build(cfg, only={a.variant})
    gc.collect()
    if _reset_high_water():
        method = "VmHWM of a fresh subprocess, reset before the step"
        before = _proc_status("VmRSS")
        built.variants[a.variant]()
        peak = _proc_status("VmHWM")
    else:
        method = "ru_maxrss of a fresh subprocess (includes set-up)"
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        built.variants[a.variant]()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"method": method, "peak_bytes": peak, "step_bytes": peak - before}))


if __name__ == "__main__":
    main()
