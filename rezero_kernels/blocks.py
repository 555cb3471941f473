"""ReZero for architectures other than the Transformer: fully connected and convolutional blocks.

Every block computes ``x + alpha * F(x)`` with ``alpha`` a learned scalar (the parameter
``resweight``, shape ``(1,)``, ``alpha_init=0.0`` by default, as in the Transformer layers), so a
stack of them is the identity map at initialisation (Bachlechner et al. 2020, Table 1 row 6).

Fully connected (``ReZeroFCBlock``)::

    x + alpha * act(W x + b)

The whole block is one ``functional.rezero_fc`` (one autograd node, the GEMM's bias folded in,
the gate and residual fused), which matters because a deep narrow net spends its time on the
host (there is no dropout in these blocks: ``dropout_p=0``).

Convolutional (``ReZeroBasicBlock``, CIFAR ResNet style)::

    shortcut(x) + alpha * conv2(relu(conv1(x)))

Design choices (documented because the paper leaves them open for CNNs):

* **No BatchNorm by default.**  The gate, not normalisation, keeps the deep stack well
  conditioned at initialisation; the convolutions carry a bias instead.  ``batch_norm=True``
  gives the conv-BN-ReLU-conv-BN branch of the original ResNet for comparison.
* **No ReLU after the addition.**  The original ResNet applies ``relu`` to the sum; that would
  break the identity-at-init property (``relu(x) != x``), so the ReZero block returns the sum
  itself, and ``ReZeroResNet`` applies one ReLU before pooling.
* **Shortcut projection** (1x1 convolution with stride, "option B") when the stride or the
  channel count changes; the identity otherwise.
* **Scalar gate.**  ``alpha`` is a 1-element tensor, which ``functional.rezero_residual``
  broadcasts over an NCHW tensor of any layout (a per-channel gate would need a channels-last
  view; the scalar needs none).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import dispatch, functional as F
from . import validation as check

__all__ = ["ReZeroFCBlock", "rezero_fc_net", "ReZeroBasicBlock", "ReZeroResNet", "rezero_resnet"]


def _gate(alpha_init: float, device=None, dtype=None) -> nn.Parameter:
    return nn.Parameter(torch.full((1,), float(alpha_init), device=device, dtype=dtype))


class ReZeroFCBlock(nn.Module):
    """``x + alpha * act(W x + b)`` for inputs of shape ``(..., width)``."""

    def __init__(self, width: int, activation: str = "relu", alpha_init: float = 0.0,
                 bias: bool = True, device=None, dtype=None, backend: str = "auto"):
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        check.activation(activation)
        self.width = width
        self.activation = activation
        self.backend = dispatch.check_name(backend)
        self.linear = nn.Linear(width, width, bias=bias, device=device, dtype=dtype)
        self.resweight = _gate(alpha_init, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rezero_fc(x, self.linear.weight, self.linear.bias, self.resweight,
                           self.activation, 0.0, self.training, self.backend)

    def extra_repr(self) -> str:
        return f"width={self.width}, activation={self.activation!r}, backend={self.backend!r}"


def rezero_fc_net(depth: int = 32, width: int = 256, *, in_features: int, out_features: int,
                  activation: str = "relu", alpha_init: float = 0.0, bias: bool = True,
                  device=None, dtype=None, backend: str = "auto") -> nn.Sequential:
    """A deep ReZero fully connected network (the paper's Fig. 5 / Table 1 row 6 model).

    ``Linear(in_features, width)``, then ``depth`` ``ReZeroFCBlock``s, then
    ``Linear(width, out_features)``.  At initialisation (``alpha_init=0``) the blocks are the
    identity, so the network is the product of its two end projections.
    """
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    factory = {"device": device, "dtype": dtype}
    layers = [nn.Linear(in_features, width, bias=bias, **factory)]
    layers += [ReZeroFCBlock(width, activation, alpha_init, bias, backend=backend, **factory)
               for _ in range(depth)]
    layers.append(nn.Linear(width, out_features, bias=bias, **factory))
    return nn.Sequential(*layers)


def _conv3x3(cin: int, cout: int, stride: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=bias)


class ReZeroBasicBlock(nn.Module):
    """CIFAR ResNet basic block in ReZero form: ``shortcut(x) + alpha * conv2(relu(conv1(x)))``.

    ``stride`` applies to the first convolution (and to the projection shortcut).  See the
    module docstring for the choices (no BatchNorm by default, no ReLU after the sum).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, alpha_init: float = 0.0,
                 backend: str = "auto", *, batch_norm: bool = False):
        super().__init__()
        self.backend = dispatch.check_name(backend)
        self.conv1 = _conv3x3(in_planes, planes, stride, bias=not batch_norm)
        self.bn1 = nn.BatchNorm2d(planes) if batch_norm else nn.Identity()
        self.conv2 = _conv3x3(planes, planes, 1, bias=not batch_norm)
        self.bn2 = nn.BatchNorm2d(planes) if batch_norm else nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False)
        else:
            self.shortcut = nn.Identity()
        self.resweight = _gate(alpha_init)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """The residual branch ``F(x)`` (without the gate)."""
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rezero_residual(self.shortcut(x), self.branch(x), self.resweight, 0.0,
                                 self.training, self.backend)


class ReZeroResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016, Sec. 4.2) with ReZero blocks: 6n+2 layers.

    Stem ``conv3x3(3, 16)`` + ReLU, three stages of ``n`` blocks (16, 32, 64 channels; the
    second and third start with stride 2), ReLU, global average pooling, a linear classifier.
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3,
                 alpha_init: float = 0.0, backend: str = "auto", *, batch_norm: bool = False,
                 widths=(16, 32, 64)):
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110...), got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.stem = _conv3x3(in_channels, widths[0], 1, bias=not batch_norm)
        self.stem_bn = nn.BatchNorm2d(widths[0]) if batch_norm else nn.Identity()
        blocks, planes = [], widths[0]
        for stage, width in enumerate(widths):
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(ReZeroBasicBlock(planes, width, stride, alpha_init, backend,
                                               batch_norm=batch_norm))
                planes = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = torch.relu(self.blocks(x))
        return self.fc(x.mean(dim=(2, 3)))


def rezero_resnet(depth: int = 20, num_classes: int = 10, **kwargs) -> ReZeroResNet:
    """A CIFAR-style ReZero ResNet of ``depth`` = 6n+2 layers (20, 56, ...); see ``ReZeroResNet``."""
    return ReZeroResNet(depth, num_classes, **kwargs)
