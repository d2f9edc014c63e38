"""K-SEQ specifics: the rho it solves for, and SpecTr's (1 - 1/e) guarantee against the optimum."""

from __future__ import annotations

import math

import pytest
import torch

import multidraft as md
from multidraft.proofs.cases import CASES
from multidraft.verifiers.kseq import accept_mass, emitted_scale, solve_rho


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_guarantee_against_optimum(case, k):
    p, q = CASES[case]
    rate = md.proofs.acceptance_rate(md.get_verifier("kseq"), p, q, k)
    assert rate >= (1 - 1 / math.e) * md.proofs.optimal_acceptance(p, q, k) - 1e-12
    # and it never does worse than recursive rejection sampling on these cases
    assert rate >= md.proofs.acceptance_rate(md.get_verifier("rrs"), p, q, k) - 1e-12


def test_rho_is_the_root_and_valid():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 300, generator=g, dtype=torch.float64)
    p = logits.softmax(-1)
    q = (logits + torch.randn(64, 300, generator=g, dtype=torch.float64)).softmax(-1)
    for k in [2, 4, 8]:
        rho = solve_rho(p, q, k)
        assert bool(((rho >= 1) & (rho <= k)).all())
        c = emitted_scale(accept_mass(p, q, rho), k)
        assert bool((c <= rho).all())  # the residual is nonnegative: exact
        torch.testing.assert_close(c, rho, rtol=0, atol=1e-9)  # and it is the root: no acceptance lost


def test_one_draft_is_standard_speculative_sampling():
    p, q = CASES["v6-dirichlet-a"]
    one = md.proofs.acceptance_rate(md.get_verifier("kseq"), p, q, 1)
    assert one == pytest.approx(md.proofs.optimal_acceptance(p, q, 1), abs=1e-12)
