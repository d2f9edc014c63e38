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


def bisection_root(p, q, k, steps=80):
    """A slow reference: the smallest valid rho to float64 resolution."""
    lo, hi = torch.ones_like(p[:, :1]), torch.full_like(p[:, :1], float(k))
    for _ in range(steps):
        mid = (lo + hi) / 2
        valid = emitted_scale(accept_mass(p, q, mid), k) <= mid
        hi, lo = torch.where(valid, mid, hi), torch.where(valid, lo, mid)
    return hi


@pytest.mark.parametrize("family", ["peaked", "nearly equal", "disjoint-ish", "float32"])
def test_solver_is_valid_and_loses_no_acceptance_on_hard_rows(family):
    """Rows with kinks of f near the root (peaked, p close to q, little overlap) where false
    position alone stalls: the answer is valid and its acceptance within the solver's bound
    (1.5e-11; float32: its rounding) of the best rho's."""
    g = torch.Generator().manual_seed(7)
    scale, noise, vocab = {"peaked": (10, 5, 1000), "nearly equal": (1, 0.1, 6), "disjoint-ish": (20, 20, 8),
                           "float32": (3, 1, 300)}[family]
    logits = scale * torch.randn(256, vocab, generator=g, dtype=torch.float64)
    p, q = logits.softmax(-1), (logits + noise * torch.randn(256, vocab, generator=g, dtype=torch.float64)).softmax(-1)
    for k in [2, 3, 4, 8, 16]:
        if family == "float32":
            rho = solve_rho(p.float(), q.float(), k).double()
            slack = 1e-5
        else:
            rho = solve_rho(p, q, k)
            slack = 1.6e-11
            assert bool((emitted_scale(accept_mass(p, q, rho), k) <= rho).all())  # exact
        best = bisection_root(p, q, k)
        loss = (1 - (1 - accept_mass(p, q, best)) ** k) - (1 - (1 - accept_mass(p, q, rho)) ** k)
        assert float(loss.max()) <= slack, (k, float(loss.max()))
        assert bool(((rho >= 1) & (rho <= k)).all())


def test_one_draft_is_standard_speculative_sampling():
    p, q = CASES["v6-dirichlet-a"]
    one = md.proofs.acceptance_rate(md.get_verifier("kseq"), p, q, 1)
    assert one == pytest.approx(md.proofs.optimal_acceptance(p, q, 1), abs=1e-12)
