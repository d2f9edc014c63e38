"""optimal-wor: the LP over k-subsets for drafts without replacement (the generic exactness and
chi-square suites cover it too).

- its acceptance equals the optimum without replacement, 1 - max_T [Q(T) - p(T)], both the fast
  prefix formula (``optimal_acceptance(..., replacement=False)``) and the enumeration over all
  2**V sets for the scheme's own draft law;
- it is never below rrs-wor (the same drafts), and beats the i.i.d. optimum where Hu et al. say
  it should;
- the kernel depends only on the drafted set;
- an LP solved with the wrong set law (i.i.d. masses for distinct drafts) fails enumeration;
- the size limit names k-subsets and refuses before any work.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings

import multidraft as md
from strategies import random_case
import multidraft.verifiers.otm as otm
from multidraft.proofs.cases import CASES, supported_ks
from multidraft.verifiers.rrs_wor import draft_probability_without_replacement
from rows_and_threads import llm_like

TOL = 1e-12
OPT_TOL = 1e-9


def _cases():
    verifier = md.get_verifier("optimal-wor")
    return [pytest.param(name, k, id=f"{name}-k{k}") for name, (_, q) in CASES.items() for k in supported_ks(verifier, q)]


@pytest.mark.parametrize("name,k", _cases())
def test_reaches_the_optimum_without_replacement(name, k):
    p, q = CASES[name]
    verifier = md.get_verifier("optimal-wor")
    rate = md.proofs.acceptance_rate(verifier, p, q, k)
    assert rate == pytest.approx(md.proofs.optimal_acceptance(p, q, k, replacement=False), abs=OPT_TOL)
    assert rate == pytest.approx(md.proofs.optimal_acceptance_for_scheme(verifier, p, q, k), abs=OPT_TOL)
    assert float(verifier.expected_acceptance(p[None], q[None], k)) == pytest.approx(rate, abs=TOL)
    assert rate >= md.proofs.acceptance_rate(md.get_verifier("rrs-wor"), p, q, k) - TOL


@settings(max_examples=60, derandomize=True, deadline=None)
@given(case=random_case(max_vocab=6, k_within_q_support=True))
def test_random_cases_are_exact_and_optimal(case):
    p, q, k = case
    verifier = md.get_verifier("optimal-wor")
    torch.testing.assert_close(md.proofs.output_distribution(verifier, p, q, k), p, rtol=0, atol=TOL)
    rate = md.proofs.acceptance_rate(verifier, p, q, k)
    assert rate == pytest.approx(md.proofs.optimal_acceptance_for_scheme(verifier, p, q, k), abs=OPT_TOL)


def test_moderate_vocabulary_reaches_the_fast_formula():
    # V = 30, k = 3: 4060 k-subsets, one LP per row; the formula is a quadrature over prefixes.
    p, q = llm_like(2, 30, seed=8)
    got = md.get_verifier("optimal-wor").expected_acceptance(p, q, 3)
    for row in range(2):
        assert float(got[row]) == pytest.approx(md.proofs.optimal_acceptance(p[row], q[row], 3, replacement=False), abs=OPT_TOL)


def test_beats_the_iid_optimum_where_drafts_would_repeat():
    # q puts 0.9 on one token: i.i.d. drafts mostly repeat it, distinct ones never do.
    p, q = CASES["v5-peaked-draft"]
    rate = md.proofs.acceptance_rate(md.get_verifier("optimal-wor"), p, q, 2)
    assert rate > md.proofs.optimal_acceptance(p, q, 2) + 0.5
    assert rate > md.proofs.acceptance_rate(md.get_verifier("rrs-wor"), p, q, 2) + 0.05


def test_kernel_depends_only_on_the_drafted_set():
    p, q = CASES["v6-dirichlet-sparse"]
    verifier = md.get_verifier("optimal-wor")
    support = torch.nonzero(q > 0).squeeze(1).tolist()
    for subset in itertools.combinations(support, 3):
        orders = torch.tensor(list(itertools.permutations(subset)))
        kernels = verifier.kernel(p.expand(len(orders), -1), q.expand(len(orders), -1), orders)
        torch.testing.assert_close(kernels, kernels[:1].expand_as(kernels), rtol=0, atol=0)


def test_the_iid_set_law_with_distinct_drafts_is_not_exact(monkeypatch):
    """The set law is what carries exactness: weigh the k-subsets as k i.i.d. draws would
    (k! prod q) while drafting without replacement, and the output law is off."""
    real = otm.set_mass

    def iid_weights(index, q_s):
        if not index.distinct:
            return real(index, q_s)
        return math.factorial(index.members.shape[1]) * q_s[index.members].prod(axis=1)

    monkeypatch.setattr(otm, "set_mass", iid_weights)
    p, q = CASES["v6-dirichlet-a"]
    out = md.proofs.output_distribution(md.get_verifier("optimal-wor"), p, q, 2)
    assert float((out - p).abs().max()) > 1e-3


def test_size_limit_names_subsets():
    verifier = md.get_verifier("optimal-wor", max_variables=1000)
    p, q = CASES["v6-dirichlet-a"][0].repeat(4) / 4, CASES["v6-dirichlet-a"][1].repeat(4) / 4  # V = 24
    drafts = verifier.draft(q[None], 3)
    with pytest.raises(ValueError) as err:
        verifier.kernel(p[None], q[None], drafts)
    for part in ["optimal-wor is exponential in k", "2024 k-subsets", "6072 LP variables", "max_variables = 1000", "s = 24"]:
        assert part in str(err.value)
    # k = 2: 2 C(24, 2) = 552 variables, within the limit
    assert md.proofs.acceptance_rate(verifier, p, q, 1) == pytest.approx(float((torch.minimum(p, q)).sum()), abs=TOL)
    assert verifier.expected_acceptance(p[None], q[None], 2).shape == (1,)


@pytest.mark.parametrize("vocab,k", [(5, 2), (6, 3), (7, 4), (8, 6)])
def test_set_law_sums_the_sequential_draw_over_orderings(vocab, k):
    """The LP's Q(S), by a recursion over the subsets of each set, against rrs-wor's draft
    probability of every ordering, summed; q has a zero."""
    g = torch.Generator().manual_seed(vocab + k)
    q = torch.rand(vocab + 1, generator=g, dtype=torch.float64)
    q[vocab // 2] = 0
    q /= q.sum()
    support = torch.nonzero(q > 0).squeeze(1)
    index = otm.subset_index(vocab, k)
    got = otm.set_mass(index, q[support].numpy())
    members = support[torch.from_numpy(index.members)]  # [M, k] token ids
    orders = torch.tensor(list(itertools.permutations(range(k))))  # [k!, k]
    tuples = members[:, orders].reshape(-1, k)  # [M k!, k]
    want = draft_probability_without_replacement(q.expand(len(tuples), -1), tuples).reshape(len(members), -1).sum(1)
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-13, atol=0)
    assert got.sum() == pytest.approx(1.0, abs=1e-13)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_a_peaked_draft_keeps_the_set_law_exact(temperature):
    """1 - max q down to 4e-10: the mass not yet drawn is summed from positive terms (the set's
    complement by rank ranges, its undrawn slots), never as 1 - drawn, which cancelled to a
    relative error of 1e-16 / (mass left) and moved the output law by 3e-6."""
    q = (torch.tensor([12.0, 1, 0.5, 0, -1, -2], dtype=torch.float64) / temperature).softmax(-1)
    p = torch.full((6,), 1 / 6, dtype=torch.float64)
    verifier = md.get_verifier("optimal-wor")
    for k in (2, 3):
        _, prob = md.proofs.enumeration.draft_law(verifier, q, k)
        assert float(prob.sum()) == pytest.approx(1.0, abs=TOL)
        torch.testing.assert_close(md.proofs.output_distribution(verifier, p, q, k), p, rtol=0, atol=TOL)
    reviewer_case = torch.tensor([0.6, 0.4 - 2e-10, 1e-10, 1e-10], dtype=torch.float64)
    flat = torch.full((4,), 0.25, dtype=torch.float64)
    torch.testing.assert_close(md.proofs.output_distribution(verifier, flat, reviewer_case, 3), flat, rtol=0, atol=TOL)
