#!/usr/bin/env bash
# Set up this checkout and run its main job or its tests.
#   ./dev.sh demo    set up, then print fused vs. reference timings (python -m bench --quick)
#   ./dev.sh test    set up, then run the test suite
#   ./dev.sh setup   set up only
# Set-up never replaces an installed torch: it installs torch==2.13.0 only where none is
# installed, installs everything else with --no-deps or alongside the existing torch, and builds
# the extension with --no-build-isolation (an isolated build would fetch a different torch).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

setup() {
  if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "torch==2.13.0"
  fi
  # the build requirements (pyproject.toml: --no-build-isolation leaves them to us), and the
  # test and benchmark dependencies; none of them requires torch
  "$PY" -m pip install -q "setuptools>=64" wheel numpy pytest pytest-benchmark expecttest ninja \
      triton matplotlib scikit-learn gensim
  "$PY" -m pip install -q --no-deps "rezero==0.1.0"
  "$PY" -m pip install -q --no-build-isolation --no-deps -e .
  "$PY" -c "import torch, rezero_kernels as r; print('torch', torch.__version__, 'backends', r.backends())"
}

case "${1:-}" in
  setup) setup ;;
  demo) setup; "$PY" -m bench --quick ;;
  test) setup; "$PY" -m pytest tests -q -p no:cacheprovider ;;
  *) echo "usage: ./dev.sh {setup|demo|test}" >&2; exit 2 ;;
esac
