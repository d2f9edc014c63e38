"""A calibrated chi-square goodness-of-fit check shared by the statistical tests.

Plan (fixed before any data is seen): the whole suite runs at most PLANNED_TESTS chi-square
tests, each at level ALPHA = FAMILY_ALPHA / PLANNED_TESTS, so by the union bound the chance
that any of them fails for an exact verifier is at most FAMILY_ALPHA = 1e-6.  Seeds are fixed,
so a run is also reproducible.  With N = 200_000 samples and ALPHA = 5e-9 the test has power
above 0.99 against any deviation with N * sum((f - e)**2 / e) >= 90, e.g. a shift of about
1% of probability mass between two tokens of probability 0.25.

Cells whose expected count is below 5 are pooled; support is checked separately, because a
chi-square cannot see a few samples on a token of probability 0.
"""

from __future__ import annotations

import numpy as np
from scipy import stats as scipy_stats

FAMILY_ALPHA = 1e-6
PLANNED_TESTS = 200
ALPHA = FAMILY_ALPHA / PLANNED_TESTS
SAMPLES = 200_000

tests_run = 0


def chi_square_pvalue(counts, expected_probs) -> float:
    """p-value of observed ``counts`` against ``expected_probs`` (cells pooled below 5)."""
    global tests_run
    tests_run += 1
    counts = np.asarray(counts, dtype=np.float64)
    probs = np.asarray(expected_probs, dtype=np.float64)
    n = counts.sum()
    expected = probs * n
    support = expected > 0
    outside = counts[~support].sum()
    if outside > 0:
        return 0.0  # a sample where the law puts no mass: certainly not this law
    counts, expected = counts[support], expected[support]
    order = np.argsort(expected)
    counts, expected = counts[order], expected[order]
    # Pool the smallest cells until the pooled cell reaches 5 expected counts.
    small = np.cumsum(expected) < 5
    if small.any():
        cut = int(small.sum()) + 1
        counts = np.concatenate([[counts[:cut].sum()], counts[cut:]])
        expected = np.concatenate([[expected[:cut].sum()], expected[cut:]])
    if len(counts) < 2:
        return 1.0  # a single cell: nothing to test beyond the support check above
    statistic = float(((counts - expected) ** 2 / expected).sum())
    return float(scipy_stats.chi2.sf(statistic, df=len(counts) - 1))


def assert_law(counts, expected_probs, what: str) -> None:
    """Fail if the counts are implausible under the law at the planned level, or leave its support."""
    counts = np.asarray(counts)
    expected_probs = np.asarray(expected_probs)
    off_support = np.flatnonzero((expected_probs <= 0) & (counts > 0))
    assert off_support.size == 0, f"{what}: sampled tokens {off_support.tolist()} that have probability 0"
    pvalue = chi_square_pvalue(counts, expected_probs)
    assert pvalue > ALPHA, f"{what}: chi-square p-value {pvalue:.3g} <= {ALPHA:.3g}"
