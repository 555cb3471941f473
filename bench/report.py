"""Output of a run: the printed tables, ``results.json``, ``results.csv`` and ``speedup.png``.

Every result row is one (case, variant): its median time, the speed-up of eager over it
(``eager_ms / median_ms``, so > 1 is faster than the reference), its bandwidth or its distance to
the GEMM+attention floor, tokens/s, and its memory figures.
"""
from __future__ import annotations

import csv
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys

import torch

ALLOC_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")
CSV_FIELDS = ("case", "group", "title", "shape", "variant", "median_ms", "iqr_ms", "rounds",
              "inner", "speedup_vs_eager", "gbps", "frac_of_copy", "x_floor", "tokens_per_s",
              "compile_s", "saved_bytes_per_layer", "peak_bytes", "step_peak_bytes",
              "peak_method", "op", "mode", "dtype", "size", "dropout", "kind", "depth")


def _version(pkg):
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit, bool(dirty)
    except (OSError, subprocess.SubprocessError):
        return None, None


def machine_meta(cfg, args) -> dict:
    import rezero_kernels
    commit, dirty = _git_commit()
    alloc = {k: os.environ.get(k) for k in ALLOC_VARS}
    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if cfg.device.startswith("cuda") else None,
        "device": cfg.device,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "rezero_kernels": rezero_kernels.__version__,
        "backends_available": rezero_kernels.backends(),
        "backends_run": list(cfg.backends),
        "git_commit": commit,
        "git_dirty": dirty,
        "allocator": {"env": alloc, "mmap_threshold_set": alloc["MALLOC_MMAP_THRESHOLD_"] is not None,
                      "tuned_malloc_flag": bool(os.environ.get("REZERO_BENCH_TUNED_MALLOC"))},
        "quick": args.quick, "tiny": cfg.tiny, "compile": cfg.compile,
        "filter": args.filter, "argv": sys.argv[1:],
    }


def allocator_line(meta) -> str:
    a = meta["allocator"]
    if a["mmap_threshold_set"]:
        how = "--tuned-malloc" if a["tuned_malloc_flag"] else "set in the environment"
        return (f"allocator: glibc with MALLOC_MMAP_THRESHOLD_={a['env']['MALLOC_MMAP_THRESHOLD_']} "
                f"MALLOC_TRIM_THRESHOLD_={a['env']['MALLOC_TRIM_THRESHOLD_']} ({how})")
    pre = f", LD_PRELOAD={a['env']['LD_PRELOAD']}" if a["env"]["LD_PRELOAD"] else ""
    return ("allocator: default (MALLOC_MMAP_THRESHOLD_ not set: every allocation >= 32 MB is a "
            f"fresh, page-faulted mmap; try --tuned-malloc){pre}")


# ---------------------------------------------------------------------------------------------
# tables

def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def _table(header, lines) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)] if lines else \
        [len(h) for h in header]
    def row(cells):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([row(header), row(["-" * w for w in widths])] + [row(l) for l in lines])


def _num(v):
    if v is None:
        return ""
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}" if v >= 1 \
        else f"{v:.3f}"


def _ms(r):
    return _num(r["median_ms"])


def headline(rows, names, titles) -> str:
    lines = []
    for name in names:
        case_rows = [r for r in rows if r["case"] == name]
        eager = next((r for r in case_rows if r["variant"] == "eager"), None)
        floor = next((r for r in case_rows if r["variant"] == "floor"), None)
        for r in case_rows:
            if not r["variant"].startswith("rezero["):
                continue
            lines.append([f"{titles[name]} [{r['shape']}]", r["variant"], _ms(r),
                          _ms(eager) if eager else "", _fmt(r["speedup_vs_eager"], ".2f") + "x",
                          _ms(floor) if floor else ""])
    return _table(["case", "ours", "ours ms", "eager ms", "speed-up", "floor ms"], lines)


