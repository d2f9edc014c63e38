"""The suite's plan for its chi-square tests (the test itself is md.proofs.checks.chi_square).

Plan (fixed before any data is seen): the whole suite runs at most PLANNED_TESTS chi-square
tests, each at level ALPHA = FAMILY_ALPHA / PLANNED_TESTS, so by the union bound the chance
that any of them fails for an exact verifier is at most FAMILY_ALPHA = 1e-6 (to the accuracy of
the chi-square tail, with every cell expecting >= checks.MIN_EXPECTED samples).  Tests that run
``check_exactness`` take their share with ``reserve``.  Seeds are fixed, so a run is also
reproducible.

Power at ALPHA = 5e-9 against a deviation with N * sum((f - e)**2 / e) = 90 (N = 200_000: a
shift of about 1 % of probability mass between two tokens of probability 0.25): 0.998 at df =
5, 0.99 at 10, 0.95 at 20, 0.77 at 40, 0.40 at 80, so the per-token law tests (df < 10) catch
such a shift; the draft-tuple law tests, at larger df, need about twice that (0.99 at 155 for
200).

Support is checked separately, because a chi-square cannot see a few samples on a token of
probability 0.
"""

from __future__ import annotations

import numpy as np

from multidraft.proofs.checks import chi_square

FAMILY_ALPHA = 1e-6
PLANNED_TESTS = 200
ALPHA = FAMILY_ALPHA / PLANNED_TESTS
SAMPLES = 200_000

tests_run = 0


def reserve(tests: int) -> float:
    """Count ``tests`` chi-square tests run elsewhere (``check_exactness``) and return the family
    level to give them: their share of the plan."""
    global tests_run
    tests_run += tests
    return tests * ALPHA


def chi_square_pvalue(counts, expected_probs) -> float:
    global tests_run
    tests_run += 1
    return chi_square(counts, expected_probs)[2]


def assert_law(counts, expected_probs, what: str) -> None:
    """Fail if the counts are implausible under the law at the planned level, or leave its support."""
    counts = np.asarray(counts)
    expected_probs = np.asarray(expected_probs)
    off_support = np.flatnonzero((expected_probs <= 0) & (counts > 0))
    assert off_support.size == 0, f"{what}: sampled tokens {off_support.tolist()} that have probability 0"
    pvalue = chi_square_pvalue(counts, expected_probs)
    assert pvalue > ALPHA, f"{what}: chi-square p-value {pvalue:.3g} <= {ALPHA:.3g}"
