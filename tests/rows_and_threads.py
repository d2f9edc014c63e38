"""Test helpers shared by the verifier tests: LLM-like (p, q) rows, and a call at a given torch
thread count (the fused CPU kernels split rows over torch's threads)."""

from __future__ import annotations

import torch


def llm_like(batch: int, vocab: int, seed: int, noise: float = 1.0, scale: float = 2.0):
    """(p, q) [batch, vocab] float64: p = softmax(scale * N(0, 1) logits), q the softmax of the
    same logits plus ``noise`` * N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=g, dtype=torch.float64) * scale
    p = logits.softmax(-1)
    q = (logits + noise * torch.randn(batch, vocab, generator=g, dtype=torch.float64)).softmax(-1)
    return p, q


def on_threads(threads: int, fn):
    """fn() with torch's thread count set to ``threads``, restored afterwards."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        return fn()
    finally:
        torch.set_num_threads(before)
