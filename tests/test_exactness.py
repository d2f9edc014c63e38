"""Exact enumeration: every verifier's output law equals the target p (DESIGN.md, step 1)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

import multidraft as md
from strategies import random_case
from multidraft.proofs.cases import CASES, exactness_cases, supported_ks
from negative_control import ForgetfulRejection

TOL = 1e-12


@pytest.mark.parametrize("name,case,k", exactness_cases())
def test_output_distribution_is_target(name, case, k):
    p, q = CASES[case]
    out = md.proofs.output_distribution(md.get_verifier(name), p, q, k)
    torch.testing.assert_close(out, p, rtol=0, atol=TOL)


@pytest.mark.parametrize("name,case,k", exactness_cases())
def test_kernels_and_draft_law_are_distributions(name, case, k):
    p, q = CASES[case]
    tuples, prob, kernels = md.proofs.enumeration.tuple_kernels(md.get_verifier(name), p, q, k)
    assert abs(float(prob.sum()) - 1) < TOL
    assert bool((kernels >= 0).all())
    torch.testing.assert_close(kernels.sum(dim=1), torch.ones(len(tuples), dtype=torch.float64), rtol=0, atol=TOL)


@pytest.mark.parametrize("name,case,k", exactness_cases())
def test_acceptance_at_most_optimal(name, case, k):
    p, q = CASES[case]
    verifier = md.get_verifier(name)
    rate = md.proofs.acceptance_rate(verifier, p, q, k)
    assert rate <= md.proofs.optimal_acceptance_for_scheme(verifier, p, q, k) + 1e-10
    if verifier.iid_drafts:
        assert rate <= md.proofs.optimal_acceptance(p, q, k) + 1e-10


@pytest.mark.parametrize("name", md.available_verifiers())
def test_float32_is_exact_to_float32_rounding(name):
    # Compare output laws, not kernels: an LP verifier (otm) may pick another optimal plan for
    # the rounded rows, and both plans are exact.
    p, q = CASES["v6-dirichlet-a"]
    verifier = md.get_verifier(name)
    k = supported_ks(verifier, q)[-1]
    tuples, prob = md.proofs.enumeration.draft_law(verifier, q, k)
    n = len(tuples)
    kernels32 = verifier.kernel(p.float().expand(n, -1), q.float().expand(n, -1), tuples)
    assert kernels32.dtype == torch.float32
    torch.testing.assert_close(prob @ kernels32.double(), p, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["rrs-wor", "optimal-wor"])
def test_float32_draft_law_without_replacement_keeps_float32_precision(name):
    """The mass left after the first drafts sat just above the cancellation guard (0.0103), where
    a float32 running sum carried 6e-6 of relative error into every step: the float32 tuple law
    summed to 0.99999 (review).  It is summed in float64 now, rounded to float32 once."""
    q = torch.tensor([0.678, 0.2553, 0.0564, 0.006, 0.0043], dtype=torch.float64)
    verifier = md.get_verifier(name)
    tuples = md.proofs.enumeration.all_tuples(5, 4)
    exact = verifier.draft_probability(q.expand(len(tuples), -1), tuples)
    single = verifier.draft_probability(q.float().expand(len(tuples), -1), tuples).double()
    assert single.dtype == torch.float64 and abs(float(single.sum()) - 1) < 1e-6
    torch.testing.assert_close(single, exact, rtol=2e-6, atol=0)  # float32 rounding of q: ~8 ulps; the old sum: 7e-6


@pytest.mark.parametrize("dtype,drift", [(torch.float64, 9e-7), (torch.float32, 9e-5)])
@pytest.mark.parametrize("name", md.available_verifiers())
def test_rows_off_by_the_tolerance_give_the_normalized_target(name, dtype, drift):
    """Validation takes rows that sum to 1 within SUM_TOLERANCE (1e-6 float64, 1e-4 float32) as
    distributions, so the output law must be that of p / sum(p), by enumeration of the tuples'
    law and kernels on such rows.  Before the rows were renormalized, kseq, spechub, otm,
    optimal-wor, greedy and importance were off by up to 8e-5 on float32 rows off by 9e-5,
    and every i.i.d. scheme's tuple law summed to (1 + drift)^k."""
    p, q = CASES["v6-dirichlet-a"]
    p, q = (p * (1 - drift)).to(dtype), (q * (1 + drift)).to(dtype)
    verifier = md.get_verifier(name)
    k = supported_ks(verifier, q)[-1]
    tuples = md.proofs.enumeration.all_tuples(q.shape[0], k)
    prob = verifier.draft_probability(q.expand(len(tuples), -1), tuples).double()
    tuples, prob = tuples[prob > 0], prob[prob > 0]  # the tuples the scheme can draw
    n = len(tuples)
    kernels = verifier.kernel(p.expand(n, -1), q.expand(n, -1), tuples).double()
    target = p.double() / p.double().sum()
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert abs(float(prob.sum()) - 1) < tol
    torch.testing.assert_close(prob @ kernels, target, rtol=0, atol=tol)


