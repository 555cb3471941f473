"""Benchmarks of rezero-kernels: ``python -m bench --quick`` (see ``bench/__main__.py``).

Modules: ``cases`` (what is measured, shared by the CLI and the pytest-benchmark files),
``timing`` (interleaved medians), ``roofline`` (copy bandwidth, GEMM+attention floor),
``memory`` (saved-for-backward bytes, peak memory), ``runner`` (one case -> result rows),
``targets`` (PASS/MISS), ``report`` (tables, JSON, CSV, PNG).  ``reproduce_*.py`` are the paper
reproductions (separate scripts).
"""
