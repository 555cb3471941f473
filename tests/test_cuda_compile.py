"""The CUDA sources build without a GPU: every csrc/cuda/*.cu compiles with ``nvcc -c`` for
sm_80 and sm_90 (when nvcc is on PATH) and no kernel instantiation spills registers or uses
local memory (``-Xptxas -v``), the kernels and launchers.h stay free of torch headers, and
binding.cpp type-checks against torch's headers and launchers.h (when the CUDA runtime headers
are found).  So a CUDA syntax or type error, or a kernel that outgrows its register budget
(common.cuh, min_blocks_per_sm), fails CI on a machine without a GPU."""
from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "csrc" / "cuda"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))
ARCHS = ("80", "90")
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")


# torch's CUDAExtension compiles with these (no implicit half/bfloat16 conversions); its
# --expt-relaxed-constexpr is left out so the kernels need no relaxed rules.
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]


def torch_cpp_standard() -> str:
    """The -std flag torch's BuildExtension adds when an extension passes none (what setup.py
    relies on): read from its source, as torch exposes it nowhere else."""
    import inspect
    import re
    from torch.utils import cpp_extension
    found = re.findall(r"c\+\+(\d\d)", inspect.getsource(cpp_extension.BuildExtension))
    assert found, "torch's BuildExtension names no C++ standard"
    return f"-std=c++{max(found)}"


def _nvcc_command(source: Path, arch: str, out: Path) -> list[str]:
    return [NVCC, "-c", torch_cpp_standard(), "-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}",
            *TORCH_NVCC_DEFINES, "-I", str(ROOT / "csrc"), "-Xcompiler", "-fPIC",
            "-Xptxas", "-v", str(source), "-o", str(out)]


@pytest.fixture(scope="module")
def nvcc_results(tmp_path_factory):
    """{(file name, arch): (returncode, output)}, all compiled at once on every core."""
    out_dir = tmp_path_factory.mktemp("nvcc")
    jobs = {(src.name, arch): _nvcc_command(src, arch, out_dir / f"{src.stem}_sm{arch}.o")
            for src in CU_FILES for arch in ARCHS}

    def compile_one(cmd):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        return proc.returncode, proc.stdout + proc.stderr

    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        futures = {key: pool.submit(compile_one, cmd) for key, cmd in jobs.items()}
        return {key: f.result() for key, f in futures.items()}


def test_there_are_cuda_sources():
    assert CU_FILES, f"no .cu files under {CUDA_DIR}"
    assert (CUDA_DIR / "launchers.h").is_file()
    assert (CUDA_DIR / "binding.cpp").is_file()


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", [p.name for p in CU_FILES])
def test_nvcc_compiles(nvcc_results, source, arch):
    returncode, output = nvcc_results[(source, arch)]
    assert returncode == 0, f"nvcc failed for {source} on sm_{arch}:\n{output[-6000:]}"


# ptxas -v, per kernel:  "Function properties for NAME" then
#   "N bytes stack frame, N bytes spill stores, N bytes spill loads"
PTXAS_PROPERTIES = re.compile(r"Function properties for (\S+)\s+(\d+) bytes stack frame, "
                              r"(\d+) bytes spill stores, (\d+) bytes spill loads")


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", [p.name for p in CU_FILES])
def test_no_kernel_spills_or_uses_local_memory(nvcc_results, source, arch):
    """A spill costs local-memory traffic in a memory-bound kernel; each kernel's
    __launch_bounds__ leaves it enough registers (common.cuh, min_blocks_per_sm)."""
    returncode, output = nvcc_results[(source, arch)]
    if returncode != 0:
        pytest.skip("does not compile (test_nvcc_compiles reports it)")
    kernels = PTXAS_PROPERTIES.findall(output)
    assert kernels, f"no ptxas -v report for {source} on sm_{arch}:\n{output[-3000:]}"
    bad = [f"{name}: {stack} B stack frame, {stores} B spill stores, {loads} B spill loads"
           for name, stack, stores, loads in kernels if int(stack) or int(stores) or int(loads)]
    assert not bad, (f"{len(bad)} of {len(kernels)} kernels in {source} spill or use local "
                     f"memory on sm_{arch}:\n" + "\n".join(bad))


TORCH_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"](torch|ATen|c10)/', re.MULTILINE)


@pytest.mark.parametrize("path", [p.name for p in sorted(CUDA_DIR.glob("*.cu"))
                                  + sorted(CUDA_DIR.glob("*.cuh")) + [CUDA_DIR / "launchers.h"]])
def test_kernels_include_no_torch_headers(path):
    text = (CUDA_DIR / path).read_text()
    found = TORCH_INCLUDE.findall(text)
    assert not found, f"{path} includes torch headers ({found}); only binding.cpp may"


def _cuda_include_dirs() -> list[str]:
    """The CUDA runtime header directories nvcc itself uses."""
    if NVCC is None:
        return []
    proc = subprocess.run([NVCC, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                          capture_output=True, text=True)
    dirs = []
    for flags in re.findall(r'INCLUDES="([^"]*)"', proc.stdout + proc.stderr):
        dirs += [f[2:] for f in flags.split() if f.startswith("-I")]
    return [d for d in dirs if (Path(d) / "cuda_runtime_api.h").is_file()]


@needs_nvcc
def test_binding_type_checks_against_torch_headers():
    """binding.cpp against the installed torch's headers.  A CPU torch wheel lacks
    c10/cuda/impl/cuda_cmake_macros.h; C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips it (it only
    holds the shared-library export switch)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    cuda_dirs = _cuda_include_dirs()
    if cxx is None or not cuda_dirs:
        pytest.skip("no C++ compiler or CUDA runtime headers")
    from torch.utils import cpp_extension
    cmd = [cxx, torch_cpp_standard(), "-fsyntax-only", "-Wall", "-Werror",
           "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-I", str(ROOT / "csrc")]
    for d in cpp_extension.include_paths() + [sysconfig.get_paths()["include"]] + cuda_dirs:
        cmd += ["-isystem", d]
    proc = subprocess.run(cmd + [str(CUDA_DIR / "binding.cpp")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"binding.cpp does not compile:\n{proc.stderr[-6000:]}"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
