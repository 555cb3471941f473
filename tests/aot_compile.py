"""Compile every Triton kernel variant the ops can launch, for real GPU targets, on a machine
without a GPU; report each one's resources.  Run by tests/test_gpu_compile.py, once per Triton
version (a Triton other than the installed one is put first on PYTHONPATH):

    python tests/aot_compile.py RESULTS.json --cache DIR [--workers N]

Which variants: the ops themselves say.  ``tuning.warmup`` runs every op forward and backward
for one setting of the public options, and ``common.launch_observer`` records each launch it
makes (kernel, arguments, constexpr flags) instead of running it; ``OPTIONS`` below is the one
table of settings, over dtypes, activations, gates, dropout and shape classes.  Each recorded
launch is specialised as Triton's runtime would specialise it (its own binder: dtypes, None
pointers and unit strides as constexprs, 16-divisible integers), once per autotune config that
survives the kernel's own ``early_config_prune`` on that target (shared memory of an A100 for
sm_80, an H100 for sm_90).

Budget (a cold run of both Triton versions must take under 20 minutes on two cores; a GEMM
variant takes 0.3-2 CPU-seconds to compile, an elementwise one 0.1-1, and about 1500 variants
take 11 CPU-minutes):
  * every launch with the aligned shapes compiles with its first config (the largest tile):
    every kernel x dtypes x flags;
  * the heaviest launches (the most constexpr flags set, for each kernel and set of tensor
    dtypes) compile with every config in bfloat16, float32 and float64 (``ALL_CONFIGS``;
    float16 takes bfloat16's registers), and with their first config in float16;
  * the heaviest launches compile with the odd shapes too: with every config for the GEMM,
    whose prune picks other tiles for unaligned operands, with their first config for the
    elementwise kernels, whose configs do not depend on alignment.

Each result is cached under DIR by a hash of the kernel's source (and the jit functions it
calls), the Triton version, the variant, the config and the target; a run compiles only what
changed.  Results: a JSON list of {kernel, variant, config, tile, element_size, arch, ok,
error, shared, regs, stack, local, local_in_loops, seconds, cpu}; ``shared`` is the dynamic
shared memory Triton launches with; ``regs``, ``stack`` (bytes of stack frame: spills and
local arrays) and ``local`` come from ``cuobjdump --dump-resource-usage`` of the cubin Triton
produced, ``local_in_loops`` (where there is a stack frame) from its SASS; ``cpu`` is the
job's CPU time (its cost on an idle machine).
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("aot_compile.py compiles for GPUs: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from python_ref import ACTIVATIONS  # noqa: E402
from rezero_kernels.triton_ops import common, tuning  # noqa: E402

# The targets, with the shared memory per block (opt-in) of the GPU the early prune assumes.
ARCHS = {80: 163 * 1024, 90: 227 * 1024}
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"

# One table: the public options every variant comes from.  Shape classes: sizes no integer
# specialisation applies to, and sizes divisible by 16 (Triton compiles both differently).
SHAPES = {"odd": dict(rows=33, features=17, hidden=47),
          "aligned": dict(rows=64, features=128, hidden=256)}
OPTIONS = dict(
    dtype=(torch.float32, torch.bfloat16, torch.float16, torch.float64),
    activation=ACTIVATIONS,  # every row of python_ref's table
    per_channel=(False, True),
    residual="same or float32",  # float32 x and gate with 16-bit operands: autocast
    shape=tuple(SHAPES),
)
ALL_CONFIGS = (torch.float32, torch.bfloat16, torch.float64)
RESULT_FORMAT = 2  # part of every cache key: bump it when a result gains or changes a field
TILE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K")


def settings():
    """(shape class, keyword arguments) of every warmup() call of the table (dropout on and off
    are both inside one call)."""
    for dtype, act, per_channel, shape in itertools.product(
            OPTIONS["dtype"], OPTIONS["activation"], OPTIONS["per_channel"], OPTIONS["shape"]):
        residuals = [dtype] + ([torch.float32] if dtype in (torch.bfloat16, torch.float16) else [])
        for residual in residuals:
            yield shape, dict(dtype=dtype, activation=act, per_channel=per_channel,
                              residual_dtype=residual, dropout_p=0.1, frozen=True,
                              **SHAPES[shape])


def record_launches():
    """[(shape class, kernel, args, kwargs)] of every launch the table's warmup() calls make."""
    launches = []
    try:
        for shape, kwargs in settings():
            common.launch_observer = lambda kernel, grid, device, args, kw: launches.append(
                (shape, kernel, args, kw))
            tuning.warmup(device="cpu", **kwargs)
    finally:
        common.launch_observer = None
    return launches


