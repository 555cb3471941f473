"""Paper Table 2 in small: 12-layer byte-level Transformer LMs, normalisation variants vs ReZero.

Corpus: the Wikipedia XML excerpt shipped inside the gensim wheel (about 6 MB of raw MediaWiki
XML, the kind of text enwik8 is); the last 10% is held out.  Every run trains with Adam (betas
0.9, 0.98), dropout 0, batch x sequence bytes per step, and is evaluated on fixed held-out
windows every ``--eval-every`` iterations (bits per byte, BPB).

Variants (as the paper's Table 2): Post-Norm (``nn.TransformerEncoderLayer``) without and with a
linear learning-rate warm-up, Pre-Norm (``norm_first=True``, final LayerNorm), ReZero with
alpha initialised to 1 and to 0.  The paper (enwik8, 12 layers, each variant's learning rate
tuned): Post-Norm diverges without warm-up; ReZero alpha=0 needs 1.56x fewer iterations than
Post-Norm with warm-up to reach 1.2 BPB.

What runs, each run in its own process on one thread, ``--jobs`` processes at a time:

1. every variant at the shared learning rate ``--lr``, every seed of ``--seeds``, for
   ``--max-iters`` iterations;
2. a learning-rate sweep: every variant at each rate of ``--lrs``, first seed only, for
   ``--sweep-iters`` iterations (the shared rate's point is the first seed's run of step 1).
   A variant's best rate has the lowest mean held-out BPB over the sweep's last three
   evaluations (a run that diverges counts as infinitely bad);
3. every variant whose best rate is not the shared one, at its best rate, every seed, for
   ``--max-iters`` iterations.

Per variant we report the median over seeds and the range (min-max) of: the iterations to reach
each of ``--thresholds`` and the lowest threshold (a multiple of 0.05) that every run that
learns at all reaches, the held-out BPB at fixed iterations, and the best held-out BPB.  Runs
are cached under ``--runs-dir`` (one JSON per run), so an interrupted reproduction resumes.

    python bench/reproduce_lm_convergence.py            # full (about 75 minutes on two cores)
    python bench/reproduce_lm_convergence.py --smoke    # seconds
"""
from __future__ import annotations

import csv
import functools
import hashlib
import json
import math
import multiprocessing
import statistics
import time
from pathlib import Path

import torch

try:  # python -m bench.<script>
    from . import reproduce_common as common
except ImportError:  # python bench/<script>.py
    import reproduce_common as common
from rezero_kernels.diagnostics import AlphaRecorder

VARIANTS = {  # key: (label, kind, warm-up?, alpha_init)
    "postnorm": ("Post-Norm", "postnorm", False, 0.0),
    "postnorm_warmup": ("Post-Norm + warm-up", "postnorm", True, 0.0),
    "prenorm": ("Pre-Norm", "prenorm", False, 0.0),
    "rezero1": ("ReZero alpha=1", "rezero", False, 1.0),
    "rezero0": ("ReZero alpha=0", "rezero", False, 0.0),
}
REFERENCE = "postnorm_warmup"  # speed-ups are iterations of this variant / the variant's
STEP = 0.05  # grid of the lowest common threshold


def _floats(text):
    return [float(v) for v in text.split(",") if v]


def _ints(text):
    return [int(v) for v in text.split(",") if v]


def parse_args(argv=None):
    p = common.arg_parser(__doc__)
    p.add_argument("--runs-dir", default=None,
                   help="cache of finished runs (default: OUT/lm_convergence_runs)")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--nhead", type=int, default=4)
    p.add_argument("--dim-ff", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3, help="the learning rate shared by all")
    p.add_argument("--lrs", type=_floats, default=[1e-3, 2e-3, 4e-3, 8e-3],
                   help="the sweep's rates")
    p.add_argument("--warmup", type=int, default=200, help="warm-up steps of the warm-up variant")
    p.add_argument("--max-iters", type=int, default=3000)
    p.add_argument("--sweep-iters", type=int, default=1500)
    p.add_argument("--seeds", type=_ints, default=[0, 1, 2])
    p.add_argument("--thresholds", type=_floats, default=[3.3, 3.0, 2.8],
                   help="held-out BPB thresholds")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--alpha-every", type=int, default=25, help="record ReZero's |alpha| every N")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (processes)")
    p.add_argument("--threads", type=int, default=1, help="threads per run")
    p.add_argument("--backend", default="auto", help="backend of the fused ReZero layers")
    p.add_argument("--variants", default="all",
                   help="comma-separated subset of " + ",".join(VARIANTS))
    args = p.parse_args(argv)
    if args.smoke:
        args.layers, args.d_model, args.nhead, args.dim_ff = 2, 16, 2, 32
        args.seq_len, args.batch, args.max_iters, args.sweep_iters = 16, 4, 6, 3
        args.warmup, args.eval_every, args.eval_batches, args.alpha_every = 3, 3, 1, 2
        args.jobs = 1
    args.lrs = sorted(set(args.lrs) | {args.lr})
    args.variants = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    args.runs_dir = args.runs_dir or str(Path(args.out) / "lm_convergence_runs")
    return args


