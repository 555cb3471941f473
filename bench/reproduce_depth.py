"""Paper Sec. 4.2 in small: a very deep (64-layer) ReZero Transformer trains where the post-norm
Transformer of the same depth does not.

Both are byte-level causal LMs on the gensim Wikipedia excerpt (see
``reproduce_lm_convergence.py``), same width, optimiser (Adam, no warm-up) and data order.  We
report the training loss at the start and the end (mean of the last 10% of steps), the held-out
BPB, and the spread of the input-output Jacobian's singular values at initialisation (the
paper's Fig. 4: the ReZero stack is exactly isometric, the post-norm stack is not).

    python bench/reproduce_depth.py            # full (a few minutes, one thread)
    python bench/reproduce_depth.py --smoke    # seconds
"""
from __future__ import annotations

import math

import torch

try:  # python -m bench.<script>
    from . import reproduce_common as common
except ImportError:  # python bench/<script>.py
    import reproduce_common as common
from rezero_kernels.diagnostics import AlphaRecorder, jacobian_singular_values

VARIANTS = [("Post-Norm", "postnorm"), ("ReZero alpha=0", "rezero")]


def parse_args(argv=None):
    p = common.arg_parser(__doc__)
    p.add_argument("--layers", type=int, default=64)
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--nhead", type=int, default=2)
    p.add_argument("--dim-ff", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-iters", type=int, default=1200)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backend", default="auto", help="backend of the fused ReZero layers")
    args = p.parse_args(argv)
    if args.smoke:
        args.layers, args.d_model, args.nhead, args.dim_ff = 4, 16, 2, 16
        args.seq_len, args.batch, args.max_iters, args.eval_every, args.eval_batches = 8, 4, 6, 3, 1
    return args


def init_spread(model: common.ByteLM, d_model: int, tokens: int = 4):
    """(min, max) singular value of the layer stack's Jacobian at init on ``tokens`` positions."""
    def layers_only(h):
        mask = model.mask[:tokens, :tokens]
        for layer in model.layers:
            h = layer(h, src_mask=mask, is_causal=True)
        return h

    x = torch.randn(1, tokens, d_model, generator=torch.Generator().manual_seed(7))
    was = model.training
    model.eval()
    try:
        sv = jacobian_singular_values(layers_only, x)
    finally:
        model.train(was)
    return sv.min().item(), sv.max().item()


def main(argv=None):
    args = parse_args(argv)
    common.setup(args.threads, args.seed)
    train, val = common.load_enwiki_bytes()
    val_batches = common.fixed_batches(val, args.eval_batches, 32, args.seq_len)
    unigram = common.unigram_bpb(train)
    rows, curves, recorder = [], {}, None
    for label, kind in VARIANTS:
        torch.manual_seed(args.seed)
        model = common.ByteLM(kind, args.layers, args.d_model, args.nhead, args.dim_ff,
                              args.seq_len, 0.0, 0.0, args.backend)
        smin, smax = init_spread(model, args.d_model)
        on_step = None
        if kind == "rezero":
            recorder = AlphaRecorder(model)
            recorder.record(0)
            on_step = recorder.record
        res = common.train_lm(model, train, val_batches, steps=args.max_iters, batch=args.batch,
                              seq_len=args.seq_len, lr=args.lr, eval_every=args.eval_every,
                              seed=args.seed, on_step=on_step)
        losses = [v for v in res["losses"] if math.isfinite(v)]
        tail = max(1, len(losses) // 10)
        first = sum(losses[:tail]) / tail / math.log(2) if losses else float("nan")
        last = sum(losses[-tail:]) / tail / math.log(2) if losses else float("nan")
        final_bpb = res["evals"][-1][1]
        best_bpb = min(v for _, v in res["evals"] if v == v)
        trains = (not res["diverged"]) and best_bpb < unigram - 0.25
        rows.append([label, args.layers, f"{smin:.3g} .. {smax:.3g}", first, last, final_bpb,
                     best_bpb,
                     "diverged" if res["diverged"] else ("yes" if trains else "no"),
                     res["steps"], res["seconds"]])
        window = 10
        xs = list(range(window, len(res["losses"]) + 1))
        ys = [sum(res["losses"][i - window:i]) / window / math.log(2) for i in xs]
        curves[label] = (xs, ys)
        print(f"{label}: train BPB {first:.3f} -> {last:.3f}, held-out {final_bpb:.3f}, "
              f"Jacobian sv {smin:.3g}..{smax:.3g}, {res['seconds']:.0f} s", flush=True)
    preamble = (f"# Depth: {args.layers}-layer byte-level Transformer LMs\n\nd_model "
                f"{args.d_model}, {args.nhead} heads, feed-forward {args.dim_ff}, sequence "
                f"{args.seq_len}, batch {args.batch}, Adam lr {args.lr} without warm-up, dropout "
                f"0, {args.max_iters} iterations, seed {args.seed}. Train BPB = mean training "
                f"loss (bits/byte) over the first / last 10% of steps; 'trains' = the best "
                f"held-out BPB is at least 0.25 below the unigram entropy of the training bytes "
                f"({unigram:.3f} BPB: what a model using no context reaches). Jacobian singular values of the layer "
                f"stack at init on 4 tokens. ReZero layers: {common.rezero_layer_source()} "
                f"(backend {args.backend}).")
    common.write_table(args.out, "depth",
                       ["variant", "layers", "Jacobian sv at init (min .. max)",
                        "train BPB first 10%", "train BPB last 10%", "held-out BPB",
                        "best held-out BPB", "trains",
                        "iterations", "seconds"], rows, preamble)
    common.plot_curves(f"{args.out}/depth.png", curves, xlabel="iteration",
                       ylabel="training bits per byte (10-step mean)",
                       title=f"{args.layers}-layer Transformers (unigram entropy "
                             f"{unigram:.2f} BPB)")
    if recorder is not None:
        try:
            recorder.plot(f"{args.out}/depth_alpha.png",
                          title=f"|alpha| of the {args.layers}-layer ReZero LM (Fig. 8)")
        except ImportError as err:
            print(err)
    return rows


if __name__ == "__main__":
    main()