def _dtypes(args):
    """The floating dtypes among a launch's tensors (its data, not which pointers are None)."""
    return tuple(sorted({str(a.dtype) for a in args
                         if isinstance(a, torch.Tensor) and a.is_floating_point()}))


def config_counts(launches):
    """How many of its configs (after the prune) each launch compiles with: see Budget."""
    def weight(kwargs):
        return sum(1 for v in kwargs.values() if v)

    heaviest = {}
    for shape, kernel, args, kwargs in launches:
        group = (kernel.fn.__name__, _dtypes(args))
        heaviest[group] = max(heaviest.get(group, 0), weight(kwargs))
    counts = []
    for shape, kernel, args, kwargs in launches:
        heavy = weight(kwargs) == heaviest[(kernel.fn.__name__, _dtypes(args))]
        by_alignment = kernel.early_config_prune is common.gemm_prune
        if heavy and args[0].dtype in ALL_CONFIGS and (shape == "aligned" or by_alignment):
            counts.append(None)
        else:
            counts.append(1 if heavy or shape == "aligned" else 0)
    return counts


def describe(fn, signature, constexprs, attrs):
    """A readable name of a variant: its tensor dtypes, constexpr values (unit strides and
    None pointers included) and the integers specialised as multiples of 16."""
    names = fn.arg_names
    parts = [f"{k}={v}" for k, v in signature.items() if v.startswith("*")]
    parts += [f"{names[path[0]]}={value}" for path, value in sorted(constexprs.items())]
    parts += [f"{names[path[0]]}%16" for path, value in sorted(attrs.items())
              if value and not signature[names[path[0]]].startswith("*")]
    return " ".join(parts)


def jobs_for(launches):
    """Unique compile jobs: dicts with the kernel, its specialisation and the cache key."""
    jobs, seen = [], set()
    for arch, shared_limit in ARCHS.items():
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        common.shared_limit = lambda device, limit=shared_limit: limit
        binders = {}
        for (shape, kernel, args, kwargs), count in zip(launches, config_counts(launches)):
            fn = kernel.fn
            if fn not in binders:
                binders[fn] = create_function_from_signature(fn.signature, fn.params, backend)
            configs = kernel.configs
            if kernel.early_config_prune is not None:
                configs = kernel.early_config_prune(configs, dict(zip(kernel.arg_names, args)),
                                                    **kwargs)
            for config in configs[:count]:
                kw = dict(kwargs, **config.all_kwargs(), debug=False)
                bound, specialization, options = binders[fn](*args, **kw)
                options, signature, constexprs, attrs = fn._pack_args(
                    backend, kw, bound, specialization, options)
                source = triton.compiler.ASTSource(fn=fn, signature=signature,
                                                   constexprs=constexprs, attrs=attrs)
                opts = {k: options.__dict__[k] for k in ("num_warps", "num_stages", "num_ctas")}
                key = hashlib.sha256(json.dumps(
                    [RESULT_FORMAT, source.hash(), triton.__version__, arch, opts]
                ).encode()).hexdigest()
                if key in seen:
                    continue
                seen.add(key)
                jobs.append(dict(key=key, kernel=fn.__name__, arch=arch, source=source,
                                 target=target, options=options.__dict__,
                                 variant=describe(fn, signature, constexprs, attrs),
                                 config=f"{config.kwargs} stages={config.num_stages} "
                                        f"warps={config.num_warps}",
                                 tile=[config.kwargs.get(k) for k in TILE_KEYS]
                                 + [config.num_stages, config.num_warps],
                                 element_size=args[0].element_size()))
    return jobs


