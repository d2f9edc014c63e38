"""The optimal acceptance bound: fast formula against brute force and the general set optimum."""

from __future__ import annotations

import pytest
import torch

import multidraft as md
from multidraft.proofs.cases import CASES


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_fast_optimum_equals_brute_force(case, k):
    p, q = CASES[case]
    fast = md.proofs.optimal_acceptance(p, q, k)
    assert isinstance(fast, float)
    assert fast == pytest.approx(md.proofs.optimal_acceptance_bruteforce(p, q, k), abs=1e-12)
    # The general optimum over the i.i.d. draft law agrees too (it enumerates tuples and sets).
    if q.shape[0] ** k <= 4000:
        general = md.proofs.optimal_acceptance_for_scheme(md.get_verifier("rrs"), p, q, k)
        assert fast == pytest.approx(general, abs=1e-12)


@pytest.mark.parametrize("case", list(CASES))
def test_one_draft_optimum_is_one_minus_total_variation(case):
    p, q = CASES[case]
    tv = 0.5 * float((p - q).abs().sum())
    assert md.proofs.optimal_acceptance(p, q, 1) == pytest.approx(1 - tv, abs=1e-12)
    # and standard speculative sampling reaches it
    assert md.proofs.acceptance_rate(md.get_verifier("single"), p, q, 1) == pytest.approx(1 - tv, abs=1e-12)


def test_random_small_cases_against_brute_force():
    g = torch.Generator().manual_seed(3)
    for _ in range(200):
        vocab = int(torch.randint(2, 8, (1,), generator=g))
        p = torch.rand(vocab, generator=g, dtype=torch.float64) * (torch.rand(vocab, generator=g) < 0.8)
        q = torch.rand(vocab, generator=g, dtype=torch.float64) * (torch.rand(vocab, generator=g) < 0.8)
        if p.sum() == 0 or q.sum() == 0:
            continue
        p, q = p / p.sum(), q / q.sum()
        k = int(torch.randint(1, 7, (1,), generator=g))
        assert md.proofs.optimal_acceptance(p, q, k) == pytest.approx(
            md.proofs.optimal_acceptance_bruteforce(p, q, k), abs=1e-12
        )


def test_batched_and_large_vocabulary():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50_000, generator=g, dtype=torch.float64)
    p = logits.softmax(-1)
    q = (logits + 0.5 * torch.randn(4, 50_000, generator=g, dtype=torch.float64)).softmax(-1)
    values = md.proofs.optimal_acceptance(p, q, 4)
    assert values.shape == (4,)
    for b in range(4):
        assert float(values[b]) == pytest.approx(md.proofs.optimal_acceptance(p[b], q[b], 4), abs=1e-12)
    tv = 0.5 * (p - q).abs().sum(-1)
    one = md.proofs.optimal_acceptance(p, q, 1)
    torch.testing.assert_close(one, 1 - tv)
    # More i.i.d. drafts never hurt.
    assert bool((md.proofs.optimal_acceptance(p, q, 8) >= values - 1e-12).all())


def test_optimum_without_replacement_is_at_least_with_replacement():
    for case, (p, q) in CASES.items():
        support = int((q > 0).sum())
        for k in range(1, min(3, support) + 1):
            wor = md.proofs.optimal_acceptance(p, q, k, replacement=False)
            assert wor >= md.proofs.optimal_acceptance(p, q, k) - 1e-12, case
            # rrs-wor is an exact verifier with that draft law, so it is below the optimum
            assert md.proofs.acceptance_rate(md.get_verifier("rrs-wor"), p, q, k) <= wor + 1e-12


