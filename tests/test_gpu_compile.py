"""The Triton kernels, checked for real GPUs without one.

Pure Python (the ops run in Triton's interpreter, their launches observed, not run): every
launch runs under a guard for its tensors' device; autotuning keys on shape classes; launch
grids stay within CUDA's limits for any size and give a GPU enough programs; the GEMM's configs
are pruned, before any is compiled, to those of its dtype and operand alignment that fit the
device.

Ahead-of-time compiles (tests/aot_compile.py): every kernel variant the ops can launch compiles
for sm_80 and sm_90, with the installed Triton and with Triton 3.6 (what the GPU machines run;
fetched once into ``CACHE``, never installed), and
  * no elementwise kernel spills or uses local memory (but for ptxas's occupancy trade of one
    value kept out of loops: ``OCCUPANCY_SPILL_BYTES``);
  * every GEMM config the prune lets launch fits the target's shared memory (A100 163 KiB,
    H100 227 KiB) without spilling, and the prune's shared-memory estimate bounds what Triton
    allocates; every GEMM dtype keeps at least one config on both.
Compiled results are cached in ``CACHE/aot`` (outside the checkout, so a CI machine keeps them
between clones) by a hash of each kernel's source, the Triton version and the variant.
``REZERO_KERNELS_CACHE`` moves the cache.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from rezero_kernels import triton_ops as T  # noqa: E402
from rezero_kernels.triton_ops import common, fused_linear, tuning  # noqa: E402

KERNELS = {"_residual_fwd", "_residual_bwd", "_bias_act_fwd", "_bias_act_bwd", "_gated_act_fwd",
           "_gated_act_bwd", "_linear_kernel"}
GEMM = "_linear_kernel"
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # A100, H100: shared memory per block (opt-in)


def _gpu_configs(make):
    """The configs a GPU run uses (this process runs the interpreter's)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        return make()


def _observe_launches(fn):
    """[(kernel, grid, device, args, kwargs)] of the launches fn() makes, none run."""
    launches = []
    common.launch_observer = lambda *launch: launches.append(launch)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("TRITON_INTERPRET", "0")  # row_groups and the GEMM's codes as on a GPU
            fn()
    finally:
        common.launch_observer = None
    return launches


def _all_ops(rows, channels, device="meta", dtype=torch.bfloat16):
    """Every op forward and backward on (rows, channels) data; the GEMMs map up to 4096
    channels to as many (the backend functions: meta tensors never reach a public op)."""
    def t(*shape):
        return torch.empty(shape, dtype=dtype, device=device).requires_grad_(True)

    def backward(out):
        out.backward(torch.empty_like(out))

    def run():
        x, alpha, bias = t(rows, channels), t(channels), t(channels)
        backward(T.rezero_residual(x, t(rows, channels), alpha, 0.1))
        backward(T.bias_act_dropout(x, bias, "gelu", 0.1))
        backward(T.gated_act_dropout(t(rows, 2 * channels), "silu", 0.1))
        n = min(channels, 4096)
        inp, w, b, a = t(rows, n), t(n, n), t(n), t(n)
        backward(T.linear_bias_act_dropout(inp, w, b, "gelu", 0.1))
        backward(T.rezero_linear(t(rows, n), inp, w, b, a, 0.1))
    return run


# --- device guard ------------------------------------------------------------------------------

def test_every_launch_passes_its_tensors_device():
    launches = _observe_launches(_all_ops(9, 40))
    assert {kernel.fn.__name__ for kernel, *_ in launches} == KERNELS
    for kernel, grid, device, args, kwargs in launches:
        assert device == torch.device("meta"), (kernel.fn.__name__, device)


def test_launch_runs_under_the_device_of_its_tensors(monkeypatch):
    """A tensor on cuda:1 while cuda:0 is current: Triton launches on the current device, so
    launch() must make the tensors' device current around the launch (and only then: the
    guard costs host time)."""
    entered = []

    @contextlib.contextmanager
    def device_guard(device):
        entered.append(("enter", torch.device(device)))
        yield
        entered.append(("exit", torch.device(device)))

    class Launcher:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: entered.append(("launch", grid))

    monkeypatch.setattr(torch.cuda, "device", device_guard)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(common, "wrap_triton", lambda kernel: Launcher())
    common.launch(None, (1,), torch.device("cuda", 1))
    assert entered == [("enter", torch.device("cuda", 1)), ("launch", (1,)),
                       ("exit", torch.device("cuda", 1))]
    for device in (torch.device("cuda", 0), torch.device("cpu")):
        entered.clear()
        common.launch(None, (1,), device)
        assert entered == [("launch", (1,))]


# --- autotuning keys ---------------------------------------------------------------------------

def _tuning_keys(rows, channels):
    """{kernel name: the autotuner cache key of each launch} as Triton's Autotuner.run forms it
    (its key arguments, then the dtypes of its tensor arguments)."""
    keys = {}
    for kernel, grid, device, args, kwargs in _observe_launches(
            _all_ops(rows, channels, device="cpu")):
        named = {**dict(zip(kernel.arg_names, args)), **kwargs}
        key = [named[k] for k in kernel.keys if k in named]
        key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
        keys.setdefault(kernel.fn.__name__, []).append(tuple(key))
    return keys


def test_autotuning_keys_on_shape_classes_not_row_counts():
    """A new batch x sequence length in the same power-of-two bucket reuses every tuning (it
    used to re-benchmark every config for each row count, and fail under graph capture)."""
    assert _tuning_keys(33, 40) == _tuning_keys(60, 40) == _tuning_keys(64, 40)
    assert _tuning_keys(33, 40) != _tuning_keys(65, 40)
    assert set(_tuning_keys(33, 40)) == KERNELS


def test_warmup_launches_every_kernel_once_per_bucket():
    launches = _observe_launches(lambda: tuning.warmup([33, 60, 200], 17, 40, device="cpu",
                                                       dropout_p=0.1))
    assert {kernel.fn.__name__ for kernel, *_ in launches} == KERNELS
    rows = {args[kernel.arg_names.index("M")] for kernel, _, _, args, _ in launches
            if kernel.fn.__name__ == "_residual_fwd"}
    assert rows == {33, 200}  # 60 shares 33's bucket


# --- launch grids ------------------------------------------------------------------------------

MAX_AXIS0, MAX_AXIS12 = 2**31 - 1, 65535
# (rows, channels) a user may pass: flattened 1-D tensors of up to 2^35 elements (an op holds
# three such tensors: 192 GiB in bf16, more than any GPU's memory), single columns, and
# ordinary activations
SIZES = [(1, 1), (1, 2**21 + 7), (1, 2**35), (2**35, 1), (3, 2**33), (2**17, 2**18),
         (4096, 2048), (8192, 512), (7, 33)]


def _grid_sizes(launches):
    """(kernel name, config, grid) of each launch for every GPU config its kernel's prune
    keeps (the GEMM's for an H100)."""
    configs = {"gemm": _gpu_configs(common.gemm_configs),
               "forward": _gpu_configs(common.elementwise_configs),
               "reduction": _gpu_configs(lambda: common.elementwise_configs(reduction=True))}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        mp.setattr(common, "shared_limit", lambda device: SHARED_LIMIT[90])
        for kernel, grid, device, args, kwargs in launches:
            name = kernel.fn.__name__
            kind = ("gemm" if name == GEMM else
                    "reduction" if "group_rows" in kernel.arg_names else "forward")
            kept = configs[kind]
            if kernel.early_config_prune is not None:
                kept = kernel.early_config_prune(kept, dict(zip(kernel.arg_names, args)),
                                                 **kwargs)
            assert kept, (name, "no config left")
            for config in kept:
                yield name, config, grid(config.kwargs)


@pytest.mark.parametrize("rows,channels", SIZES, ids=str)
def test_launch_grids_stay_within_cuda_limits(rows, channels):
    """The real launchers, on meta tensors of every size, for every config: axis 0 below
    2^31, axes 1 and 2 below 65535 (they used to carry cdiv(C, BLOCK_C): a launch failure for
    C > 2^21 at BLOCK_C = 32)."""
    launches = _observe_launches(_all_ops(rows, channels))
    assert launches
    for name, config, grid in _grid_sizes(launches):
        assert 1 <= grid[0] <= MAX_AXIS0, (name, config.kwargs, grid)
        assert all(1 <= g <= MAX_AXIS12 for g in grid[1:]), (name, config.kwargs, grid)


def test_column_reductions_give_a_gpu_enough_programs():
    """4096 x 2048 (measured 3x slower than the CUDA kernels on an H100 with 128 programs for
    132 SMs): every config now launches at least 1024 programs, still with one partial row per
    row group."""
    launches = _observe_launches(_all_ops(4096, 2048))
    reductions = [(n, c, g) for n, c, g in _grid_sizes(launches)
                  if n in ("_residual_bwd", "_bias_act_bwd")]
    assert reductions
    for name, config, grid in reductions:
        assert grid[0] >= 1024, (name, config.kwargs, grid)
    assert common.row_groups(4096) <= common.MAX_GROUPS


# --- GEMM configs ------------------------------------------------------------------------------

@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("arch", sorted(SHARED_LIMIT))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=str)
def test_every_gemm_dtype_keeps_a_config(dtype, arch, aligned):
    configs = common.select_gemm_configs(_gpu_configs(common.gemm_configs), dtype, aligned,
                                         SHARED_LIMIT[arch])
    assert configs, f"no GEMM config for {dtype} (aligned: {aligned}) fits sm_{arch}"


