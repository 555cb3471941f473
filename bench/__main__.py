"""``python -m bench``: time the fused ops, layers and stacks against their baselines.

    python -m bench --quick                 # the demo: headline table in about a minute on 2 cores
    python -m bench                         # everything (tens of minutes on a 2-core CPU)
    python -m bench --filter 'op/rezero_residual/.*/fp32/large'  --out my_results
    python -m bench --quick --tuned-malloc  # re-run under MALLOC_MMAP_THRESHOLD_/TRIM_THRESHOLD_
    python -m bench --list                  # the case names
    python -m bench --gpu --out bench/results/gpu   # the GPU run (what ./dev.sh gpu runs)
Writes ``results.json``, ``results.csv`` and ``speedup.png`` to ``--out`` (default
``bench_results``).  ``--tiny`` (or ``REZERO_BENCH_TINY=1``) shrinks every size: a smoke test,
whose figures mean nothing.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "17179869184", "MALLOC_TRIM_THRESHOLD_": "17179869184"}


def _parse(argv):
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="the headline cases only, short timing, no torch.compile baseline")
    ap.add_argument("--gpu", action="store_true",
                    help="the GPU set (cases.GPU) on cuda: short timing, torch.compile only for "
                         "the GEMM op, layers and stacks (cases.GPU_COMPILE)")
    ap.add_argument("--tiny", action="store_true", default=os.environ.get("REZERO_BENCH_TINY") == "1",
                    help="tiny sizes and few rounds (smoke test; also REZERO_BENCH_TINY=1)")
    ap.add_argument("--out", default="bench_results", help="directory for JSON/CSV/PNG")
    ap.add_argument("--backends", nargs="+", default=None,
                    help="our backends to time (default: every available one for the device)")
    ap.add_argument("--filter", default=None, help="regular expression on case names")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--compile", dest="compile", action="store_true", default=None,
                    help="include the torch.compile baseline (default: on, off with --quick)")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--no-peak", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--tuned-malloc", action="store_true",
                    help="re-exec with MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ = 16 GiB")
    ap.add_argument("--list", action="store_true", help="print the case names and exit")
    ap.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                    help="start no case after SECONDS: the cases run so far are still reported "
                         "and written (what ./dev.sh gpu uses to stay inside its time limit)")
    return ap.parse_args(argv)


def _reexec_tuned(argv):
    """glibc reads MALLOC_* when the process starts: set them and start again."""
    env = dict(os.environ, REZERO_BENCH_TUNED_MALLOC="1", **TUNED_MALLOC)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "bench", *argv], env)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    if args.tuned_malloc and not os.environ.get("REZERO_BENCH_TUNED_MALLOC"):
        _reexec_tuned(argv)

    import torch

    from . import cases, report, runner, targets

    preset = cases.GPU if args.gpu else None
    if args.list:
        for c in cases.select(args.quick, args.filter, preset):
            print(c.name)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.gpu and not device.startswith("cuda"):
        print("--gpu needs a CUDA GPU, and none is visible", file=sys.stderr)
        return 2
    backends = tuple(args.backends) if args.backends else cases.default_backends(device)
    compile_ = (not args.quick) if args.compile is None else args.compile
    cfg = cases.Config(device=device, backends=backends, compile=compile_, tiny=args.tiny,
                       compile_only=cases.GPU_COMPILE if args.gpu else None)
    plan = runner.TINY if args.tiny else (runner.QUICK if args.quick or args.gpu else runner.FULL)
    if args.no_peak:
        plan = runner.Plan(**{**plan.__dict__, "peak_groups": ()})
    selected = cases.select(args.quick, args.filter, preset)
    if not selected:
        print(f"no case matches {args.filter!r}; see --list", file=sys.stderr)
        return 2

    meta = report.machine_meta(cfg, args)
    notes = _notes(cfg, args, meta)
    print(f"rezero-kernels bench: {meta['cpu_model']} ({meta['cpu_count']} cores), "
          f"{meta['threads']} threads, torch {meta['torch']}, device {device}, "
          f"ours: {', '.join(backends) or 'none'}")
    print(report.allocator_line(meta))
    print(f"{len(selected)} cases; each case's variants are timed in alternation "
          f"(rotated order per round), medians reported\n")

    rows, started, skipped = [], time.perf_counter(), []
    for i, case in enumerate(selected, 1):
        t0 = time.perf_counter()
        if args.budget is not None and t0 - started >= args.budget:
            skipped = [c.name for c in selected[i - 1:]]
            print(f"budget of {args.budget:g} s spent: {len(skipped)} cases not run: "
                  + ", ".join(skipped))
            break
        print(f"[{i}/{len(selected)}] {case.name} ...", end=" ", flush=True)
        case_rows = runner.run_case(case, cfg, plan)
        rows += case_rows
        ours = [r for r in case_rows if r["variant"].startswith("rezero[")]
        summary = ", ".join(f"{r['variant']} {r['median_ms']:.3g} ms"
                            + (f" ({r['speedup_vs_eager']:.2f}x eager)" if r["speedup_vs_eager"]
                               else "") for r in ours)
        print(f"{summary}  [{time.perf_counter() - t0:.1f} s]", flush=True)
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    meta["not_run"] = skipped
    if skipped:
        selected = selected[:len(selected) - len(skipped)]
        notes.append(f"--budget {args.budget:g} s: {len(skipped)} selected cases were not run "
                     "(listed in results.json, not_run)")

    checked = targets.evaluate(rows)
    titles = {c.name: c.title for c in selected}
    heads = [n for n in cases.HEADLINE if n in titles]
    print()
    if heads:
        print("== Headline: fused (ours) vs eager python_ref, medians ==")
        print(report.headline(rows, heads, titles))
        print()
    print("== Targets ==")
    print(report.targets_table(checked))
    print()
    print("== All results (eager/this > 1: faster than the reference; /floor: time over the "
          "GEMMs+attention alone) ==")
    print(report.details(rows))
    print()
    for n in notes:
        print(f"note: {n}")

    os.makedirs(args.out, exist_ok=True)
    paths = {k: os.path.join(args.out, f) for k, f in
             (("json", "results.json"), ("csv", "results.csv"), ("png", "speedup.png"))}
    report.write_json(paths["json"], meta, rows, checked, notes)
    report.write_csv(paths["csv"], rows)
    wrote_png = report.write_png(paths["png"], rows, meta)
    print(f"\nwrote {paths['json']}, {paths['csv']}"
          + (f", {paths['png']}" if wrote_png else " (no PNG: pip install matplotlib)")
          + f"  [{meta['wall_s']} s]")
    return 0


def _notes(cfg, args, meta) -> list:
    from . import cases
    n = []
    if cfg.tiny:
        n.append("--tiny: toy sizes for a smoke test; these figures mean nothing")
    if not cfg.compile:
        n.append("torch.compile baseline skipped" + (" in --quick" if args.quick else "")
                 + " (add --compile)")
    s12 = cases.stack_shape(12, cfg.tiny).text()
    deep = cases.stack_shape(64, cfg.tiny).text()
    n.append(f"stacks: 12 layers at {s12}; 64 and 128 layers at {deep} (small width and tokens "
             "so that the CPU run finishes in minutes); training step = forward + "
             "torch.autograd.grad w.r.t. all parameters, no optimizer")
    n.append("fwd = training forward (inputs require grad); bwd = autograd.grad on an output "
             "computed outside the timed region; fwd+bwd/train = autograd.grad(f(inputs), "
             "inputs, grad_out), no .grad accumulation")
    n.append("GB/s counts each input read once and each output written once; copy = "
             "out.copy_(x) of the same size, preallocated, measured in the same run")
    n.append("peak memory: " + ("torch.cuda.max_memory_allocated" if cfg.device.startswith("cuda")
                                else "resident set size of a fresh subprocess per variant (VmHWM, reset "
                                     "after set-up; step peak = its rise during one training "
                                     "step); compiled variants not measured"))
    if meta["cpu_count"] and meta["cpu_count"] <= 4:
        n.append("few cores: other processes on the machine skew timings; compare ratios "
                 "from one run, not absolute times across runs")
    return n


if __name__ == "__main__":
    sys.exit(main())
