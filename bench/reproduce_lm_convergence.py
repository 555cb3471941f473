"""Paper Table 2 in small: 12-layer byte-level Transformer LMs, normalisation variants vs ReZero.

Corpus: the Wikipedia XML excerpt shipped inside the gensim wheel (about 6 MB of raw MediaWiki
XML, the kind of text enwik8 is); the last 10% is held out.  Every variant trains with Adam
(betas 0.9, 0.98) at the same learning rate, dropout 0, batch x sequence bytes per step, and we
count the iterations until the held-out bits per byte (BPB) reach a threshold (where the run
stops).

Variants (as the paper's Table 2): Post-Norm (``nn.TransformerEncoderLayer``) without and with a
linear learning-rate warm-up, Pre-Norm (``norm_first=True``, final LayerNorm), ReZero with
alpha initialised to 1 and to 0.  The paper (enwik8, 1.2 BPB): Post-Norm diverges without
warm-up; ReZero alpha=0 needs 1.56x fewer iterations than Post-Norm with warm-up.

    python bench/reproduce_lm_convergence.py            # full (about 10 minutes, one thread)
    python bench/reproduce_lm_convergence.py --smoke    # seconds
"""
from __future__ import annotations

import argparse

import torch

try:  # python -m bench.<script>
    from . import reproduce_common as common
except ImportError:  # python bench/<script>.py
    import reproduce_common as common

VARIANTS = [  # (label, kind, warm-up?, alpha_init)
    ("Post-Norm", "postnorm", False, None),
    ("Post-Norm + warm-up", "postnorm", True, None),
    ("Pre-Norm", "prenorm", False, None),
    ("ReZero alpha=1", "rezero", False, 1.0),
    ("ReZero alpha=0", "rezero", False, 0.0),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny setting that runs in seconds")
    p.add_argument("--out", default="bench_results", help="output directory")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--nhead", type=int, default=4)
    p.add_argument("--dim-ff", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=200, help="warm-up steps of the warm-up variant")
    p.add_argument("--max-iters", type=int, default=1200)
    p.add_argument("--threshold", type=float, default=3.3, help="held-out BPB threshold")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backend", default="auto", help="backend of the fused ReZero layers")
    p.add_argument("--variants", default="all",
                   help="comma-separated subset of labels' kinds: postnorm,postnorm_warmup,"
                        "prenorm,rezero1,rezero0")
    args = p.parse_args(argv)
    if args.smoke:
        args.layers, args.d_model, args.nhead, args.dim_ff = 2, 16, 2, 32
        args.seq_len, args.batch, args.max_iters, args.warmup = 16, 4, 6, 3
        args.eval_every, args.eval_batches = 3, 1
    return args


_KEYS = ["postnorm", "postnorm_warmup", "prenorm", "rezero1", "rezero0"]


def main(argv=None):
    args = parse_args(argv)
    common.setup(args.threads, args.seed)
    train, val = common.load_enwiki_bytes()
    val_batches = common.fixed_batches(val, args.eval_batches, 32, args.seq_len)
    chosen = _KEYS if args.variants == "all" else args.variants.split(",")
    rows, curves = [], {}
    for key, (label, kind, warm, alpha) in zip(_KEYS, VARIANTS):
        if key not in chosen:
            continue
        torch.manual_seed(args.seed)
        model = common.ByteLM(kind, args.layers, args.d_model, args.nhead, args.dim_ff,
                              args.seq_len, 0.0, alpha if alpha is not None else 0.0,
                              args.backend)
        res = common.train_lm(model, train, val_batches, steps=args.max_iters, batch=args.batch,
                              seq_len=args.seq_len, lr=args.lr,
                              warmup=args.warmup if warm else 0, eval_every=args.eval_every,
                              seed=args.seed, stop_bpb=args.threshold)
        hit = common.first_crossing(res["evals"], args.threshold)
        best = min((v for _, v in res["evals"] if v == v), default=float("nan"))
        status = "diverged" if res["diverged"] else "ok"
        rows.append([label, hit, res["evals"][-1][1], best, status, res["steps"],
                     res["seconds"] / max(1, res["steps"]) * 1e3])
        curves[label] = ([s for s, _ in res["evals"]], [v for _, v in res["evals"]])
        print(f"{label:22s} iterations to {args.threshold} BPB: {common.fmt(hit)}  final "
              f"{res['evals'][-1][1]:.3f}  best {best:.3f}  {status}  {res['seconds']:.0f} s",
              flush=True)
    ref = next((r[1] for r in rows if r[0] == "Post-Norm + warm-up"), None)
    for r in rows:
        r.insert(2, f"{ref / r[1]:.2f}x" if ref and r[1] else "n/a")
    preamble = (f"# Table 2 in small: {args.layers}-layer byte-level LMs on the gensim enwiki "
                f"excerpt\n\nd_model {args.d_model}, {args.nhead} heads, feed-forward "
                f"{args.dim_ff}, sequence {args.seq_len}, batch {args.batch}, Adam lr {args.lr} "
                f"(betas 0.9/0.98), dropout 0, warm-up {args.warmup} steps (warm-up variant "
                f"only), at most {args.max_iters} iterations, seed {args.seed}; held-out BPB on "
                f"{args.eval_batches}x32 windows every {args.eval_every} iterations; threshold "
                f"{args.threshold} BPB (a run stops there). ReZero layers: "
                f"{common.rezero_layer_source()} (backend {args.backend}). Speed-up = "
                f"iterations of Post-Norm + warm-up / iterations of the variant.")
    common.write_table(args.out, "lm_convergence",
                       ["variant", f"iterations to {args.threshold} BPB", "speed-up",
                        "final BPB", "best BPB", "status", "iterations run", "ms / iteration"],
                       rows, preamble)
    common.plot_curves(f"{args.out}/lm_convergence.png", curves, xlabel="iteration",
                       ylabel="held-out bits per byte", threshold=args.threshold,
                       title=f"{args.layers}-layer byte LMs")
    return rows


if __name__ == "__main__":
    main()
