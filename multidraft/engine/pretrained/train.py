"""Train the shipped target/draft pair on the standard library's source, reproducibly.

    python -m multidraft.engine.pretrained.train            # writes target.pt, draft.pt here (~40 min, 1 core)
    python -m multidraft.engine.pretrained.train --target-steps 20 --draft-steps 20 --out /tmp/pair  # a smoke run

Both models are the engine's built-in GPT, byte-level (V = 256).  The target is several layers
wide, the draft one narrow layer: noticeably weaker and many times cheaper.  Training is plain
next-byte cross-entropy with AdamW and a cosine schedule, on random windows of the training
files, a fixed seed and a fixed budget of steps.  The weights are stored in float16 with the
config, the training record (steps, tokens, held-out loss, Python version) beside them.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from ..gpt import GPT, GPTConfig
from .corpus import load_corpus

HERE = Path(__file__).parent

TARGET = GPTConfig(vocab_size=256, n_layer=4, n_head=4, dim=128)
DRAFT = GPTConfig(vocab_size=256, n_layer=1, n_head=2, dim=64)


class WindowKV:
    """Stands in for the KV cache in training: a whole window is one forward, so each layer's
    keys and values are just its own (a shared cache buffer would also break autograd, since
    every layer writes into one tensor in place)."""

    def __init__(self, max_len: int):
        self.max_len = max_len  # positions stay below it (the model's rotary table is this long)

    def write(self, layer, k_new, v_new):
        return k_new, v_new


def causal_forward(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] for a batch of windows [B, T] through the engine's model protocol."""
    batch, length = ids.shape
    cache = WindowKV(length)
    pos = torch.arange(length, device=ids.device).expand(batch, length)
    mask = torch.ones(length, length, dtype=torch.bool, device=ids.device).tril().expand(batch, length, length)
    return model(ids, pos, mask, cache)


def windows(data: torch.Tensor, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    start = torch.randint(0, data.numel() - length - 1, (batch,), generator=generator)
    return torch.stack([data[s : s + length + 1] for s in start.tolist()]).long()  # [B, T+1]


@torch.no_grad()
def held_out_loss(model: GPT, data: torch.Tensor, length: int = 256, batches: int = 16) -> float:
    """Mean next-byte cross-entropy (nats) on fixed held-out windows."""
    g = torch.Generator().manual_seed(1234)
    total = 0.0
    for _ in range(batches):
        chunk = windows(data, 16, length, g)
        logits = causal_forward(model, chunk[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten()).item()
    return total / batches


def train_model(config: GPTConfig, corpus, steps: int, batch: int, length: int, lr: float, seed: int, log) -> tuple[GPT, dict]:
    torch.manual_seed(seed)
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(seed)
    warmup = max(1, steps // 20)
    start = time.time()
    for step in range(steps):
        # Linear warm-up, then cosine decay to a tenth of the peak rate.
        scale = (step + 1) / warmup if step < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        chunk = windows(corpus.train, batch, length, g)
        logits = causal_forward(model, chunk[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"  step {step:5d}/{steps}  loss {loss.detach().item():.3f}  {time.time() - start:6.0f}s")
    model.eval()
    record = {
        "steps": steps,
        "batch": batch,
        "window": length,
        "tokens_seen": steps * batch * length,
        "parameters": sum(p.numel() for p in model.parameters()),
        "held_out_loss_nats_per_byte": held_out_loss(model, corpus.held_out),
        "train_seconds": round(time.time() - start, 1),
    }
    return model, record


def save(model: GPT, record: dict, path: Path) -> None:
    state = {name: t.half() for name, t in model.state_dict().items()}
    torch.save({"config": asdict(model.config), "state": state, "record": record}, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target-steps", type=int, default=1800)
    parser.add_argument("--draft-steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the shipped run's setting)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    corpus = load_corpus()
    print(f"corpus: {corpus.files} files, {corpus.train.numel()} train bytes, {corpus.held_out.numel()} held-out bytes")
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {
        "threads": args.threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "corpus_files": corpus.files,
        "held_out_files": corpus.held_out_files,
        "train_bytes": corpus.train.numel(),
        "held_out_bytes": corpus.held_out.numel(),
    }
    for name, config, steps, lr in [("draft", DRAFT, args.draft_steps, 3e-3), ("target", TARGET, args.target_steps, 2e-3)]:
        print(f"training {name}: {config}")
        model, record = train_model(config, corpus, steps, args.batch, args.window, lr, args.seed, print)
        print(f"{name}: held-out loss {record['held_out_loss_nats_per_byte']:.3f} nats/byte")
        save(model, record, args.out / f"{name}.pt")
        summary[name] = {"config": asdict(config), **record}
    (args.out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
