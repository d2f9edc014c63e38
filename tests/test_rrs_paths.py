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
