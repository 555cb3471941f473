"""What attention dropout costs in ``scaled_dot_product_attention`` itself, which the layers' GEMM +
attention floor leaves out: forward + backward at the Llama layer's shape (8x128 tokens, 8 heads
of 64, causal), fp32 and bf16, dropout 0 against 0.1, interleaved medians.

    python -m bench.sdpa_dropout
"""
import statistics
import time

import torch
import torch.nn.functional as F

BATCH, HEADS, SEQ, HEAD_DIM, ROUNDS = 8, 8, 128, 64, 15


def step(qkv, p):
    out = F.scaled_dot_product_attention(*qkv, dropout_p=p, is_causal=True)
    torch.autograd.grad(out, qkv, torch.ones_like(out))


def main():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        qkv = [torch.randn(BATCH, HEADS, SEQ, HEAD_DIM, dtype=dtype, requires_grad=True)
               for _ in range(3)]
        times = {0.0: [], 0.1: []}
        for p in times:
            step(qkv, p)  # warm-up
        for r in range(ROUNDS):
            for p in (list(times) if r % 2 else list(times)[::-1]):
                start = time.perf_counter()
                step(qkv, p)
                times[p].append(time.perf_counter() - start)
        ms = {p: statistics.median(v) * 1e3 for p, v in times.items()}
        print(f"{str(dtype):15} SDPA fwd+bwd: p 0 {ms[0.0]:.1f} ms, p 0.1 {ms[0.1]:.1f} ms "
              f"({ms[0.1] / ms[0.0]:.2f}x)")


if __name__ == "__main__":
    main()
