"""gls: Gumbel-max list sampling (the generic exactness and chi-square suites cover it too).

- the scheme itself, simulated with all k V shared clocks (not the conditional sampler that
  ``verify`` uses), gives the joint law draft_probability x kernel: the kernel's quadrature and
  the verifier's conditioning are two derivations checked against the paper's definition;
- with one draft the acceptance is Daliri et al.'s Gumbel coupling, sum_i 1 / sum_j max(q_j/q_i, p_j/p_i);
- the closed-form acceptance equals enumeration, also on rows whose ratios span 1e-9..1e9;
- a verify that pins the drafted clocks at 0 instead of q(x) T (forgetting memorylessness)
  fails the calibrated chi-square test;
- the kernel's size limit names the numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import multidraft as md
import chisquare
from chisquare import assert_law
from multidraft.proofs.cases import CASES
from multidraft.proofs.checks import check_exactness
from multidraft.proofs.enumeration import tuple_kernels
from multidraft.verifiers.base import Verdict, first_match
from multidraft.verifiers.gls import GumbelListSampling

TOL = 1e-12


def simulate_scheme(p: torch.Tensor, q: torch.Tensor, k: int, samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(drafts [n, k], Y [n]) from the definition: k lists of Exp(1) clocks E[i, v], draft i =
    argmin_v E[i, v] / q(v), Y = argmin_v min_i E[i, v] / p(v)."""
    g = torch.Generator().manual_seed(seed)
    clocks = torch.empty(samples, k, p.shape[0], dtype=torch.float64).exponential_(generator=g)
    drafts = (clocks / q).argmin(dim=2)
    token = (clocks.amin(dim=1) / p).argmin(dim=1)
    return drafts, token


@pytest.mark.parametrize("case,k", [("v4-onehot-p", 2), ("v5-zeros-both", 2), ("v6-dirichlet-sparse", 2), ("v3-zero-in-q", 3)])
def test_the_shared_clock_scheme_has_the_kernel_joint_law(case, k):
    p, q = CASES[case]
    vocab = p.shape[0]
    drafts, token = simulate_scheme(p, q, k, 200_000, seed=vocab + k)
    codes = (drafts * torch.tensor([vocab**i for i in range(k)])).sum(1) * vocab + token  # (tuple, Y)
    counts = np.bincount(codes.numpy(), minlength=vocab ** (k + 1))
    tuples, prob, kernels = tuple_kernels(md.get_verifier("gls"), p, q, k)
    tuple_codes = (tuples * torch.tensor([vocab**i for i in range(k)])).sum(1)
    joint = np.zeros(vocab ** (k + 1))
    for code, weight, kernel in zip(tuple_codes.tolist(), prob.tolist(), kernels.numpy()):
        joint[code * vocab : (code + 1) * vocab] += weight * kernel
    assert_law(counts, joint, f"gls scheme vs kernel, {case} k={k}")


@pytest.mark.parametrize("case", list(CASES))
def test_one_draft_is_the_gumbel_coupling(case):
    p, q = CASES[case]
    both = (p > 0) & (q > 0)
    ratio_q = q.unsqueeze(0) / torch.where(both, q, torch.ones_like(q)).unsqueeze(1)  # [i, j] q_j / q_i
    ratio_p = p.unsqueeze(0) / torch.where(both, p, torch.ones_like(p)).unsqueeze(1)
    want = float(torch.where(both, 1 / torch.maximum(ratio_q, ratio_p).sum(1), torch.zeros_like(p)).sum())
    verifier = md.get_verifier("gls")
    assert md.proofs.acceptance_rate(verifier, p, q, 1) == pytest.approx(want, abs=TOL)
    assert float(verifier.expected_acceptance(p[None], q[None], 1)) == pytest.approx(want, abs=TOL)


def _spread_rows():
    # ratios p/q from ~1e-9 to ~1e9, a token with q tiny and p not, zeros in both
    p = torch.tensor([0.3, 1e-9, 0.2, 0.0, 0.25, 0.25 - 1e-9], dtype=torch.float64)
    q = torch.tensor([1e-9, 0.3, 0.2, 0.1, 0.0, 0.4 - 1e-9], dtype=torch.float64)
    return p / p.sum(), q / q.sum()


@pytest.mark.parametrize("k", [1, 2, 3])
def test_extreme_ratios_stay_exact(k):
    p, q = _spread_rows()
    verifier = md.get_verifier("gls")
    tuples, prob, kernels = tuple_kernels(verifier, p, q, k)
    torch.testing.assert_close(prob @ kernels, p, rtol=0, atol=TOL)
    torch.testing.assert_close(kernels.sum(1), torch.ones(len(tuples), dtype=torch.float64), rtol=0, atol=TOL)
    rate = md.proofs.acceptance_rate(verifier, p, q, k)
    assert float(verifier.expected_acceptance(p[None], q[None], k)) == pytest.approx(rate, abs=TOL)


def test_batched_acceptance_matches_rows_alone():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 300, generator=g, dtype=torch.float64) * 2
    p = logits.softmax(-1)
    q = (logits + torch.randn(5, 300, generator=g, dtype=torch.float64)).softmax(-1)
    verifier = md.get_verifier("gls")
    batch = verifier.expected_acceptance(p, q, 4)
    alone = torch.cat([verifier.expected_acceptance(p[i : i + 1], q[i : i + 1], 4) for i in range(5)])
    torch.testing.assert_close(batch, alone, rtol=0, atol=1e-15)
    assert bool((batch <= md.proofs.optimal_acceptance(p, q, 4) + 1e-12).all())


