"""What attention dropout costs in ``scaled_dot_product_attention`` itself, which the layers' GEMM +
attention floor leaves out: forward + backward at the Llama layer's shape (8x128 tokens, 8 heads
of 64, causal), fp32 and bf16, dropout 0 against 0.1, interleaved medians.

    python -m bench.sdpa_dropout
"""
import torch
import torch.nn.functional as F

from bench import timing

BATCH, HEADS, SEQ, HEAD_DIM, ROUNDS = 8, 8, 128, 64, 15


def step(qkv, p):
    out = F.scaled_dot_product_attention(*qkv, dropout_p=p, is_causal=True)
    torch.autograd.grad(out, qkv, torch.ones_like(out))


def main():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        qkv = [torch.randn(BATCH, HEADS, SEQ, HEAD_DIM, dtype=dtype, requires_grad=True)
               for _ in range(3)]
        t = timing.interleaved({p: (lambda p=p: step(qkv, p)) for p in (0.0, 0.1)},
                               rounds=ROUNDS)
        ms = {p: t[p].median_s * 1e3 for p in t}
        print(f"{str(dtype):15} SDPA fwd+bwd: p 0 {ms[0.0]:.1f} ms, p 0.1 {ms[0.1]:.1f} ms "
              f"({ms[0.1] / ms[0.0]:.2f}x)")


if __name__ == "__main__":
    main()
