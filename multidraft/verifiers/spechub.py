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

Cost of verify (CPU, B rows): the hub and R from two block-wise reads of q (``hub_and_rest``);
the draft test on x needs nothing more, and most rows end there.  Only the rows that reject x
(a fraction near 1 - sum min(p, q)) copy their p and q rows and compute the spare masses and
the residual: about eight [n, V] passes, and a two-level inverse CDF for the draw.  On an
accelerator every row does all of it, with no host sync.  Draft: two block-wise reads for the
hub and two two-level inverse-CDF draws.  No Python loop over V or B.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .base import (
    CDF_BLOCK,
    Verdict,
    Verifier,
    block_reduce,
    block_weights,
    first_match,
    inverse_cdf,
    register_verifier,
)


def hub_and_rest(q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(a [B, 1], q(a) [B, 1], R [B, 1]): the hub a = argmax q, the first index among ties as
    ``q.max`` gives it, and R = the mass of q off the hub.

    Two reads of q, in blocks of CDF_BLOCK tokens: a values-only max and a sum per block.  The
    hub lies in the first block holding the row maximum, and only that block is searched with
    an index (torch's max-with-index reduction runs about 3x slower than a values-only one on a
    CPU; over the whole row it was the largest single cost of verify).  R adds every other
    block's sum to the hub block's sum without the hub: never sum(q) - q(a), which cancels near
    a one-hot q, where R divides the second draft's law.  A rest below the dtype's smallest
    normal number counts as 0, and draft() then repeats the hub, so every function here sees
    the same scheme.
    """
    block_max, block_sum = block_reduce(q, torch.amax), block_reduce(q, torch.sum)  # [B, nb] each
    _, block = block_max.max(dim=-1, keepdim=True)  # [B, 1] the first block reaching the max
    inside = block_weights(q, block).squeeze(1)  # [B, CDF_BLOCK]; past V: 0
    q_hub, offset = inside.max(dim=-1, keepdim=True)
    rest = block_sum.scatter(1, block, 0.0).sum(dim=-1, keepdim=True) + inside.scatter(1, offset, 0.0).sum(dim=-1, keepdim=True)
    rest = torch.where(rest >= torch.finfo(q.dtype).tiny, rest, torch.zeros_like(rest))
    return block * CDF_BLOCK + offset, q_hub, rest


class HubStats(NamedTuple):
    """What the scheme takes from q alone (all [B, 1])."""

    hub: Tensor  # LongTensor: a = argmax q, first index among ties
    q_hub: Tensor  # q(a)
    rest: Tensor  # R = sum of q off the hub; 0 where that is below the dtype's tiny (one-hot)
    scale: Tensor  # q(a) / R, so that w_x = scale * q(x); 0 where R = 0

    def rows(self, index: Tensor) -> HubStats:
        return HubStats(*(t.index_select(0, index) for t in self))


def hub_stats(q: Tensor) -> HubStats:
    hub, q_hub, rest = hub_and_rest(q)
    has_rest = rest > 0
    scale = torch.where(has_rest, q_hub / torch.where(has_rest, rest, torch.ones_like(rest)), torch.zeros_like(rest))
    return HubStats(hub, q_hub, rest, scale)


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """min(1, num / den), and 1 where den = 0 (a test reached with probability 0)."""
    safe = torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, (num / safe).clamp(max=1), torch.ones_like(num))


class DraftTest(NamedTuple):
    """The first test of verification, on the non-hub draft x (all [B, 1])."""

    x: Tensor  # the non-hub draft; the hub itself for a tuple (a, a)
    hub_first: Tensor  # bool: the tuple is (a, x)
    accept_x: Tensor  # P(emit x)


def draft_test(p: Tensor, q: Tensor, drafts: Tensor, stats: HubStats) -> DraftTest:
    first, second = drafts[:, :1], drafts[:, 1:2]  # [B, 1] each
    hub_first = first == stats.hub
    x = torch.where(hub_first, second, first)
    p_x, q_x = p.gather(1, x), q.gather(1, x)
    # (x, a): ordinary speculative sampling of x against the full p.
    accept_x_last = _ratio(p_x, q_x)
    # (a, x): what p(x) has left after the (x, a) tuples, against w_x.
    accept_x_first = _ratio((p_x - q_x).clamp(min=0), stats.scale * q_x)
    accept_x_first = torch.where(x == stats.hub, torch.zeros_like(accept_x_first), accept_x_first)
    return DraftTest(x, hub_first, torch.where(hub_first, accept_x_first, accept_x_last))


class Spare(NamedTuple):
    """What is left for the hub test and the residual (all [B, 1] but residual)."""

    p_hub: Tensor  # p(a)
    spare_hub_first: Tensor  # D1: mass of (a, x) tuples that reaches the hub test
    spare_hub_last: Tensor  # D2: mass of (x, a) tuples that reaches the hub test
    residual: Tensor  # [B, V] (p - pi)+ off the hub, 0 at the hub (unnormalized)
    residual_mass: Tensor  # W = sum of residual = 1 - acceptance


def spare_masses(p: Tensor, q: Tensor, stats: HubStats, q_writable: bool = False) -> Spare:
    """The masses that reach the hub test, and the residual; they depend on p and q only.
    With ``q_writable`` q is a scratch copy, and the hub is zeroed in it in place."""
    hub, q_hub, rest, scale = stats
    q_off = q.scatter_(1, hub, 0.0) if q_writable else q.scatter(1, hub, 0.0)  # [B, V]
    p_hub = p.gather(1, hub)  # [B, 1]
    # Residual (p - pi)+ with pi = (1 + scale) q off the hub; the hub's own entry is cleared.
    residual = torch.addcmul(p, q_off, 1 + scale, value=-1).clamp_(min=0)  # [B, V]
    residual.scatter_(1, hub, 0.0)
    residual_mass = residual.sum(dim=-1, keepdim=True)  # W
    # D2 = sum_{x != a} (q(x) - p(x))+ = R - sum_{x != a} min(p(x), q(x)).
    overlap = torch.minimum(p, q_off).sum(dim=-1, keepdim=True)
    spare_hub_last = (rest - overlap).clamp_(min=0)
    # D1 + D2 = D = sum_{x != a} (pi_x - p(x))+ = W + sum pi - sum_{x != a} p, and sum pi = R + q(a).
    off_p = p.sum(dim=-1, keepdim=True) - p_hub
    spare = residual_mass + rest + q_hub - off_p
    # With R = 0 the only tuple is (a, a) of mass q(a): all of it reaches the hub test.
    spare_hub_first = torch.where(rest > 0, (spare - spare_hub_last).clamp(min=0), q_hub)
    return Spare(p_hub, spare_hub_first, spare_hub_last, residual, residual_mass)


def hub_acceptance(spare: Spare, hub_first: Tensor) -> Tensor:
    """P(emit the hub | x rejected) [B, 1]: g1 for (a, x) tuples, g2 for (x, a) tuples."""
    d1, d2 = spare.spare_hub_first, spare.spare_hub_last
    g1 = _ratio(spare.p_hub, d1)
    g2 = _ratio((spare.p_hub - d1).clamp(min=0), d2)
    return torch.where(hub_first, g1, g2)


def residual_token(spare: Spare, x: Tensor, hub: Tensor, v: Tensor) -> Tensor:
    """A draw [B, 1] from the residual by inverse CDF with uniforms v [B, 1].

    A row whose residual is empty reaches it only by rounding; it emits the hub if p(a) > 0,
    else x, so the token stays in p's support.
    """
    drawn = inverse_cdf(spare.residual, v)  # [B, 1]
    fallback = torch.where(spare.p_hub > 0, hub, x)
    return torch.where(spare.residual_mass > 0, drawn, fallback)


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
        stats = hub_stats(q)
        has_hub = (drafts == stats.hub).any(dim=1)  # [B]
        if not bool(has_hub.all()):
            row = int((~has_hub).nonzero()[0, 0])
            raise ValueError(
                f"spechub drafts must contain the hub token argmax q; row {row} has drafts "
                f"{drafts[row].tolist()} but its hub is {int(stats.hub[row])} (draw drafts with spechub's draft())"
            )
        repeat = (drafts[:, 0] == drafts[:, 1]) & (stats.rest.squeeze(1) > 0)
        if bool(repeat.any()):
            row = int(repeat.nonzero()[0, 0])
            raise ValueError(
                f"spechub drafts repeat the hub only when q is one-hot; row {row} has drafts "
                f"{drafts[row].tolist()} but q puts mass {float(stats.rest[row]):.6g} off the hub"
            )

    def _draft(self, q, k, generator):
        hub, _, rest = hub_and_rest(q)
        u = torch.rand((q.shape[0], 2), generator=generator, device=q.device, dtype=q.dtype)
        first = inverse_cdf(q, u[:, :1])  # x1 ~ q   [B, 1]
        other = inverse_cdf(q, u[:, 1:], exclude=hub)  # x2 ~ q off the hub, renormalized
        # One-hot rows (R = 0) have nothing off the hub: the pair is (a, a).
        second = torch.where((first == hub) & (rest > 0), other, hub)
        return torch.cat([first, second], dim=1)

    def _draft_probability(self, q, drafts):
        hub, q_hub, rest, scale = hub_stats(q)
        first, second = drafts[:, :1], drafts[:, 1:2]
        q_first, q_second = q.gather(1, first), q.gather(1, second)
        zero = torch.zeros_like(q_first)
        hub_last = torch.where((first != hub) & (second == hub), q_first, zero)
        hub_first = torch.where((first == hub) & (second != hub) & (rest > 0), scale * q_second, zero)
        hub_twice = torch.where((first == hub) & (second == hub) & (rest == 0), q_hub, zero)
        return (hub_last + hub_first + hub_twice).squeeze(1)

    def _kernel(self, p, q, drafts):
        stats = hub_stats(q)
        test = draft_test(p, q, drafts, stats)
        spare = spare_masses(p, q, stats)
        miss_x = 1 - test.accept_x
        accept_hub = hub_acceptance(spare, test.hub_first)
        mass = spare.residual_mass
        # Where the residual has no mass it is reached with probability 0; p keeps it finite.
        residual = torch.where(mass > 0, spare.residual / torch.where(mass > 0, mass, torch.ones_like(mass)), p)
        kern = miss_x * (1 - accept_hub) * residual  # [B, V]
        kern.scatter_add_(1, test.x, test.accept_x)
        kern.scatter_add_(1, stats.hub, miss_x * accept_hub)
        return kern

    def _verify(self, p, q, drafts, generator):
        # Three uniforms per row, drawn up front so both paths below make the same decisions:
        # the draft test, the hub test, the residual draw.
        u = torch.rand((p.shape[0], 3), generator=generator, device=p.device, dtype=p.dtype)  # [B, 3]
        verify_path = _verify_shrinking if p.device.type == "cpu" else _verify_dense
        token = verify_path(p, q, drafts, u)
        return Verdict(token, first_match(drafts, token))

    def _expected_acceptance(self, p, q, k):
        return (1 - spare_masses(p, q, hub_stats(q)).residual_mass.squeeze(1)).clamp(min=0, max=1)


def _verify_dense(p: Tensor, q: Tensor, drafts: Tensor, u: Tensor) -> Tensor:
    """Every row computes every test and a residual draw: no host sync (for accelerators)."""
    stats = hub_stats(q)
    test = draft_test(p, q, drafts, stats)
    spare = spare_masses(p, q, stats)
    take_hub = u[:, 1:2] < hub_acceptance(spare, test.hub_first)
    drawn = residual_token(spare, test.x, stats.hub, u[:, 2:3])
    token = torch.where(u[:, :1] < test.accept_x, test.x, torch.where(take_hub, stats.hub, drawn))
    return token.squeeze(1)


def _verify_shrinking(p: Tensor, q: Tensor, drafts: Tensor, u: Tensor) -> Tensor:
    """The [B, V] work after the draft test is done only for the rows that reach it.

    The draft test needs only the hub and R, and most rows accept x there; only the others
    compute the spare masses and the residual.  Finding them syncs with the device, which is
    free on a CPU.
    """
    stats = hub_stats(q)
    test = draft_test(p, q, drafts, stats)
    token = test.x.squeeze(1).clone()  # [B]; rows that reject x are overwritten below
    rows = (u[:, 0] >= test.accept_x.squeeze(1)).nonzero().squeeze(1)  # [n]
    if rows.numel() == 0:
        return token
    stats = stats.rows(rows)
    spare = spare_masses(p.index_select(0, rows), q.index_select(0, rows), stats, q_writable=True)
    take_hub = u[rows, 1:2] < hub_acceptance(spare, test.hub_first.index_select(0, rows))  # [n, 1]
    drawn = residual_token(spare, test.x.index_select(0, rows), stats.hub, u[rows, 2:3])
    token[rows] = torch.where(take_hub, stats.hub, drawn).squeeze(1)
    return token
