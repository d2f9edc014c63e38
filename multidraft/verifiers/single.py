"""Standard speculative sampling (Leviathan et al. 2023; Chen et al. 2023): one draft.

The draft x ~ q is accepted with probability min(1, p(x) / q(x)); otherwise the token is drawn
from normalize(max(p - q, 0)).  This is recursive rejection sampling with k = 1, so it reuses
that code; the acceptance probability is 1 - TV(p, q), the best any exact single-draft
verifier can do.  Proof: docs/verifiers/single.md.
"""

from __future__ import annotations

from .base import register_verifier
from .rrs import RecursiveRejection


@register_verifier("single")
class SingleDraft(RecursiveRejection):
    """Speculative sampling with exactly one draft per node."""

    max_drafts = 1
