"""SpecHub (Sun, Zhou, Chen and Sun, EMNLP 2024): two drafts that always contain a hub token.

Draft scheme (k = 2).  The hub is a = argmax q (the first index among ties).  x1 ~ q; if
x1 != a then x2 = a, otherwise x2 ~ q with a removed and renormalized.  So every tuple holds
the hub and one other token x, in one of two orders:

    (x, a)  with probability  u_x = q(x)
    (a, x)  with probability  w_x = q(a) q(x) / R,    R = sum_{v != a} q(v)

and the unordered pair {a, x} has mass pi_x = u_x + w_x = q(x) / (1 - q(a)).  When R = 0 (q is
one-hot on a) there is nothing else to draw and the tuple is (a, a).

Verification (the authors' split, Sequoia/Tree/MyTree.py ``accept_step``).  With
D2 = sum_{x != a} (u_x - p(x))+ the draft mass of (x, a) tuples left after their x is served and
D1 = sum_{x != a} (w_x - (p(x) - u_x)+)+ the same for (a, x) tuples:

    (x, a): emit x with prob. min(1, p(x) / u_x); else the hub with prob. g2; else residual
    (a, x): emit x with prob. min(1, (p(x) - u_x)+ / w_x); else the hub with prob. g1; else residual

    g1 = min(1, p(a) / D1),  g2 = min(1, (p(a) - D1)+ / D2),
    residual r(y) ∝ (p(y) - pi_y)+ for y != a, and r(a) = 0.

Each x receives min(p(x), pi_x) and the hub receives min(p(a), D1 + D2) = p(a) (because the
pair masses sum to 1, D1 + D2 >= p(a) always), so the hub is never in the residual and the
acceptance is 1 - sum_{x != a} (p(x) - pi_x)+, the optimum of the transport LP over this draft
law.  Proofs and edge cases: docs/verifiers/spechub.md.

Cost of verify: about 16 memory passes over [B, V] (max of q, a masked copy of q, the residual
weights and their cumsum, min(p, q) and four row sums: 11 reads, 5 writes); draft: max, masked
copy and one cumsum.  No Python loop over V or B and no host sync.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .base import Verdict, Verifier, first_match, register_verifier


class HubPlan(NamedTuple):
    """Per-row quantities shared by kernel, verify and expected_acceptance (all [B, 1])."""

    hub: Tensor  # LongTensor: a = argmax q, first index among ties
    q_hub: Tensor  # q(a)
    rest: Tensor  # R = sum of q off the hub; 0 where that is below the dtype's tiny (one-hot)
    scale: Tensor  # q(a) / R, so that w_x = scale * q(x); 0 where R = 0
    spare_hub_first: Tensor  # D1: mass of (a, x) tuples that reaches the hub test
    spare_hub_last: Tensor  # D2: mass of (x, a) tuples that reaches the hub test
    residual: Tensor  # [B, V] (p - pi)+ off the hub, 0 at the hub (unnormalized), or its cumsum
    residual_mass: Tensor  # W = sum of residual = 1 - acceptance


def hub_and_rest(q: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(hub [B, 1], q(hub) [B, 1], q with the hub zeroed [B, V], R [B, 1]).

    R is summed over the masked copy rather than taken as sum(q) - q(a): near a one-hot q the
    difference would cancel, and R divides the second draft's law.  A rest below the dtype's
    smallest normal number counts as 0, and draft() then repeats the hub, so every function
    here sees the same scheme.
    """
    q_hub, hub = q.max(dim=-1, keepdim=True)  # max returns the first maximal index
    q_off = q.scatter(1, hub, 0.0)  # [B, V]
    rest = q_off.sum(dim=-1, keepdim=True)  # [B, 1]
    rest = torch.where(rest >= torch.finfo(q.dtype).tiny, rest, torch.zeros_like(rest))
    return hub, q_hub, q_off, rest


