"""greedy: exact (generic suite), optimal for its own draft law, and its input contract."""

from __future__ import annotations

import pytest
import torch

import multidraft as md
from multidraft.proofs.cases import CASES, supported_ks


@pytest.mark.parametrize("case", list(CASES))
def test_optimal_for_its_draft_law(case):
    p, q = CASES[case]
    greedy = md.get_verifier("greedy")
    for k in supported_ks(greedy, q):
        rate = md.proofs.acceptance_rate(greedy, p, q, k)
        assert rate == pytest.approx(md.proofs.optimal_acceptance_for_scheme(greedy, p, q, k), abs=1e-12)


def test_drafts_hold_the_top_tokens():
    g = torch.Generator().manual_seed(0)
    q = torch.rand(500, 40, generator=g, dtype=torch.float64)
    q = q / q.sum(1, keepdim=True)
    drafts = md.get_verifier("greedy").draft(q, 4, generator=g)
    top = q.argsort(dim=1, descending=True)[:, :3]
    assert torch.equal(drafts[:, :3], top)
    assert not (drafts[:, 3:] == top).any()


def test_wrong_hub_is_named():
    p = torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64)
    q = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"top 1 tokens of q, most likely first: row 0 has \[1, 2\], expected \[0\]"):
        md.get_verifier("greedy").kernel(p, q, torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="greedy needs k >= 2 drafts, got k = 1"):
        md.get_verifier("greedy").draft(q, 1)


def test_two_drafts_accept_as_often_as_spechub():
    # Same unordered draft law (the hub plus one token from q without it), both optimal for it.
    greedy, spechub = md.get_verifier("greedy"), md.get_verifier("spechub")
    for case, (p, q) in CASES.items():
        if int((q > 0).sum()) < 2:
            continue
        assert md.proofs.acceptance_rate(greedy, p, q, 2) == pytest.approx(
            md.proofs.acceptance_rate(spechub, p, q, 2), abs=1e-12
        ), case


@pytest.mark.parametrize("q", [[1 - 2e-15, 1e-15, 1e-15], [0.5, 1e-300, 0.25, 0.25]])
def test_peaked_draft_laws_sum_to_one_and_stay_exact(q):
    """The sampled draft's law divides by the q-mass off the hub, summed from its own terms:
    1 - q(hub) cancelled (a draft law of mass 1.0008 for the first q; for the second, k = 4,
    every tuple got probability 0, the one draft() returns included)."""
    q = torch.tensor(q, dtype=torch.float64)
    p = torch.linspace(1, 2, q.shape[0], dtype=torch.float64)
    p = p / p.sum()
    verifier = md.get_verifier("greedy")
    k = q.shape[0]
    tuples, prob = md.proofs.enumeration.draft_law(verifier, q, k)
    assert abs(float(prob.sum()) - 1) < 1e-12
    torch.testing.assert_close(md.proofs.output_distribution(verifier, p, q, k), p, rtol=0, atol=1e-12)
