"""``./dev.sh gpu``, the one-command GPU validation: it refuses at once where no GPU is visible,
and its stage time limits add up to less than the 9 minutes it must finish in."""
import re
import subprocess
from pathlib import Path

import pytest
import torch

DEV_SH = Path(__file__).resolve().parents[1] / "dev.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here")
def test_gpu_exits_at_once_without_a_gpu():
    res = subprocess.run(["bash", str(DEV_SH), "gpu"], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "no CUDA GPU is visible" in res.stderr


def test_gpu_stage_limits_fit_in_nine_minutes():
    text = DEV_SH.read_text()
    tools = re.search(r"for tool in ([\w ]+); do", text).group(1).split()
    total = 0
    for name, seconds in re.findall(r'^\s*stage ("?\$?\w[\w-]*"?) (\d+) ', text, re.M):
        total += int(seconds) * (len(tools) if name == '"$tool"' else 1)
    assert 0 < total < 9 * 60, total
    budget = int(re.search(r"--budget (\d+)", text).group(1))
    bench_limit = int(re.search(r"^\s*stage bench (\d+) ", text, re.M).group(1))
    assert budget + 30 <= bench_limit  # the last case started may still run for a while
