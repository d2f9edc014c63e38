"""Recursive rejection sampling without replacement (Jeon et al. 2024).

Drafts are k distinct tokens drawn one after another from q renormalized over the tokens not
yet drawn.  Draft i is accepted with probability min(1, r_{i-1}(x_i) / q_{i-1}(x_i)), where
q_{i-1} is q with x_1..x_{i-1} removed and renormalized, and on rejection
r_i = normalize(max(r_{i-1} - q_{i-1}, 0)).  Because a rejected draft never comes back, the
acceptance is higher than with replacement.  Shares the residual walk with rrs.py; the proof
is in docs/verifiers/rrs-wor.md.
"""

from __future__ import annotations

import torch

from .base import Verifier, register_verifier
from .rrs import draftable_mass, recursive_rejection_kernel, recursive_rejection_verify


def sample_without_replacement(q, k, generator):
    """k distinct tokens per row [B, k], drawn sequentially from q renormalized each time.

    Exponential race: token v finishes at time E_v / q_v with E_v ~ Exp(1); the order of the
    first k finishers is exactly a sequential draw without replacement (tokens with q = 0
    never finish).
    """
    # float64 whatever q's dtype: a float32 uniform is exactly 0 with probability 2^-24, and a
    # clock of 0 finishes first whatever its q (V = 32000 tokens: a 2e-3 bias)
    u = torch.rand(q.shape, generator=generator, device=q.device, dtype=torch.float64)  # [B, V]
    # compared as logs: E / q overflows to inf for a subnormal q (1e-310), tying with q = 0
    q64 = q.to(torch.float64)
    log_finish = torch.where(q64 > 0, (-torch.log1p(-u)).log() - q64.log(), torch.inf)  # [B, V]
    return torch.topk(log_finish, k, dim=-1, largest=False, sorted=True).indices


def draft_probability_without_replacement(q, drafts):
    """prod_i q(x_i) / (1 - q(x_1) - ... - q(x_{i-1})); 0 for a tuple with a repeat: [B]."""
    qx = q.gather(1, drafts)  # [B, k]
    remaining = draftable_mass(q, drafts)  # [B, k] mass before step i, without cancellation
    # q(x_i) <= the mass left, so the step is <= 1 even where that mass is subnormal
    steps = torch.where(remaining > 0, qx / torch.where(remaining > 0, remaining, 1.0), 0.0)
    ordered = drafts.sort(dim=1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)  # [B]
    return torch.where(repeated, torch.zeros_like(qx[:, 0]), steps.prod(dim=1))


@register_verifier("rrs-wor")
class RecursiveRejectionWithoutReplacement(Verifier):
    """Recursive rejection sampling over k distinct drafts."""

    distinct_drafts = True
    iid_drafts = False
    needs_exact_sums = False  # as rrs: the rows' own sums

    def _draft(self, q, k, generator):
        return sample_without_replacement(q, k, generator)

    def _draft_probability(self, q, drafts):
        return draft_probability_without_replacement(q, drafts)

    def _kernel(self, p, q, drafts):
        return recursive_rejection_kernel(p, q, drafts, without_replacement=True)

    def _verify(self, p, q, drafts, generator):
        return recursive_rejection_verify(p, q, drafts, True, generator)