def test_a_pinned_config_leaves_one_that_suits_the_launch(monkeypatch):
    """REZERO_TRITON_CONFIG=i (common.PINNED_CONFIG) leaves the autotuner the i-th of the configs
    the prune functions keep (the last where fewer suit), so a pinned test run compiles one
    variant per kernel; unset, every config that suits stays."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(common, "shared_limit", lambda device: SHARED_LIMIT[90])
    elementwise = _gpu_configs(common.elementwise_configs)
    gemm = _gpu_configs(common.gemm_configs)
    a = b = torch.empty(64, 64, dtype=torch.float64)
    cases = [(common.elementwise_prune, elementwise, {"M_BUCKET": 2**20, "C": 3}),
             (common.elementwise_prune, elementwise, {"M_BUCKET": 4096, "C": 512}),
             (common.gemm_prune, gemm, {"a_ptr": a, "b_ptr": b})]
    for prune, configs, args in cases:
        monkeypatch.setattr(common, "PINNED_CONFIG", None)
        suits = prune(configs, args)
        assert len(suits) > 1
        for i in range(len(suits) + 2):
            monkeypatch.setattr(common, "PINNED_CONFIG", i)
            assert prune(configs, args) == [suits[min(i, len(suits) - 1)]]


def test_a_pinned_config_must_be_an_index():
    env = {**os.environ, "REZERO_TRITON_CONFIG": "first", "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", "import rezero_kernels.triton_ops"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "REZERO_TRITON_CONFIG must be a config index" in res.stderr


def test_gemm_prune_is_wired_into_the_autotuner(monkeypatch):
    """The GEMM's autotuner prunes with gemm_prune, which keeps the tiles of a launch's dtype
    and operand alignment that fit its device (the device's limit is patched)."""
    kernel = fused_linear._linear_kernel
    assert kernel.early_config_prune is common.gemm_prune
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(common, "shared_limit", lambda device: SHARED_LIMIT[80])
    configs = _gpu_configs(common.gemm_configs)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for k, aligned in ((64, True), (33, False)):
            a, b = torch.empty(8, k, dtype=dtype), torch.empty(16, k, dtype=dtype)
            kept = common.gemm_prune(configs, {"a_ptr": a, "b_ptr": b})
            assert common.gemm_operands_aligned(a, b) == aligned
            assert kept and kept == common.select_gemm_configs(configs, dtype, aligned,
                                                               SHARED_LIMIT[80])
    a = torch.empty(8, 65)[:, 1:]  # 64 columns, but starting 4 bytes into the storage
    assert not common.gemm_operands_aligned(a, torch.empty(16, 64))
    assert common.gemm_operands_aligned(torch.empty(64, 32).t(), torch.empty(16, 64))


# --- ahead-of-time compiles --------------------------------------------------------------------

TESTS = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("REZERO_KERNELS_CACHE", Path.home() / ".cache" / "rezero_kernels"))
GPU_MACHINE_TRITON = "3.6.0"


