#!/usr/bin/env bash
# Set up this checkout and run its main job or its tests.
#   ./dev.sh demo    set up, then print fused vs. reference timings (python -m bench --quick)
#   ./dev.sh test    set up, then run the test suite
#   ./dev.sh setup   set up only
#   ./dev.sh oldest  the test suite on the oldest versions supported, torch 2.11 and triton 3.6
#                    (the GPU machines' versions), in a venv of their own (about 5 GB)
#   ./dev.sh newest  the test suite on the newest torch release (2.15), in a venv of its own
#   ./dev.sh gpu [DIR]  on a GPU machine: build with the CUDA kernels, run the device-generic
#                    tests on CUDA, compute-sanitizer over a CUDA subset, the GPU benchmark;
#                    logs, JSON, PNG and versions into DIR (default bench/results/gpu)
# Set-up never replaces an installed torch: it installs torch==2.13.0 only where none is
# installed, installs everything else with --no-deps or alongside the existing torch, and builds
# the extension with --no-build-isolation (an isolated build would fetch a different torch).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

# install_here PYTHON [REQUIREMENT...]: into PYTHON's environment, the REQUIREMENTs, the build
# requirements (pyproject.toml: --no-build-isolation leaves them to us) and the test and
# benchmark dependencies (HF transformers, for the integration and its tests, and accelerate,
# which HF's Trainer needs: both take the torch that is there); the original package; then this
# directory's package, built against the torch there.  Chained with && so that a caller's
# subshell tested by || stops at the first failure too.
install_here() {
  local py=$1
  shift
  "$py" -m pip install -q "$@" "setuptools>=64" wheel pytest pytest-benchmark expecttest ninja \
      matplotlib scikit-learn gensim "transformers==5.24.0" "accelerate==1.16.0" &&
    "$py" -m pip install -q --no-deps "rezero==0.1.0" &&
    "$py" -m pip install -q --no-build-isolation --no-deps -e . &&
    "$py" -c "import torch, triton, rezero_kernels as r; print('torch', torch.__version__, '| triton', triton.__version__, '| backends', r.backends())"
}

setup() {
  if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "torch==2.13.0"
  fi
  install_here "$PY" numpy triton
}

