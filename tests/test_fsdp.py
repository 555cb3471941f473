"""The ReZero layers under FSDP2 (torch.distributed.fsdp.fully_shard) on CPU: every layer and
the model sharded over 2 gloo ranks; after 3 SGD steps the gathered parameters are identical on
both ranks and equal to a single-process run on the full batch."""
import os

import pytest
import torch
import torch.distributed as dist

from two_ranks import (Net, assert_matches_single_process, init_rank, needs_gloo, rank_rows,
                       run_ranks, train, WORLD)

fsdp = pytest.importorskip("torch.distributed.fsdp", reason="torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)",
                allow_module_level=True)


def _worker(rank, port, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    init_rank(rank, port)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        torch.manual_seed(0)
        model = Net()
        for layer in (model.enc, model.dec, model.llama, model.fc):
            fsdp.fully_shard(layer, mesh=mesh)
        fsdp.fully_shard(model, mesh=mesh)
        assert all(isinstance(p, DTensor) for p in model.parameters())  # really sharded
        train(model, rank_rows(rank))
        full = {k: v.full_tensor() if isinstance(v, DTensor) else v
                for k, v in model.state_dict().items()}
        torch.save(full, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@needs_gloo
def test_fsdp2_two_ranks_match_single_process(tmp_path, monkeypatch):
    run_ranks(_worker, tmp_path, monkeypatch)
    assert_matches_single_process([torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)])