def test_bad_arguments():
    p, q = CASES["v2-mild"]
    with pytest.raises(ValueError, match="k must be an int >= 1, got 0"):
        md.proofs.optimal_acceptance(p, q, 0)
    with pytest.raises(ValueError, match="same shape"):
        md.proofs.optimal_acceptance(p, torch.tensor([1.0]), 2)
    big = torch.full((21,), 1 / 21, dtype=torch.float64)
    with pytest.raises(ValueError, match="V = 21 is above the limit 20"):
        md.proofs.optimal_acceptance_for_scheme(md.get_verifier("rrs-wor"), big, big, 2)
    with pytest.raises(ValueError, match="k = 3 drafts without replacement need k tokens with q > 0; q has 2"):
        md.proofs.optimal_acceptance(torch.tensor([0.5, 0.5, 0.0]), torch.tensor([0.5, 0.0, 0.5]), 3, replacement=False)
    half = torch.tensor([0.25, 0.25], dtype=torch.float64)
    for replacement in (True, False):  # had returned nan, 0.46, or 1.0
        with pytest.raises(ValueError, match=r"p\[0, 0\] = nan is not finite"):
            md.proofs.optimal_acceptance(torch.tensor([float("nan"), 1.0]), half * 2, 2, replacement=replacement)
        with pytest.raises(ValueError, match=r"p\[0, 0\] = -0.5 is negative"):
            md.proofs.optimal_acceptance(torch.tensor([-0.5, 1.5]), half * 2, 2, replacement=replacement)
        with pytest.raises(ValueError, match="row 0 of q sums to 0.5, more than 1e-06"):
            md.proofs.optimal_acceptance(half * 2, half, 2, replacement=replacement)
    with pytest.raises(ValueError, match=r"V\*\*k = 6\*\*9 = 10077696 draft tuples; the limit is"):
        md.proofs.output_distribution(md.get_verifier("rrs"), CASES["v6-dirichlet-a"][0], CASES["v6-dirichlet-a"][1], 9)


def random_pair(g, vocab, zero_prob=0.0):
    conc = float(torch.rand(1, generator=g)) * 2 + 0.05
    p = torch._standard_gamma(torch.full((vocab,), conc, dtype=torch.float64), generator=g)
    q = torch._standard_gamma(torch.full((vocab,), conc, dtype=torch.float64), generator=g)
    p = p * (torch.rand(vocab, generator=g) >= zero_prob)
    q = q * (torch.rand(vocab, generator=g) >= zero_prob)
    p[0], q[-1] = p[0] + 0.01, q[-1] + 0.01  # keep both rows nonzero
    return p / p.sum(), q / q.sum()


def test_optimum_without_replacement_equals_the_set_enumeration():
    """The fast optimum (ratio-sorted prefixes, quadrature) against the maximum over all 2**V sets
    of the exact without-replacement law: this also checks that a prefix is always optimal."""
    g = torch.Generator().manual_seed(5)
    wor = md.get_verifier("rrs-wor")
    checked = 0
    for trial in range(150):
        vocab = int(torch.randint(2, 10, (1,), generator=g))
        p, q = random_pair(g, vocab, zero_prob=0.25 if trial % 3 == 0 else 0.0)
        support = int((q > 0).sum())
        k = int(torch.randint(1, min(support, 5) + 1, (1,), generator=g))
        fast = md.proofs.optimal_acceptance(p, q, k, replacement=False)
        assert fast == pytest.approx(md.proofs.optimal_acceptance_for_scheme(wor, p, q, k), abs=2e-12), (p, q, k)
        checked += 1
    assert checked == 150


@pytest.mark.parametrize("case", ["v3-zero-in-p", "v4-disjoint", "v5-zeros-both", "v5-peaked-draft", "v6-dirichlet-a"])
def test_optimum_without_replacement_equals_the_transport_lp(case):
    from transport_lp import transport_lp_optimum

    p, q = CASES[case]
    for k in (2, 3):
        if int((q > 0).sum()) >= k:
            lp = transport_lp_optimum(md.get_verifier("rrs-wor"), p, q, k)
            assert md.proofs.optimal_acceptance(p, q, k, replacement=False) == pytest.approx(lp, abs=1e-9)


def test_optimum_without_replacement_at_a_large_vocabulary():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4000, generator=g, dtype=torch.float64) * 3
    p = logits.softmax(0)
    q = (logits + torch.randn(4000, generator=g, dtype=torch.float64)).softmax(0)
    tv = 0.5 * float((p - q).abs().sum())
    assert md.proofs.optimal_acceptance(p, q, 1, replacement=False) == pytest.approx(1 - tv, abs=1e-12)
    values = [md.proofs.optimal_acceptance(p, q, k, replacement=False) for k in (1, 2, 4, 8)]
    assert values == sorted(values) and values[-1] <= 1
    for k, value in zip((1, 2, 4, 8), values):  # distinct drafts never do worse than i.i.d. ones
        assert value >= md.proofs.optimal_acceptance(p, q, k) - 1e-12


