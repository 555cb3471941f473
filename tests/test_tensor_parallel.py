"""Tensor and sequence parallelism (rezero_kernels.parallel) on CPU gloo ranks: for tensor-
parallel degrees 2 and 4, with and without sequence parallelism, and a 2 x 2 mesh with FSDP2,
the outputs and the gradients of every parameter after 3 SGD steps equal one process on the
full batch (dropout 0); the communication is Megatron-LM's (two activation all-reduces per
layer forward and two backward); the dropout rules hold; activation checkpointing, KV-cache
generation, torch.compile and torch.distributed.checkpoint (saved at one degree, loaded at
another) work; misuse gets errors naming the problem.

Each world size is one spawn, its checks run in turn inside it (start-up dominates on CPU)."""
import collections
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import python_ref
import rezero_kernels as rzk
from two_ranks import init_rank, needs_gloo, run_ranks

tensor_api = pytest.importorskip("torch.distributed.tensor", reason="torch.distributed.tensor")
from rezero_kernels import parallel  # noqa: E402

D, HEADS, FF, SEQ, BATCH, STEPS = 16, 4, 32, 8, 4, 3


class Net(nn.Module):
    """Encoder layer, decoder layer (memory = the encoder's output), a Llama-style layer with
    q/k/v biases and grouped-query attention (``kv_heads``), all gates non-zero."""

    def __init__(self, kv_heads, dropout=0.0):
        super().__init__()
        self.enc = rzk.RZTXEncoderLayer(D, HEADS, FF, dropout=dropout, batch_first=True,
                                        alpha_init=0.2)
        self.dec = rzk.RZTXDecoderLayer(D, HEADS, FF, dropout=dropout, batch_first=True,
                                        alpha_init=0.3, share_alpha=False)
        self.llama = rzk.RZLlamaLayer(D, HEADS, kv_heads, FF, qkv_bias=True, dropout=dropout,
                                      attn_dropout=dropout, mlp_dropout=dropout,
                                      alpha_init=0.25, share_alpha=False)
        self.mesh = None  # set under sequence parallelism: the layers take sequence chunks

    def forward(self, x):
        if self.mesh is not None:
            x = parallel.shard_sequence(x, self.mesh)
        memory = self.enc(x)
        y = self.llama(self.dec(x, memory, tgt_is_causal=True,
                                tgt_mask=python_ref.causal_mask(SEQ, SEQ)))
        return y if self.mesh is None else parallel.gather_sequence(y, self.mesh)


def _data():
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(STEPS, BATCH, SEQ, D, generator=gen),
            torch.randn(STEPS, BATCH, SEQ, D, generator=gen))


