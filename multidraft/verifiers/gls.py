"""Gumbel-max list sampling (GLS; Rowan, Phan & Khisti 2025): k drafts and the target sample
coupled through shared exponential clocks.

The scheme.  Draw k lists of i.i.d. Exp(1) variables E[i, v], one per list i and token v.
Draft i is ``argmin_v E[i, v] / q(v)`` (so the k drafts are i.i.d. from q, as for rrs), and
the emitted token is ``Y = argmin_v min_i E[i, v] / p(v)``.  For each v, ``min_i E[i, v]`` is
Exp(k) and independent across v, so Y follows p, whatever q is: the output is a function of
the clocks and p alone (*drafter invariance*), and a draft is accepted when one of them equals Y.

The verifier samples Y given the drafts, which is what the contract asks for.  Given draft i
= x, list i's clocks are, by memorylessness, ``E[i, v] = q(v) T_i + F[i, v]`` for v != x and
``E[i, x] = q(x) T_i``, with T_i, F[i, v] i.i.d. Exp(1) (T_i = min_v E[i, v] / q(v)).  So
``verify`` draws those clocks and takes Y (``target_race_winner``; only min_i E[i, v] matters
for a token no list drafted, which one variate per token gives): the joint law of (drafts, Y)
is the scheme's, hence exact.  (The pathwise invariance needs the drafter and the verifier to share the clocks, which
this contract, where drafts are tokens, does not carry; the law is the same.)

The kernel and the acceptance are 1-D integrals over the time t of the first ring of all k V
clocks of the target race, taken by exp-sinh quadrature (docs/verifiers/gls.md):

    K(y | x) = p(y) sum_i int_0^inf e^{-kt} g_i(y, t) prod_{j != i} H(r(x_j), inf; t) dt,
    H(a, b; t) = t int_a^b exp(-t Phi(r)) dr,   Phi(r) = sum_v q(v) (r - r(v))^+,   r = p / q,

with ``g_i(y, t) = H(r(x_i), r(y); t)`` for y != x_i and ``exp(-t Phi(r(y))) / q(y)`` for
y = x_i.  Phi is piecewise linear with its breakpoints at the sorted ratios, so H is a sum of
positive per-segment terms.  The kernel costs B k N V for N quadrature nodes and is refused
above ``max_kernel_entries``; ``verify`` never needs it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..quadrature import exp_sinh_nodes
from .base import Verdict, Verifier, as_law, first_match, register_verifier, sample_categorical

# [rows, k, nodes, V] float64 entries of the kernel's quadrature: one pass takes at most this
# many, and a call that would need more than ``max_kernel_entries`` in all is refused.
KERNEL_CHUNK_ENTRIES = 1 << 20
DEFAULT_MAX_KERNEL_ENTRIES = 1 << 28
# Quadrature steps in tau (multidraft/quadrature.py): the kernel tries them in turn for rows
# that do not yet sum to 1 within KERNEL_SUM_TOLERANCE; the acceptance, whose terms carry the
# weight p(y), uses the first one only.
KERNEL_STEPS = (1 / 32, 1 / 64, 1 / 128, 1 / 256, 1 / 512)
KERNEL_SUM_TOLERANCE = 1e-13
ACCEPTANCE_STEP = 1 / 32


class RaceSegments:
    """The target race's ratio line for rows p, q [B, V] (float64), at the quadrature nodes.

    Tokens are sorted by r = p/q (q = 0 last, r = inf).  ``position`` [B, V] is each token's
    place in that order; ``segment`` [B, N, V] is, for the segment from the m-th ratio to the
    next, ``t int exp(-t Phi)`` over it = ``(1/Q_m) e^{-t phi_m} (1 - e^{-t Q_m dr_m})`` with
    Q_m the q-mass up to m, phi_m = Phi(r_m) and dr_m the segment's length (inf for the last
    one; 0 past q's support).  ``at_ratio`` [B, N, V] is ``e^{-t phi_m}`` at each position.
    """

    def __init__(self, p: Tensor, q: Tensor, t: Tensor):
        ratio = torch.where(q > 0, p / torch.where(q > 0, q, torch.ones_like(q)), torch.full_like(p, float("inf")))
        overflow = (q > 0) & torch.isinf(ratio)
        if bool(overflow.any()):
            row, token = (int(i) for i in overflow.nonzero()[0])
            raise ValueError(f"gls's quadrature needs finite ratios p/q where q > 0; row {row}, token {token} has "
                             f"p = {float(p[row, token]):.3g}, q = {float(q[row, token]):.3g} (p/q overflows float64)")
        order = ratio.argsort(dim=-1, stable=True)  # [B, V]
        self.position = torch.empty_like(order).scatter_(1, order, torch.arange(p.shape[1], device=p.device).expand_as(order))
        r = ratio.gather(1, order)  # [B, V] ascending
        q_sorted = q.gather(1, order)
        mass = q_sorted.cumsum(dim=1).clamp(max=1.0)  # [B, V] Q_m
        live = q_sorted > 0
        nxt = torch.cat([r[:, 1:], torch.full_like(r[:, :1], float("inf"))], dim=1)
        gap = torch.where(live, nxt - torch.where(live, r, torch.zeros_like(r)), torch.zeros_like(r))  # dr_m: inf last, 0 past support
        rise = torch.where(torch.isinf(gap), torch.zeros_like(gap), mass * gap)  # Phi(r_{m+1}) - Phi(r_m), finite part
        phi = torch.cat([torch.zeros_like(rise[:, :1]), rise[:, :-1].cumsum(dim=1)], dim=1)  # [B, V] Phi(r_m), sums of >= 0
        phi = torch.where(live, phi, torch.full_like(phi, float("inf")))
        tt = t.view(1, -1, 1)  # [1, N, 1]
        self.at_ratio = torch.exp(-tt * phi.unsqueeze(1))  # [B, N, V]; 0 past the support
        width = -torch.expm1(-tt * (mass * gap).unsqueeze(1))  # [B, N, V]; 1 for the last segment
        self.segment = torch.where(live.unsqueeze(1), self.at_ratio * width / mass.clamp(min=1e-300).unsqueeze(1),
                                   torch.zeros_like(width))
        self.q_sorted, self.p_sorted = q_sorted, p.gather(1, order)

    def tail_from(self) -> Tensor:
        """H(r_m, inf; t) for every position m: [B, N, V], suffix sums of positive terms."""
        return self.segment.flip(-1).cumsum(-1).flip(-1)


def gls_kernel_rows(p: Tensor, q: Tensor, drafts: Tensor, t: Tensor, w: Tensor) -> Tensor:
    """K(y | drafts) [B, V] for float64 rows by the quadrature (t, w) [N]."""
    batch, k = drafts.shape
    race = RaceSegments(p, q, t)
    start = race.position.gather(1, drafts)  # [B, k] each draft's position
    positions = torch.arange(p.shape[1], device=p.device)
    # From each draft's position on: H(r(x_i), r_m; t) = sum of the segments in [pos(x_i), m).
    from_draft = race.segment.unsqueeze(1) * (positions >= start.unsqueeze(-1)).unsqueeze(2)  # [B, k, N, V]
    upto = torch.cat([torch.zeros_like(from_draft[..., :1]), from_draft.cumsum(-1)[..., :-1]], dim=-1)  # [B, k, N, V]
    tail = upto[..., -1] + from_draft[..., -1]  # [B, k, N] H(r(x_i), inf; t)
    # prod over j != i of the tails, as prefix x suffix products (a tail can underflow to 0,
    # so no division)
    ones = torch.ones_like(tail[:, :1])
    before = torch.cat([ones, tail[:, :-1]], dim=1).cumprod(dim=1)  # [B, k] prod over j < i
    after = torch.cat([tail[:, 1:], ones], dim=1).flip(1).cumprod(dim=1).flip(1)  # prod over j > i
    others = before * after  # [B, k, N]
    # g_i(y, t) in sorted positions, then back to token order
    by_token = upto.gather(3, race.position.view(batch, 1, 1, -1).expand(-1, k, t.shape[0], -1))  # [B, k, N, V]
    own = race.at_ratio.gather(2, start.unsqueeze(1).expand(-1, t.shape[0], -1)).transpose(1, 2)  # [B, k, N] e^{-t Phi(r(x_i))}
    q_draft = q.gather(1, drafts)  # [B, k]
    is_draft = drafts.unsqueeze(-1) == torch.arange(p.shape[1], device=p.device)  # [B, k, V]
    g = torch.where(is_draft.unsqueeze(2), (own / q_draft.unsqueeze(-1)).unsqueeze(-1), by_token)  # [B, k, N, V]
    weight = (w * torch.exp(-k * t)).view(1, 1, -1)  # [1, 1, N]
    integral = ((weight * others).unsqueeze(-1) * g).sum(dim=(1, 2))  # [B, V]
    return p * integral


def standard_exponential(shape, like: Tensor, generator) -> Tensor:
    """Exp(1) variates -log(1 - U) in ``like``'s dtype: 3x faster than ``Tensor.exponential_``
    on a CPU, and finite (U < 1).  U is drawn in float64 whatever the dtype: a float32 uniform
    is exactly 0 with probability 2^-24, and a clock of 0 wins the race whatever p (at
    V = 32000 a token outside the drafts won 1.6e-3 of the time, not 3e-5)."""
    u = torch.rand(shape, generator=generator, device=like.device, dtype=torch.float64)
    return u.neg_().log1p_().neg_().to(like.dtype)


def target_race_winner(p: Tensor, q: Tensor, drafts: Tensor, generator) -> Tensor:
    """Y [B] = argmin_v min_i E[i, v] / p(v), the clocks drawn given the drafts.

    Given draft i = x_i: E[i, v] = q(v) T_i + F[i, v] (v != x_i) and E[i, x_i] = q(x_i) T_i.
    A token no list drafted needs only M_v = min_i E[i, v], whose survival is
    exp(-sum_i (m - q(v) T_i)^+): piecewise linear in the exponent, with breakpoints at the
    sorted T's, so one Exp(1) variate e_v and a search among k - 1 breakpoints invert it
    (V variates per row, not k V).  The at most k drafted tokens take their k clocks each."""
    batch, k = drafts.shape
    first = standard_exponential((batch, k), p, generator)  # T_i
    ordered = first.sort(dim=1).values  # [B, k] T_(1) <= ... <= T_(k)
    below = ordered.cumsum(dim=1)  # [B, k] sum_{i <= j} T_(i)
    # exponent at m = q T_(j+1): q * (j T_(j+1) - sum_{i <= j} T_(i)) = q * rise_j, j = 1..k-1
    rise = torch.arange(1, k, device=p.device, dtype=p.dtype) * ordered[:, 1:] - below[:, :-1]  # [B, k-1]
    level = standard_exponential(p.shape, p, generator)  # [B, V] e_v
    scaled = level / q  # [B, V] e_v / q(v); inf where q = 0, where all k clocks are active from 0
    active = torch.searchsorted(rise.contiguous(), scaled, right=True) + 1  # [B, V] clocks past their shift, 1..k
    shifted = below.gather(1, active - 1)  # [B, V] sum of the active shifts / q
    clock_min = (level + q * shifted) / active  # [B, V] M_v (e_v / k, an Exp(k), where q = 0)
    # drafted tokens: list i's clock of x_j is pinned if x_i == x_j, else shifted; slots holding
    # the same token share one set of fresh clocks (those of its first slot)
    same = drafts.unsqueeze(2) == drafts.unsqueeze(1)  # [B, i, j]
    owner = same.to(torch.uint8).argmax(dim=1)  # [B, j] first slot holding x_j
    fresh = standard_exponential((batch, k, k), p, generator)  # [B, i, slot]
    fresh = fresh.gather(2, owner.unsqueeze(1).expand(-1, k, -1))  # [B, i, j]
    qx = q.gather(1, drafts)  # [B, k]
    pinned = qx.unsqueeze(1) * first.unsqueeze(2)  # [B, i, j] q(x_j) T_i
    drafted_min = torch.where(same, pinned, pinned + fresh).amin(dim=1)  # [B, j]
    clock_min = clock_min.scatter(1, drafts, drafted_min)
    # p = 0 never wins, also where a clock is exactly 0 (U = 0: 0/0 would be NaN, and argmin takes NaN)
    target_time = torch.where(p > 0, clock_min / p, torch.full_like(p, float("inf")))
    return target_time.argmin(dim=1)


@register_verifier("gls")
class GumbelListSampling(Verifier):
    """GLS: k i.i.d. drafts and the target sample from shared exponential clocks."""

    iid_drafts = True
    exact_acceptance = True
    needs_exact_sums = False  # renormalizes p and q itself (as_law)

    def __init__(self, validate_args: bool | None = None, max_kernel_entries: int = DEFAULT_MAX_KERNEL_ENTRIES):
        super().__init__(validate_args)
        if isinstance(max_kernel_entries, bool) or not isinstance(max_kernel_entries, int) or max_kernel_entries < 1:
            raise ValueError(f"max_kernel_entries must be an int >= 1, got {max_kernel_entries!r}")
        self.max_kernel_entries = max_kernel_entries

    def _draft(self, q, k, generator):
        return sample_categorical(q, k, generator)  # [B, k]: each list's argmin is a draw from q

    def _draft_probability(self, q, drafts):
        return q.gather(1, drafts).prod(dim=1)  # [B]

    def _verify(self, p, q, drafts, generator) -> Verdict:
        token = target_race_winner(p, q, drafts, generator)
        return Verdict(token, first_match(drafts, token))

    def _kernel(self, p, q, drafts):
        batch, k = drafts.shape
        # The limit counts the first step's nodes: the finer steps redo only the rows that need them.
        nodes = exp_sinh_nodes(KERNEL_STEPS[0])[0].shape[0]
        if batch * k * nodes * p.shape[1] > self.max_kernel_entries:
            raise ValueError(
                f"gls's kernel is a quadrature over N = {nodes} nodes: B k N V = {batch} x {k} x {nodes} x {p.shape[1]} = "
                f"{batch * k * nodes * p.shape[1]} entries, above the limit max_kernel_entries = {self.max_kernel_entries}; "
                f"verify() samples without the kernel")
        p64, q64 = as_law(p), as_law(q)
        out = torch.empty_like(p64)
        rows = torch.arange(batch, device=p.device)
        # A draft with an extreme ratio p/q puts a sharp feature at t ~ q/p, which a coarse grid
        # misses; a kernel row's distance from summing to 1 shows it, and such rows are redone
        # with half the step.
        for step in KERNEL_STEPS:
            t, w = (x.to(p.device) for x in exp_sinh_nodes(step))
            chunk = max(1, KERNEL_CHUNK_ENTRIES // (k * t.shape[0] * p.shape[1]))
            part = torch.cat([gls_kernel_rows(p64[r], q64[r], drafts[r], t, w) for r in rows.split(chunk)])
            out[rows] = part
            off = ~((part.sum(dim=1) - 1).abs() <= KERNEL_SUM_TOLERANCE)  # NaN counts as off
            rows = rows[off]
            if not rows.numel():
                return out.to(p.dtype)
        raise ValueError(f"gls's kernel quadrature did not converge at step {KERNEL_STEPS[-1]} for rows {rows.tolist()[:8]} "
                         f"(a row sums to 1 +- {float((out[rows].sum(1) - 1).abs().max()):.1e}, tolerance {KERNEL_SUM_TOLERANCE})")

    def _expected_acceptance(self, p, q, k):
        """sum_y p(y) int k e^{-kt} [1 - (1 - e^{-t Phi(r(y))}) (1 - q(y) H(r(y), inf; t))^(k-1)] dt: given
        that y wins the target race at time t through one list, that list drafts y with
        probability e^{-t Phi(r(y))} and each other list with probability q(y) H(r(y), inf; t).
        Every term is weighted by p(y), so a coarser grid than the kernel's does (checked against
        enumeration on rows with ratios from 1e-9 to 1e9)."""
        t, w = (x.to(p.device) for x in exp_sinh_nodes(ACCEPTANCE_STEP))
        p64, q64 = as_law(p), as_law(q)
        rows = max(1, KERNEL_CHUNK_ENTRIES // (t.shape[0] * p.shape[1]))
        weight = (k * w * torch.exp(-k * t)).view(1, -1, 1)  # [1, N, 1]
        out = []
        for i in range(0, p.shape[0], rows):
            race = RaceSegments(p64[i : i + rows], q64[i : i + rows], t)  # everything in ratio order
            other = race.q_sorted.unsqueeze(1) * race.tail_from()  # [b, N, V] q(y) H(r(y), inf; t)
            hit = 1 - (1 - race.at_ratio) * (1 - other) ** (k - 1)  # [b, N, V] some list drafts y
            out.append((race.p_sorted * (weight * hit).sum(dim=1)).sum(dim=1))
        return torch.cat(out).to(p.dtype)
