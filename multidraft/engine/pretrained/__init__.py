"""The shipped target/draft pair: byte-level GPTs trained on the Python standard library's
source (corpus.py holds the data and its split, train.py the reproducible training run).

    from multidraft.engine.pretrained import load_pair, encode, decode
    target, draft = load_pair()
    out = Engine(target, draft, verifier="rrs-wor", num_drafts=2, depth=4).generate(encode("def "), 64)
    print(decode(out.tokens[0]))

Sizes, training budget and held-out losses: training.json beside the weights, and
docs/model-pair.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..gpt import GPT, GPTConfig
from ..models import TableModel
from .corpus import decode, encode, load_corpus

__all__ = ["WEIGHTS_DIR", "decode", "encode", "held_out_windows", "load_model", "load_ngram", "load_pair", "training_record"]

# Byte n-gram tables are V^order entries of float64: order 3 is already 134 MB.
MAX_NGRAM_ORDER = 3

WEIGHTS_DIR = Path(__file__).parent


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> GPT:
    """A GPT from a checkpoint written by train.py (config, float16 state, training record)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"no model weights at {path}; train them with `python -m multidraft.engine.pretrained.train --out {path.parent}`"
        )
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model = GPT(GPTConfig(**checkpoint["config"]))
    model.load_state_dict({name: t.to(dtype) for name, t in checkpoint["state"].items()})
    return model.to(device=device, dtype=dtype).eval()


def load_pair(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              weights_dir: str | Path = WEIGHTS_DIR) -> tuple[GPT, GPT]:
    """(target, draft): the shipped pair, or the pair train.py wrote to ``weights_dir``."""
    weights_dir = Path(weights_dir)
    return load_model(weights_dir / "target.pt", device, dtype), load_model(weights_dir / "draft.pt", device, dtype)


def load_ngram(order: int = 2, smoothing: float = 0.01, device: str | torch.device = "cpu") -> TableModel:
    """A byte n-gram model counted on the pair's training files, with add-``smoothing`` counts:
    the second-stage draft (``Engine(..., draft2=load_ngram())``), as Spector & Re's staged
    decoding used an n-gram model under a small transformer draft.  Built in about a second
    from the standard library on this machine; nothing to download or ship."""
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= MAX_NGRAM_ORDER:
        raise ValueError(f"n-gram order must be an int in 1..{MAX_NGRAM_ORDER}, got {order!r}")
    if not smoothing > 0:
        raise ValueError(f"smoothing must be > 0 (every row needs mass), got {smoothing!r}")
    data = load_corpus().train.long()
    vocab = 256
    index = torch.zeros(data.numel() - order + 1, dtype=torch.long)
    for lag in range(order):  # oldest byte most significant, as TableModel indexes its contexts
        index = index * vocab + data[lag : data.numel() - order + 1 + lag]
    counts = torch.bincount(index, minlength=vocab**order).double() + smoothing
    rows = counts.view(-1, vocab)
    return TableModel((rows / rows.sum(-1, keepdim=True)).view((vocab,) * order)).to(device)


def training_record(weights_dir: str | Path = WEIGHTS_DIR) -> dict:
    """What train.py recorded: corpus sizes, each model's config, steps and held-out loss."""
    return json.loads((Path(weights_dir) / "training.json").read_text())


def held_out_windows(count: int, length: int, seed: int = 0) -> torch.Tensor:
    """``count`` windows [count, length] of held-out bytes (files the pair never trained on),
    at positions drawn with ``seed``: prompts and contexts for reports and benchmarks."""
    held_out = load_corpus().held_out
    if not 1 <= length < held_out.numel():
        raise ValueError(f"window length must be in 1..{held_out.numel() - 1}, got {length}")
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, held_out.numel() - length, (count,), generator=g)
    return torch.stack([held_out[s : s + length] for s in start.tolist()]).long()
