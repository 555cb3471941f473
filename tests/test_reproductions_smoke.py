"""The paper reproductions (bench/reproduce_*.py) run in their --smoke setting and write their
table and plot.  No convergence claim is checked here: the smoke settings train for a few steps."""
import csv
import importlib
import os
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def _has(module):
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


@pytest.fixture
def run_script(tmp_path):
    threads = torch.get_num_threads()
    sys.path.insert(0, BENCH)

    def run(name):
        module = importlib.import_module(name)
        module.main(["--smoke", "--out", str(tmp_path)])
        return tmp_path

    try:
        yield run
    finally:
        sys.path.remove(BENCH)
        torch.set_num_threads(threads)


def _check_outputs(out, table, rows):
    md = (out / f"{table}.md").read_text()
    assert md.count("\n|") >= rows + 1  # header separator + one line per row
    csv_lines = (out / f"{table}.csv").read_text().strip().splitlines()
    assert len(csv_lines) == rows + 1
    if _has("matplotlib"):
        assert (out / f"{table}.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.skipif(not _has("sklearn"), reason="needs scikit-learn (digits data)")
def test_fc_convergence_smoke(run_script):
    out = run_script("reproduce_fc_convergence")
    _check_outputs(out, "fc_convergence", 4)


@pytest.mark.skipif(not _has("sklearn"), reason="needs scikit-learn (digits data)")
def test_deep_fc_smoke(run_script):
    out = run_script("reproduce_deep_fc")
    _check_outputs(out, "deep_fc", 3)


@pytest.mark.skipif(not _has("gensim"), reason="needs gensim (ships the Wikipedia excerpt)")
def test_lm_convergence_smoke(run_script):
    out = run_script("reproduce_lm_convergence")
    md = (out / "lm_convergence.md").read_text()
    for section in ("## All variants at the shared lr", "## Learning-rate sweep",
                    "## Each variant at its best lr"):
        assert section in md
    assert md.count("\n| ReZero alpha=0 |") == 5  # two tables, two speed-up tables, the sweep
    with open(out / "lm_convergence.csv", newline="") as f:
        curves = list(csv.DictReader(f))
    assert len({(r["variant"], r["seed"]) for r in curves}) == 5 * 3  # every variant, 3 seeds
    with open(out / "lm_convergence_alpha.csv", newline="") as f:
        alpha = list(csv.DictReader(f))
    assert {r["variant"] for r in alpha} == {"ReZero alpha=0", "ReZero alpha=1"}
    assert [c for c in alpha[0] if c.startswith("layer_")] == ["layer_0", "layer_1"]
    if _has("matplotlib"):
        assert (out / "lm_convergence.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.skipif(not _has("gensim"), reason="needs gensim (ships the Wikipedia excerpt)")
def test_depth_smoke(run_script):
    out = run_script("reproduce_depth")
    _check_outputs(out, "depth", 2)
    if _has("matplotlib"):
        assert (out / "depth_alpha.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.skipif(not _has("gensim"), reason="needs gensim (ships the Wikipedia excerpt)")
def test_deep_lm_smoke(run_script):
    out = run_script("reproduce_deep_lm")
    _check_outputs(out, "deep_lm", 4)
    assert (out / "deep_lm_curves.csv").read_text().startswith("variant,seed,iteration")
