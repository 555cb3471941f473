"""Whole models built from our modules load with ``torch.load(path, weights_only=True)`` once
``rezero_kernels`` is imported (rezero_kernels/serialization.py), and compute what they did."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import python_ref
import rezero_kernels as rzk

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D, H, FF = 16, 2, 32


def _models():
    torch.manual_seed(0)
    enc = rzk.RZTXEncoderLayer(D, H, FF, dropout=0.0, batch_first=True, alpha_init=0.5)
    dec = rzk.RZTXDecoderLayer(D, H, FF, dropout=0.0, batch_first=True, alpha_init=0.5,
                               share_alpha=False, activation="gelu")
    x = torch.randn(2, 5, D)
    return {
        "encoder stack": (nn.TransformerEncoder(enc, 2, enable_nested_tensor=False), (x,)),
        "decoder stack": (nn.TransformerDecoder(dec, 2), (x, torch.randn(2, 3, D))),
        "reference layer": (python_ref.RZTXEncoderLayer(D, H, FF, dropout=0.0, alpha_init=0.5),
                            (x,)),
        "llama stack": (nn.Sequential(*[rzk.RZLlamaLayer(D, H, 1, FF, alpha_init=0.5)
                                        for _ in range(2)]), (x,)),
        "llama reference layer": (python_ref.RZLlamaLayer(D, H, 2, FF, qkv_bias=True,
                                                          alpha_init=0.5, share_alpha=False),
                                  (x,)),
        "gate": (rzk.ReZero(nn.Linear(D, D), alpha_init=0.5, channels=D), (x,)),
        "fc net": (rzk.rezero_fc_net(depth=3, width=D, in_features=D, out_features=4,
                                     alpha_init=0.5), (x,)),
        "resnet": (rzk.rezero_resnet(depth=20, batch_norm=True).eval(),
                   (torch.randn(2, 3, 8, 8),)),
    }


@pytest.mark.parametrize("name", list(_models()))
def test_whole_model_loads_with_weights_only(name, tmp_path):
    model, inputs = _models()[name]
    path = tmp_path / "model.pt"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=True)
    assert type(loaded) is type(model)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs), model(*inputs), rtol=0, atol=0)


def test_importing_the_package_is_what_allows_it(tmp_path):
    path = tmp_path / "layer.pt"
    torch.save(rzk.RZTXEncoderLayer(D, H, FF), path)
    code = ("import torch, pickle\n"
            f"path = {str(path)!r}\n"
            "try:\n"
            "    torch.load(path, weights_only=True)\n"
            "    raise SystemExit('loaded without rezero_kernels')\n"
            "except pickle.UnpicklingError as e:\n"
            "    assert 'rezero_kernels.transformer.RZTXEncoderLayer' in str(e), e\n"
            "import rezero_kernels\n"
            "print(type(torch.load(path, weights_only=True)).__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "RZTXEncoderLayer"