def details(rows) -> str:
    lines, last = [], None
    for r in rows:
        first = r["case"] != last
        last = r["case"]
        mem = ""
        if r.get("saved_bytes_per_layer") is not None:
            mem = f"{r['saved_bytes_per_layer'] / 2**20:.2f}"
        peak = "" if r.get("step_peak_bytes") is None else f"{r['step_peak_bytes'] / 2**20:.0f}"
        lines.append([f"{r['title']} [{r['shape']}]" if first else "", r["variant"], _ms(r),
                      _num(r["iqr_ms"]), _fmt(r["speedup_vs_eager"], ".2f"),
                      _fmt(r.get("gbps"), ".1f"), _fmt(r.get("frac_of_copy"), ".0%"),
                      _fmt(r.get("x_floor"), ".2f"), _fmt(r.get("tokens_per_s"), ".0f"),
                      _fmt(r.get("compile_s"), ".1f"), mem, peak])
    return _table(["case", "variant", "median ms", "IQR ms", "eager/this", "GB/s", "of copy",
                   "/floor", "tokens/s", "compile s", "saved MiB/layer", "step peak MiB"], lines)


def targets_table(targets) -> str:
    return _table(["target", "ours", "measured", "required", "result", "shortfall"],
                  [[t["target"], t["variant"], t["measured"], t["required"], t["status"],
                    t["shortfall"]] for t in targets])


# ---------------------------------------------------------------------------------------------
# files

def write_json(path, meta, rows, targets, notes):
    with open(path, "w") as f:
        json.dump({"meta": meta, "notes": notes, "results": rows, "targets": targets}, f,
                  indent=1, default=str)


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})


def write_png(path, rows, meta) -> bool:
    """Speed-up of ours over eager per op case, and over every baseline per layer/stack depth."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ours = [r for r in rows if r["variant"].startswith("rezero[")]
    ops = [r for r in ours if r["group"] in ("op", "host") and r.get("speedup_vs_eager")]
    deep = [r for r in ours if r["group"] in ("layer", "stack", "fc")]
    base_names = ["eager", "compiled", "nn.TEL", "nn.TEL(norm_first)", "nn", "floor"]
    fig_h = 3.5 + 0.28 * max(len(ops), 1) + 0.5 * max(len(deep), 1)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, fig_h),
                                   gridspec_kw={"height_ratios": [max(len(ops), 1),
                                                                  max(2 * len(deep), 5)]})
    labels = [f"{r['title']} {r['variant']}" for r in ops]
    vals = [r["speedup_vs_eager"] for r in ops]
    ax1.barh(range(len(vals)), vals, color=["tab:green" if v >= 1 else "tab:red" for v in vals])
    ax1.set_yticks(range(len(vals)), labels, fontsize=7)
    ax1.invert_yaxis()
    ax1.axvline(1.0, color="k", lw=0.8)
    ax1.set_xlabel("speed-up over eager python_ref (x)")
    ax1.set_title("ops: eager time / ours")
    width = 0.8 / len(base_names)
    for j, base in enumerate(base_names):
        xs, ys = [], []
        for i, r in enumerate(deep):
            b = next((x for x in rows if x["case"] == r["case"] and x["variant"] == base), None)
            if b:
                xs.append(i + j * width)
                ys.append(b["median_ms"] / r["median_ms"])
        if xs:
            ax2.bar(xs, ys, width, label=f"vs {base}")
    ax2.set_xticks([i + 0.4 - width / 2 for i in range(len(deep))],
                   [f"{r['title']}\n{r['variant']}" for r in deep], fontsize=7)
    ax2.axhline(1.0, color="k", lw=0.8)
    ax2.set_ylabel("baseline time / ours (x)")
    ax2.set_title("layers, stacks and FC nets (floor: < 1 means slower than GEMMs+attention "
                  "alone; nn: plain nn.Linear+ReLU blocks)")
    if deep:
        ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    where = meta["gpu"] or f"{meta['cpu_model']}, {meta['threads']} threads"
    fig.suptitle(f"rezero-kernels, {where}, torch {meta['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
