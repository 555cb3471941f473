"""pytest configuration of the benchmark files (``python -m pytest bench --benchmark-only``).

Only ``test_bench_*.py`` are benchmarks; the paper reproductions (``reproduce_*.py``) are scripts
and are never collected.  Which cases run is set by environment variables (see
``test_bench_cases.py``)."""
collect_ignore_glob = ["reproduce_*.py"]
