"""The acceptance-optimal verifier for k drafts drawn without replacement, solved as an LP.

Draft scheme: rrs-wor's, k distinct tokens drawn one after another from q renormalized over the
tokens not yet drawn.  Hu et al. (2025) showed that the best acceptance any exact verifier can
reach with such drafts is ``multidraft.proofs.optimal_acceptance(p, q, k, replacement=False)``
= 1 - max_T [Q(T) - p(T)], Q(T) the chance that all k drafts fall in T, and that it is higher
than with i.i.d. drafts; rrs-wor stays below it.  This verifier reaches it.

The LP is otm's with k-subsets in place of multisets: over the C(s, k) sets A of k distinct
tokens of q's support, with Q(A) the chance that the drafts are A in any order (a sum over
the k! orderings of the sequential draw), the variables are a(A, y) >= 0 for y in A with
p(y) > 0, and

    maximize  sum a    s.t.  sum_y a(A, y) <= Q(A)  (each A),   sum_A a(A, y) <= p(y)  (each y).

The kernel of an ordered draft tuple t with set A is otm's,
``K(y) = a(A, y)/Q(A) + (1 - sum_y' a(A, y')/Q(A)) res(y)``, res ∝ p - sum_A a(A, .): exact for
any feasible a, optimal for an optimal one, by max-flow/min-cut (docs/verifiers/optimal-wor.md).
The solver, the repair to exact feasibility, the per-row cache and the size limit
(``max_variables``; k C(s, k) variables) are otm's.
"""

from __future__ import annotations

from .base import register_verifier
from .otm import OptimalTransport
from .rrs_wor import draft_probability_without_replacement, sample_without_replacement


@register_verifier("optimal-wor")
class OptimalTransportWithoutReplacement(OptimalTransport):
    """The acceptance-optimal coupling of k drafts drawn without replacement with p, by LP."""

    iid_drafts = False
    distinct_drafts = True
    distinct_sets = True

    def _draft(self, q, k, generator):
        return sample_without_replacement(q, k, generator)  # [B, k]

    def _draft_probability(self, q, drafts):
        return draft_probability_without_replacement(q, drafts)  # [B]
