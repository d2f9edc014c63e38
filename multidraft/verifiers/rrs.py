"""Recursive rejection sampling with replacement (SpecInfer): k i.i.d. drafts from q.

Draft i is checked against the running residual r_{i-1} (r_0 = p) and accepted with
probability min(1, r_{i-1}(x_i) / q(x_i)); on rejection the residual becomes
r_i = normalize(max(r_{i-1} - q, 0)); if every draft is rejected the token is drawn from r_k.

Every residual has the closed form r_i = max(p - c_i q, 0) / m_i with one scalar c_i per row:
c_0 = 0, c_{i+1} = c_i + m_i / Z_i, where m_i = sum(max(p - c_i q, 0)) is the residual's mass
and Z_i = 1 for drafts with replacement (Z_i = mass of q not yet drafted without replacement,
see rrs_wor.py).  So no [B, V] residual is ever stored: a step costs one fused reduction over V
and a gather, and the acceptance test needs only the gathered values at the draft.
The written proof is in docs/verifiers/rrs.md.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Verdict, Verifier, first_match, register_verifier, sample_categorical, sample_from_weights


def unnormalized_residual(p: Tensor, q: Tensor, c: Tensor) -> Tensor:
    """max(p - c q, 0): [B, V].  p is the target, q the draft, c [B, 1]."""
    return torch.addcmul(p, c, q, value=-1).clamp_(min=0)


def acceptance_probability(p, q, x, c, m, z) -> Tensor:
    """min(1, r(x) / q_cur(x)) [B, 1] for the draft x [B, 1], with r = max(p - c q, 0) / m
    the residual and q_cur = q / z the draft law over tokens still draftable.

    Where m = 0 the step is reached with probability 0 in exact arithmetic (the previous
    step accepted surely); accepting there keeps every later term of the kernel finite.
    """
    px, qx = p.gather(1, x), q.gather(1, x)  # [B, 1]
    ratio = torch.addcmul(px, c, qx, value=-1).clamp_(min=0) * z / (m * qx)
    return torch.where(m > 0, ratio.clamp(max=1), torch.ones_like(ratio))


def rejection_walk(p: Tensor, q: Tensor, drafts: Tensor, without_replacement: bool):
    """Acceptance probabilities of the k drafts in order, and the final residual.

    Returns (accepts: list of k tensors [B, 1], residual [B, V] unnormalized, mass [B, 1]).
    """
    c = torch.zeros_like(p[:, :1])  # [B, 1]
    m = p.sum(dim=-1, keepdim=True)  # [B, 1] residual mass (1 up to rounding)
    z = q.sum(dim=-1, keepdim=True)  # [B, 1] q-mass of the tokens still draftable
    accepts = []
    k = drafts.shape[1]
    for i in range(k):
        x = drafts[:, i : i + 1]  # [B, 1]
        accepts.append(acceptance_probability(p, q, x, c, m, z))
        c = c + torch.where(m > 0, m / z, torch.zeros_like(m))
        if without_replacement:
            z = z - q.gather(1, x)
        if i < k - 1:
            m = unnormalized_residual(p, q, c).sum(dim=-1, keepdim=True)
    residual = unnormalized_residual(p, q, c)  # [B, V]
    return accepts, residual, residual.sum(dim=-1, keepdim=True)


def recursive_rejection_kernel(p: Tensor, q: Tensor, drafts: Tensor, without_replacement: bool) -> Tensor:
    """Exact distribution [B, V] of the token emitted by recursive rejection sampling."""
    accepts, residual, mass = rejection_walk(p, q, drafts, without_replacement)
    kern = torch.zeros_like(p)  # [B, V]
    reach = torch.ones_like(mass)  # [B, 1] probability that draft i is examined
    for i, accept in enumerate(accepts):
        kern.scatter_add_(1, drafts[:, i : i + 1], reach * accept)
        reach = reach * (1 - accept)
    # Where the last residual has no mass, reach is 0 in exact arithmetic; p keeps it finite.
    last = torch.where(mass > 0, residual / torch.where(mass > 0, mass, torch.ones_like(mass)), p)
    return kern + reach * last


def recursive_rejection_verify(
    p: Tensor, q: Tensor, drafts: Tensor, without_replacement: bool, generator: torch.Generator | None
) -> Verdict:
    """Sample the recursive rejection scheme directly: one uniform per draft, no [B, V] kernel."""
    accepts, residual, mass = rejection_walk(p, q, drafts, without_replacement)
    uniforms = torch.rand(drafts.shape, generator=generator, device=p.device, dtype=p.dtype)  # [B, k]
    passed = uniforms < torch.cat(accepts, dim=1)  # [B, k]
    chosen = torch.where(passed.any(dim=1), passed.to(torch.uint8).argmax(dim=1), -1)  # [B]
    # Rows that rejected every draft draw from the last residual; drawing for all rows avoids
    # a host sync to find them.
    fallback = sample_from_weights(torch.where(mass > 0, residual, p), generator)  # [B]
    accepted_token = drafts.gather(1, chosen.clamp(min=0).unsqueeze(1)).squeeze(1)
    token = torch.where(chosen >= 0, accepted_token, fallback)
    return Verdict(token, first_match(drafts, token))


@register_verifier("rrs")
class RecursiveRejection(Verifier):
    """Recursive rejection sampling over k i.i.d. drafts (SpecInfer)."""

    iid_drafts = True
    exact_acceptance = True

    def _draft(self, q, k, generator):
        return sample_categorical(q, k, generator)  # [B, k]

    def _expected_acceptance(self, p, q, k):
        # Averaged over i.i.d. drafts, all k are rejected with probability m_k (docs/verifiers/rrs.md).
        c = torch.zeros_like(p[:, :1])
        m = p.sum(dim=-1, keepdim=True)
        for _ in range(k):
            c = c + m
            m = unnormalized_residual(p, q, c).sum(dim=-1, keepdim=True)
        return 1 - m.squeeze(1)

    def _draft_probability(self, q, drafts):
        return q.gather(1, drafts).prod(dim=1)  # [B]

    def _kernel(self, p, q, drafts):
        return recursive_rejection_kernel(p, q, drafts, without_replacement=False)

    def _verify(self, p, q, drafts, generator):
        return recursive_rejection_verify(p, q, drafts, False, generator)
