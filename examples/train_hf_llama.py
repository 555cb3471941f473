"""Train a small HF Llama from scratch as a ReZero model: build it from a config (no download),
convert it with one call, and train it on a text file as a byte-level language model.

    pip install transformers matplotlib      # the model; the loss plot (optional)
    python examples/train_hf_llama.py --text my_corpus.txt [--layers 12] [--steps 300]

Without ``--text`` it trains on this file itself.  Prints a progress bar with tokens/s and the
loss, and writes the loss curve to ``--out`` (default ``train_hf_llama_loss.png``).
"""
import argparse
import time

import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from rezero_kernels.integrations.transformers import rezero_


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--text", default=__file__)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--out", default="train_hf_llama_loss.png")
    args = parser.parse_args()

    data = torch.tensor(list(open(args.text, "rb").read()), dtype=torch.long)  # bytes: vocab 256
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=args.width, num_hidden_layers=args.layers,
                         num_attention_heads=max(1, args.width // 32),
                         num_key_value_heads=max(1, args.width // 64),
                         intermediate_size=int(8 * args.width / 3) // 64 * 64,
                         max_position_embeddings=args.seq)
    model = rezero_(LlamaForCausalLM(config))  # every layer the identity at init, no norms
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)  # no warm-up: ReZero needs none

    losses, started = [], time.perf_counter()
    bar = tqdm(range(args.steps))
    for step in bar:
        starts = torch.randint(0, len(data) - args.seq - 1, (args.batch,))
        ids = torch.stack([data[s:s + args.seq] for s in starts])
        loss = model(ids, labels=ids).loss  # HF shifts the labels itself
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        tokens_per_s = (step + 1) * args.batch * args.seq / (time.perf_counter() - started)
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens_per_s:,.0f}")

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: pip install matplotlib")
        return
    plt.plot(losses)
    plt.xlabel("step")
    plt.ylabel("training loss (nats per byte)")
    plt.title(f"ReZero Llama, {args.layers} layers, d{args.width}")
    plt.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
