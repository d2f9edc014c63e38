"""Realistic rows at V = 32000 in float32: top-k/top-p filtered (many exact zeros), sharp and
flat.  Every kernel row must be a distribution inside p's support, and verify must never emit a
token of target probability 0."""

from __future__ import annotations

import pytest
import torch

import multidraft as md


def _filtered(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    kth = logits.topk(top_k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf")).softmax(-1)


def _rows(batch=64, vocab=32_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(batch, vocab, generator=g) * torch.linspace(0.5, 6, batch).unsqueeze(1)
    draft = target + torch.randn(batch, vocab, generator=g)
    p = _filtered(target, 50)
    q = _filtered(draft, 200)
    return p, q, g


@pytest.mark.parametrize("name", md.available_verifiers())
def test_kernel_and_verify_stay_in_support(name):
    p, q, g = _rows()
    verifier = md.get_verifier(name)
    try:
        k = max(verifier.min_drafts, min(4, verifier.max_drafts or 4))
        drafts = verifier.draft(q, k, generator=g)
        kernel = verifier.kernel(p, q, drafts)
    except ValueError as err:
        pytest.skip(f"{name} refuses this size: {err}")
    assert bool((kernel >= 0).all())
    torch.testing.assert_close(kernel.sum(-1), torch.ones(p.shape[0]), rtol=0, atol=1e-4)
    assert float(kernel.masked_fill(p > 0, 0).abs().max()) == 0.0
    for seed in range(5):
        verdict = verifier.verify(p, q, drafts, generator=torch.Generator().manual_seed(seed))
        assert bool((p.gather(1, verdict.token.unsqueeze(1)) > 0).all())
        on_draft = (drafts == verdict.token.unsqueeze(1)).any(1)
        assert torch.equal(verdict.accepted >= 0, on_draft)