# ----------------------------------------------------------------------------------------------
# one run (in a worker process)


@functools.lru_cache(maxsize=1)
def _data(seq_len: int, eval_batches: int):
    train, val = common.load_enwiki_bytes()
    return train, common.fixed_batches(val, eval_batches, 32, seq_len)


def _cache_path(args, job) -> Path:
    """One file per run, named by everything that determines the run."""
    settings = [args.layers, args.d_model, args.nhead, args.dim_ff, args.seq_len, args.batch,
                args.warmup, args.eval_every, args.eval_batches, args.alpha_every, args.backend,
                *job]
    digest = hashlib.sha1(json.dumps(settings).encode()).hexdigest()[:12]
    key, lr, seed, iters = job
    return Path(args.runs_dir) / f"{key}_lr{lr:g}_seed{seed}_{iters}it_{digest}.json"


def train_one(args, job) -> dict:
    """Train variant ``key`` at rate ``lr`` from ``seed`` (model init and data order) for
    ``iters`` iterations; returns the held-out curve, ReZero's |alpha| and the time taken."""
    key, lr, seed, iters = job
    _, kind, warm, alpha = VARIANTS[key]
    cpu, wall = time.process_time(), time.perf_counter()
    common.setup(args.threads, seed)
    train, val_batches = _data(args.seq_len, args.eval_batches)
    model = common.ByteLM(kind, args.layers, args.d_model, args.nhead, args.dim_ff,
                          args.seq_len, 0.0, alpha, args.backend)
    recorder = AlphaRecorder(model) if kind == "rezero" else None
    if recorder is not None:
        recorder.record(0)

    def on_step(step):
        if recorder is not None and step % args.alpha_every == 0:
            recorder.record(step)

    res = common.train_lm(model, train, val_batches, steps=iters, batch=args.batch,
                          seq_len=args.seq_len, lr=lr, warmup=args.warmup if warm else 0,
                          eval_every=args.eval_every, seed=seed, on_step=on_step)
    run = {"job": list(job), "evals": res["evals"], "diverged": res["diverged"],
           "steps": res["steps"], "cpu_s": time.process_time() - cpu,
           "wall_s": time.perf_counter() - wall,
           "alpha_steps": recorder.steps if recorder else [],
           "alpha": recorder.history.tolist() if recorder else []}
    path = _cache_path(args, job)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(run))
    return run


def _train_one_star(a):
    return train_one(*a)


def run_jobs(args, jobs, runs: dict, log: list) -> None:
    """Run (or load from the cache) every job not already covered by a run in ``runs``, which
    maps ``(key, lr, seed)`` to its longest run; ``log`` collects every run done or loaded."""
    todo, seen = [], set()
    for job in jobs:
        have = runs.get(tuple(job[:3]))
        if (have is None or have["job"][3] < job[3]) and job not in seen:
            seen.add(job)
            todo.append(job)

    def keep(run, cached):
        run["cached"] = cached
        log.append(run)
        k = tuple(run["job"][:3])
        if k not in runs or runs[k]["job"][3] < run["job"][3]:
            runs[k] = run
        key, lr, seed, iters = run["job"]
        last = run["evals"][-1]
        print(f"{VARIANTS[key][0]:20s} lr {lr:g} seed {seed}: {iters} iterations, BPB "
              f"{last[1]:.3f} at {last[0]}{' (diverged)' if run['diverged'] else ''}, "
              f"{run['cpu_s']:.0f} s CPU{' (cached)' if cached else ''}", flush=True)

    fresh = []
    for job in todo:
        path = _cache_path(args, job)
        if path.is_file():
            keep(json.loads(path.read_text()), True)
        else:
            fresh.append(job)
    fresh.sort(key=lambda j: -j[3])  # longest first: the pool's tail stays short
    if args.jobs <= 1:
        for job in fresh:
            keep(train_one(args, job), False)
        return
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        for run in pool.imap_unordered(_train_one_star, [(args, job) for job in fresh]):
            keep(run, False)


