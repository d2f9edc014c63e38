"""rrs / rrs-wor sample through two code paths (row-shrinking on CPU, full-batch on
accelerators); given the same uniforms they must emit the same tokens."""

from __future__ import annotations

import pytest
import torch

import multidraft as md
from multidraft.verifiers.rrs import _verify_dense, _verify_shrinking


@pytest.mark.parametrize("name,without_replacement", [("rrs", False), ("rrs-wor", True)])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_dense_and_shrinking_paths_agree(name, without_replacement, k):
    g = torch.Generator().manual_seed(k)
    logits = 3 * torch.randn(512, 300, generator=g, dtype=torch.float64)
    p = logits.softmax(-1)
    q = (logits + torch.randn(512, 300, generator=g, dtype=torch.float64)).softmax(-1)
    drafts = md.get_verifier(name).draft(q, k, generator=g)
    uniforms = torch.rand(drafts.shape, generator=g, dtype=p.dtype)
    u_fallback = torch.rand((p.shape[0], 1), generator=g, dtype=p.dtype)
    dense = _verify_dense(p, q, drafts, without_replacement, uniforms, u_fallback)
    shrinking = _verify_shrinking(p, q, drafts, without_replacement, uniforms, u_fallback)
    assert torch.equal(dense, shrinking)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 0.3])
def test_a_peaked_draft_without_replacement_stays_exact(temperature):
    """1 - max q down to 2e-16: the draftable mass after the top draft is summed from the
    undrafted tokens, not taken as 1 - q(top) (which cancelled: 1.3e-8 off at 1 - max q = 4e-10),
    and both verify paths see the same values."""
    q = (torch.tensor([12.0, 1, 0.5, 0, -1, -2], dtype=torch.float64) / temperature).softmax(-1)
    p = torch.full((6,), 1 / 6, dtype=torch.float64)
    verifier = md.get_verifier("rrs-wor")
    for k in (2, 3):
        torch.testing.assert_close(md.proofs.output_distribution(verifier, p, q, k), p, rtol=0, atol=1e-12)
    g = torch.Generator().manual_seed(0)
    drafts = verifier.draft(q.expand(512, -1), 3, generator=g)
    uniforms = torch.rand(512, 3, generator=g, dtype=torch.float64)
    fallback = torch.rand(512, 1, generator=g, dtype=torch.float64)
    rows = (p.expand(512, -1), q.expand(512, -1), drafts, True, uniforms, fallback)
    assert torch.equal(_verify_dense(*rows), _verify_shrinking(*rows))
