"""The paper's 10,000-layer claim in small: a 10,000-layer ReZero fully connected ReLU network
trains on this CPU, where the same depth without the gate does not.

Width 64, Adagrad (lr 0.01, as the paper's Fig. 5 runs), minibatches of 128 from scikit-learn's
8x8 digits (1797 images, standardised), Xavier-uniform weights, zero biases.  Variants, all
``depth`` hidden layers deep:

  FC + ReZero     x + alpha * relu(W x + b), alpha = 0 at init (``rezero_kernels.blocks``)
  FC + Residual   x + relu(W x + b): the gate fixed at 1
  FC              relu(W x + b): no skip connection

We record every step's minibatch loss and wall time, the loss and accuracy on the whole training
set before and after, and stop a run whose loss is not finite.  ReZero runs ``--iters`` steps;
the ungated variants at most ``--baseline-iters`` (they are expected to fail, and each step of a
10,000-layer net costs seconds).

    python bench/reproduce_deep_fc.py            # full (about 15 minutes on two cores)
    python bench/reproduce_deep_fc.py --smoke    # seconds
"""
from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as F

try:  # python -m bench.<script>
    from . import reproduce_common as common
except ImportError:  # python bench/<script>.py
    import reproduce_common as common

KINDS = ("rezero", "residual", "plain")


def parse_args(argv=None):
    p = common.arg_parser(__doc__)
    p.add_argument("--depth", type=int, default=10_000)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--iters", type=int, default=300, help="training steps of the ReZero net")
    p.add_argument("--baseline-iters", type=int, default=40,
                   help="at most this many steps for the ungated variants")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto", help="backend of the ReZero blocks")
    args = p.parse_args(argv)
    if args.smoke:
        args.depth, args.width, args.iters, args.baseline_iters = 20, 16, 4, 3
    return args


def evaluate(net, x, y, chunk: int = 512):
    """(cross-entropy, accuracy) on the whole set, in chunks (a 10,000-layer forward keeps
    nothing, but each chunk's activations pass through every layer)."""
    loss, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(x), chunk):
            logits = net(x[i:i + chunk])
            loss += F.cross_entropy(logits, y[i:i + chunk], reduction="sum").item()
            correct += (logits.argmax(1) == y[i:i + chunk]).sum().item()
    return loss / len(x), correct / len(x)


def run(kind, steps, x, y, args):
    torch.manual_seed(args.seed)
    net = common.make_fc_net(kind, args.depth, args.width, x.shape[1], 10, args.backend)
    opt = torch.optim.Adagrad(net.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    start_loss, start_acc = evaluate(net, x, y)
    losses, times = [], []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (args.batch,), generator=gen)
        t0 = time.perf_counter()
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = loss.item()
        times.append(time.perf_counter() - t0)
        losses.append(value)
        if not math.isfinite(value):
            break
    end_loss, end_acc = evaluate(net, x, y)
    return {"losses": losses, "times": times, "start": (start_loss, start_acc),
            "end": (end_loss, end_acc)}


def outcome(res) -> str:
    """"trains" when the whole-set loss ends below half the chance level (ln 10 = 2.30 nats)."""
    losses = res["losses"]
    if not math.isfinite(res["start"][0]) or (losses and not math.isfinite(losses[-1])):
        return f"not finite (after {len(losses)} step(s))"
    return "trains" if res["end"][0] < 0.5 * math.log(10) else "does not train"


def main(argv=None):
    args = parse_args(argv)
    common.setup(args.threads, args.seed)
    x, y = common.load_digits()
    results, rows = {}, []
    for kind in KINDS:
        steps = args.iters if kind == "rezero" else min(args.iters, args.baseline_iters)
        res = results[kind] = run(kind, steps, x, y, args)
        step_s = statistics.median(res["times"]) if res["times"] else float("nan")
        rows.append([common.FC_LABELS[kind], len(res["losses"]), res["start"][0], res["end"][0],
                     f"{res['end'][1]:.1%}", f"{step_s:.2f}", outcome(res)])
        print(f"{common.FC_LABELS[kind]:14s} {len(res['losses'])} steps: loss "
              f"{res['start'][0]:.3f} -> {res['end'][0]:.3f}, accuracy {res['end'][1]:.1%}, "
              f"{step_s:.2f} s/step, {outcome(res)}", flush=True)
    preamble = (f"# {args.depth:,}-layer fully connected ReLU nets, width {args.width}, on "
                f"sklearn digits\n\nAdagrad lr {args.lr}, batch {args.batch}, Xavier-uniform "
                f"weights, zero biases, seed {args.seed}, {args.threads} thread(s) on the CPU. "
                f"Loss and accuracy on the whole training set (1797 images) before and after; "
                f"time per step = forward, backward and optimizer step, median over the steps. "
                f"ReZero blocks: rezero_kernels.blocks.ReZeroFCBlock (backend {args.backend}). "
                f"'trains': the whole-set loss ends below half the chance level (ln 10 = 2.30).")
    common.write_table(args.out, "deep_fc",
                       ["variant", "steps", "loss before", "loss after", "accuracy after",
                        "s / step", "outcome"], rows, preamble)
    curves = {}
    for kind, res in results.items():
        finite = [(i + 1, v) for i, v in enumerate(res["losses"]) if math.isfinite(v)]
        if finite:
            curves[common.FC_LABELS[kind]] = ([i for i, _ in finite], [v for _, v in finite])
    common.plot_curves(f"{args.out}/deep_fc.png", curves, xlabel="step",
                       ylabel="minibatch cross-entropy", logy=True,
                       title=f"{args.depth:,}-layer FC nets, width {args.width}, digits")
    return results


if __name__ == "__main__":
    main()