def hub_plan(p: Tensor, q: Tensor, cumulative: bool = False) -> HubPlan:
    """Everything the verification needs that depends on p and q but not on the drafts.

    With ``cumulative`` the residual comes back as its cumsum along V (what a sampler searches),
    whose last column is its mass, so no separate sum is taken.
    """
    hub, q_hub, q_off, rest = hub_and_rest(q)
    has_rest = rest > 0
    safe_rest = torch.where(has_rest, rest, torch.ones_like(rest))
    scale = torch.where(has_rest, q_hub / safe_rest, torch.zeros_like(rest))  # w_x = scale * q(x)
    p_hub = p.gather(1, hub)  # [B, 1]
    # Residual (p - pi)+ with pi = (1 + scale) q off the hub; the hub's own entry is cleared.
    residual = torch.addcmul(p, q_off, 1 + scale, value=-1).clamp_(min=0)  # [B, V]
    residual.scatter_(1, hub, 0.0)
    if cumulative:
        residual = residual.cumsum_(dim=-1)
        residual_mass = residual[:, -1:]  # W
    else:
        residual_mass = residual.sum(dim=-1, keepdim=True)  # W
    # D2 = sum_{x != a} (q(x) - p(x))+ = R - sum_{x != a} min(p(x), q(x)).  (q_off is not
    # needed after this, so the minimum overwrites it: one [B, V] buffer fewer.)
    overlap = torch.minimum(p, q_off, out=q_off).sum(dim=-1, keepdim=True)
    spare_hub_last = (rest - overlap).clamp_(min=0)
    # D1 + D2 = D = sum_{x != a} (pi_x - p(x))+ = W + sum pi - sum_{x != a} p, and sum pi = R + q(a).
    off_p = p.sum(dim=-1, keepdim=True) - p_hub
    spare = residual_mass + rest + q_hub - off_p
    spare_hub_first = torch.where(has_rest, (spare - spare_hub_last).clamp(min=0), q_hub)
    # With R = 0 the only tuple is (a, a) of mass q(a): all of it reaches the hub test.
    return HubPlan(hub, q_hub, rest, scale, spare_hub_first, spare_hub_last, residual, residual_mass)


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """min(1, num / den), and 1 where den = 0 (a test reached with probability 0)."""
    safe = torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, (num / safe).clamp(max=1), torch.ones_like(num))


def decision_probabilities(p: Tensor, q: Tensor, drafts: Tensor, plan: HubPlan):
    """(x [B, 1] the non-hub draft, P(emit x) [B, 1], P(emit hub) [B, 1], P(residual) [B, 1]).

    For a tuple (a, a) x is the hub itself and P(emit x) is 0.
    """
    first, second = drafts[:, :1], drafts[:, 1:2]  # [B, 1] each
    hub_first = first == plan.hub
    x = torch.where(hub_first, second, first)
    p_x, q_x = p.gather(1, x), q.gather(1, x)
    p_hub = p.gather(1, plan.hub)
    # (x, a): ordinary speculative sampling of x against the full p.
    accept_x_last = _ratio(p_x, q_x)
    # (a, x): what p(x) has left after the (x, a) tuples, against w_x.
    accept_x_first = _ratio((p_x - q_x).clamp(min=0), plan.scale * q_x)
    accept_x_first = torch.where(x == plan.hub, torch.zeros_like(accept_x_first), accept_x_first)
    accept_x = torch.where(hub_first, accept_x_first, accept_x_last)
    d1, d2 = plan.spare_hub_first, plan.spare_hub_last
    g1 = _ratio(p_hub, d1)
    g2 = _ratio((p_hub - d1).clamp(min=0), d2)
    accept_hub = torch.where(hub_first, g1, g2)
    miss_x = 1 - accept_x
    return x, accept_x, miss_x * accept_hub, miss_x * (1 - accept_hub)


