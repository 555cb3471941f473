"""The paper's depth claim on today's decoder design: 128-layer Llama-style byte LMs, ReZero
(``RZLlamaLayer``, alpha 0, no norms, no warm-up) against Pre-RMSNorm (with and without warm-up)
and Post-RMSNorm (with warm-up), the same data, optimiser and budget.

Byte-level causal LMs on the gensim Wikipedia excerpt (the corpus of the Table 2 reproduction,
``reproduce_lm_convergence.py``; it stands in for the seed tutorial's WikiText-2: 6 MB of raw
MediaWiki XML, bytes rather than words, so bits per byte rather than word perplexity).  Every
variant has the same embedding, 128 layers of the same projections (RoPE, grouped-query
attention, SwiGLU MLP, initialised alike), a linear head; Adam with gradient clipping at 0.5 (the
tutorial's), dropout 0.  Reported: held-out bits per byte over iterations, whether each trains
(best held-out BPB at least 0.25 below the unigram entropy) or diverges, and the singular values
of the layer stack's input-output Jacobian at initialisation (``diagnostics``).  Seeds run in
parallel one-thread processes.

    python bench/reproduce_deep_lm.py              # full (about an hour on two cores)
    python bench/reproduce_deep_lm.py --smoke      # seconds
"""
from __future__ import annotations

import csv
import math
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn as nn

try:  # python -m bench.<script>
    from . import reproduce_common as common
    from .llama_baselines import PostNormLlama, PreNormLlama
except ImportError:  # python bench/<script>.py
    import reproduce_common as common
    from llama_baselines import PostNormLlama, PreNormLlama
import python_ref
import rezero_kernels as rzk
from rezero_kernels.diagnostics import jacobian_singular_values

# (label, layer kind, warm-up)
VARIANTS = [("ReZero (RZLlamaLayer, alpha 0)", "rezero", False),
            ("Pre-RMSNorm", "prenorm", False),
            ("Pre-RMSNorm + warm-up", "prenorm", True),
            ("Post-RMSNorm + warm-up", "postnorm", True)]


class DeepLM(nn.Module):
    """Byte embedding, ``layers`` Llama-style layers of ``kind``, a final RMSNorm for pre-norm
    (as Llama has; ReZero and post-norm have none), a linear head over 256 bytes."""

    def __init__(self, kind, layers, d_model, nhead, kv_heads, hidden, backend="auto"):
        super().__init__()
        self.embed = nn.Embedding(256, d_model)
        kw = dict(d_model=d_model, nhead=nhead, num_kv_heads=kv_heads, dim_feedforward=hidden)
        if kind == "rezero":
            self.layers = nn.ModuleList(rzk.RZLlamaLayer(**kw, backend=backend)
                                        for _ in range(layers))
        else:
            wrap = PreNormLlama if kind == "prenorm" else PostNormLlama
            self.layers = nn.ModuleList(wrap(python_ref.RZLlamaLayer(**kw))
                                        for _ in range(layers))
        self.norm = nn.RMSNorm(d_model, eps=1e-6) if kind == "prenorm" else nn.Identity()
        self.head = nn.Linear(d_model, 256)

    def stack(self, h):
        for layer in self.layers:
            h = layer(h)
        return h

    def forward(self, idx):
        return self.head(self.norm(self.stack(self.embed(idx))))


def parse_args(argv=None):
    p = common.arg_parser(__doc__)
    p.add_argument("--layers", type=int, default=128)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--nhead", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--hidden", type=int, default=176)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100, help="warm-up steps of the + warm-up runs")
    p.add_argument("--max-iters", type=int, default=500)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    if args.smoke:
        args.layers, args.d_model, args.nhead, args.kv_heads, args.hidden = 4, 16, 2, 1, 32
        args.seq_len, args.batch, args.max_iters, args.eval_every = 8, 4, 6, 3
        args.eval_batches, args.seeds, args.warmup, args.workers = 1, 1, 2, 1
    return args