SASS_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")


def local_accesses_in_loops(sass: str) -> int:
    """How many local-memory loads and stores (STL, LDL) of a kernel's SASS lie inside a loop
    (between a backward branch and its target)."""
    code = [(int(address, 16), text) for address, text in SASS_INSTRUCTION.findall(sass)]
    loops = [(int(target, 16), address) for address, text in code
             for target in re.findall(r"\bBRA\b[^;]*?0x([0-9a-f]+)", text)
             if int(target, 16) < address]
    return sum(1 for address, text in code if re.search(r"\b(STL|LDL)\b", text)
               and any(start <= address <= end for start, end in loops))


def resource_usage(cubin: bytes) -> dict:
    """Registers, stack frame and local memory of the cubin (cuobjdump), and where its stack
    frame is used, how many local accesses sit inside loops."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        dump = [str(BIN / "cuobjdump"), f.name]
        out = subprocess.run(dump[:1] + ["--dump-resource-usage"] + dump[1:],
                             capture_output=True, text=True, check=True).stdout
        found = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out)}
        in_loops = 0
        if found["STACK"]:
            sass = subprocess.run(dump[:1] + ["-sass"] + dump[1:], capture_output=True,
                                  text=True, check=True).stdout
            in_loops = local_accesses_in_loops(sass)
    return {"regs": found["REG"], "stack": found["STACK"], "local": found["LOCAL"],
            "local_in_loops": in_loops}


JOBS: list = []  # filled before the workers fork: jit functions do not pickle


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas): the cost of a job on an idle
    machine, whatever the load."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def compile_job(index: int) -> dict:
    job = JOBS[index]
    start, cpu = time.time(), _cpu_seconds()
    result = {k: job[k] for k in ("key", "kernel", "variant", "config", "arch", "tile",
                                  "element_size")}
    try:
        kernel = triton.compile(job["source"], target=job["target"], options=job["options"])
        result.update(ok=True, error="", shared=kernel.metadata.shared,
                      **resource_usage(kernel.asm["cubin"]))
    except Exception as error:  # reported, not raised: one bad variant must not hide the rest
        result.update(ok=False, error=f"{type(error).__name__}: {error}"[-3000:])
    result["seconds"] = round(time.time() - start, 2)
    result["cpu"] = round(_cpu_seconds() - cpu, 2)
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("results")
    parser.add_argument("--cache", required=True)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    cache = Path(args.cache) / f"triton-{triton.__version__}"
    cache.mkdir(parents=True, exist_ok=True)

    start = time.time()
    JOBS.extend(jobs_for(record_launches()))
    results, todo = [], []
    for i, job in enumerate(JOBS):
        path = cache / f"{job['key']}.json"
        if path.is_file():
            results.append(json.loads(path.read_text()) | {"cached": True})
        else:
            todo.append(i)
    # longest first (GEMMs), so that the last jobs are short
    todo.sort(key=lambda i: JOBS[i]["kernel"] != "_linear_kernel")
    if todo:
        with multiprocessing.get_context("fork").Pool(args.workers) as pool:
            for result in pool.imap_unordered(compile_job, todo):
                if result["ok"]:  # failures are recompiled next time
                    (cache / f"{result['key']}.json").write_text(json.dumps(result))
                results.append(result | {"cached": False})
    cpu = sum(r["cpu"] for r in results if not r["cached"])
    Path(args.results).write_text(json.dumps(
        {"triton": triton.__version__, "seconds": round(time.time() - start, 1),
         "compiled": len(todo), "cpu": round(cpu), "results": results}))
    print(f"triton {triton.__version__}: {len(JOBS)} variants, {len(todo)} compiled "
          f"({cpu:.0f} CPU s), {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