@register_verifier("spechub")
class SpecHub(Verifier):
    """SpecHub: hub token a = argmax q in every pair, closed-form optimal transport (k = 2)."""

    min_drafts = 2
    max_drafts = 2  # the paper and the authors' code define two drafts only
    distinct_drafts = False  # a one-hot q gives (a, a)
    iid_drafts = False
    exact_acceptance = True

    def check_inputs(self, p, q, drafts):
        super().check_inputs(p, q, drafts)
        hub, _, _, rest = hub_and_rest(q)
        has_hub = (drafts == hub).any(dim=1)  # [B]
        if not bool(has_hub.all()):
            row = int((~has_hub).nonzero()[0, 0])
            raise ValueError(
                f"spechub drafts must contain the hub token argmax q; row {row} has drafts "
                f"{drafts[row].tolist()} but its hub is {int(hub[row])} (draw drafts with spechub's draft())"
            )
        repeat = (drafts[:, 0] == drafts[:, 1]) & (rest.squeeze(1) > 0)
        if bool(repeat.any()):
            row = int(repeat.nonzero()[0, 0])
            raise ValueError(
                f"spechub drafts repeat the hub only when q is one-hot; row {row} has drafts "
                f"{drafts[row].tolist()} but q puts mass {float(rest[row]):.6g} off the hub"
            )

    def _draft(self, q, k, generator):
        hub, q_hub, q_off, rest = hub_and_rest(q)
        # One cumsum of q off the hub serves both draws.  Inserting the hub's own step at a
        # gives the cdf of q for x1; the off-hub cdf alone, searched at full resolution
        # (values up to R rather than 1), gives the law of x2 even when R is tiny.
        cdf = q_off.cumsum(dim=-1)  # [B, V]
        cdf_rest = cdf[:, -1:]
        below = cdf.gather(1, hub)  # off-hub mass before the hub
        u = torch.rand((q.shape[0], 2), generator=generator, device=q.device, dtype=q.dtype)
        total = cdf_rest + q_hub
        t1 = torch.minimum(u[:, :1] * total, torch.nextafter(total, torch.zeros_like(total)))
        before = torch.searchsorted(cdf, t1, right=True)
        # Past the hub's step: search t1 - q(a), kept >= below so rounding cannot land before
        # the hub, and < R so it cannot run off the end.
        shifted = torch.minimum(t1 - q_hub, torch.nextafter(cdf_rest, torch.zeros_like(cdf_rest)))
        after = torch.searchsorted(cdf, torch.maximum(shifted, below), right=True).clamp_(max=q.shape[1] - 1)
        first = torch.where(t1 < below, before, torch.where(t1 < below + q_hub, hub, after))
        t2 = torch.minimum(u[:, 1:] * cdf_rest, torch.nextafter(cdf_rest, torch.zeros_like(cdf_rest)))
        other = torch.searchsorted(cdf, t2, right=True).clamp_(max=q.shape[1] - 1)
        # One-hot rows (R = 0) have nothing off the hub: the pair is (a, a).
        second = torch.where((first == hub) & (rest > 0), other, hub)
        return torch.cat([first, second], dim=1)

    def _draft_probability(self, q, drafts):
        hub, q_hub, _, rest = hub_and_rest(q)
        first, second = drafts[:, :1], drafts[:, 1:2]
        q_first, q_second = q.gather(1, first), q.gather(1, second)
        safe_rest = torch.where(rest > 0, rest, torch.ones_like(rest))
        zero = torch.zeros_like(q_first)
        hub_last = torch.where((first != hub) & (second == hub), q_first, zero)
        hub_first = torch.where((first == hub) & (second != hub) & (rest > 0), q_hub * q_second / safe_rest, zero)
        hub_twice = torch.where((first == hub) & (second == hub) & (rest == 0), q_hub, zero)
        return (hub_last + hub_first + hub_twice).squeeze(1)

    def _kernel(self, p, q, drafts):
        plan = hub_plan(p, q)
        x, emit_x, emit_hub, reject = decision_probabilities(p, q, drafts, plan)
        mass = plan.residual_mass
        # Where the residual has no mass it is reached with probability 0; p keeps it finite.
        residual = torch.where(mass > 0, plan.residual / torch.where(mass > 0, mass, torch.ones_like(mass)), p)
        kern = reject * residual  # [B, V]
        kern.scatter_add_(1, x, emit_x)
        kern.scatter_add_(1, plan.hub, emit_hub)
        return kern

    def _verify(self, p, q, drafts, generator):
        plan = hub_plan(p, q, cumulative=True)
        x, emit_x, emit_hub, _ = decision_probabilities(p, q, drafts, plan)
        u = torch.rand((p.shape[0], 1), generator=generator, device=p.device, dtype=p.dtype)  # [B, 1]
        # One uniform splits [0, 1) into emit x | emit hub | residual.
        take_x = u < emit_x
        take_hub = ~take_x & (u < emit_x + emit_hub)
        # Drawing the residual for every row (inverse CDF, one binary search) avoids a host
        # sync to find the rejected ones.  A row whose residual is empty reaches it only by
        # rounding; it emits the hub if p(a) > 0, else x, so the token stays in p's support.
        cdf, mass = plan.residual, plan.residual_mass  # [B, V], [B, 1]
        v = torch.rand(mass.shape, generator=generator, device=p.device, dtype=p.dtype)
        target = torch.minimum(v * mass, torch.nextafter(mass, torch.zeros_like(mass)))
        drawn = torch.searchsorted(cdf, target, right=True).clamp_(max=p.shape[1] - 1)  # [B, 1]
        fallback = torch.where(p.gather(1, plan.hub) > 0, plan.hub, x)
        drawn = torch.where(mass > 0, drawn, fallback)
        token = torch.where(take_x, x, torch.where(take_hub, plan.hub, drawn)).squeeze(1)
        return Verdict(token, first_match(drafts, token))

    def _expected_acceptance(self, p, q, k):
        return (1 - hub_plan(p, q).residual_mass.squeeze(1)).clamp(min=0, max=1)