def _fetch_triton(version: str) -> Path:
    """A folder holding ``triton`` ``version`` unpacked (for PYTHONPATH), fetched once."""
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    target = CACHE / f"triton-{version}-{tag}"
    if (target / "triton" / "__init__.py").is_file():
        return target
    wheels = CACHE / "wheels"
    pattern = f"triton-{version}-{tag}-*.whl"
    if not list(wheels.glob(pattern)):
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                               "--only-binary=:all:", f"triton=={version}", "-d", str(wheels)],
                              capture_output=True, text=True, timeout=900)
        if proc.returncode != 0 or not list(wheels.glob(pattern)):
            pytest.fail(f"could not fetch triton=={version} (the GPU machines' Triton) with "
                        f"`pip download`; this check compiles with it. Put its {tag} wheel in "
                        f"{wheels} by hand or allow access to PyPI.\n{proc.stderr[-3000:]}")
    wheel = sorted(wheels.glob(pattern))[-1]
    partial = Path(tempfile.mkdtemp(dir=CACHE, prefix=".unpack-"))
    with zipfile.ZipFile(wheel) as z:
        z.extractall(partial)
    for tool in (partial / "triton" / "backends" / "nvidia" / "bin").iterdir():
        tool.chmod(0o755)  # zip extraction drops the executable bits of ptxas & co.
    partial.rename(target)
    return target


