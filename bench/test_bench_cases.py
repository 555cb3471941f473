"""pytest-benchmark view of the cases in ``bench/cases.py`` (the same definitions as the CLI).

    python -m pytest bench --benchmark-only                       # the --quick cases
    REZERO_BENCH_ALL=1 python -m pytest bench --benchmark-only    # every case
    REZERO_BENCH_FILTER='op/rezero_residual/fwd\\+bwd' python -m pytest bench --benchmark-only
    python -m pytest bench --benchmark-only --benchmark-group-by=group --benchmark-compare ...

Environment: ``REZERO_BENCH_ALL=1`` every case (default: the ``--quick`` ones),
``REZERO_BENCH_FILTER`` a regular expression on case names, ``REZERO_BENCH_TINY=1`` tiny sizes,
``REZERO_BENCH_COMPILE=1`` include the ``torch.compile`` baseline.

Each test times one variant of one case; a case's variants share one build (inputs, weights)
and one benchmark group, so pytest-benchmark's table puts them side by side.  Unlike the CLI,
pytest-benchmark runs the variants one after another, not interleaved: on a busy machine prefer
``python -m bench``, whose ratios come from alternating rounds.
"""
from __future__ import annotations

import os

import pytest

pytest.importorskip("pytest_benchmark")

from bench import cases  # noqa: E402

CFG = cases.Config(device="cuda" if cases.torch.cuda.is_available() else "cpu",
                   compile=os.environ.get("REZERO_BENCH_COMPILE") == "1",
                   tiny=os.environ.get("REZERO_BENCH_TINY") == "1")
CFG = cases.Config(**{**CFG.__dict__, "backends": cases.default_backends(CFG.device)})
SELECTED = cases.select(quick=os.environ.get("REZERO_BENCH_ALL") != "1",
                        pattern=os.environ.get("REZERO_BENCH_FILTER"))
PARAMS = [pytest.param(c, v, id=f"{c.name}::{v}") for c in SELECTED for v in c.variant_names(CFG)]

_built = {}


def _build(case):
    """One case built at a time (its variants are consecutive tests)."""
    if case.name not in _built:
        _built.clear()
        _built[case.name] = case.build(CFG)
    return _built[case.name]


@pytest.mark.parametrize("case,variant", PARAMS)
def test_bench(benchmark, case, variant):
    built = _build(case)
    benchmark.group = case.name
    benchmark.extra_info.update(shape=built.shape, variant=variant, **case.params)
    if variant in built.compile_s:
        benchmark.extra_info["compile_s"] = built.compile_s[variant]
    if variant in built.bytes:
        benchmark.extra_info["bytes_per_call"] = built.bytes[variant]
    if built.tokens:
        benchmark.extra_info["tokens_per_call"] = built.tokens
    benchmark(built.variants[variant])
