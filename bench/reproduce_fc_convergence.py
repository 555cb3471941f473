"""Paper Fig. 5 in small: deep fully connected ReLU networks, plain / residual / LayerNorm / ReZero.

32 hidden layers of width 256, Adagrad (lr 0.01), minibatches of 128 from scikit-learn's 8x8
digits (1797 images, standardised); we measure the iterations until the loss on the whole
training set falls below a threshold.  The paper (CIFAR-10) reports ReZero converging 7-15x
faster than the other variants.

    python bench/reproduce_fc_convergence.py            # full (a few minutes, one thread)
    python bench/reproduce_fc_convergence.py --smoke    # seconds
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

try:  # python -m bench.<script>
    from . import reproduce_common as common
except ImportError:  # python bench/<script>.py
    import reproduce_common as common


def parse_args(argv=None):
    p = common.arg_parser(__doc__)
    p.add_argument("--depth", type=int, default=32)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--max-iters", type=int, default=2500)
    p.add_argument("--threshold", type=float, default=0.01, help="training-loss threshold (nats)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--eval-every", type=int, default=25,
                   help="evaluate the full training loss every N iterations (every 5 during the "
                        "first 100)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backend", default="auto", help="backend of the ReZero blocks")
    args = p.parse_args(argv)
    if args.smoke:
        args.depth, args.width, args.max_iters, args.seeds, args.eval_every = 4, 32, 20, 1, 5
    return args


def run_one(kind, seed, x, y, args):
    torch.manual_seed(seed)
    net = common.make_fc_net(kind, args.depth, args.width, x.shape[1], 10, args.backend)
    opt = torch.optim.Adagrad(net.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(seed)
    curve, start = [], time.perf_counter()

    def full_loss():
        with torch.no_grad():
            return F.cross_entropy(net(x), y).item()

    curve.append((0, full_loss()))
    for it in range(1, args.max_iters + 1):
        idx = torch.randint(0, len(x), (args.batch,), generator=gen)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if it % args.eval_every == 0 or (it <= 100 and it % 5 == 0) or it == args.max_iters:
            value = full_loss()
            curve.append((it, value))
            if value <= args.threshold or value != value:
                break
    return curve, time.perf_counter() - start


def main(argv=None):
    args = parse_args(argv)
    common.setup(args.threads)
    x, y = common.load_digits()
    results = {}
    for kind in common.FC_KINDS:
        results[kind] = []
        for seed in range(args.seeds):
            curve, secs = run_one(kind, seed, x, y, args)
            hit = common.first_crossing(curve, args.threshold)
            results[kind].append((curve, hit, secs))
            print(f"{common.FC_LABELS[kind]:16s} seed {seed}: iterations to loss <= "
                  f"{args.threshold}: {common.fmt(hit)} (final loss {curve[-1][1]:.4f}, "
                  f"{secs:.1f} s)", flush=True)

    def median_hits(kind):
        hits = [h for _, h, _ in results[kind]]
        return statistics.median(hits) if all(h is not None for h in hits) else None

    rz = median_hits("rezero")
    rows = []
    for kind in common.FC_KINDS:
        hits = [h for _, h, _ in results[kind]]
        med = median_hits(kind)
        n_hit = sum(h is not None for h in hits)
        slower = (f"{med / rz:.1f}x" if med is not None and rz else
                  (f"> {args.max_iters / rz:.1f}x" if rz else "n/a"))
        final = statistics.median(r[0][-1][1] for r in results[kind])
        rows.append([common.FC_LABELS[kind], " / ".join(common.fmt(h) for h in hits),
                     common.fmt(None if med is None else float(med), 0), f"{n_hit}/{len(hits)}",
                     slower, final])
    preamble = (f"# Fig. 5 in small: {args.depth}-layer, width-{args.width} ReLU nets on sklearn "
                f"digits\n\nAdagrad lr {args.lr}, batch {args.batch}, Xavier-uniform init, "
                f"{args.seeds} seed(s), at most {args.max_iters} iterations; iterations until the "
                f"full-training-set cross-entropy <= {args.threshold} (checked every 5 "
                f"iterations up to 100, then every {args.eval_every}). ReZero blocks: "
                f"rezero_kernels.blocks.ReZeroFCBlock (backend {args.backend}).")
    common.write_table(args.out, "fc_convergence",
                       ["variant", "iterations per seed", "median iterations", "reached",
                        "vs ReZero", "median final loss"], rows, preamble)
    curves = {common.FC_LABELS[k]: ([s for s, _ in results[k][0][0]], [v for _, v in results[k][0][0]])
              for k in common.FC_KINDS}
    common.plot_curves(f"{args.out}/fc_convergence.png", curves, xlabel="iteration",
                       ylabel="training cross-entropy (seed 0)", threshold=args.threshold,
                       logy=True, title=f"{args.depth}-layer FC nets, width {args.width}, digits")
    return results


if __name__ == "__main__":
    main()
