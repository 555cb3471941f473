"""ReZero FC and convolutional blocks: parity with the plain-PyTorch formula, gradients,
identity at initialisation."""
import pytest
import torch
import torch.nn.functional as F

import rezero_kernels
from rezero_kernels.blocks import (ReZeroBasicBlock, ReZeroFCBlock, ReZeroResNet, rezero_fc_net,
                                   rezero_resnet)

BACKENDS = ["auto", "torch"]
ACT = {"relu": F.relu, "gelu": F.gelu, "identity": lambda t: t,
       "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}


def _grads(out, inputs, seed=0):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_fc_block_matches_formula(backend, activation):
    torch.manual_seed(0)
    block = ReZeroFCBlock(24, activation, alpha_init=0.3, backend=backend)
    x = torch.randn(5, 7, 24, requires_grad=True)
    out = block(x)
    ref = x + block.resweight * ACT[activation](F.linear(x, block.linear.weight, block.linear.bias))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    params = [x, block.linear.weight, block.linear.bias, block.resweight]
    for got, want in zip(_grads(out, params), _grads(ref, params)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_fc_block_without_bias_and_float64():
    block = ReZeroFCBlock(8, "identity", alpha_init=0.5, bias=False, dtype=torch.float64,
                          backend="torch")
    assert block.linear.bias is None
    x = torch.randn(3, 8, dtype=torch.float64)
    out = block(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, x + 0.5 * x @ block.linear.weight.T)


def test_fc_identity_at_init_and_gate_gradient():
    torch.manual_seed(0)
    blocks = torch.nn.Sequential(*[ReZeroFCBlock(16) for _ in range(8)])
    x = torch.randn(4, 16)
    assert torch.equal(blocks(x), x)
    names = [n for n, _ in blocks.named_parameters() if n.endswith("resweight")]
    assert len(names) == 8
    blocks(x).pow(2).sum().backward()
    # at alpha = 0 only the gates receive a gradient: the branches are switched off
    assert all(b.resweight.grad.abs().item() > 0 for b in blocks)
    assert all(b.linear.weight.grad.abs().max().item() == 0 for b in blocks)


def test_fc_net_builder():
    net = rezero_fc_net(depth=32, width=64, in_features=10, out_features=3)
    assert sum(isinstance(m, ReZeroFCBlock) for m in net) == 32
    x = torch.randn(6, 10)
    out = net(x)
    assert out.shape == (6, 3)
    # the blocks are the identity: the net is its two end projections
    torch.testing.assert_close(out, net[-1](net[0](x)))
    with pytest.raises(ValueError):
        ReZeroFCBlock(8, activation="tanh")


def _conv_reference(block, x):
    h = F.conv2d(x, block.conv1.weight, block.conv1.bias, stride=block.conv1.stride, padding=1)
    h = F.conv2d(F.relu(h), block.conv2.weight, block.conv2.bias, padding=1)
    if isinstance(block.shortcut, torch.nn.Conv2d):
        short = F.conv2d(x, block.shortcut.weight, stride=block.shortcut.stride)
    else:
        short = x
    return short + block.resweight * h


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_planes,planes,stride", [(8, 8, 1), (8, 16, 2)])
def test_basic_block_matches_formula(backend, in_planes, planes, stride):
    torch.manual_seed(0)
    block = ReZeroBasicBlock(in_planes, planes, stride, alpha_init=0.7, backend=backend)
    x = torch.randn(2, in_planes, 8, 8, requires_grad=True)
    out = block(x)
    ref = _conv_reference(block, x)
    assert out.shape == (2, planes, 8 // stride, 8 // stride)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    params = [x, block.conv1.weight, block.conv2.bias, block.resweight]
    if stride != 1:
        params.append(block.shortcut.weight)
    for got, want in zip(_grads(out, params), _grads(ref, params)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_basic_block_channels_last_and_identity_at_init():
    torch.manual_seed(0)
    block = ReZeroBasicBlock(8, 8)
    x = torch.randn(2, 8, 6, 6).to(memory_format=torch.channels_last)
    assert torch.equal(block(x), x)
    block.resweight.data.fill_(0.5)
    torch.testing.assert_close(block(x), _conv_reference(block, x.contiguous()))


def test_basic_block_batch_norm_option():
    block = ReZeroBasicBlock(4, 8, 2, alpha_init=0.1, batch_norm=True)
    assert block.conv1.bias is None and isinstance(block.bn1, torch.nn.BatchNorm2d)
    out = block(torch.randn(3, 4, 8, 8))
    assert out.shape == (3, 8, 4, 4)


@pytest.mark.parametrize("depth,blocks", [(20, 9), (56, 27)])
def test_resnet_builder(depth, blocks):
    net = rezero_resnet(depth, num_classes=10)
    assert isinstance(net, ReZeroResNet)
    assert sum(isinstance(m, ReZeroBasicBlock) for m in net.modules()) == blocks
    convs = sum(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) for m in net.modules())
    assert convs + 1 == depth  # 6n+2 = 3x3 convolutions + the classifier
    x = torch.randn(2, 3, 32, 32)
    out = net(x)
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for n, p in net.named_parameters() if n.endswith("resweight"))


def test_resnet_bad_depth():
    with pytest.raises(ValueError, match="6n\\+2"):
        rezero_resnet(21)


def test_exports_when_present():
    # blocks live in rezero_kernels.blocks; the package may also re-export them
    for name in ("ReZeroFCBlock", "rezero_fc_net", "ReZeroBasicBlock", "rezero_resnet"):
        if hasattr(rezero_kernels, name):
            assert getattr(rezero_kernels, name) is getattr(rezero_kernels.blocks, name)
