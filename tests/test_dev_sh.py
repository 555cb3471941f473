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
    """The fixed stage limits leave the benchmark at least 130 s of a deadline under 9 minutes;
    the benchmark's limit is what is left, and it stops starting cases 40 s before it (the last
    case started may still run for a while)."""
    text = DEV_SH.read_text()
    deadline = int(re.search(r"deadline=\$\(\(SECONDS \+ (\d+)\)\)", text).group(1))
    assert deadline < 9 * 60
    tools = re.search(r"for tool in ([\w ]+); do", text).group(1).split()
    fixed = 0
    for name, seconds in re.findall(r'^\s*stage ("?\$?\w[\w-]*"?) (\d+) ', text, re.M):
        fixed += int(seconds) * (len(tools) if name == '"$tool"' else 1)
    assert 0 < fixed <= deadline - 130, fixed
    assert re.search(r'bench_limit=\$\(\(deadline - SECONDS\)\)', text)
    assert re.search(r'^\s*stage bench "\$bench_limit" ', text, re.M)
    assert '--budget "$((bench_limit - 40))"' in text
