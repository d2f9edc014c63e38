"""Greedy draft construction (Hu et al. 2025, "Towards Optimal Multi-draft Speculative
Decoding"): the k - 1 most likely draft tokens are proposed deterministically, the last draft is
sampled from q without them, and the target verifies with the best coupling for that draft law.

Write H for the k - 1 "hub" tokens (top k - 1 of q) and w = q / (1 - q(H)) off H for the law of
the sampled draft x.  Every tuple holds all of H, so the coupling is a small flow: x is served
first (emit x with mass min(w(x), p(x))), the spare mass max(w(x) - p(x), 0) flows to H up to
p(H), split over H in proportion to p, and whatever is left is rejected to the residual
p - (accepted mass).  With k = 2 this is SpecHub's hub-token construction.
Proof of exactness and optimality: docs/verifiers/greedy.md.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Verifier, register_verifier


def hub_tokens(q: Tensor, k: int) -> Tensor:
    """The k - 1 most likely draft tokens, most likely first: [B, k-1] (ties: lowest id)."""
    # topk is not specified to break ties by index; a stable descending sort is.
    return torch.sort(q, dim=-1, descending=True, stable=True).indices[:, : k - 1]


def hub_mask(q: Tensor, k: int) -> Tensor:
    """[B, V] True on the hub tokens."""
    return torch.zeros_like(q, dtype=torch.bool).scatter_(1, hub_tokens(q, k), True)


def greedy_plan(p: Tensor, q: Tensor, k: int):
    """The coupling's per-token quantities.

    Returns (hub [B, V] bool, w [B, V] law of the sampled draft, keep [B, V] = min(1, p / w)
    probability of emitting the sampled draft itself, theta [B, 1] share of a rejected draft's
    spare mass sent to the hub, residual [B, V] normalized law emitted on rejection).
    """
    hub = hub_mask(q, k)
    off_hub_q = q.masked_fill(hub, 0)
    w = off_hub_q / off_hub_q.sum(dim=-1, keepdim=True)  # [B, V]
    served = torch.minimum(w, p).masked_fill(hub, 0)  # emitted as the sampled draft
    spare = (w - p).clamp(min=0).masked_fill(hub, 0)  # [B, V]
    spare_total = spare.sum(dim=-1, keepdim=True)
    p_hub = p.masked_fill(~hub, 0)
    hub_mass = p_hub.sum(dim=-1, keepdim=True)
    to_hub = torch.minimum(hub_mass, spare_total)  # [B, 1]
    theta = torch.where(spare_total > 0, to_hub / torch.where(spare_total > 0, spare_total, torch.ones_like(spare_total)), torch.zeros_like(spare_total))
    hub_share = torch.where(hub_mass > 0, to_hub / torch.where(hub_mass > 0, hub_mass, torch.ones_like(hub_mass)), torch.zeros_like(hub_mass))
    leftover = torch.where(hub, p * (1 - hub_share), p - served).clamp(min=0)  # [B, V]
    leftover_total = leftover.sum(dim=-1, keepdim=True)
    residual = torch.where(leftover_total > 0, leftover / torch.where(leftover_total > 0, leftover_total, torch.ones_like(leftover_total)), p)
    keep = torch.where(w > 0, (p / torch.where(w > 0, w, torch.ones_like(w))).clamp(max=1), torch.zeros_like(w))
    return hub, w, keep, theta, p_hub / torch.where(hub_mass > 0, hub_mass, torch.ones_like(hub_mass)), residual


@register_verifier("greedy")
class GreedyHub(Verifier):
    """Top k-1 draft tokens deterministically plus one sampled draft, optimally coupled."""

    min_drafts = 2
    distinct_drafts = True
    iid_drafts = False
    exact_acceptance = True

    def _expected_acceptance(self, p, q, k):
        hub, w, keep, theta, _, _ = greedy_plan(p, q, k)
        served = (w * keep).masked_fill(hub, 0).sum(dim=-1)  # [B]
        spare = (w * (1 - keep)).masked_fill(hub, 0).sum(dim=-1)
        return served + theta.squeeze(1) * spare

    def check_inputs(self, p, q, drafts):
        super().check_inputs(p, q, drafts)
        k = drafts.shape[1]
        wrong = ~(drafts[:, : k - 1] == hub_tokens(q, k)).all(dim=1)  # [B]
        if bool(wrong.any()):
            row = int(wrong.nonzero()[0, 0])
            raise ValueError(
                f"greedy drafts must start with the top {k - 1} tokens of q, most likely first: "
                f"row {row} has {drafts[row].tolist()}, expected {hub_tokens(q, k)[row].tolist()} "
                f"then one other token (use draft())"
            )

    def _draft(self, q, k, generator):
        hub = hub_tokens(q, k)  # [B, k-1]
        rest = q.scatter(1, hub, 0)  # q without the hub
        cdf = rest.cumsum(dim=-1)
        total = cdf[:, -1:]
        u = torch.rand(total.shape, generator=generator, device=q.device, dtype=q.dtype)
        target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
        last = torch.searchsorted(cdf, target, right=True)  # [B, 1]
        return torch.cat([hub, last], dim=1)

    def _draft_probability(self, q, drafts):
        k = drafts.shape[1]
        hub = hub_tokens(q, k)
        hub_ok = (drafts[:, : k - 1] == hub).all(dim=1)  # [B]
        last = drafts[:, k - 1 :]
        off_hub = ~(last == hub).any(dim=1)
        q_last = q.gather(1, last).squeeze(1)
        # the q-mass off the hub as a sum of its own (positive) terms, as _draft and greedy_plan
        # take it: 1 - q(hub) cancelled for a peaked q (a draft law summing to 1.0008 at
        # 1 - max q = 2e-15, and 0 for every tuple when q's rest was 1e-300)
        rest = q.scatter(1, hub, 0).sum(dim=1)
        prob = torch.where(rest > 0, q_last / torch.where(rest > 0, rest, torch.ones_like(rest)), torch.zeros_like(rest))
        return torch.where(hub_ok & off_hub, prob, torch.zeros_like(prob))

    def _kernel(self, p, q, drafts):
        k = drafts.shape[1]
        hub, w, keep, theta, hub_law, residual = greedy_plan(p, q, k)
        last = drafts[:, k - 1 :]  # [B, 1] the sampled draft
        keep_last = keep.gather(1, last)  # [B, 1]
        rejected = 1 - keep_last
        kern = torch.zeros_like(p).scatter_(1, last, keep_last)
        return kern + rejected * theta * hub_law + rejected * (1 - theta) * residual
