"""What the distributed tests share (test_ddp.py, test_fsdp.py, test_tensor_parallel.py): a
small net of our layers, its data, its training loop, and gloo ranks on CPU (loopback only,
two unless told) run with torch.multiprocessing.spawn.  A parallel run trains on each rank's half of every batch; the
reference trains one process on the whole batch."""
import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import python_ref
import rezero_kernels
from rezero_kernels.blocks import ReZeroFCBlock

WORLD = 2
STEPS = 3
D_MODEL, NHEAD, FF, SEQ, BATCH = 16, 2, 32, 6, 4
TIMEOUT_S = 60

needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


class Net(nn.Module):
    """Encoder layer, decoder layer (memory = encoder output), a Llama-style layer (grouped-query
    attention), a ReZero FC block."""

    def __init__(self):
        super().__init__()
        enc = getattr(rezero_kernels, "RZTXEncoderLayer", python_ref.RZTXEncoderLayer)
        dec = getattr(rezero_kernels, "RZTXDecoderLayer", python_ref.RZTXDecoderLayer)
        self.enc = enc(D_MODEL, NHEAD, FF, dropout=0.0, batch_first=True, alpha_init=0.2)
        self.dec = dec(D_MODEL, NHEAD, FF, dropout=0.0, batch_first=True, alpha_init=0.2,
                       share_alpha=False)
        llama = getattr(rezero_kernels, "RZLlamaLayer", python_ref.RZLlamaLayer)
        self.llama = llama(D_MODEL, NHEAD, 1, FF, alpha_init=0.2, share_alpha=False)
        self.fc = ReZeroFCBlock(D_MODEL, "gelu", alpha_init=0.2)

    def forward(self, src, tgt):
        memory = self.enc(src)
        return self.fc(self.llama(self.dec(tgt, memory, tgt_is_causal=True,
                                           tgt_mask=python_ref.causal_mask(tgt.shape[1],
                                                                           tgt.shape[1]))))


def _data():
    gen = torch.Generator().manual_seed(1)
    src = torch.randn(STEPS, BATCH, SEQ, D_MODEL, generator=gen)
    tgt = torch.randn(STEPS, BATCH, SEQ, D_MODEL, generator=gen)
    target = torch.randn(STEPS, BATCH, SEQ, D_MODEL, generator=gen)
    return src, tgt, target


def train(model, rows):
    """STEPS SGD steps on the given rows of every batch."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    src, tgt, target = _data()
    for step in range(STEPS):
        opt.zero_grad()
        out = model(src[step, rows], tgt[step, rows])
        nn.functional.mse_loss(out, target[step, rows]).backward()
        opt.step()


def rank_rows(rank):
    per_rank = BATCH // WORLD
    return slice(rank * per_rank, (rank + 1) * per_rank)


def init_rank(rank, port, world=WORLD):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=TIMEOUT_S))


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker, out_dir, monkeypatch, world=WORLD, timeout_s=TIMEOUT_S):
    """worker(rank, port, out_dir) on ``world`` processes; fails the test if they do not
    finish within ``timeout_s``."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    ctx = mp.spawn(worker, args=(_free_port(), str(out_dir)), nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"workers did not finish within {timeout_s} s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.terminate()
                proc.join(5)


def assert_matches_single_process(states):
    """Both ranks' final parameters equal each other and a single process on the full batch;
    and training moved every parameter."""
    torch.manual_seed(0)
    single = Net()
    initial = {k: v.clone() for k, v in single.state_dict().items()}
    train(single, slice(0, BATCH))
    expected = single.state_dict()
    for name, value in expected.items():
        assert torch.equal(states[0][name], states[1][name]), f"ranks differ in {name}"
        torch.testing.assert_close(states[0][name], value, rtol=1e-5, atol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")
    moved = [k for k in expected if not torch.equal(expected[k], initial[k])]
    assert len(moved) == len(expected)
