"""The fused ops keep less for backward than the reference: no dropout masks, no x in the
residual, no GEMM output in rezero_linear."""
import pytest
import torch

import python_ref
import rezero_kernels as rzk
from rezero_kernels.saved_memory import saved_bytes

pytestmark = pytest.mark.skipif(not rzk.backends()["cpu"], reason="compiled extension not built")
F = rzk.functional


def test_counts_distinct_storages():
    x = torch.randn(10, 10, requires_grad=True)
    w = torch.randn(10, 10, requires_grad=True)
    assert saved_bytes(lambda: x @ w) == 800
    assert saved_bytes(lambda: x @ w, exclude=[w]) == 400


def test_residual_keeps_fx_alpha_and_seed_only():
    x = torch.randn(64, 64, requires_grad=True)
    fx = torch.randn(64, 64, requires_grad=True)
    alpha = torch.ones(1, requires_grad=True)
    fused = saved_bytes(lambda: F.rezero_residual(x, fx, alpha, 0.1))
    assert fused == fx.nbytes + 4 + 16  # fx, alpha, [key, counter_base]
    reference = saved_bytes(lambda: python_ref.rezero_residual(x, fx, alpha, 0.1))
    assert reference > fused + 64 * 64  # + the stored bool mask


@pytest.mark.parametrize("dropout, activation", [(0.1, "relu"), (0.0, "relu"), (0.1, "gelu")])
def test_encoder_layer_saves_less_than_reference(dropout, activation):
    torch.manual_seed(0)
    kw = dict(dropout=dropout, activation=activation, batch_first=True, alpha_init=0.1)
    fused = rzk.RZTXEncoderLayer(64, 4, 256, **kw)
    ref = python_ref.RZTXEncoderLayer(64, 4, 256, **kw)
    x = torch.randn(4, 32, 64, requires_grad=True)
    fused_bytes = saved_bytes(fused, x, exclude=list(fused.parameters()))
    ref_bytes = saved_bytes(ref, x, exclude=list(ref.parameters()))
    assert fused_bytes < (0.8 if dropout else 1.0) * ref_bytes, (fused_bytes, ref_bytes)
