"""Khisti et al.'s importance-sampling verifier: optimal at k = 2 with the full LP, exact with a
truncated one, and a deliberately wrong proposal in step 2 is caught.

(The generic suites — enumeration on every case, hypothesis, chi-square, validation — cover it
too, as a registered verifier.)
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import multidraft as md
from multidraft.proofs.cases import CASES
from multidraft.verifiers.importance import ImportanceSampling, select, selected_acceptance, selection_probabilities

from test_spechub import random_cases

IMPORTANCE = md.get_verifier("importance")
ALL_CASES = list(CASES.values()) + random_cases(60, seed=5)


@pytest.mark.parametrize("index", range(len(ALL_CASES)))
def test_full_lp_reaches_the_optimum_at_two_drafts(index):
    p, q = ALL_CASES[index]
    rate = md.proofs.acceptance_rate(IMPORTANCE, p, q, 2)
    assert rate == pytest.approx(float(md.proofs.optimal_acceptance(p, q, 2)), abs=1e-9)
    # the selected draft's acceptance is the whole acceptance here: the optimum leaves nothing over
    closed = float(selected_acceptance(p[None], q[None], 2, top=p.shape[0])[0])
    assert closed == pytest.approx(rate, abs=1e-12)


@pytest.mark.parametrize("top,buckets", [(1, 1), (1, 2), (2, 2), (3, 1)])
@pytest.mark.parametrize("index", range(0, len(ALL_CASES), 5))
def test_truncated_lp_stays_exact(index, top, buckets):
    p, q = ALL_CASES[index]
    verifier = md.get_verifier("importance", top=top, buckets=buckets)
    out = md.proofs.output_distribution(verifier, p, q, 2)
    torch.testing.assert_close(out, p, rtol=0, atol=1e-12)
    assert md.proofs.acceptance_rate(verifier, p, q, 2) <= md.proofs.optimal_acceptance(p, q, 2) + 1e-12


def test_selected_token_has_the_law_the_kernel_uses():
    # p_I, the proposal of step 2, must be exactly the law of the selected draft.
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(2 * torch.randn(4, 7, generator=g, dtype=torch.float64), -1)
    q = torch.softmax(2 * torch.randn(4, 7, generator=g, dtype=torch.float64), -1)
    for k in (2, 3):
        selection = select(p, q, k, top=3, buckets=2)
        law = torch.zeros_like(p)
        for tup in itertools.product(range(7), repeat=k):
            drafts = torch.tensor([tup]).expand(4, -1)
            chance = selection_probabilities(selection, drafts)  # [4, k]
            mass = q[:, list(tup)].prod(dim=1, keepdim=True)  # [4, 1]
            law.scatter_add_(1, drafts, mass * chance)
        torch.testing.assert_close(law, selection.proposal, rtol=0, atol=1e-14)


def test_large_vocab_truncated_lp_is_within_reach_of_the_optimum():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(64, 2000, generator=g, dtype=torch.float64)
    p = logits.softmax(-1)
    q = (logits + torch.randn(64, 2000, generator=g, dtype=torch.float64)).softmax(-1)
    rate = selected_acceptance(p, q, 2)
    optimum = md.proofs.optimal_acceptance(p, q, 2)
    rrs = md.get_verifier("rrs").expected_acceptance(p, q, 2)
    assert bool((rate <= optimum + 1e-9).all())
    # Measured: importance 0.802, optimum 0.811, rrs 0.734 on average (seed 0).
    assert float(rate.mean()) > float(rrs.mean()) + 0.05
    assert float((optimum - rate).mean()) < 0.015
    # Near-uniform rows, where ranking alone would waste the pair (p = q wants a fair coin):
    # measured 0.972 against the optimum's 0.987 and rrs's 0.894.
    p = torch.softmax(0.3 * torch.randn(64, 40, generator=g, dtype=torch.float64), -1)
    q = torch.softmax(0.3 * torch.randn(64, 40, generator=g, dtype=torch.float64), -1)
    rate = selected_acceptance(p, q, 2)
    assert float(rate.mean()) > float(md.get_verifier("rrs").expected_acceptance(p, q, 2).mean()) + 0.05
    assert float((md.proofs.optimal_acceptance(p, q, 2) - rate).mean()) < 0.03


def test_knockout_stages_beat_kseq_at_large_vocab():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(32, 2000, generator=g, dtype=torch.float64)
    p = logits.softmax(-1)
    q = (logits + torch.randn(32, 2000, generator=g, dtype=torch.float64)).softmax(-1)
    kseq = md.get_verifier("kseq")
    for k in (3, 4):  # measured at 64 rows: 0.874 / 0.910 against kseq's 0.817 / 0.853, optimum 0.890 / 0.933
        rate = selected_acceptance(p, q, k)  # a lower bound on the acceptance
        assert bool((rate <= md.proofs.optimal_acceptance(p, q, k) + 1e-9).all())
        assert float(rate.mean()) > float(kseq.expected_acceptance(p, q, k).mean()) + 0.03


@pytest.mark.parametrize("case", list(CASES))
def test_more_drafts_never_lower_acceptance_and_stay_below_the_optimum(case):
    # Each knockout stage may keep the incumbent always, so its LP (exact for single-token
    # units, as here with V <= 6) can only add acceptance.
    p, q = CASES[case]
    rates = [md.proofs.acceptance_rate(IMPORTANCE, p, q, k) for k in (1, 2, 3, 4) if q.shape[0] ** k <= 2e5]
    for k, (before, after) in enumerate(zip(rates, rates[1:]), start=2):
        assert after >= before - 1e-12, (k, before, after)
        assert after <= md.proofs.optimal_acceptance(p, q, k) + 1e-9
    # Observed, not proved: on these cases the knockout reaches the optimum for k = 3 and 4 too.
    # At V = 2000 (test below) it sits between kseq and the optimum.


class WrongProposal(ImportanceSampling):
    """Selects like importance but speculates against q instead of the selected token's law."""

    def _proposal_and_choice(self, p, q, drafts):
        proposal, choice = super()._proposal_and_choice(p, q, drafts)
        return q.double(), choice

    def _verify(self, p, q, drafts, generator):
        return md.Verifier._verify(self, p, q, drafts, generator)