def test_negative_control_fails_enumeration():
    p, q = CASES["v6-dirichlet-a"]
    out = md.proofs.output_distribution(ForgetfulRejection(), p, q, 2)
    assert (out - p).abs().max() > 1e-3
    # ... while with one draft it is ordinary speculative sampling and exact.
    torch.testing.assert_close(md.proofs.output_distribution(ForgetfulRejection(), p, q, 1), p, rtol=0, atol=TOL)


@pytest.mark.parametrize("name", md.available_verifiers())
@settings(max_examples=40, derandomize=True, deadline=None)
@given(case=random_case())
def test_random_cases_are_exact(name, case):
    p, q, k = case
    verifier = md.get_verifier(name)
    if k not in supported_ks(verifier, q, max_k=3):
        k = supported_ks(verifier, q, max_k=3)[0] if supported_ks(verifier, q, max_k=3) else None
    if k is None:
        return  # e.g. a scheme of distinct drafts with fewer than min_drafts tokens in q's support
    out = md.proofs.output_distribution(verifier, p, q, k)
    torch.testing.assert_close(out, p, rtol=0, atol=TOL)
    rate = md.proofs.acceptance_rate(verifier, p, q, k)
    assert -TOL <= rate <= md.proofs.optimal_acceptance_for_scheme(verifier, p, q, k) + 1e-10


@pytest.mark.parametrize(
    "name,case,k",
    [c for c in exactness_cases() if md.get_verifier(c[0]).exact_acceptance],
)
def test_closed_form_acceptance_matches_enumeration(name, case, k):
    p, q = CASES[case]
    verifier = md.get_verifier(name)
    closed = verifier.expected_acceptance(p.unsqueeze(0), q.unsqueeze(0), k)
    assert closed.shape == (1,)
    assert float(closed) == pytest.approx(md.proofs.acceptance_rate(verifier, p, q, k), abs=1e-10)


def test_enumeration_takes_float32_rows_within_their_tolerance():
    """output_distribution and acceptance_rate had refused a float32 row 5e-5 short of 1 (naming
    the float64 tolerance) that every verifier accepts; they now take it as p / sum(p)."""
    p, q = CASES["v6-dirichlet-a"]
    p32, q32 = (p * (1 - 5e-5)).float(), q.float()
    out = md.proofs.output_distribution(md.get_verifier("rrs"), p32, q32, 2)
    torch.testing.assert_close(out, p32.double() / p32.double().sum(), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="the torch.float32 tolerance"):
        md.proofs.output_distribution(md.get_verifier("rrs"), p32 * 0.99, q32, 2)


@pytest.mark.parametrize("name", ["rrs", "single", "optimal", "gls", "kseq"])
def test_closed_form_acceptance_on_rows_off_by_the_tolerance(name):
    """The closed form must agree with the kernel's law on drifted rows too: rrs and single,
    which opt out of renormalizing (their kernels work from the rows' sums), read the raw rows
    in expected_acceptance and were 6e-5 (k = 2) and 8e-5 (k = 1) off on float32 rows."""
    p, q = CASES["v6-dirichlet-a"]
    p, q = (p * (1 - 9e-5)).float(), (q * (1 + 9e-5)).float()
    verifier = md.get_verifier(name)
    k = supported_ks(verifier, q)[-1]
    tuples = md.proofs.enumeration.all_tuples(q.shape[0], k)
    prob = verifier.draft_probability(q.expand(len(tuples), -1), tuples).double()
    tuples, prob = tuples[prob > 0], prob[prob > 0]
    kernels = verifier.kernel(p.expand(len(tuples), -1), q.expand(len(tuples), -1), tuples).double()
    on_draft = torch.zeros_like(kernels, dtype=torch.bool).scatter_(1, tuples, True)
    enumerated = float(prob @ (kernels * on_draft).sum(dim=1))
    closed = float(verifier.expected_acceptance(p.unsqueeze(0), q.unsqueeze(0), k))
    assert abs(closed - enumerated) < 2e-6
