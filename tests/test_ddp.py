"""The ReZero layers under DistributedDataParallel: a 2-process gloo run on CPU (loopback only)
ends 3 SGD steps with parameters identical on both ranks and equal to a single-process run on
the full batch."""
import os

import torch
import torch.distributed as dist
import torch.nn as nn

from two_ranks import (Net, assert_matches_single_process, init_rank, needs_gloo, rank_rows,
                       run_ranks, train, WORLD)


def _worker(rank, port, out_dir):
    init_rank(rank, port)
    try:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(Net())
        train(model, rank_rows(rank))
        torch.save(model.module.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@needs_gloo
def test_ddp_two_ranks_match_single_process(tmp_path, monkeypatch):
    run_ranks(_worker, tmp_path, monkeypatch)
    assert_matches_single_process([torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)])
