"""Exactness checks for any verifier, the library's own or a user's: exact enumeration over
the corner cases and a calibrated chi-square of sampled tokens against p.

The test suite and `multidraft verify-exactness NAME` both run these.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import stats

from ..verifiers.base import Verifier
from .cases import CASES, supported_ks
from .enumeration import draft_law, output_distribution


# Cells expecting fewer samples than this are pooled.  The chi-square tail is an approximation,
# and at the extreme levels these checks run at (~1e-9) it fails first for small cells: a cell
# expecting 5 samples crosses the 5e-9 threshold on df = 5 by itself with probability 8e-8, one
# expecting 50 with 6e-10.
MIN_EXPECTED = 50.0


def chi_square(counts, expected_probs) -> tuple[float, int, float]:
    """(statistic, degrees of freedom, p-value) of ``counts`` against ``expected_probs``.

    Cells of zero probability must be empty (a sample there returns p-value 0: no chi-square can
    weigh it).  The other cells are pooled, smallest first, into groups that each expect at least
    MIN_EXPECTED samples (a last group short of it joins the one before).
    """
    counts = np.asarray(counts, dtype=np.float64)
    probs = np.asarray(expected_probs, dtype=np.float64)
    expected = probs * counts.sum()
    support = expected > 0
    if counts[~support].sum() > 0:
        return float("inf"), 0, 0.0
    counts, expected = pooled(counts[support], expected[support])
    if len(counts) < 2:
        return 0.0, 0, 1.0  # one cell: the support check above is all there is to test
    statistic = float(((counts - expected) ** 2 / expected).sum())
    df = len(counts) - 1
    return statistic, df, float(stats.chi2.sf(statistic, df))


def pooled(counts: np.ndarray, expected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cells in ascending order of expectation, merged into consecutive groups that each
    expect at least MIN_EXPECTED samples, or half of all samples where there are too few for
    two such groups (one group would test nothing: p-value 1 whatever the counts)."""
    least = min(MIN_EXPECTED, float(expected.sum()) / 2)
    order = np.argsort(expected, kind="stable")
    group_counts, group_expected, count, mass = [], [], 0.0, 0.0
    for c, e in zip(counts[order], expected[order]):
        count, mass = count + c, mass + e
        if mass >= least:
            group_counts.append(count)
            group_expected.append(mass)
            count = mass = 0.0
    if mass > 0:  # the rest, short of MIN_EXPECTED
        if group_counts:
            group_counts[-1] += count
            group_expected[-1] += mass
        else:
            group_counts.append(count)
            group_expected.append(mass)
    return np.asarray(group_counts), np.asarray(group_expected)


def sample_tokens(verifier: Verifier, p: torch.Tensor, q: torch.Tensor, k: int, samples: int, seed: int):
    """End to end: ``samples`` draft tuples from the verifier's scheme, then ``verify``.

    Returns (token counts [V], drafts [N, k], verdict)."""
    g = torch.Generator().manual_seed(seed)
    p_n = p.unsqueeze(0).expand(samples, -1).contiguous()
    q_n = q.unsqueeze(0).expand(samples, -1).contiguous()
    drafts = verifier.draft(q_n, k, generator=g)
    verdict = verifier.verify(p_n, q_n, drafts, generator=g)
    return np.bincount(verdict.token.numpy(), minlength=p.shape[0]), drafts, verdict


@dataclass
class CheckResult:
    kind: str  # "enumeration" or "chi-square"
    case: str
    k: int
    passed: bool
    detail: str


@dataclass
class ExactnessReport:
    verifier: str
    results: list[CheckResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(r.passed for r in self.results)


MIN_SAMPLES = 1_000  # per chi-square test: the cases' cells then pool into several groups of >= 50 expected


def check_exactness(
    verifier: Verifier,
    max_k: int = 3,
    tolerance: float = 1e-12,
    samples: int = 200_000,
    family_alpha: float = 1e-6,
    statistical_cases=("v4-onehot-q", "v5-zeros-both", "v6-dirichlet-sparse"),
    seed: int = 0,
) -> ExactnessReport:
    """Enumerate every corner case (k = 1..max_k the verifier supports) and chi-square-test the
    sampled tokens of ``statistical_cases`` against p, at a per-test level that keeps the
    chance of a false failure for an exact verifier below ``family_alpha``."""
    if isinstance(max_k, bool) or not isinstance(max_k, numbers.Integral) or max_k < 1:
        raise ValueError(f"max_k must be an int >= 1 (the largest draft count to check), got {max_k!r}")
    if isinstance(samples, bool) or not isinstance(samples, numbers.Integral) or samples < MIN_SAMPLES:
        # fewer and the pooled chi-square has a degree of freedom or none: a check that cannot fail
        raise ValueError(f"samples must be an int >= {MIN_SAMPLES} per chi-square test, got {samples!r}")
    if not 0 < family_alpha < 1:
        raise ValueError(f"family_alpha must be in (0, 1), got {family_alpha!r}")
    report = ExactnessReport(verifier.name or type(verifier).__name__)
    for case, (p, q) in CASES.items():
        for k in supported_ks(verifier, q, max_k):
            error = float((output_distribution(verifier, p, q, k) - p).abs().max())
            _, prob = draft_law(verifier, q, k)
            mass_error = abs(float(prob.sum()) - 1)
            passed = error <= tolerance and mass_error <= tolerance
            report.results.append(
                CheckResult("enumeration", case, k, passed, f"max |out - p| = {error:.2e}, draft law mass error {mass_error:.2e}")
            )
    plan = [(case, supported_ks(verifier, CASES[case][1], max_k)) for case in statistical_cases]
    plan = [(case, ks[-1]) for case, ks in plan if ks]
    alpha = family_alpha / max(len(plan), 1)
    for i, (case, k) in enumerate(plan):
        p, q = CASES[case]
        counts, _, _ = sample_tokens(verifier, p, q, k, samples, seed + i)
        statistic, df, pvalue = chi_square(counts, p.numpy())
        # one group with p spread over several tokens: the pooling left nothing to test (a
        # one-token p has df 0 at any count, and its check is the support check: a sample where
        # p = 0 gives p-value 0)
        if df < 1 and pvalue > 0 and int((p > 0).sum()) >= 2:
            raise ValueError(f"the chi-square test of case {case!r} pooled into one group at {samples} samples: "
                             f"nothing to test; use more samples")
        report.results.append(
            CheckResult(
                "chi-square", case, k, pvalue > alpha,
                f"chi2 = {statistic:.2f} on {df} df, p-value {pvalue:.3g} (level {alpha:.2g}, {samples} samples)",
            )
        )
    return report