# ----------------------------------------------------------------------------------------------
# summaries over seeds

INF = math.inf


def bpb_at(run, step):
    """Held-out BPB at ``step``; inf when the run diverged (or stopped) before it."""
    value = dict(run["evals"]).get(step)
    return value if value is not None and math.isfinite(value) else INF


def iters_to(run, threshold):
    hit = common.first_crossing(run["evals"], threshold)
    return INF if hit is None else hit


def best(run):
    """(lowest held-out BPB, its iteration)."""
    return min(((v, s) for s, v in run["evals"] if math.isfinite(v)), default=(INF, INF))


def sweep_score(run, args):
    """Mean held-out BPB over the sweep's last three evaluations (inf if the run diverged)."""
    steps = [max(0, args.sweep_iters - i * args.eval_every) for i in range(3)]
    return sum(bpb_at(run, s) for s in steps) / 3


def spread(values, digits, inf_text):
    """'median (min-max)' over seeds; inf is written ``inf_text``."""
    def f(v):
        return inf_text if v == INF else f"{v:.{digits}f}"
    values = sorted(values)
    return f"{f(statistics.median(values))} ({f(values[0])}–{f(values[-1])})"


def lowest_common_threshold(runs, unigram):
    """The lowest multiple of STEP that every run that learns (best BPB at least 0.25 below the
    unigram entropy, as in reproduce_depth.py) reaches; None when no run learns."""
    bests = [best(r)[0] for r in runs if best(r)[0] < unigram - 0.25]
    return math.ceil(max(bests) / STEP - 1e-9) * STEP if bests else None


def summary_rows(args, groups, thresholds, fixed):
    """One row per variant of ``groups`` ({key: (lr, [runs over seeds])})."""
    over = f">{args.max_iters}"
    rows = []
    for key, (lr, seed_runs) in groups.items():
        row = [VARIANTS[key][0], f"{lr:g}"]
        row += [spread([iters_to(r, t) for r in seed_runs], 0, over) for t in thresholds]
        row += [spread([bpb_at(r, s) for r in seed_runs], 3, "div.") for s in fixed]
        cpu_ms = statistics.median(r["cpu_s"] / max(1, r["steps"]) * 1e3 for r in seed_runs)
        row += [spread([best(r)[0] for r in seed_runs], 3, "div."),
                spread([best(r)[1] for r in seed_runs], 0, "div."), f"{cpu_ms:.0f}"]
        rows.append(row)
    return rows


def speedup_rows(groups, thresholds):
    """Median iterations of the reference / median iterations of the variant, per threshold."""
    def med(key, t):
        return statistics.median(iters_to(r, t) for r in groups[key][1])
    rows = []
    for key in groups:
        cells = []
        for t in thresholds:
            ref, mine = (med(REFERENCE, t), med(key, t)) if REFERENCE in groups else (INF, INF)
            cells.append(f"{ref / mine:.2f}x" if ref < INF and mine < INF else "n/a")
        rows.append([VARIANTS[key][0], *cells])
    return rows


# ----------------------------------------------------------------------------------------------
# chart