def test_wrong_proposal_is_caught_by_enumeration():
    p, q = CASES["v6-dirichlet-a"]
    out = md.proofs.output_distribution(WrongProposal(), p, q, 2)
    assert float((out - p).abs().max()) > 1e-3


def test_bad_options_and_k():
    with pytest.raises(ValueError, match="importance: top must be an int >= 1, got 0"):
        md.get_verifier("importance", top=0)
    with pytest.raises(ValueError, match="importance: buckets must be an int >= 1, got 2.5"):
        md.get_verifier("importance", buckets=2.5)
    q = CASES["v6-dirichlet-a"][1][None]
    with pytest.raises(ValueError, match="importance supports at most 4 drafts, got k = 5"):
        IMPORTANCE.draft(q, 5)


def test_a_rows_kernel_does_not_depend_on_the_other_rows():
    """The rows share one block-diagonal LP; with a tie-break below the solver's tolerances a
    degenerate row took a vertex that depended on its neighbours (a kernel of
    [0.553, 0, 0, 0, 0, 0.447] alone, [0.625, 0.091, 0, 0, 0, 0.283] beside another row)."""
    g = torch.Generator().manual_seed(3)
    batch, vocab = 20, 6
    p = torch._standard_gamma(torch.full((batch, vocab), 0.5, dtype=torch.float64), generator=g)
    q = torch._standard_gamma(torch.full((batch, vocab), 0.5, dtype=torch.float64), generator=g)
    p, q = p / p.sum(1, keepdim=True), q / q.sum(1, keepdim=True)
    drafts = md.get_verifier("rrs").draft(q, 2, generator=torch.Generator().manual_seed(1))
    verifier = md.get_verifier("importance")
    together = verifier.kernel(p, q, drafts)
    alone = torch.cat([verifier.kernel(p[i : i + 1], q[i : i + 1], drafts[i : i + 1]) for i in range(batch)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-9)


def test_the_selected_drafts_acceptance_is_a_lower_bound_at_three_drafts():
    """At k >= 3 a fallback draw can land on another draft of the tuple, which counts as
    accepted: sum min(p, p_I) is then short of the acceptance (so there is no closed form)."""
    assert not IMPORTANCE.exact_acceptance
    g = torch.Generator().manual_seed(5)

    def dirichlet(vocab, alpha):
        x = torch._standard_gamma(torch.full((vocab,), alpha, dtype=torch.float64), generator=g)
        return x / x.sum()

    gaps = []
    for _ in range(12):
        p, q = dirichlet(5, 1.0), dirichlet(5, 0.3)
        for k in (3, 4):
            rate = md.proofs.acceptance_rate(IMPORTANCE, p, q, k)
            lower = float(selected_acceptance(p[None], q[None], k)[0])
            assert lower <= rate + 1e-12
            gaps.append(rate - lower)
    assert max(gaps) > 1e-5  # measured 3.3e-5 (k = 3) and 9.1e-5 (k = 4) on one of these


def test_verify_follows_the_kernel_where_the_selection_is_random():
    """With one bucket beside the top token, the drafts [2, 4] of v6-dirichlet-a are selected
    0.5 / 0.5 and each kept with probability 0.27 or 0.47: a verify that reused the keep coin
    for the selection (a mutation audit) shifts the law there, which the generic suite's tuple,
    whose selection is deterministic, cannot see."""
    from chisquare import SAMPLES, assert_law

    p, q = CASES["v6-dirichlet-a"]
    verifier = md.get_verifier("importance", top=1, buckets=1)
    drafts = torch.tensor([[2, 4]])
    kernel = verifier.kernel(p.unsqueeze(0), q.unsqueeze(0), drafts)[0]
    verdict = verifier.verify(p.expand(SAMPLES, -1), q.expand(SAMPLES, -1), drafts.expand(SAMPLES, -1), torch.Generator().manual_seed(3))
    assert_law(np.bincount(verdict.token.numpy(), minlength=p.shape[0]), kernel.numpy(), "importance(top=1, buckets=1) on [2, 4]")