def _versions() -> list:
    """The installed Triton's version and the GPU machines' (once if they are the same)."""
    return list(dict.fromkeys([triton.__version__, GPU_MACHINE_TRITON]))


@pytest.fixture(scope="module")
def compiled():
    """{Triton version: aot_compile.py's report}."""
    CACHE.mkdir(parents=True, exist_ok=True)
    reports = {}
    for version in _versions():
        with tempfile.TemporaryDirectory() as tmp:
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            env["TRITON_CACHE_DIR"] = str(Path(tmp) / "triton-cache")
            if version != triton.__version__:
                env["PYTHONPATH"] = os.pathsep.join([str(_fetch_triton(version))] + [
                    p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
            out = Path(tmp) / "results.json"
            proc = subprocess.run([sys.executable, str(TESTS / "aot_compile.py"), str(out),
                                   "--cache", str(CACHE / "aot")],
                                  env=env, capture_output=True, text=True, timeout=3600)
            assert proc.returncode == 0, (f"aot_compile.py failed with triton {version}:\n"
                                          f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
            report = json.loads(out.read_text())
            assert report["triton"] == version, f"PYTHONPATH did not provide triton {version}"
            reports[version] = report
    return reports


# ptxas may keep one value in local memory to reach an occupancy step rather than take one more
# register (seen: 4-8 bytes in float64 backward kernels, stored before the row loop and loaded
# after it: two accesses a program).  A register shortage spills tens to thousands of bytes.
# So a kernel passes with no stack frame, or with at most OCCUPANCY_SPILL_BYTES of it never
# touched inside a loop.
OCCUPANCY_SPILL_BYTES = 8


def _spills(r) -> bool:
    return bool(r["local"] or r["stack"] > OCCUPANCY_SPILL_BYTES
                or (r["stack"] and r["local_in_loops"]))


def _fmt(r) -> str:
    return f"{r['kernel']} sm_{r['arch']} [{r['variant']}] {r['config']}"


def _usage(r) -> str:
    return (f"stack {r['stack']} B ({r['local_in_loops']} accesses in loops), local "
            f"{r['local']} B, {r['regs']} registers")


@pytest.mark.parametrize("version", _versions())
def test_every_variant_compiles(compiled, version):
    results = compiled[version]["results"]
    assert {r["kernel"] for r in results} == KERNELS
    assert {r["arch"] for r in results} == set(SHARED_LIMIT)
    failed = [r for r in results if not r["ok"]]
    assert not failed, f"{len(failed)} of {len(results)} variants do not compile:\n" + "\n".join(
        f"{_fmt(r)}\n    {r['error'].strip().splitlines()[-1] if r['error'].strip() else ''}"
        for r in failed[:20])


@pytest.mark.parametrize("version", _versions())
def test_elementwise_kernels_do_not_spill(compiled, version):
    bad = [r for r in compiled[version]["results"]
           if r["ok"] and r["kernel"] != GEMM and _spills(r)]
    assert not bad, "elementwise kernels with spills or local memory:\n" + "\n".join(
        f"{_fmt(r)}: {_usage(r)}" for r in bad[:20])


@pytest.mark.parametrize("version", _versions())
def test_launchable_gemm_configs_fit_without_spilling(compiled, version):
    """Every config the prune lets launch (the report holds only those) fits and does not
    spill; the prune's estimate bounds the shared memory Triton asks for."""
    bad = []
    for r in compiled[version]["results"]:
        if not r["ok"] or r["kernel"] != GEMM:
            continue
        estimate = common.gemm_shared_bytes(tuple(r["tile"]), r["element_size"])
        if _spills(r) or r["shared"] > min(SHARED_LIMIT[r["arch"]], estimate):
            bad.append(f"{_fmt(r)}: {_usage(r)}, shared {r['shared']} B (estimate {estimate})")
    assert not bad, "GEMM configs that can launch but spill or do not fit:\n" + "\n".join(bad[:30])