def _train(model, rows=slice(None)):
    """STEPS SGD steps; the last step's output and every parameter's gradient (full tensors,
    in the unsharded model's shapes)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs, targets = _data()
    for step in range(STEPS):
        opt.zero_grad()
        out = model(xs[step, rows])
        F.mse_loss(out, targets[step, rows]).backward()
        grads = {n: _full(p.grad) for n, p in model.named_parameters()}
        opt.step()
    return out.detach(), grads


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _built(kv_heads, dropout=0.0):
    torch.manual_seed(0)
    return Net(kv_heads, dropout)


def _assert_matches(model, reference, out, grads, ref_out, ref_grads, what):
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5,
                               msg=lambda m: f"{what}: output: {m}")
    ref_params = dict(reference.named_parameters())
    assert set(grads) == set(ref_params), what
    for name, p in model.named_parameters():
        shape = ref_params[name].shape
        torch.testing.assert_close(grads[name].reshape(shape), ref_grads[name], rtol=1e-5,
                                   atol=1e-5, msg=lambda m, n=name: f"{what}: grad {n}: {m}")
        torch.testing.assert_close(_full(p.detach()).reshape(shape), ref_params[name].detach(),
                                   rtol=1e-5, atol=1e-5,
                                   msg=lambda m, n=name: f"{what}: {n} after training: {m}")


def _check_training(mesh, kv_heads, sequence_parallel):
    reference = _built(kv_heads)
    ref_out, ref_grads = _train(reference)
    model = parallel.tensor_parallel(_built(kv_heads), mesh,
                                     sequence_parallel=sequence_parallel)
    assert all(isinstance(p, tensor_api.DTensor) for p in model.parameters())
    local = model.llama.self_attn.k_proj.weight.to_local()
    assert local.shape[0] == kv_heads * (D // HEADS) // mesh.size()  # really sharded
    if sequence_parallel:
        model.mesh = mesh
    out, grads = _train(model)
    _assert_matches(model, reference, out, grads, ref_out, ref_grads,
                    f"tp={mesh.size()} sequence_parallel={sequence_parallel}")


def _check_communication(mesh):
    """Per Llama layer and training step: two all-reduces of the activations forward and two
    backward (Megatron-LM's layout), and nothing else; under sequence parallelism two
    all-gathers and two reduce-scatters each way, plus the gates' gradients."""
    size = mesh.size()
    act = (BATCH, SEQ, D)
    act_bytes = BATCH * SEQ * D * 4
    for sp in (False, True):
        torch.manual_seed(0)
        layer = parallel.tensor_parallel(rzk.RZLlamaLayer(D, HEADS, 2, FF, alpha_init=0.5,
                                                          share_alpha=False), mesh,
                                         sequence_parallel=sp)
        x = torch.randn(BATCH, SEQ // size if sp else SEQ, D, requires_grad=True)
        with parallel.communication_log() as log:
            layer(x).square().sum().backward()
        counts = collections.Counter((c.kind, c.phase, c.shape) for c in log)
        if not sp:
            assert counts == {("all_reduce", "forward", act): 2,
                              ("all_reduce", "backward", act): 2}, counts
            assert sum(c.bytes_sent for c in log) == 4 * 2 * (size - 1) * act_bytes // size
        else:
            assert counts == {("all_gather", "forward", act): 2,
                              ("reduce_scatter", "forward", act): 2,
                              ("reduce_scatter", "backward", act): 2,
                              ("all_gather", "backward", act): 2,
                              ("all_reduce", "backward", (1,)): 2}, counts  # the two gates
            moved = sum(c.bytes_sent for c in log if c.shape == act)
            assert moved == 8 * (size - 1) * act_bytes // size  # = the all-reduce layout's


def _check_dropout(mesh):
    """Replicated tensors get the same mask on every rank (the outputs agree), sharded ones a
    different mask per rank; the shared generator stays in step."""
    rank, size = mesh.get_local_rank(), mesh.size()
    if rank == 1:  # tensor_parallel makes the generators equal across the mesh
        torch.manual_seed(1234)
    model = parallel.tensor_parallel(_built(2, dropout=0.3), mesh)
    x = torch.randn(BATCH, SEQ, D, generator=torch.Generator().manual_seed(5))
    out = model(x)
    gathered = [torch.empty_like(out) for _ in range(size)]
    dist.all_gather(gathered, out.detach().contiguous(), group=mesh.get_group())
    assert all(torch.equal(g, gathered[0]) for g in gathered), "replicated outputs differ"
    assert not torch.allclose(out, model.eval()(x)), "dropout was not applied"
    tp = model.llama._tp
    with parallel.rank_generator(tp, x.device):
        inside = rzk.functional.gated_act_dropout(torch.ones(64, 2 * 64), "identity", 0.5)
    after = torch.rand(8)
    inside_all = [torch.empty_like(inside) for _ in range(size)]
    after_all = [torch.empty_like(after) for _ in range(size)]
    dist.all_gather(inside_all, inside, group=mesh.get_group())
    dist.all_gather(after_all, after, group=mesh.get_group())
    assert not torch.equal(inside_all[0], inside_all[1]), "sharded masks equal across ranks"
    assert all(torch.equal(a, after_all[0]) for a in after_all), "generators out of step"


def _check_checkpointing_and_cache(mesh):
    """Activation checkpointing (with dropout, preserve_rng_state) gives the same gradients;
    generation with a KVCache gives the full forward's outputs."""
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    layer = parallel.tensor_parallel(
        rzk.RZLlamaLayer(D, HEADS, 2, FF, dropout=0.2, attn_dropout=0.2, mlp_dropout=0.2,
                         alpha_init=0.5), mesh)
    x = torch.randn(BATCH, SEQ, D, generator=torch.Generator().manual_seed(6))
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(7)
        xi = x.clone().requires_grad_()
        out = checkpoint(layer, xi, use_reentrant=False) if ckpt else layer(xi)
        out.square().sum().backward()
        grads.append([xi.grad] + [_full(p.grad) for p in layer.parameters()])
        layer.zero_grad()
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    layer.eval()
    cache = rzk.KVCache()
    steps = [layer(x[:, :5], cache=cache)] + [layer(x[:, i:i + 1], cache=cache)
                                             for i in range(5, SEQ)]
    torch.testing.assert_close(torch.cat(steps, 1), layer(x), rtol=1e-5, atol=1e-5)


def _check_compile(mesh):
    torch.manual_seed(0)
    layer = parallel.tensor_parallel(rzk.RZLlamaLayer(D, HEADS, 2, FF, alpha_init=0.5), mesh)
    x = torch.randn(BATCH, SEQ, D, generator=torch.Generator().manual_seed(8))
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    layer(xe).square().sum().backward()
    eager = [_full(p.grad) for p in layer.parameters()]
    layer.zero_grad()
    torch.compile(layer, fullgraph=True, backend="aot_eager")(xc).square().sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-5)
    for a, b in zip([_full(p.grad) for p in layer.parameters()], eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _check_errors(mesh):
    with pytest.raises(ValueError, match="nhead.*multiple of the tensor-parallel degree"):
        parallel.tensor_parallel(rzk.RZLlamaLayer(12, 3, 3, 16), mesh)
    with pytest.raises(ValueError, match="num_kv_heads.*whole key/value heads"):
        parallel.tensor_parallel(rzk.RZLlamaLayer(16, 4, 1, 16), mesh)
    with pytest.raises(ValueError, match="no RZTXEncoderLayer"):
        parallel.tensor_parallel(nn.Linear(4, 4), mesh)
    with pytest.raises(TypeError, match="python_ref layer"):
        parallel.tensor_parallel(python_ref.RZLlamaLayer(16, 4, 2, 16), mesh)
    layer = parallel.tensor_parallel(rzk.RZLlamaLayer(16, 4, 2, 16), mesh)
    with pytest.raises(ValueError, match="already tensor-parallel"):
        parallel.tensor_parallel(layer, mesh)
    with pytest.raises(ValueError, match="KVCache needs the whole sequence"):
        parallel.tensor_parallel(rzk.RZLlamaLayer(16, 4, 2, 16), mesh, sequence_parallel=True)(
            torch.randn(1, 2, 16), cache=rzk.KVCache())
    with pytest.raises(ValueError, match="1-D mesh"):
        parallel.tensor_parallel(rzk.RZLlamaLayer(16, 4, 2, 16), mesh2d := _mesh((1, 2)))
    del mesh2d
    # a parallelize_module plan on our layer, or DTensors given to a fused op: an error that
    # names rezero_kernels.parallel (not the generic mixed-tensor one)
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)
    planned = parallelize_module(rzk.RZTXEncoderLayer(16, 4, 32, batch_first=True), mesh,
                                 {"linear1": ColwiseParallel(), "linear2": RowwiseParallel()})
    with pytest.raises(TypeError, match="rezero_kernels.parallel"):
        planned(torch.randn(2, 3, 16))
    w = tensor_api.distribute_tensor(torch.randn(16, 8), mesh, [tensor_api.Shard(0)])
    for call in (lambda: rzk.functional.rezero_linear(torch.randn(2, 16), torch.randn(2, 8), w,
                                                      None, torch.ones(1)),
                 lambda: rzk.functional.rezero_residual(w, w, torch.ones(1))):
        with pytest.raises(TypeError, match="rezero_kernels.parallel"):
            call()


def _mesh(shape, names=None):
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh("cpu", shape, mesh_dim_names=names)


def _two_ranks(rank, port, out_dir):
    init_rank(rank, port, 2)
    try:
        mesh = _mesh((2,))
        for sp in (False, True):
            _check_training(mesh, 2, sp)
        _check_communication(mesh)
        _check_dropout(mesh)
        _check_checkpointing_and_cache(mesh)
        _check_compile(mesh)
        _check_errors(mesh)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _four_ranks(rank, port, out_dir):
    """tp 4 (with and without sequence parallelism); a 2 x 2 mesh, tp 2 and FSDP2 over dp 2;
    its checkpoint loaded at tp 4 and, for the Llama layer, into an unsharded model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import fully_shard

    init_rank(rank, port, 4)
    try:
        for sp in (False, True):
            _check_training(_mesh((4,)), 4, sp)
        mesh = _mesh((2, 2), ("dp", "tp"))
        reference = _built(4)
        ref_out, ref_grads = _train(reference)
        model = parallel.tensor_parallel(_built(4), mesh["tp"])
        for layer in (model.enc, model.dec, model.llama):
            fully_shard(layer, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        dp = mesh["dp"].get_local_rank()
        rows = slice(dp * BATCH // 2, (dp + 1) * BATCH // 2)
        out, grads = _train(model, rows)
        _assert_matches(model, reference, out, grads, ref_out[rows], ref_grads, "2 x 2 mesh")

        path = os.path.join(out_dir, "ckpt")
        dcp.save(model.state_dict(), checkpoint_id=path)
        trained = {n: _full(v) for n, v in model.state_dict().items()}
        other = parallel.tensor_parallel(Net(4), _mesh((4,)))
        state = other.state_dict()
        dcp.load(state, checkpoint_id=path)
        other.load_state_dict(state)
        for name, value in other.state_dict().items():
            assert torch.equal(_full(value), trained[name]), f"tp 4 load: {name}"
        plain = Net(4).llama
        state = {f"llama.{n}": v for n, v in plain.state_dict().items()}
        dcp.load(state, checkpoint_id=path)
        for name, value in state.items():
            assert torch.equal(value, trained[name]), f"unsharded load: {name}"
        dist.barrier()
    finally:
        dist.destroy_process_group()


@needs_gloo
def test_tensor_parallel_two_ranks(tmp_path, monkeypatch):
    run_ranks(_two_ranks, tmp_path, monkeypatch, world=2, timeout_s=240)


@needs_gloo
def test_tensor_parallel_four_ranks_and_2d_mesh_with_fsdp2(tmp_path, monkeypatch):
    pytest.importorskip("torch.distributed.fsdp").fully_shard  # noqa: B018
    run_ranks(_four_ranks, tmp_path, monkeypatch, world=4, timeout_s=240)