def plot(path, args, shared, tuned, thresholds):
    """(a) held-out BPB at the shared rate, whole run; (b) the same from the end of the plateau;
    (c) at each variant's best rate; (d) ReZero's |alpha| per layer at the shared rate.
    Lines are seed medians, bands the range over seeds."""
    try:
        import numpy as np
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize
        from matplotlib.figure import Figure
    except ImportError:
        print(f"matplotlib is not installed: skipping the plot {path}")
        return False
    fig = Figure(figsize=(13, 9))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    colours = {key: f"C{i}" for i, key in enumerate(VARIANTS)}
    zoom_from = min(args.max_iters // 3, 1000)

    def bands(ax, groups, title, top, start=0):
        low = INF
        for key, (lr, seed_runs) in groups.items():
            steps = [s for s, _ in seed_runs[0]["evals"] if s >= start]
            ys = np.array([[bpb_at(r, s) for s in steps] for r in seed_runs])
            ys[~np.isfinite(ys)] = np.nan
            if not steps or np.isnan(ys).all():
                continue
            ax.plot(steps, np.nanmedian(ys, 0), color=colours[key],
                    label=f"{VARIANTS[key][0]} (lr {lr:g})")
            ax.fill_between(steps, np.nanmin(ys, 0), np.nanmax(ys, 0), color=colours[key],
                            alpha=0.2, linewidth=0)
            low = min(low, float(np.nanmin(ys)))
        for t in thresholds:
            ax.axhline(t, color="gray", linestyle=":", linewidth=0.8)
        if low < top:  # cut off the first iterations' high loss
            ax.set_ylim(low - 0.05, top)
        ax.set_xlabel("iteration")
        ax.set_ylabel("held-out bits per byte")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)

    n = len(args.seeds)
    zoom_top = max(thresholds) + 0.3  # the region the thresholds cover
    bands(axes[0, 0], shared, f"(a) shared lr {args.lr:g}: median and range of {n} seeds", 6.0)
    bands(axes[0, 1], shared, f"(b) shared lr {args.lr:g}, from iteration {zoom_from}",
          zoom_top, zoom_from)
    bands(axes[1, 0], tuned, f"(c) each variant's best lr, from iteration {zoom_from}",
          zoom_top, zoom_from)
    ax = axes[1, 1]
    layers = args.layers
    cmap, norm = colormaps["viridis"], Normalize(0, layers - 1)
    for key, style in (("rezero0", "-"), ("rezero1", "--")):
        if key not in shared:
            continue
        seed_runs = shared[key][1]
        length = min(len(r["alpha_steps"]) for r in seed_runs)
        steps = seed_runs[0]["alpha_steps"][:length]
        hist = np.median(np.array([r["alpha"][:length] for r in seed_runs]), 0)
        for layer in range(hist.shape[1]):
            ax.plot(steps, hist[:, layer], style, color=cmap(norm(layer)), linewidth=1)
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="layer")
    ax.set_xlabel("iteration")
    ax.set_ylabel("|alpha| (median of seeds)")
    ax.set_title(f"(d) ReZero gates per layer, lr {args.lr:g}: alpha=0 init solid, "
                 f"alpha=1 init dashed", fontsize=10)
    fig.suptitle(f"{args.layers}-layer byte LMs (d_model {args.d_model}) on the gensim enwiki "
                 f"excerpt")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return True


# ----------------------------------------------------------------------------------------------


