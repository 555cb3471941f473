"""What only a GPU can check, beyond the device-generic parity suite (test_parity.py, whose
cuda-cuda and triton-cuda targets run here): the CUDA kernels' raw-op edge cases (misaligned
storage, grid-stride sizes, empty tensors), CPU and CUDA drawing the same mask from the same
seed (the Philox rule of csrc/philox.h), bitwise-deterministic reductions, the caller's stream,
CUDA-graph capture and replay (raw ops, the autograd path, a whole encoder training step with
dropout), no host-device synchronisation on the hot path, the device guard, torch.compile with
Inductor on CUDA (bf16 autocast is in test_parity.py).

Skipped unless a GPU is visible.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import python_ref
import rezero_kernels as rzk
from parity import assert_parity

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

F = rzk.functional
ops = torch.ops.rezero_kernels
BOTH = [True, True]  # output_mask of the backward ops: both gradients
DEV = torch.device("cuda")
SEED = 1234
ACTIVATIONS = python_ref.ACTIVATIONS


def randn(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype, device=DEV)


def seed_tensor(key, base, device=DEV):
    return torch.tensor([key, base], dtype=torch.int64, device=device)


def seeded(fn):
    def call(*args):
        torch.manual_seed(SEED)
        return fn(*args)
    return call


GPU_BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(not rzk.backends()[b],
                                                         reason=f"backend {b!r} not available"))
                for b in ("cuda", "triton")]
needs_cuda_kernels = pytest.mark.skipif(not rzk.backends()["cuda"],
                                        reason="rezero_kernels built without its CUDA kernels")


def mask_for(shape, p, backend):
    torch.manual_seed(SEED)
    ones = torch.ones(shape, dtype=torch.float32, device=DEV)
    out = F.rezero_residual(torch.zeros_like(ones), ones, torch.ones(1, device=DEV), p,
                            backend=backend)
    return out != 0


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("shape", [(1031, 1024), (1027, 1031), (2, 3_000_001), (3_000_001,)],
                         ids=str)
@pytest.mark.parametrize("per_channel", [False, True])
def test_large_shapes(backend, shape, per_channel):
    """More work than one wave of blocks covers (grid-stride loops; many row blocks per column
    tile, for per-channel reductions), and a last dimension above CUDA's 65535 limit of grid
    axes y and z."""
    torch.manual_seed(0)
    x, fx, grad = randn(*shape), randn(*shape), randn(*shape)
    alpha = randn(shape[-1] if per_channel else 1)
    mask = mask_for(shape, 0.2, backend)
    assert_parity(seeded(lambda x, fx, a: F.rezero_residual(x, fx, a, 0.2, backend=backend)),
                  lambda x, fx, a: python_ref.rezero_residual(x, fx, a, 0.2, mask=mask),
                  [x, fx, alpha], grad, torch.float32, names=["x", "fx", "alpha"])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_large_bias_act(backend, activation):
    torch.manual_seed(0)
    shape = (2053, 771)
    h, bias = randn(*shape), randn(shape[-1])
    mask = mask_for(shape, 0.1, backend)
    assert_parity(seeded(lambda h, b: F.bias_act_dropout(h, b, activation, 0.1, backend=backend)),
                  lambda h, b: python_ref.bias_act_dropout(h, b, activation, 0.1, mask=mask),
                  [h, bias], randn(*shape), torch.float32, names=["h", "bias"])


@needs_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("per_channel", [False, True])
def test_misaligned_storage_matches_aligned(dtype, per_channel):
    """A contiguous tensor whose data pointer is not 16-byte aligned takes the scalar path; it
    must compute exactly what the vector path does (same elements, same reduction order)."""
    torch.manual_seed(0)
    rows, channels = 33, 64
    math = torch.float64 if dtype == torch.float64 else torch.float32
    alpha = torch.randn(channels if per_channel else 1, dtype=math, device=DEV)
    seed = seed_tensor(11, 22)

    def shifted(t):  # same values, data pointer one element past a 16-byte boundary
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=DEV)
        view = buf[1:].view(t.shape)
        view.copy_(t)
        return view

    x, fx, g = (randn(rows, channels).to(dtype) for _ in range(3))
    xs, fxs, gs = shifted(x), shifted(fx), shifted(g)
    assert xs.is_contiguous() and xs.data_ptr() % 16 != 0
    assert torch.equal(ops.residual(xs, fxs, alpha, 0.3, seed), ops.residual(x, fx, alpha, 0.3, seed))
    for a, b in zip(ops.residual_backward(gs, fxs, alpha, 0.3, seed, BOTH),
                    ops.residual_backward(g, fx, alpha, 0.3, seed, BOTH)):
        assert torch.equal(a, b)
    bias = torch.randn(channels, dtype=math, device=DEV)
    assert torch.equal(ops.bias_act_dropout(xs, bias, "gelu", 0.3, seed),
                       ops.bias_act_dropout(x, bias, "gelu", 0.3, seed))
    for a, b in zip(ops.bias_act_dropout_backward(gs, xs, bias, "gelu", 0.3, seed, BOTH),
                    ops.bias_act_dropout_backward(g, x, bias, "gelu", 0.3, seed, BOTH)):
        assert torch.equal(a, b)
    gy = g[:, : channels // 2].contiguous()  # x as gate_up: the gradient of its (rows, H) result
    assert torch.equal(ops.gated_act_dropout(xs, "gelu", 0.3, seed),
                       ops.gated_act_dropout(x, "gelu", 0.3, seed))
    assert torch.equal(ops.gated_act_dropout_backward(shifted(gy), xs, "gelu", 0.3, seed),
                       ops.gated_act_dropout_backward(gy, x, "gelu", 0.3, seed))


@needs_cuda_kernels
def test_empty_tensors():
    seed = seed_tensor(1, 2)
    x = torch.empty(0, 8, device=DEV)
    alpha, bias = torch.ones(8, device=DEV), torch.ones(8, device=DEV)
    assert ops.residual(x, x, alpha, 0.5, seed).shape == (0, 8)
    gf, ga = ops.residual_backward(x, x, alpha, 0.5, seed, BOTH)
    assert gf.shape == (0, 8) and torch.equal(ga, torch.zeros_like(alpha))
    gh, gb = ops.bias_act_dropout_backward(x, x, bias, "gelu", 0.5, seed, BOTH)
    assert gh.shape == (0, 8) and torch.equal(gb, torch.zeros_like(bias))
    gate_up = torch.empty(0, 16, device=DEV)
    assert ops.gated_act_dropout(gate_up, "silu", 0.5, seed).shape == (0, 8)
    assert ops.gated_act_dropout_backward(x, gate_up, "silu", 0.5, seed).shape == (0, 16)
    assert ops.gated_act_dropout(torch.empty(3, 0, device=DEV), "silu", 0.5, seed).shape == (3, 0)


@needs_cuda_kernels
def test_no_dropout_never_reads_the_seed():
    """p == 0 takes the no-dropout path: even a seed that is not a valid [key, base] tensor is
    fine."""
    x, fx = randn(4, 8).float(), randn(4, 8).float()
    alpha = torch.full((1,), 0.5, device=DEV)
    bogus = torch.empty(0, dtype=torch.int64, device=DEV)
    torch.testing.assert_close(ops.residual(x, fx, alpha, 0.0, bogus), x + 0.5 * fx)
    gate_up = torch.cat([x, fx], -1)
    torch.testing.assert_close(ops.gated_act_dropout(gate_up, "relu", 0.0, bogus),
                               torch.relu(x) * fx)


# --- the dropout mask ---------------------------------------------------------------------------

@needs_cuda_kernels
@pytest.mark.parametrize("shape", [(4, 4096), (37, 53), (3, 1, 7)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_cpu_and_cuda_drop_the_same_elements(shape, dtype):
    """The same seed values give the same mask on CPU and CUDA (both follow csrc/philox.h),
    for the flat kernels (forward), the column kernels (per-channel backward) and the gated
    kernels (odd widths: dropout indices not a multiple of 4 at row starts)."""
    if not rzk.backends()["cpu"]:
        pytest.skip("CPU kernels not built")
    math = torch.float64 if dtype == torch.float64 else torch.float32
    seed_values = (0x0123456789ABCDEF, 0x0FEDCBA987654321)
    ones = torch.ones(shape, dtype=dtype)
    alpha = torch.ones(shape[-1], dtype=math)
    bias = torch.zeros(shape[-1], dtype=math)
    for p in (0.1, 0.5):
        cpu = ops.residual(torch.zeros_like(ones), ones, alpha[:1].contiguous(), p,
                           seed_tensor(*seed_values, device="cpu"))
        cuda = ops.residual(torch.zeros_like(ones).to(DEV), ones.to(DEV), alpha[:1].to(DEV), p,
                            seed_tensor(*seed_values))
        assert torch.equal(cpu != 0, (cuda != 0).cpu())
        torch.testing.assert_close(cuda.cpu(), cpu)
        cpu_g, _ = ops.residual_backward(ones, ones, alpha, p, seed_tensor(*seed_values, "cpu"),
                                         BOTH)
        cuda_g, _ = ops.residual_backward(ones.to(DEV), ones.to(DEV), alpha.to(DEV), p,
                                          seed_tensor(*seed_values), BOTH)
        assert torch.equal(cpu_g != 0, (cuda_g != 0).cpu())
        cpu_b = ops.bias_act_dropout(ones, bias, "identity", p, seed_tensor(*seed_values, "cpu"))
        cuda_b = ops.bias_act_dropout(ones.to(DEV), bias.to(DEV), "identity", p,
                                      seed_tensor(*seed_values))
        assert torch.equal(cpu_b != 0, (cuda_b != 0).cpu())
        gate_up = torch.ones(shape[:-1] + (2 * shape[-1],), dtype=dtype)  # y = m, grad = [m | m]
        cpu_y = ops.gated_act_dropout(gate_up, "identity", p, seed_tensor(*seed_values, "cpu"))
        cuda_y = ops.gated_act_dropout(gate_up.to(DEV), "identity", p, seed_tensor(*seed_values))
        assert torch.equal(cpu_y != 0, (cuda_y != 0).cpu())
        cuda_gg = ops.gated_act_dropout_backward(ones.to(DEV), gate_up.to(DEV), "identity", p,
                                                 seed_tensor(*seed_values))
        assert torch.equal((cuda_gg != 0).cpu(), torch.cat([cpu_y != 0] * 2, -1))


@needs_cuda_kernels
def test_mask_follows_the_documented_philox_rule():
    from test_dropout import philox4x32_10  # the numpy reference of csrc/philox.h
    p, n = 0.3, 5003
    key, base = 0x0123456789ABCDEF, 0x7EDCBA9876543210
    out = ops.residual(torch.zeros(n, device=DEV), torch.ones(n, device=DEV),
                       torch.ones(1, device=DEV), p, seed_tensor(key, base))
    i = np.arange(n, dtype=np.uint64)
    counters = np.stack([(i >> np.uint64(2)) & np.uint64(0xFFFFFFFF), i >> np.uint64(34),
                         np.full(n, base & 0xFFFFFFFF, np.uint64),
                         np.full(n, base >> 32, np.uint64)], axis=1)
    words = philox4x32_10(counters, key)[np.arange(n), (i % 4).astype(np.int64)]
    expected = torch.from_numpy(words < int((1 - p) * 2**32))
    assert torch.equal((out != 0).cpu(), expected)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_keep_rate_and_scaling_over_a_million_elements(backend, p, dtype):
    n = 1_000_003
    out = F.rezero_residual(torch.zeros(n, dtype=dtype, device=DEV),
                            torch.ones(n, dtype=dtype, device=DEV), torch.ones(1, device=DEV), p,
                            backend=backend)
    kept = out != 0
    rate = kept.double().mean().item()
    assert abs(rate - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    assert torch.all(out[kept] == torch.tensor(1 / (1 - p), dtype=dtype, device=DEV))


# --- determinism, streams, CUDA graphs ------------------------------------------------------

@needs_cuda_kernels
@pytest.mark.parametrize("shape", [(4099, 1031), (1024, 1024)], ids=str)
def test_reductions_are_bitwise_deterministic(shape):
    torch.manual_seed(0)
    g, fx = randn(*shape).float(), randn(*shape).float()
    seed = seed_tensor(3, 4)
    for alpha in (torch.ones(1, device=DEV), torch.ones(shape[-1], device=DEV)):
        first = ops.residual_backward(g, fx, alpha, 0.1, seed, BOTH)[1]
        for _ in range(3):
            assert torch.equal(ops.residual_backward(g, fx, alpha, 0.1, seed, BOTH)[1], first)
    bias = torch.zeros(shape[-1], device=DEV)
    first = ops.bias_act_dropout_backward(g, fx, bias, "gelu", 0.1, seed, BOTH)[1]
    for _ in range(3):
        again = ops.bias_act_dropout_backward(g, fx, bias, "gelu", 0.1, seed, BOTH)[1]
        assert torch.equal(again, first)


@needs_cuda_kernels
def test_runs_on_the_current_stream():
    """Work is ordered on the caller's stream: results written on a side stream are complete
    after waiting on that stream only."""
    torch.manual_seed(0)
    x, fx = randn(2048, 1024).float(), randn(2048, 1024).float()
    alpha = torch.full((1024,), 0.5, device=DEV)
    expected = x + 0.5 * fx
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = ops.residual(x, fx, alpha, 0.0, seed_tensor(0, 0))
        gf, ga = ops.residual_backward(fx, x, alpha, 0.0, seed_tensor(0, 0), BOTH)
    side.synchronize()
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(ga, (fx * x).sum(0), rtol=1e-4, atol=1e-3)


def _capture(fn):
    """Warm fn up on a side stream, capture it in a CUDA graph; returns (graph, static outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = fn()
    return graph, outs


@needs_cuda_kernels
@pytest.mark.parametrize("per_channel", [False, True])
def test_cuda_graph_forward_backward_matches_eager(per_channel):
    """The raw ops in a graph, with the seed read from device memory at replay: changing the
    seed tensor in place changes the mask of the next replay exactly as an eager call sees it."""
    torch.manual_seed(0)
    shape = (257, 96)
    x, fx, grad, h = (randn(*shape).float() for _ in range(4))
    gate_up = randn(shape[0], 2 * shape[1]).float()
    alpha = torch.rand(shape[-1] if per_channel else 1, device=DEV)
    bias = torch.randn(shape[-1], device=DEV)
    seed = seed_tensor(5, 6)
    p = 0.3

    def step():
        y = ops.residual(x, fx, alpha, p, seed)
        gfx, galpha = ops.residual_backward(grad, fx, alpha, p, seed, BOTH)
        z = ops.bias_act_dropout(h, bias, "gelu", p, seed)
        gh, gbias = ops.bias_act_dropout_backward(grad, h, bias, "gelu", p, seed, BOTH)
        gated = ops.gated_act_dropout(gate_up, "silu", p, seed)
        ggu = ops.gated_act_dropout_backward(grad, gate_up, "silu", p, seed)
        return y, gfx, galpha, z, gh, gbias, gated, ggu

    graph, static = _capture(step)
    for key, base in [(5, 6), (123456789, -42), (2**62 - 1, 2**40 + 3)]:
        seed.copy_(seed_tensor(key, base))
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(static, step()):
            assert torch.equal(got, want)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_of_autograd_training_step(backend):
    """The autograd path (functional op, seed drawn by torch's CUDA generator inside the graph)
    captures, replays with a fresh mask each time, and keeps forward and backward masks equal."""
    fx = torch.ones(64, 128, device=DEV, requires_grad=True)
    x = torch.zeros(64, 128, device=DEV)
    alpha = torch.full((128,), 2.0, device=DEV, requires_grad=True)

    def step():
        out = F.rezero_residual(x, fx, alpha, 0.4, backend=backend)
        g_fx, g_alpha = torch.autograd.grad(out.sum(), (fx, alpha))
        return out.detach(), g_fx, g_alpha

    graph, (out, g_fx, g_alpha) = _capture(step)
    masks = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(g_fx, out)                    # same mask both ways
        torch.testing.assert_close(g_alpha, out.sum(0) / 2.0)    # sum of mask * scale * fx
        masks.append(out != 0)
    assert not torch.equal(masks[0], masks[1]), "each replay must draw a fresh mask"

    # without dropout the graph equals eager exactly
    def step0():
        out = F.rezero_residual(x, fx, alpha, 0.0, backend=backend)
        return (out.detach(), *torch.autograd.grad(out.sum(), (fx, alpha)))

    graph0, static0 = _capture(step0)
    graph0.replay()
    torch.cuda.synchronize()
    for got, want in zip(static0, step0()):
        assert torch.equal(got, want)


# --- whole training steps --------------------------------------------------------------------

def _encoder(backend, depth=3, dropout=0.1, dtype=torch.float32):
    torch.manual_seed(0)
    layers = [rzk.RZTXEncoderLayer(64, 4, 128, dropout=dropout, batch_first=True, alpha_init=0.2,
                                   backend=backend, device=DEV, dtype=dtype)
              for _ in range(depth)]
    return torch.nn.Sequential(*layers)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_of_an_encoder_training_step_with_dropout(backend):
    """Forward and backward of a 3-layer encoder with dropout, captured once and replayed: each
    replay equals an eager step that draws the same seeds (the generator's state is restored to
    what the replay started from), and two replays draw different masks."""
    model = _encoder(backend)
    x = torch.randn(4, 16, 64, device=DEV)
    params = list(model.parameters())

    def step():
        out = model(x)
        return (out.detach(), *torch.autograd.grad(out.square().mean(), params))

    graph, static = _capture(step)
    outs = []
    for _ in range(2):
        state = torch.cuda.get_rng_state()
        graph.replay()
        torch.cuda.synchronize()
        outs.append([t.clone() for t in static])
        after = torch.cuda.get_rng_state()
        torch.cuda.set_rng_state(state)
        eager = step()
        torch.cuda.set_rng_state(after)
        for got, want in zip(outs[-1], eager):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.equal(outs[0][0], outs[1][0]), "each replay must draw fresh masks"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_hot_path_never_synchronises(backend):
    """A training step with dropout makes no host-device synchronisation (no .item(), no
    host copy, no blocking allocation): torch raises on any while sync debug mode is "error"."""
    model = _encoder(backend)
    x = torch.randn(4, 16, 64, device=DEV)
    model(x).sum().backward()  # warm-up: autotuning and lazy initialisation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_inductor_compiles_a_stack_on_cuda(backend):
    model = _encoder(backend, dropout=0.0)
    x = torch.randn(2, 16, 64, device=DEV, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True)
    out_c, out_e = compiled(x), model(x)
    torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-4)
    g_c = torch.autograd.grad(out_c.sum(), [x, *model.parameters()])
    g_e = torch.autograd.grad(out_e.sum(), [x, *model.parameters()])
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_tensors_on_another_gpu_run_there(backend):
    """Data on cuda:1 while cuda:0 is current: the kernels run in cuda:1's context."""
    x, fx = torch.randn(64, 33, device="cuda:1"), torch.randn(64, 33, device="cuda:1")
    alpha = torch.full((1,), 0.5, device="cuda:1")
    with torch.cuda.device(0):
        out = F.rezero_residual(x, fx, alpha, backend=backend)
        torch.testing.assert_close(out, x + 0.5 * fx)


