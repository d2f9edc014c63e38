"""Shared helpers for the engine tests: plain (non-speculative) references and exact laws."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from multidraft.engine import KVCache


def full_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] of a fresh causal forward over ids [B, T]: no cache reuse, no tree."""
    bsz, t = ids.shape
    cache: KVCache = model.new_cache(bsz, t, ids.device)
    pos = torch.arange(t).expand(bsz, t)
    mask = torch.ones(t, t, dtype=torch.bool).tril().expand(bsz, t, t)
    return model(ids, pos, mask, cache)


def plain_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Target-only greedy decoding, recomputing the whole sequence at every step."""
    seq = list(prompt)
    for _ in range(n):
        logits = full_logits(model, torch.tensor([seq]))
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]


def transformed_row(row: np.ndarray, temperature=1.0, top_k=None, top_p=None) -> np.ndarray:
    """The sampling transform applied to a probability row, written independently of the engine."""
    with np.errstate(divide="ignore"):
        logits = np.log(row) / temperature
    if top_k is not None and top_k < len(row):
        kth = np.sort(logits)[::-1][top_k - 1]
        logits = np.where(logits < kth, -np.inf, logits)
    w = np.exp(logits - logits.max())
    w = w / w.sum()
    if top_p is not None and top_p < 1:
        order = np.argsort(-w, kind="stable")
        before = np.cumsum(w[order]) - w[order]
        drop = np.zeros(len(w), dtype=bool)
        drop[order] = before >= top_p
        w = np.where(drop, 0.0, w)
        w = w / w.sum()
    return w


def sequence_law(table, prompt: list[int], n: int, **sampling) -> np.ndarray:
    """Exact probability of every length-n continuation under the (transformed) table model,
    indexed by the base-V number of the tokens (first token most significant)."""
    vocab = table.vocab_size
    law = np.zeros(vocab**n)
    for code, seq in enumerate(itertools.product(range(vocab), repeat=n)):
        prob, ctx = 1.0, list(prompt)
        for tok in seq:
            prob *= transformed_row(table.next_probs(ctx).numpy(), **sampling)[tok]
            ctx.append(tok)
        law[code] = prob
    return law


def encode(tokens: torch.Tensor, vocab: int) -> np.ndarray:
    """Rows of tokens [N, n] -> base-V codes [N] matching sequence_law's indexing."""
    n = tokens.shape[1]
    weights = vocab ** torch.arange(n - 1, -1, -1)
    return (tokens * weights).sum(1).numpy()