# The whole GPU validation in one command, for a lent GPU machine (no network: installs nothing).
# Each stage has a time limit; the benchmark's is whatever the stages before it left of 8 min
# 30 s (at least 130 s, as their limits add up to 6 min 20 s), so the run ends in under 9
# minutes; a failing stage is reported and the next one still runs; the exit status is non-zero
# if any stage failed.  The cuda backend's tests run before the triton backend's, and the
# benchmark stops starting cases 40 s before its limit (it still writes what it measured).
gpu() {
  local out=${1:-bench/results/gpu} failed=()
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "dev.sh gpu: no CUDA GPU is visible (torch.cuda.is_available() is False)" >&2
    exit 1
  fi
  local deadline=$((SECONDS + 510))
  mkdir -p "$out"
  rm -f "$out"/*.log
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  stage() {  # stage NAME SECONDS LOG COMMAND...: run, time out, record failure
    local name=$1 limit=$2 log=$3 t0=$SECONDS rc=0
    shift 3
    timeout "$limit" "$@" >> "$log" 2>&1 || rc=$?
    printf '%-10s %s in %ss (log: %s)\n' "$name" "$([ $rc = 0 ] && echo ok || echo "FAILED rc=$rc")" \
      "$((SECONDS - t0))" "$log"
    [ $rc = 0 ] || failed+=("$name")
  }
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| triton', triton.__version__)"
    nvcc --version | tail -1; git rev-parse HEAD; } > "$out/versions.txt" 2>&1
  cat "$out/versions.txt"
  local arch
  arch=$("$PY" -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")
  stage build 90 "$out/build.log" env REZERO_CUDA=1 REZERO_CUDA_ARCH="$arch" MAX_JOBS="$(nproc)" \
    "$PY" setup.py build_ext --inplace
  if [ ${#failed[@]} -gt 0 ]; then
    tail -20 "$out/build.log"
    echo "build failed: carrying on with the triton backend"
  fi
  "$PY" -c "import rezero_kernels as r; print('backends', r.backends())"
  local xdist=()
  "$PY" -c "import xdist" 2>/dev/null && xdist=(-n "$(nproc)")
  stage tests-cuda 130 "$out/tests.log" "$PY" -m pytest -q -p no:cacheprovider -rfE \
    "${xdist[@]}" tests/test_parity.py tests/test_gpu.py tests/test_compiled_ops.py -k "not triton"
  tail -3 "$out/tests.log" || true
  # each Triton kernel with its first config (one compile per variant, no autotune benchmark);
  # test_gpu.py's every-config test checks the other configs against it
  stage tests-triton 90 "$out/tests_triton.log" env REZERO_TRITON_CONFIG=0 \
    "$PY" -m pytest -q -p no:cacheprovider -rfE "${xdist[@]}" \
    tests/test_parity.py tests/test_gpu.py tests/test_triton_backend.py -k "triton"
  tail -3 "$out/tests_triton.log" || true
  local subset="misaligned or empty_tensors or never_reads or bitwise or current_stream or (large_bias_act and cuda)"
  if command -v compute-sanitizer > /dev/null; then
    for tool in memcheck racecheck; do
      stage "$tool" 35 "$out/sanitizer.log" compute-sanitizer --tool "$tool" --error-exitcode 9 \
        "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "$subset"
    done
    grep -h "ERROR SUMMARY\|RACECHECK SUMMARY\|passed\|failed" "$out/sanitizer.log" || true
  else
    echo "compute-sanitizer not found: skipped"
  fi
  local bench_limit=$((deadline - SECONDS))
  stage bench "$bench_limit" "$out/bench.log" "$PY" -m bench --gpu --no-peak \
    --budget "$((bench_limit - 40))" --out "$out"
  sed -n '/== Headline/,/== All results/p' "$out/bench.log" | head -n -1 || true
  if [ ${#failed[@]} -gt 0 ]; then echo "dev.sh gpu: FAILED: ${failed[*]}"; return 1; fi
  echo "dev.sh gpu: all stages passed; results in $out"
}

# in_venv NAME PIP_ENV TORCH NUMPY: the test suite in a venv of its own (under the cache; PyPI's
# torch is the CUDA build, with its CUDA libraries: several GB, a minute or two to fetch), with
# TORCH and NUMPY installed there (PIP_ENV: a VAR=value for its installs, e.g. a pip
# configuration to ignore) and the extension built into a copy of this working tree (uncommitted
# files included, the checkout's own build left alone), with the CUDA kernels where nvcc is
# found, as on a GPU machine.
in_venv() {
  local name=$1 pip_env=$2 torch_req=$3 numpy_req=$4 venv copy
  venv=${REZERO_KERNELS_CACHE:-$HOME/.cache/rezero_kernels}/venv-$name-py$("$PY" -c \
    "import sys; print('%d.%d' % sys.version_info[:2])")
  [ -x "$venv/bin/python" ] || { "$PY" -m venv "$venv" && "$venv/bin/pip" install -q -U pip; }
  copy=$(mktemp -d)
  git ls-files -z -co --exclude-standard | tar -c --null -T - -f - | tar -x -C "$copy" -f -
  # CUDA where nvcc says it is (torch guesses from nvcc's path, which may be a wrapper script)
  local cuda_home=${CUDA_HOME:-} rc=0
  if [ -z "$cuda_home" ] && command -v nvcc > /dev/null; then
    cuda_home=$(nvcc --dryrun -E -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p')
  fi
  # (a subshell tested by || ignores set -e: hence the &&; the install tests build too)
  ( cd "$copy" && export CUDA_HOME=$cuda_home REZERO_CUDA_ARCH=${REZERO_CUDA_ARCH:-90} &&
    { [ -z "$pip_env" ] || export "${pip_env?}"; } &&
    install_here "$venv/bin/python" "$torch_req" "$numpy_req" &&
    "$venv/bin/python" -m pytest tests -q -p no:cacheprovider ) || rc=$?
  rm -rf "$copy"
  return $rc
}

# The oldest versions we support, and the GPU machines' ones, checked on any machine: torch 2.11
# with the triton it requires (3.6), numpy below 2.4, with which triton 3.6's interpreter cannot
# run (about 5 GB).
oldest() { in_venv torch2.11 "" "torch==2.11.0" "numpy<2.4"; }

# The newest torch release (2.15 as written; NEWEST_TORCH overrides), whatever the pip
# configuration of this machine caps torch at: its constraint file is ignored for that one
# install (PIP_CONFIG_FILE=/dev/null).  About 3 GB.
newest() {
  in_venv "torch${NEWEST_TORCH:-2.15.0}" "PIP_CONFIG_FILE=/dev/null" \
    "torch==${NEWEST_TORCH:-2.15.0}" "numpy"
}

case "${1:-}" in
  setup) setup ;;
  demo) setup; "$PY" -m bench --quick ;;
  test) setup; "$PY" -m pytest tests -q -p no:cacheprovider ;;
  oldest) oldest ;;
  newest) newest ;;
  gpu) gpu "${2:-}" ;;
  *) echo "usage: ./dev.sh {setup|demo|test|oldest|newest|gpu [DIR]}" >&2; exit 2 ;;
esac