needs_triton = pytest.mark.skipif(not rzk.backends()["triton"], reason="triton not available")


@needs_triton
@pytest.mark.parametrize("index", range(1, 7))  # up to the 7 tiles of the elementwise kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_every_triton_config_computes_what_the_first_does(dtype, index, monkeypatch):
    """Config ``index`` of every Triton kernel (the last where fewer suit), forward and backward
    with dropout, gives the results of the first config, which the parity suite checks against
    python_ref (./dev.sh gpu runs it with REZERO_TRITON_CONFIG=0): the same mask (the mask rule
    does not depend on the tile) and the same values up to summation order.  Odd sizes leave
    partial tiles; K = 96 and K = 90 take the GEMM tiles for aligned and for unaligned operands.
    One test per index, so that parallel workers share the compiles."""
    from rezero_kernels.triton_ops import bias_act, common, fused_linear, gated_act, residual
    kernels = [residual._residual_fwd, residual._residual_bwd, bias_act._bias_act_fwd,
               bias_act._bias_act_bwd, gated_act._gated_act_fwd, gated_act._gated_act_bwd,
               fused_linear._linear_kernel]
    tol = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float64: 1e-10}[dtype]

    def run(config):
        monkeypatch.setattr(common, "PINNED_CONFIG", config)
        for kernel in kernels:
            kernel.cache.clear()
        torch.manual_seed(SEED)
        x, fx, h = (randn(77, 200, dtype=dtype).requires_grad_() for _ in range(3))
        inputs = [x, fx, h] + [randn(*s, dtype=dtype).requires_grad_() for s in
                               [(77, 96), (77, 90), (200, 96), (200, 90), (200,), (200,), (1,),
                                (77, 400)]]
        _, _, _, inp, inp_odd, w, w_odd, b, a_vec, a, gate_up = inputs
        outs = [F.rezero_residual(x, fx, a, 0.1, backend="triton"),
                F.bias_act_dropout(h, b, "gelu", 0.1, backend="triton"),
                F.rezero_linear(x, inp, w, b, a_vec, 0.1, backend="triton"),
                F.rezero_linear(x, inp_odd, w_odd, b, a, 0.1, backend="triton"),
                F.linear_bias_act_dropout(inp, w, b, "gelu", 0.1, backend="triton"),
                F.linear_bias_act_dropout(inp_odd, w_odd, b, "relu", 0.1, backend="triton"),
                F.gated_act_dropout(gate_up, "silu", 0.1, backend="triton")]
        torch.manual_seed(SEED + 1)
        loss = sum((o * torch.randn_like(o)).sum() for o in outs)
        return outs + list(torch.autograd.grad(loss, inputs))

    first = run(0)
    for got, want in zip(run(index), first):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
