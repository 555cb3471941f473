"""Host time of single calls, the rows of the host-overhead study: what one ``rezero_residual``
call costs on the host beside the eager expression it replaces, the registered op called
directly, and a 200-layer, width-256 FC net (interleaved medians, bench/timing.py).

    python -m bench.host_calls                     # this checkout, from its root
    cd OTHER_CHECKOUT && PYTHONPATH=. python /path/to/bench/host_calls.py   # another version

The benchmark cases ``host/...`` and ``fc/...`` (``python -m bench``) cover the op sizes and the
deep nets; this script adds the per-call break-down.
"""
import torch

import python_ref
import rezero_kernels as rzk
from bench import timing

F = rzk.functional


def leaf(*shape):
    return torch.randn(*shape, requires_grad=True)


def main():
    torch.manual_seed(0)
    x, fx, a = leaf(8, 8), leaf(8, 8), torch.full((1,), 0.5, requires_grad=True)
    g, no_seed = torch.randn(8, 8), torch.empty(0, dtype=torch.int64)
    t = timing.interleaved({
        "eager fwd+bwd, 8x8": lambda: torch.autograd.grad(
            python_ref.rezero_residual(x, fx, a, 0.0), (x, fx, a), g),
        "ours fwd+bwd, 8x8": lambda: torch.autograd.grad(
            F.rezero_residual(x, fx, a, 0.0), (x, fx, a), g),
        "eager x + a * fx, inputs require grad": lambda: x + a * fx,
        "the registered op, inputs require grad": lambda: torch.ops.rezero_kernels.residual(
            x, fx, a, 0.0, no_seed),
        "functional.rezero_residual, forward": lambda: F.rezero_residual(x, fx, a, 0.0),
    }, rounds=31)
    for name, r in t.items():
        print(f"{name:42s} {r.median_s * 1e6:7.1f} us")
    x, fx = leaf(64, 256), leaf(64, 256)
    g = torch.randn(64, 256)
    t = timing.interleaved({
        "eager": lambda: torch.autograd.grad(python_ref.rezero_residual(x, fx, a, 0.0),
                                             (x, fx, a), g),
        "ours": lambda: torch.autograd.grad(F.rezero_residual(x, fx, a, 0.0), (x, fx, a), g)},
        rounds=31)
    print(f"rezero_residual fwd+bwd 64x256 p=0: eager/ours "
          f"{t['eager'].median_s / t['ours'].median_s:.2f}x")
    inp, grad_out = torch.randn(128, 256), torch.randn(128, 10)
    steps = {}
    for backend in ("auto", "torch"):
        net = rzk.rezero_fc_net(200, 256, in_features=256, out_features=10, backend=backend)
        params = list(net.parameters())
        steps[backend] = lambda net=net, params=params: torch.autograd.grad(
            net(inp), params, grad_out)
    t = timing.interleaved(steps, rounds=15)
    print(f"rezero_fc_net 200 x 256, batch 128, training step: backend='torch' / ours "
          f"{t['torch'].median_s / t['auto'].median_s:.2f}x "
          f"({t['auto'].median_s * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
