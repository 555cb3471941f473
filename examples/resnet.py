"""A CIFAR-style ReZero ResNet (6n+2 layers, no BatchNorm) trained for a few steps on random
images, to show the API.  Swap in torchvision's CIFAR-10 for real training.

    python examples/resnet.py [--depth 20|56] [--steps 20]
"""
import argparse

import torch
import torch.nn.functional as F

from rezero_kernels.blocks import rezero_resnet


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--depth", type=int, default=20, help="6n+2: 20, 32, 44, 56, 110")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = rezero_resnet(args.depth, num_classes=10)
    print(f"ReZero ResNet-{args.depth}: {sum(p.numel() for p in model.parameters()):,} parameters")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    images = torch.randn(args.batch, 3, 32, 32)
    labels = torch.randint(0, 10, (args.batch,))
    for step in range(args.steps):
        loss = F.cross_entropy(model(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 5 == 0 or step == args.steps - 1:
            gates = [m.resweight.item() for m in model.blocks]
            print(f"step {step:3d}  loss {loss.item():.4f}  alpha mean {sum(gates) / len(gates):+.4f}")


if __name__ == "__main__":
    main()