class PinnedAtZero(GumbelListSampling):
    """Deliberately wrong: the drafted clocks are set to 0 rather than q(x) T, so the drafts win
    the target race too often."""

    name = "test-gls-pinned-at-zero"

    def _verify(self, p, q, drafts, generator):
        batch, k = drafts.shape
        first = torch.empty((batch, k), dtype=p.dtype).exponential_(generator=generator)
        clocks = torch.empty((batch, k, p.shape[1]), dtype=p.dtype).exponential_(generator=generator)
        clocks += q.unsqueeze(1) * first.unsqueeze(2)
        clocks.scatter_(2, drafts.unsqueeze(2), torch.zeros_like(first).unsqueeze(2))
        token = (clocks.amin(dim=1) / p).argmin(dim=1)
        return Verdict(token, first_match(drafts, token))


def test_pinning_the_drafted_clocks_at_zero_fails_the_chi_square():
    good = check_exactness(md.get_verifier("gls"), max_k=2, samples=50_000, family_alpha=chisquare.reserve(3))
    assert good.passed, [r for r in good.results if not r.passed]
    bad = check_exactness(PinnedAtZero(), max_k=2, samples=50_000)
    assert any(r.kind == "chi-square" and not r.passed for r in bad.results)


def test_kernel_size_limit_names_the_numbers():
    verifier = md.get_verifier("gls", max_kernel_entries=10_000)
    p, q = CASES["v6-dirichlet-a"]
    drafts = verifier.draft(q.expand(4, -1), 3)
    with pytest.raises(ValueError) as err:
        verifier.kernel(p.expand(4, -1), q.expand(4, -1), drafts)
    for part in ["quadrature over N = 289 nodes", "4 x 3 x 289 x 6 = 20808", "max_kernel_entries = 10000", "verify() samples"]:
        assert part in str(err.value)
    verifier.verify(p.expand(4, -1), q.expand(4, -1), drafts)  # verify needs no kernel
    with pytest.raises(ValueError, match="max_kernel_entries"):
        md.get_verifier("gls", max_kernel_entries=0)


@pytest.mark.slow  # ~60 s: two [20,000, 20,000] float32 batches (the cause, float32 uniforms, is
# tested by test_clocks_are_drawn_from_float64_uniforms_whatever_the_dtype in the default run)
def test_verify_never_emits_a_token_of_target_probability_zero_in_float32():
    """A token with p = q = 0 whose uniform is exactly 0 (2^-24 per token in float32) got clock
    0 and 0/0 = NaN, which argmin returns: a review found 23 such tokens in 20,000 nodes."""
    vocab, batch = 20_000, 20_000
    p = torch.zeros(batch, vocab)
    q = torch.zeros(batch, vocab)
    p[:, :4], q[:, :4] = torch.tensor([0.4, 0.3, 0.2, 0.1]), torch.tensor([0.1, 0.2, 0.3, 0.4])
    verifier = md.get_verifier("gls", validate_args=False)
    g = torch.Generator().manual_seed(0)
    drafts = verifier.draft(q, 2, generator=g)
    token = verifier.verify(p, q, drafts, generator=g).token
    assert int((token >= 4).sum()) == 0


def test_an_overflowing_ratio_is_refused_not_nan():
    p = torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64)
    q = torch.tensor([[1e-320, 0.5, 0.5]], dtype=torch.float64)
    verifier = md.get_verifier("gls", validate_args=False)
    for call in (lambda: verifier.kernel(p, q, torch.tensor([[1, 2]])), lambda: verifier.expected_acceptance(p, q, 2)):
        with pytest.raises(ValueError, match="p/q overflows float64"):
            call()


def test_clocks_are_drawn_from_float64_uniforms_whatever_the_dtype():
    """A float32 uniform is exactly 0 with probability 2^-24, and a clock of 0 wins the race
    whatever p: at V = 32000 a token outside the drafts won 1.6e-3 of the time, not 3e-5.  The
    uniforms are float64 (and so the same variates) for float32 rows too."""
    from multidraft.verifiers.gls import standard_exponential

    like32, like64 = torch.zeros(1), torch.zeros(1, dtype=torch.float64)
    e32 = standard_exponential((64, 1000), like32, torch.Generator().manual_seed(3))
    e64 = standard_exponential((64, 1000), like64, torch.Generator().manual_seed(3))
    assert e32.dtype == torch.float32 and torch.equal(e32, e64.float())
    assert bool((e32 > 0).all())


def test_kernel_rows_that_need_a_finer_step_get_one():
    """On these rows the first quadrature step leaves some kernel rows 1.4e-8 from summing to 1
    (tuples of tiny probability, so the output law is exact either way); the kernel refines
    them.  A looser refinement tolerance (a mutation audit's 1e-7) had passed every other test."""
    g = torch.Generator().manual_seed(0)
    p = (8 * torch.randn(5, generator=g, dtype=torch.float64)).softmax(-1)
    q = (8 * torch.randn(5, generator=g, dtype=torch.float64)).softmax(-1)
    tuples, prob, kernels = tuple_kernels(md.get_verifier("gls"), p, q, 2)
    torch.testing.assert_close(kernels.sum(1), torch.ones(len(tuples), dtype=torch.float64), rtol=0, atol=TOL)
    torch.testing.assert_close(prob @ kernels, p, rtol=0, atol=TOL)
