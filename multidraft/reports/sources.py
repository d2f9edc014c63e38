"""Where the report's (target, draft) logit pairs come from: a real model pair on real text.

A pair of models and a set of contexts give one pair of next-token logit rows per context: the
target's and the draft's, at the context's last position.  Each context is a separate window
of text, so the pairs are independent draws from the text distribution and the report's
confidence intervals over pairs mean what they say.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from ..engine import pretrained


@dataclass
class ModelPair:
    name: str
    description: str
    target: object  # models speaking the engine protocol (engine/models.py)
    draft: object
    encode: object  # str -> LongTensor [T]
    vocab: int


def shipped_pair() -> ModelPair:
    target, draft = pretrained.load_pair()
    record = pretrained.training_record()
    t, d = record["target"], record["draft"]
    description = (
        f"the shipped byte-level pair (target {t['parameters'] / 1e6:.2f}M parameters, held-out loss "
        f"{t['held_out_loss_nats_per_byte']:.3f} nats/byte; draft {d['parameters'] / 1e6:.2f}M, "
        f"{d['held_out_loss_nats_per_byte']:.3f}) on held-out Python standard-library source"
    )
    return ModelPair("shipped-pair", description, target, draft, pretrained.encode, target.config.vocab_size)


def hf_pair(target_dir: str, draft_dir: str) -> ModelPair:
    """A transformers causal-LM pair from local directories (the target's tokenizer encodes)."""
    from transformers import AutoTokenizer

    from ..engine import HFModel

    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    target, draft = HFModel.from_pretrained(target_dir), HFModel.from_pretrained(draft_dir)

    def encode(text: str) -> Tensor:
        return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)

    name = f"{Path(target_dir).name}/{Path(draft_dir).name}"
    return ModelPair(name, f"transformers pair: target {target_dir}, draft {draft_dir}", target, draft, encode, target.vocab_size)


class PromptContexts(NamedTuple):
    contexts: list[Tensor]  # the first ``count`` non-empty lines, each its last ``length`` tokens
    lines: int  # non-empty lines in the file
    cut: int  # how many of the lines used were longer than ``length`` tokens


def contexts_from_prompts(path: str | Path, encode, length: int, count: int) -> PromptContexts:
    """One context per non-empty line of a prompts file, the first ``count`` lines (all of
    them where there are fewer: the caller reports the count used), each its last ``length``
    tokens."""
    if length < 1:  # [-0:] would keep whole lines and [-(-3):] drop their first tokens
        raise ValueError(f"context length must be >= 1 token, got {length}")
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"prompts file {path} has no non-empty lines")
    encoded = [encode(line) for line in lines[:count]]
    cut = sum(len(tokens) > length for tokens in encoded)
    return PromptContexts([tokens[-length:] for tokens in encoded], len(lines), cut)


@torch.no_grad()
def next_token_logits(model, contexts: Tensor, batch: int = 64) -> Tensor:
    """Logits [N, V] (float64) after each context [N, T], one causal forward per batch."""
    out = []
    for chunk in contexts.split(batch):
        n, length = chunk.shape
        cache = model.new_cache(n, length, chunk.device)
        pos = torch.arange(length).expand(n, length)
        mask = torch.ones(length, length, dtype=torch.bool).tril().expand(n, length, length)
        out.append(model(chunk, pos, mask, cache)[:, -1].double())
    return torch.cat(out)


def pair_logits(pair: ModelPair, contexts: Tensor | list[Tensor]) -> tuple[Tensor, Tensor]:
    """(target logits [N, V], draft logits [N, V]) after each context."""
    if isinstance(contexts, list):  # ragged prompts: one forward each
        rows = [pair_logits(pair, c.unsqueeze(0)) for c in contexts]
        return torch.cat([t for t, _ in rows]), torch.cat([d for _, d in rows])
    return next_token_logits(pair.target, contexts), next_token_logits(pair.draft, contexts)