def write_raw(out, runs):
    """Every run's held-out curve (lm_convergence.csv) and ReZero's |alpha| per layer
    (lm_convergence_alpha.csv), one row per evaluation / recording."""
    ordered = sorted(runs.values(), key=lambda r: (list(VARIANTS).index(r["job"][0]),
                                                   r["job"][1], r["job"][2]))
    with open(out / "lm_convergence.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "lr", "seed", "iteration", "held_out_bpb"])
        for r in ordered:
            key, lr, seed, _ = r["job"]
            w.writerows([VARIANTS[key][0], f"{lr:g}", seed, s, f"{v:.4f}"] for s, v in r["evals"])
    alpha_runs = [r for r in ordered if r["alpha"]]
    if alpha_runs:
        with open(out / "lm_convergence_alpha.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["variant", "lr", "seed", "iteration",
                        *[f"layer_{i}" for i in range(len(alpha_runs[0]["alpha"][0]))]])
            for r in alpha_runs:
                key, lr, seed, _ = r["job"]
                w.writerows([VARIANTS[key][0], f"{lr:g}", seed, s, *[f"{a:.4g}" for a in row]]
                            for s, row in zip(r["alpha_steps"], r["alpha"]))


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    common.setup(args.threads, 0)
    unigram = common.unigram_bpb(_data(args.seq_len, args.eval_batches)[0])
    keys, first = args.variants, args.seeds[0]
    runs, log = {}, []
    run_jobs(args, [(k, args.lr, s, args.max_iters) for k in keys for s in args.seeds]
             + [(k, lr, first, args.sweep_iters) for k in keys for lr in args.lrs
                if lr != args.lr], runs, log)
    scores = {k: {lr: sweep_score(runs[k, lr, first], args) for lr in args.lrs}
              for k in keys}
    best_lr = {k: min(args.lrs, key=lambda lr: (scores[k][lr], lr != args.lr)) for k in keys}
    run_jobs(args, [(k, best_lr[k], s, args.max_iters) for k in keys for s in args.seeds
                    if best_lr[k] != args.lr], runs, log)
    wall = time.perf_counter() - start

    shared = {k: (args.lr, [runs[k, args.lr, s] for s in args.seeds]) for k in keys}
    tuned = {k: (best_lr[k], [runs[k, best_lr[k], s] for s in args.seeds]) for k in keys}
    step = args.eval_every
    fixed = sorted({min(args.max_iters, (args.max_iters * i // 3 + step - 1) // step * step)
                    for i in (1, 2, 3)})

    def table(groups, what):
        low = lowest_common_threshold([r for _, rs in groups.values() for r in rs], unigram)
        thresholds = args.thresholds + ([low] if low is not None and low < min(
            args.thresholds) - 1e-9 else [])
        cols = (["variant", "lr"] + [f"iterations to {t:g}" for t in thresholds]
                + [f"BPB at {s}" for s in fixed]
                + ["best BPB", "iteration of best", "CPU ms / iteration"])
        rows = summary_rows(args, groups, thresholds, fixed)
        text = (f"## {what}\n\n" + common.markdown_table(cols, rows) + "\n\nSpeed-up to each "
                f"threshold (median iterations of Post-Norm + warm-up / the variant's):\n\n"
                + common.markdown_table(["variant", *[f"{t:g}" for t in thresholds]],
                                        speedup_rows(groups, thresholds)))
        return text, low

    shared_text, shared_low = table(shared, f"All variants at the shared lr {args.lr:g}")
    tuned_text, tuned_low = table(tuned, "Each variant at its best lr from the sweep")
    sweep_rows = [[VARIANTS[k][0], *[common.fmt(scores[k][lr]) if scores[k][lr] < INF else
                                     "div." for lr in args.lrs], f"{best_lr[k]:g}"]
                  for k in keys]
    cpu = sum(r["cpu_s"] for r in log)
    cached = sum(r["cached"] for r in log)
    n = len(args.seeds)
    preamble = (
        f"# Table 2 in small: {args.layers}-layer byte-level LMs on the gensim enwiki excerpt\n\n"
        f"d_model {args.d_model}, {args.nhead} heads, feed-forward {args.dim_ff}, sequence "
        f"{args.seq_len}, batch {args.batch}, Adam (betas 0.9/0.98), dropout 0, warm-up "
        f"{args.warmup} steps (warm-up variant only). Held-out BPB on {args.eval_batches}x32 "
        f"fixed windows every {args.eval_every} iterations (the unigram entropy of the training "
        f"bytes, what a model that uses no context reaches, is {unigram:.3f} BPB). ReZero "
        f"layers: {common.rezero_layer_source()} (backend {args.backend}).\n\n"
        f"What was run: (1) every variant at the shared lr {args.lr:g}, seeds "
        f"{', '.join(map(str, args.seeds))}, {args.max_iters} iterations; (2) a learning-rate "
        f"sweep over {', '.join(f'{lr:g}' for lr in args.lrs)}, seed {first} only, "
        f"{args.sweep_iters} iterations (best lr = lowest mean held-out BPB over the last three "
        f"evaluations up to iteration {args.sweep_iters}); (3) every variant whose best lr is not "
        f"{args.lr:g} again at its best lr, all seeds, {args.max_iters} iterations. "
        f"{len(log)} runs, {cpu / 60:.0f} CPU-minutes summed over them; "
        f"{args.jobs} processes of {args.threads} thread(s); wall time of this invocation "
        f"{wall / 60:.0f} min{f' ({cached} runs loaded from the cache)' if cached else ''}.\n\n"
        f"Cells are the median over the {n} seeds and (in brackets) the range, min–max. "
        f"'>{args.max_iters}': not reached within {args.max_iters} iterations; 'div.': the run "
        f"diverged before. The last threshold column of a table, when it is below the others, "
        f"is the lowest multiple of {STEP} that every run that learns at all (best BPB 0.25 "
        f"below the unigram entropy) reaches. Raw curves: lm_convergence.csv; ReZero's |alpha| "
        f"per layer: lm_convergence_alpha.csv.")
    text = "\n\n".join([
        preamble, shared_text,
        f"## Learning-rate sweep (seed {first}, mean held-out BPB over the last three "
        f"evaluations up to iteration {args.sweep_iters})\n\n"
        + common.markdown_table(["variant", *[f"lr {lr:g}" for lr in args.lrs], "best lr"],
                                sweep_rows),
        tuned_text]) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lm_convergence.md").write_text(text)
    write_raw(out, runs)
    print(text, flush=True)
    plot(out / "lm_convergence.png", args, shared, tuned,
         [t for t in args.thresholds] + ([shared_low] if shared_low else []))
    return {"shared": shared, "tuned": tuned, "best_lr": best_lr, "scores": scores}


if __name__ == "__main__":
    main()
