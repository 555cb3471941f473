"""Host time of the Triton backend's own Python, per op call, without a GPU: everything the
``triton`` backend runs on the host for one call (checks, dispatch, autograd, seed, allocations,
the backward's torch ops) except Triton's launcher itself.  On a GPU, where small kernels take
microseconds, host time is the step time.

The script sets TRITON_INTERPRET=1 (so that the backend loads on a CPU machine) and replaces
every kernel launch (``triton_ops.common.launch``) by a counter: the kernels do not run, and
the time of Triton's launcher (its autotuner's lookup and ``JITFunction.run``) is not included;
the launch count is printed so that it can be added.  The ops run on small CPU tensors (8 x 8;
the GEMM ops 8 x 8 x 8); torch ops inside them (allocations, the backward's sums) run for real.
Interleaved medians (bench/timing.py).

    python -m bench.triton_host                     # this checkout, from its root
    cd OTHER_CHECKOUT && PYTHONPATH=. python /path/to/bench/triton_host.py   # another version
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before rezero_kernels is imported

import torch  # noqa: E402

import rezero_kernels as rzk  # noqa: E402
from rezero_kernels.triton_ops import common  # noqa: E402
from bench import timing  # noqa: E402

F = rzk.functional
LAUNCHES = []


def _count_launch(*args):
    LAUNCHES.append(args[0])


def _cases(p):
    def leaf(*shape):
        return torch.randn(*shape, requires_grad=True)
    x, fx, h, inp, w = leaf(8, 8), leaf(8, 8), leaf(8, 8), leaf(8, 8), leaf(8, 8)
    a, b = torch.full((1,), 0.5, requires_grad=True), leaf(8)
    return {  # name: (inputs, op)
        "rezero_residual": ((x, fx, a), lambda *t: F.rezero_residual(*t, p, True, "triton")),
        "bias_act_dropout": ((h, b), lambda *t: F.bias_act_dropout(*t, "gelu", p, True, "triton")),
        "gated_act_dropout": ((leaf(8, 16),), lambda *t: F.gated_act_dropout(*t, "silu", p, True,
                                                                             "triton")),
        "rezero_linear": ((x, inp, w, b, a), lambda *t: F.rezero_linear(*t, p, True, "triton")),
        "linear_bias_act_dropout": ((inp, w, b), lambda *t: F.linear_bias_act_dropout(
            *t, "gelu", p, True, "triton")),
    }


def main():
    torch.manual_seed(0)
    common.launch_observer = _count_launch
    g = torch.randn(8, 8)
    print(f"{'op':24s} {'p':>4s} {'mode':8s} {'host us':>8s} {'launches':>9s}")
    for p in (0.0, 0.1):
        for name, (inputs, op) in _cases(p).items():
            fns = {"fwd": lambda: op(*inputs),
                   "fwd+bwd": lambda: torch.autograd.grad(op(*inputs), inputs, g)}
            t = timing.interleaved(fns, rounds=21)
            for mode, fn in fns.items():
                LAUNCHES.clear()
                fn()
                print(f"{name:24s} {p:4.1f} {mode:8s} {t[mode].median_s * 1e6:8.1f} "
                      f"{len(LAUNCHES):9d}")


if __name__ == "__main__":
    main()