def _run(job):
    """One (variant, seed): its Jacobian spread at init and its training run."""
    args, label, kind, warm, seed = job
    common.setup(1, seed)
    train, val = common.load_enwiki_bytes()
    val_batches = common.fixed_batches(val, args.eval_batches, 32, args.seq_len)
    torch.manual_seed(seed)
    model = DeepLM(kind, args.layers, args.d_model, args.nhead, args.kv_heads, args.hidden)
    x = torch.randn(1, 4, args.d_model, generator=torch.Generator().manual_seed(7))
    model.eval()
    sv = jacobian_singular_values(model.stack, x)
    model.train()
    res = common.train_lm(model, train, val_batches, steps=args.max_iters, batch=args.batch,
                          seq_len=args.seq_len, lr=args.lr,
                          warmup=args.warmup if warm else 0, eval_every=args.eval_every,
                          seed=seed, clip=0.5)
    return label, seed, (sv.min().item(), sv.max().item()), res


def main(argv=None):
    args = parse_args(argv)
    train, _ = common.load_enwiki_bytes()
    unigram = common.unigram_bpb(train)
    jobs = [(args, label, kind, warm, seed) for label, kind, warm in VARIANTS
            for seed in range(args.seeds)]
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers) as pool:
            results = list(pool.map(_run, jobs))
    else:
        results = [_run(job) for job in jobs]
    rows, curves, csv_rows = [], {}, []
    for label, _, _ in VARIANTS:
        runs = [r for r in results if r[0] == label]
        finals = [res["evals"][-1][1] for _, _, _, res in runs]
        bests = [min(v for _, v in res["evals"] if v == v) for _, _, _, res in runs]
        diverged = sum(res["diverged"] for _, _, _, res in runs)
        trains = sum((not res["diverged"]) and b < unigram - 0.25
                     for (_, _, _, res), b in zip(runs, bests))
        svs = [sv for _, _, sv, _ in runs]
        spread = f"{min(s[0] for s in svs):.3g} .. {max(s[1] for s in svs):.3g}"
        finite = [f for f in finals if math.isfinite(f)]
        rows.append([label, spread,
                     f"{statistics.median(finite):.3f} ({min(finite):.3f}-{max(finite):.3f})"
                     if finite else "nan",
                     f"{trains} of {len(runs)}", f"{diverged} of {len(runs)}",
                     f"{statistics.median(res['seconds'] for _, _, _, res in runs):.0f}"])
        for _, seed, _, res in runs:
            for step, bpb in res["evals"]:
                csv_rows.append([label, seed, step, bpb])
        first = min(runs, key=lambda r: r[1])[3]
        curves[label] = ([s for s, _ in first["evals"]], [v for _, v in first["evals"]])
        print(f"{label}: held-out BPB {rows[-1][2]}, trains {rows[-1][3]}, Jacobian sv "
              f"{spread}", flush=True)
    preamble = (f"# 128-layer Llama-style byte LMs: ReZero against pre- and post-norm\n\n"
                f"{args.layers} layers, d_model {args.d_model}, {args.nhead} heads, "
                f"{args.kv_heads} key/value heads, SwiGLU hidden {args.hidden}, RoPE, sequence "
                f"{args.seq_len}, batch {args.batch}, Adam lr {args.lr}, gradient clipping 0.5, "
                f"dropout 0, {args.max_iters} iterations, warm-up {args.warmup} steps where "
                f"named, {args.seeds} seeds (held-out BPB: median (range) at the end). 'trains' "
                f"= best held-out BPB at least 0.25 below the unigram entropy of the training "
                f"bytes ({unigram:.3f} BPB). Jacobian singular values of the layer stack at init "
                f"on 4 tokens (min .. max over seeds).")
    common.write_table(args.out, "deep_lm",
                       ["variant", "Jacobian sv at init", "held-out BPB at the end", "trains",
                        "diverged", "seconds per run"], rows, preamble)
    with open(Path(args.out) / "deep_lm_curves.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "seed", "iteration", "held_out_bpb"])
        writer.writerows(csv_rows)
    common.plot_curves(f"{args.out}/deep_lm.png", curves, xlabel="iteration",
                       ylabel="held-out bits per byte (seed 0)",
                       title=f"{args.layers}-layer Llama-style LMs (unigram {unigram:.2f} BPB)")
    return rows


if __name__ == "__main__":
    main()
