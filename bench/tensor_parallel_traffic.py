"""What tensor parallelism sends: the collectives one rank runs per layer and training step
(forward and backward) for the fused layers under ``rezero_kernels.parallel.tensor_parallel``,
counted by ``parallel.communication_log`` on gloo CPU ranks, beside Megatron-LM's layout (two
all-reduces of the activations per layer forward and two backward, each sending
2 (T - 1) / T of the activation's bytes per rank in a ring).

    python bench/tensor_parallel_traffic.py            # tp 2 and 4, d512, 4 x 256 tokens
    python bench/tensor_parallel_traffic.py --smoke    # tiny, seconds

Writes bench/results/tensor_parallel_traffic.md (or --out).  Counts bytes, not time: gloo on
loopback says nothing about NVLink.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rezero_kernels as rzk  # noqa: E402
from rezero_kernels import parallel  # noqa: E402

MIB = 2 ** 20


def _layers(cfg):
    d, heads, kv, hidden = cfg["d_model"], cfg["heads"], cfg["kv_heads"], cfg["hidden"]
    return {
        f"RZLlamaLayer (d{d}, {heads} heads, {kv} kv, hidden {hidden})":
            lambda: rzk.RZLlamaLayer(d, heads, kv, hidden, alpha_init=0.1, share_alpha=False),
        f"RZTXEncoderLayer (d{d}, {heads} heads, ff {4 * d})":
            lambda: rzk.RZTXEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True,
                                         alpha_init=0.1),
    }


def _worker(rank, world, port, cfg, queue):
    from torch.distributed.device_mesh import init_device_mesh
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        mesh = init_device_mesh("cpu", (world,))
        rows = []
        for name, build in _layers(cfg).items():
            for sp in (False, True):
                torch.manual_seed(0)
                layer = parallel.tensor_parallel(build(), mesh, sequence_parallel=sp)
                seq = cfg["seq"] // world if sp else cfg["seq"]
                x = torch.randn(cfg["batch"], seq, cfg["d_model"], requires_grad=True)
                with parallel.communication_log() as log:
                    layer(x).square().sum().backward()
                rows.append((name, sp, list(log)))
        if rank == 0:
            queue.put(rows)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _measure(world, cfg):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, cfg, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    rows = queue.get(timeout=600)
    for p in procs:
        p.join(60)
        if p.exitcode != 0:
            raise RuntimeError(f"rank {procs.index(p)} exited with {p.exitcode}")
    return rows


def _describe(log):
    counts = collections.Counter((c.phase, c.kind, c.shape) for c in log)
    return "; ".join(f"{phase} {n} x {kind} {'x'.join(map(str, shape))}"
                     for (phase, kind, shape), n in sorted(counts.items()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--degrees", default="2,4")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results", "tensor_parallel_traffic.md"))
    args = ap.parse_args(argv)
    cfg = (dict(d_model=16, heads=4, kv_heads=4, hidden=32, batch=2, seq=8) if args.smoke else
           dict(d_model=512, heads=8, kv_heads=4, hidden=1408, batch=4, seq=256))
    act = cfg["batch"] * cfg["seq"] * cfg["d_model"] * 4  # fp32 bytes of one activation
    lines = ["# Tensor-parallel traffic per layer and training step (one rank, ring payload)",
             "", f"`python bench/tensor_parallel_traffic.py{' --smoke' if args.smoke else ''}`: "
             f"{cfg['batch']} x {cfg['seq']} tokens, fp32 (one activation = {act / MIB:.2f} MiB); "
             "Megatron-LM's layout = 2 all-reduces of the activation forward + 2 backward = "
             "8 (T-1)/T activations per rank.", "",
             "| layer | T | sequence parallel | collectives | activation MiB sent | "
             "Megatron layout MiB | other bytes |", "| --- | --- | --- | --- | --- | --- | --- |"]
    failed = False
    for world in (int(d) for d in args.degrees.split(",")):
        for name, sp, log in _measure(world, cfg):
            full = (cfg["batch"], cfg["seq"], cfg["d_model"])
            moved = sum(c.bytes_sent for c in log if c.shape == full)
            other = sum(c.bytes_sent for c in log if c.shape != full)
            megatron = 4 * 2 * (world - 1) * act // world
            failed |= moved != megatron
            lines.append(f"| {name} | {world} | {'yes' if sp else 'no'} | {_describe(log)} | "
                         f"{moved / MIB:.2f} | {megatron / MIB:.2f} | {other} B |")
    lines += ["", "Other bytes: under sequence parallelism the replicated gates' (and biases') "
              "gradients are summed over the ranks in backward."]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