@pytest.mark.parametrize("q,p,k", [
    ([8.5e-16, 5.5e-16, 1 - 1.4e-15], [0.2, 0.3, 0.5], 2),
    ([8.5e-16, 5.5e-16, 1 - 1.4e-15], [0.2, 0.3, 0.5], 3),
    ([1e-12, 1e-12, 1 - 2e-12], [0.1, 0.1, 0.8], 2),
    ([1e-9, 1e-9, 1 - 2e-9], [0.1, 0.1, 0.8], 2),
    ([5e-50, 1.0], [1.0, 0.0], 2),
    # q down to 1e-300 and subnormal (a float64 softmax at a low temperature gives 1e-311): the
    # nodes out past 64 / q overflowed float64 (a crash, or no convergence after 6 halvings)
    ([0.5, 0.5 - 2e-300, 1e-300, 1e-300], [0.1, 0.2, 0.3, 0.4], 3),
    ([0.5, 0.5, 1e-310, 1e-310], [0.1, 0.2, 0.3, 0.4], 2),
    ([0.5, 0.5, 1e-310, 1e-310], [0.1, 0.2, 0.3, 0.4], 3),
    ([0.6, 0.4 - 1e-250, 1e-250, 4e-320], [0.25, 0.25, 0.25, 0.25], 3),
])
def test_optimum_without_replacement_on_peaked_drafts(q, p, k):
    """A prefix with tiny q-mass outside it is decided at t ~ 1/s, where step-1/32 nodes are
    2.4x apart (1e-4 off at s = 1e-12; 1.0 off at s = 5e-50, past the last node): the step is
    halved until converged and the nodes reach past 64 / min q.  A prefix holding fewer than k
    tokens has Q = 0 exactly."""
    p, q = torch.tensor(p, dtype=torch.float64), torch.tensor(q, dtype=torch.float64)
    p, q = p / p.sum(), q / q.sum()
    exact = md.proofs.optimal_acceptance_for_scheme(md.get_verifier("rrs-wor"), p, q, k)
    assert md.proofs.optimal_acceptance(p, q, k, replacement=False) == pytest.approx(exact, abs=1e-12)


def test_the_enumerated_optima_check_their_inputs():
    """They had taken any p: p = [2, -1] gave an "acceptance" of -0.5."""
    rrs = md.get_verifier("rrs")
    with pytest.raises(ValueError, match="is negative"):
        md.proofs.optimal_acceptance_for_scheme(rrs, [2.0, -1.0], [0.5, 0.5], 1)
    with pytest.raises(ValueError, match="sums to 0.6"):
        md.proofs.optimal_acceptance_bruteforce([0.3, 0.3], [0.5, 0.5], 1)
    with pytest.raises(ValueError, match="k must be an int >= 1, got 0"):
        md.proofs.optimal_acceptance_bruteforce([0.5, 0.5], [0.5, 0.5], 0)
    with pytest.raises(ValueError, match="same shape"):
        md.proofs.optimal_acceptance_for_scheme(rrs, [1.0], [0.5, 0.5], 1)
    with pytest.raises(ValueError, match="replacement must be True or False, got 'no'"):
        md.proofs.optimal_acceptance([0.5, 0.5], [0.5, 0.5], 2, replacement="no")
    with pytest.raises(ValueError, match="V >= 1"):
        md.proofs.optimal_acceptance(1.0, 1.0, 2)


@pytest.mark.parametrize("replacement", [True, False])
def test_rows_off_by_the_tolerance_are_taken_as_their_normalized_laws(replacement):
    """As the verifiers take them: with p = q a float32 row 9e-5 short of 1 gave 0.99991 without
    replacement (and an exact verifier could seem to beat the optimum)."""
    q = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float32) * (1 - 9e-5)
    assert md.proofs.optimal_acceptance(q, q, 2, replacement=replacement) == pytest.approx(1.0, abs=1e-12)
