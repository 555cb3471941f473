"""Train a 32-layer, width-256 ReZero fully connected network (x + alpha * relu(Wx + b) per
layer) on scikit-learn's digits, and record the gates |alpha| (paper Fig. 8 style heat map).

    pip install scikit-learn matplotlib      # data set; plot (optional)
    python examples/deep_fc.py [--steps 300] [--out deep_fc_alpha.png]
"""
import argparse

import torch
import torch.nn.functional as F

from rezero_kernels.blocks import rezero_fc_net
from rezero_kernels.diagnostics import AlphaRecorder, jacobian_singular_values


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="deep_fc_alpha.png")
    args = parser.parse_args()

    from sklearn.datasets import load_digits
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(digits.target)

    torch.manual_seed(0)
    net = rezero_fc_net(depth=32, width=256, in_features=64, out_features=10)
    blocks = net[1:-1]
    with torch.no_grad():
        hidden = net[0](x[:2])
    sv = jacobian_singular_values(blocks, hidden)
    print(f"Jacobian of the 32 blocks at init: singular values {sv.min():.6f} .. {sv.max():.6f}")

    opt = torch.optim.Adagrad(net.parameters(), lr=0.01)
    recorder = AlphaRecorder(net)
    for step in range(args.steps):
        idx = torch.randint(0, len(x), (128,))
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        recorder.record(step)
        if step % 50 == 0 or step == args.steps - 1:
            with torch.no_grad():
                acc = (net(x).argmax(1) == y).float().mean().item()
            print(f"step {step:4d}  loss {loss.item():.4f}  train accuracy {acc:.3f}")
    print("final |alpha| per layer:", " ".join(f"{a:.3f}" for a in recorder.history[-1]))
    try:
        recorder.plot(args.out)
        print(f"wrote {args.out}")
    except ImportError as err:
        print(err)


if __name__ == "__main__":
    main()
