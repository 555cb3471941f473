"""The layers under activation checkpointing (torch.utils.checkpoint, reentrant and not), with
dropout: the recomputed forward draws the same dropout seeds (checkpoint restores the RNG
state), so gradients are bit-identical to the run without checkpointing."""
import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

import rezero_kernels as rzk

D, H, FF, P = 32, 4, 64, 0.2


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.ModuleList(rzk.RZTXEncoderLayer(D, H, FF, dropout=P, batch_first=True,
                                                      alpha_init=0.5) for _ in range(2))
        self.dec = rzk.RZTXDecoderLayer(D, H, FF, dropout=P, batch_first=True, alpha_init=0.5,
                                        activation="gelu", share_alpha=False)
        self.fc = rzk.ReZero(nn.Linear(D, D), alpha_init=0.5, dropout=P)

    def forward(self, src, tgt, use_reentrant=None):
        def run(fn, *args):
            if use_reentrant is None:
                return fn(*args)
            return checkpoint(fn, *args, use_reentrant=use_reentrant)

        memory = src
        for layer in self.enc:
            memory = run(layer, memory)
        return run(self.fc, run(self.dec, tgt, memory))


def _backward(out, leaves, grad_out=None):
    """Gradients by .backward() (reentrant checkpointing does not support autograd.grad)."""
    for t in leaves:
        t.grad = None
    out.backward(grad_out)
    return [t.grad.clone() for t in leaves]


def _step(model, use_reentrant, mask_seed=1):
    torch.manual_seed(mask_seed)
    gen = torch.Generator().manual_seed(2)
    src = torch.randn(3, 7, D, generator=gen, requires_grad=True)
    tgt = torch.randn(3, 5, D, generator=gen, requires_grad=True)
    out = model(src, tgt, use_reentrant)
    return out, _backward(out, [src, tgt, *model.parameters()],
                          torch.randn(out.shape, generator=gen))


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpointed_gradients_are_bit_identical(use_reentrant):
    torch.manual_seed(0)
    model = Net()
    out, grads = _step(model, None)
    out_ck, grads_ck = _step(model, use_reentrant)
    assert torch.equal(out_ck, out)
    names = ["src", "tgt"] + [n for n, _ in model.named_parameters()]
    for name, g, g_ck in zip(names, grads, grads_ck):
        assert torch.equal(g_ck, g), f"gradient of {name} differs under checkpointing"
    # dropout was on: other masks give other gradients
    assert not torch.equal(_step(model, use_reentrant, mask_seed=5)[1][0], grads[0])


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpoint_sequential_stack(use_reentrant):
    torch.manual_seed(0)
    stack = nn.Sequential(*[rzk.RZTXEncoderLayer(D, H, FF, dropout=P, batch_first=True,
                                                 alpha_init=0.5) for _ in range(4)])
    x = torch.randn(2, 6, D, requires_grad=True)

    def grads(run):
        torch.manual_seed(3)
        return _backward(run(x).square().sum(), [x, *stack.parameters()])

    plain = grads(stack)
    checked = grads(lambda t: checkpoint_sequential(stack, 2, t, use_reentrant=use_reentrant))
    assert all(torch.equal(a, b) for a, b in zip(plain, checked))
