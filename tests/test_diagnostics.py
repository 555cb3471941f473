"""Jacobian spectrum (dynamical isometry at init, paper Fig. 4) and the alpha recorder (Fig. 8)."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import rezero_kernels
from rezero_kernels.blocks import ReZeroFCBlock
from rezero_kernels.diagnostics import (AlphaRecorder, gate_parameters, jacobian,
                                        jacobian_singular_values)

RZTXEncoderLayer = rezero_kernels.RZTXEncoderLayer



def test_jacobian_of_linear_map_is_its_weight():
    lin = nn.Linear(5, 3)
    x = torch.randn(5)
    torch.testing.assert_close(jacobian(lin, x), lin.weight.detach())
    torch.testing.assert_close(jacobian(lin, x, vectorize=False), lin.weight.detach())
    sv = jacobian_singular_values(lin, x)
    torch.testing.assert_close(sv, torch.linalg.svdvals(lin.weight.detach().double()))


def test_rezero_transformer_stack_is_isometric_at_init():
    torch.manual_seed(0)
    stack = nn.Sequential(*[RZTXEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True)
                   for _ in range(64)])
    stack.train()
    x = torch.randn(1, 4, 16)
    sv = jacobian_singular_values(stack, x)
    assert sv.shape == (64,)
    assert (sv - 1).abs().max().item() < 1e-6
    assert stack.training  # mode restored


def test_rezero_fc_stack_is_isometric_at_init():
    torch.manual_seed(0)
    stack = nn.Sequential(*[ReZeroFCBlock(16) for _ in range(64)])
    sv = jacobian_singular_values(stack, torch.randn(3, 16))
    assert (sv - 1).abs().max().item() < 1e-6


def test_post_norm_stack_is_not_isometric():
    torch.manual_seed(0)
    stack = nn.Sequential(*[nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True)
                   for _ in range(64)])
    sv = jacobian_singular_values(stack, torch.randn(1, 8, 16))
    assert sv.max().item() / sv.min().item() > 1.5


def test_dropout_is_off_while_measuring():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.5))
    model.train()
    x = torch.randn(6)
    torch.testing.assert_close(jacobian(model, x), model[0].weight.detach())
    assert model.training


def _train_and_record(model, steps=5):
    rec = AlphaRecorder(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 6, 16)
    rec.record(0)
    for step in range(1, steps + 1):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        rec.record(step)
    return rec


def test_alpha_recorder_history():
    torch.manual_seed(0)
    model = nn.Sequential(*[RZTXEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, share_alpha=False)
                   for _ in range(3)])
    rec = _train_and_record(model)
    assert rec.names == [n for n, _ in gate_parameters(model)]
    assert len(rec.names) == 6  # resweight + resweight_ff per layer
    assert rec.history.shape == (6, 6)
    assert rec.steps == list(range(6))
    assert np.all(rec.history[0] == 0)
    assert np.all(rec.history >= 0)
    assert rec.history[-1].max() > 0  # the gates moved
    final = np.array([p.detach().abs().item() for _, p in gate_parameters(model)])
    np.testing.assert_allclose(rec.history[-1], final)


def test_alpha_recorder_needs_gates():
    with pytest.raises(ValueError, match="resweight"):
        AlphaRecorder(nn.Linear(3, 3))


def test_alpha_recorder_plot(tmp_path):
    pytest.importorskip("matplotlib")
    torch.manual_seed(0)
    model = nn.Sequential(*[ReZeroFCBlock(16) for _ in range(4)])
    rec = AlphaRecorder(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(4):
        opt.zero_grad()
        model(torch.randn(8, 16)).pow(2).mean().backward()
        opt.step()
        rec.record(step)
    path = rec.plot(tmp_path / "alpha.png")
    data = (tmp_path / "alpha.png").read_bytes()
    assert path == tmp_path / "alpha.png"
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
