"""An optimal verifier for k i.i.d. drafts: select one draft by a bid race, then speculate.

Its acceptance equals the max-flow bound ``1 - max_T [q(T)^k - p(T)]`` of
``md.proofs.optimal_acceptance``, at one sort of V plus O(k V) work per Newton step.  The
algorithm, its cost and the proofs of exactness and optimality are in
docs/verifiers/optimal.md.

p is the target law, q the draft law, drafts x_1..x_k i.i.d. from q.

1. **Select** one draft by a bid race: every token y has a scale ``phi(y) > 0``; draft i bids
   ``U_i * phi(x_i)`` with U_i ~ Uniform(0, 1) independent, and the highest bid wins.  The law
   s of the winning token has a closed form (``race_marginal``).  ``optimal_plan`` picks the
   scales so that ``s <= p`` on the tokens H outside the optimal cut T* and ``s >= p`` on T*.
2. **Speculate** from s to p as with one draft: keep the winner y with probability
   ``min(1, p(y) / s(y))``, else emit from ``normalize(max(p - s, 0))``.  Exact for *any*
   scales, because this step only needs the law of its proposal, and that law is s: the
   scales decide how much is accepted, never whether the output law is p.
"""

from __future__ import annotations

import math
import threading
from typing import NamedTuple

import numpy
import torch
from torch import Tensor

from . import cpu_kernels
from .base import (
    Verdict,
    Verifier,
    as_law,
    first_match,
    register_verifier,
    sample_categorical,
    sample_from_weights_with,
)

# Newton steps for the join equation, after a quadratic upper bound that is exact for k = 2.
NEWTON_STEPS = 4
# Floor on one join's log-scale drop.  A drop this deep marks a group that ran out (a tight set,
# such as H above T*): the tokens below then beat it with probability <= exp(-SEG_FLOOR) ~ 4e-18
# (smallest_log_ratio raises it where the masses on either side make that unlikely anyway).
SEG_FLOOR = 40.0
# The fused plan merges the cut's positions whose ratios lie within this relative width of a
# run's first into the run, where the slack allows (docs/verifiers/optimal.md, "Merged runs"):
# a run shares one scale, so it joins without solving (~60x fewer joins on LLM-like rows).
RUN_WIDTH = 2.0**-7


class Plan(NamedTuple):
    """What the bid race needs per token, in float64."""

    log_scale: Tensor  # [B, V] log phi <= 0, non-increasing in p/q order (any depth: logs)
    marginal: Tensor  # [B, V] s: the law of the winner (0 where q = 0)


def _descending_order(x: Tensor) -> Tensor:
    """argsort of each row, largest first [B, V] (numpy on the CPU: several times faster)."""
    if x.device.type == "cpu":
        return torch.from_numpy(numpy.argsort(-x.detach().numpy(), axis=-1))
    return x.argsort(dim=-1, descending=True)


def _power(x: Tensor, n: int) -> Tensor:
    """x**n for an int n >= 0 by repeated squaring (several times faster than pow on the CPU)."""
    out, base = None, x
    while n:
        if n & 1:
            out = base if out is None else out * base
        n >>= 1
        if n:
            base = base * base
    return torch.ones_like(x) if out is None else out


def _power_sum(a: Tensor, b: Tensor, k: int, b_powers: list[Tensor] | None = None) -> Tensor:
    """sum_{j<k} a^j b^(k-1-j) = (a^k - b^k) / (a - b), without the cancellation.

    ``b_powers``, if given, is [b, b^2, ..., b^(k-1)].
    """
    total, b_pow = torch.ones_like(a), None
    for m in range(k - 1):  # Horner: total <- total * a + b^(m + 1)
        if b_powers is not None:
            b_pow = b_powers[m]
        else:
            b_pow = b if b_pow is None else b_pow * b
        total = torch.addcmul(b_pow, total, a)
    return total


def _shift_right(x: Tensor) -> Tensor:
    """out[:, i] = x[:, i - 1], out[:, 0] = 0."""
    return torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=-1)


def _suffix_sum(x: Tensor) -> Tensor:
    """out[:, i] = sum of x[:, i:]."""
    return x.flip(-1).cumsum(-1).flip(-1)


def race_marginal(qs: Tensor, log_scale: Tensor, k: int) -> Tensor:
    """Law [B, V] of the winner of the bid race, positions sorted by non-increasing scale.

    ``qs`` is q in that order.  With ``G(u) = sum_z q(z) min(1, u / phi(z))`` the chance that one
    draft bids below u, ``s(y) = k q(y) / phi(y) * integral_0^phi(y) G(u)^(k-1) du``.  G is
    linear between consecutive scales, so with ``beta_i = sum_{l <= i} q_l / phi_l``
    ``s_i = q_i / phi_i * sum_{m >= i} phi_m * d_m``, where
    ``d_m = (G(phi_m)^k - G(phi_{m+1})^k) / (phi_m beta_m)
          = (1 - phi_{m+1} / phi_m) * sum_j G(phi_m)^j G(phi_{m+1})^(k-1-j)``
    (G drops by ``(phi_m - phi_{m+1}) beta_m`` on the piece): all terms are >= 0, no cancellation.
    Only ratios of scales enter (``phi_i beta_i = sum_{l <= i} q_l phi_i / phi_l`` and the sum
    over m, both as log-cumulative sums), so scales of any depth are fine: rows whose every
    suffix is a tight set take them far below float64's range.
    """
    slope = (log_scale + torch.logcumsumexp(qs.log() - log_scale, dim=-1)).exp()  # phi_i beta_i
    lower = torch.cat([_suffix_sum(qs)[:, 1:], torch.zeros_like(qs[:, :1])], dim=-1)  # mass after i
    step = torch.cat([log_scale[:, 1:] - log_scale[:, :-1], torch.full_like(qs[:, :1], float("-inf"))], dim=-1)
    g_at = lower + slope  # [B, V] G(phi_i)
    g_next = lower + slope * step.exp()  # [B, V] G(phi_{i+1}); G(0) = 0 after the last
    piece = torch.expm1(step).neg_() * _power_sum(g_at, g_next, k)  # d_i
    weighted = (log_scale + piece.log()).flip(-1).logcumsumexp(dim=-1).flip(-1)  # log sum_{m >= i} phi_m d_m
    return qs * (weighted - log_scale).exp()


def _join_lengths(base: Tensor, sigma: Tensor, deficit: Tensor, group: Tensor, k: int) -> Tensor:
    """The largest root L in [0, group] of ``(base + L)^k - base^k - sigma L = deficit``.

    L is the length the group has left when a token of ratio sigma joins it: the win-mass of
    the levels [base, base + L] less what sigma pays for them must equal the group's deficit.
    The left side is convex in L with non-negative coefficients past the linear one, so the
    root of its quadratic part bounds the root from above, and is sharp where the root is
    nearly double (a group about to run out, the hard case).  From there Newton on the
    k-th-root form ``L = (sigma L + deficit) / h_k(tau, base)``,
    ``tau = (base^k + sigma L + deficit)^(1/k)``, convex and nearly linear, falls monotonically
    to the root.  Every term keeps its relative precision when L is small.
    """
    b_powers = [base]
    for _ in range(k - 2):
        b_powers.append(b_powers[-1] * base)  # base^1 .. base^(k-1)
    base_k2 = b_powers[k - 3] if k > 2 else torch.ones_like(base)
    a2 = k * (k - 1) / 2 * base_k2  # coefficient of L^2
    a1 = k * b_powers[-1] - sigma  # of L
    disc = (a1 * a1 + 4 * a2 * deficit).sqrt()
    # the positive root of a2 L^2 + a1 L = deficit, in its cancellation-free form for either sign
    quad = torch.where(a1 >= 0, 2 * deficit / (a1 + disc), (disc - a1) / (2 * a2))
    length = torch.fmin(group, quad)  # fmin: a nan bound (0 / 0) leaves the group length
    # No root in (0, group] when the left side is below the deficit at L = group: never with
    # the exact cut (docs, step D), but where rounding decided the cut the group can be asked
    # for more than its levels hold.  The token then joins at once (L = group), as the fused
    # kernel's solver does, rather than at L = 0, which would end the group (a ratio of e^-40).
    short = group * _power_sum(base + group, base, k) - sigma * group < deficit
    if k == 2:  # the quadratic is the equation
        return torch.where(short, group, length)
    base_k = b_powers[-1] * base
    for _ in range(NEWTON_STEPS):
        rise = torch.addcmul(deficit, sigma, length)
        log_tau = (base_k + rise).log_().div_(k)
        h = length - rise / _power_sum(log_tau.exp(), base, k, b_powers)
        slope = 1 - sigma / k * log_tau.mul_(1 - k).exp_()  # H'(L), > 0 right of the root
        length = torch.fmin(length - h / slope, length).clamp_(min=0)  # never up; nan: stay
    return torch.where(short, group, length)


def optimal_plan(p: Tensor, q: Tensor, k: int, fused: bool | None = None, run_width: float = RUN_WIDTH,
                 cells: bool = True) -> Plan:
    """Scales of a bid race whose winner law s has ``s <= p`` outside the optimal cut T* and
    ``s >= p`` on it, and that law s (docs/verifiers/optimal.md, "Algorithm"), for the rows
    of p and q renormalized in float64 (``as_law``).

    ``fused``: run the plan as a few sequential passes per row (``optimal_cpu``, numba; CPU
    only) instead of [B, V] tensor ops.  Default: fused on the CPU, tensor ops elsewhere.
    ``run_width``: the fused plan's merged runs (``RUN_WIDTH``; 0: none, and then both plans
    give the same s to rounding).  The tensor plan does not merge.  ``cells``: with
    run_width > 0, the fused plan takes whole ratio buckets of tokens that share a scale as one
    position where it can (docs/verifiers/optimal.md, "Cells"); False plans token by token.
    """
    return _plan_of_laws(as_law(p), as_law(q), k, fused, _check_run_width(run_width), _check_cells(cells))


def _check_cells(cells: bool) -> bool:
    """cells itself, or a ValueError naming it: a bool, not a truthy stand-in."""
    if not isinstance(cells, bool):
        raise ValueError(f"cells must be True or False, got {cells!r}")
    return cells


def _check_run_width(run_width: float) -> float:
    """run_width as a float, or a ValueError naming it and its range [0, 1)."""
    if not (isinstance(run_width, (int, float)) and 0 <= run_width < 1):
        raise ValueError(f"run_width must be a number in [0, 1), got {run_width!r}")
    return float(run_width)


def _plan_of_laws(p: Tensor, q: Tensor, k: int, fused: bool | None, run_width: float, cells: bool) -> Plan:
    """``optimal_plan`` for rows already renormalized in float64 (``as_law``)."""
    if k == 1:  # the only draft always wins: s = q
        return Plan(torch.zeros_like(q), q.clone())
    if _runs_fused(fused, p.device):
        return _fused_plan(p, q, k, run_width, cells)
    ratio = (p / q).nan_to_num(nan=float("inf"))  # [B, V]; q = 0 gives inf
    return _tensor_plan(p, q, ratio, _descending_order(ratio), k)


def _runs_fused(fused: bool | None, device: torch.device) -> bool:
    """Whether the plan and the verdict run in the fused CPU kernel (None: on the CPU, when
    numba is installed -- a dependency of the package, but the tensor plan serves without it)."""
    if fused is None:
        return cpu_kernels.runs_fused(device)
    if fused and device.type != "cpu":
        raise ValueError(f"the fused optimal plan runs on the CPU only, got tensors on {device}")
    if fused and not cpu_kernels.have_numba():
        raise ValueError("the fused optimal plan needs numba (pip install numba); fused=False runs the tensor plan")
    return fused


def _fused_plan(p: Tensor, q: Tensor, k: int, run_width: float, cells: bool) -> Plan:
    """The plan in the fused kernel (its own ratio sort included), rows split over up to
    torch.get_num_threads() threads (``cpu_kernels.run_on_chunks``)."""
    # numba compiles the kernel, or loads it from its cache, on first use
    from .optimal_cpu import plan_rows

    cpu_kernels.check_kernel_inputs(p, q)
    p_np, q_np = p.detach().contiguous().numpy(), q.detach().contiguous().numpy()
    log_scale, marginal = numpy.empty_like(p_np), numpy.empty_like(p_np)

    def plan(rows: slice, work: numpy.ndarray) -> None:
        plan_rows(p_np[rows], q_np[rows], k, log_scale[rows], marginal[rows], work, run_width, cells)

    _over_row_chunks(plan, p_np.shape[0], p_np.shape[1])
    return Plan(torch.from_numpy(log_scale), torch.from_numpy(marginal))


class _Workspaces(threading.local):
    """The fused kernel's scratch (``optimal_cpu.workspace``), kept per calling thread for the
    largest vocabulary size seen, one per chunk of rows, so that calls reuse warm memory."""

    def __init__(self):
        self.vocab, self.spaces = -1, []

    def get(self, vocab: int, count: int) -> list[numpy.ndarray]:
        from .optimal_cpu import workspace

        if vocab > self.vocab:  # a larger one serves smaller vocabularies (the kernel slices :V)
            self.vocab, self.spaces = vocab, []
        while len(self.spaces) < count:  # all of the largest size: any of them serves any call
            self.spaces.append(workspace(self.vocab))
        return self.spaces[:count]


_WORKSPACES = _Workspaces()


def _over_row_chunks(fn, batch: int, vocab: int) -> list:
    """[fn(rows, work)] for slices covering range(batch), each with its own scratch."""
    chunks = cpu_kernels.row_chunks(batch)
    return cpu_kernels.run_on_chunks(fn, chunks, _WORKSPACES.get(vocab, len(chunks)))


def smallest_log_ratio(above: Tensor, rest: Tensor, k: int) -> Tensor:
    """The floor on the log of a scale ratio between a block's positions before i (q-mass
    ``above``) and from i on (``rest``): -SEG_FLOOR, raised towards 0 as the chance that a
    tuple holds drafts from both sides, at most k (k - 1) above rest, falls below e^-SEG_FLOOR.

    A ratio larger than the ideal race's lets a draft from below outbid one from above only
    if the latter's uniform is below the ratio: probability <= k (k - 1) above rest ratio, so
    this floor costs at most e^-SEG_FLOOR of acceptance per position where it is used (docs,
    Theorem 2).  It keeps tokens of negligible mass from deepening the scales: rows with
    dozens of tokens at q ~ 1e-20 next to real ones, whose structure rounding decides, would
    otherwise add e^-40 each, and the log-cumulative sums of the race marginal lose relative
    precision in proportion to the depth.
    """
    pairs = (k * (k - 1)) * above * rest
    return -SEG_FLOOR - pairs.clamp(min=math.exp(-SEG_FLOOR), max=1.0).log()


def _deficits(room: Tensor, starts: Tensor, in_h: Tensor, in_t: Tensor) -> Tensor:
    """The join equations' deficits [B, V] from ``room`` = (what the group's levels can win,
    down to where it would run out alone) - (the group's targets), at the positions that solve
    a join (``starts``; the others take their run's level).

    With the exact optimal cut the room is > 0 in H and >= 0 in T* (docs, step B).  Where the
    cut was decided by rounding (values tied to the last bit) it can be < 0: the group's
    targets exceed what its levels can win, the group runs out, and a deficit clamped at 0
    there would leave every later position of the block in the same debt, each ending a group
    at once (a scale ratio of e^-40 per position, where the ideal race has none).  So the debt is written
    off where it arises: each room is raised by the largest shortfall so far at the block's
    solving positions, as the fused kernel does (0 with the exact cut: nothing changes).
    """
    shortfall = (-room).clamp(min=0) * starts
    written_off = shortfall.mul(in_h).cummax(dim=-1).values * in_h + shortfall.mul(in_t).cummax(dim=-1).values * in_t
    return (room + written_off).clamp(min=0)


def _run_starts(sigma: Tensor, qs: Tensor, pos: Tensor, cut: Tensor) -> Tensor:
    """[B, V] True where a run of positions that share sigma (capped, floored, tied) begins: a
    change of sigma, the block's start, or after a position with q = 0 (where the fused kernel
    also solves).  The rest of a run joins at its first position's level (``_shared_joins``)."""
    after_empty = _shift_right((qs == 0).to(qs.dtype)) > 0
    return (sigma != _shift_right(sigma)) | (pos == 0) | (pos == cut) | after_empty


def _shared_joins(left: Tensor, starts: Tensor, q_group: Tensor, pos: Tensor) -> Tensor:
    """Join lengths [B, V] with each run of positions that share sigma joining at the level of
    its first: F_i(l_i) = 0 there (docs, step D), so that is the root, and the solver, near a
    double root where the group's ratio is k l^(k-1), would only find it to a few digits (each
    miss a scale ratio of e^-40).  The group's length left at that level grows by the q-mass
    the run adds."""
    start = torch.where(starts, pos, 0).cummax(dim=-1).values  # [B, V] the run's first position
    return torch.where(starts, left, left.gather(1, start) + q_group - q_group.gather(1, start))


def optimal_cut(qs: Tensor, ps: Tensor, q_below: Tensor, k: int) -> Tensor:
    """The first position of T* [B, 1] (V for T* = {}): of the sets {positions >= i} the largest
    maximizing ``q(T)^k - p(T)``, for q and p in position order [B, V] and q_below their q
    suffix sums.

    Two stages, because a token whose own change to the value, ``q_i h_k(Q_i, Q_{i+1}) - p_i``
    (Q_i = q_below[:, i]), lies below the rounding of the value itself (a q of 1e-22 next to a
    value of 0.6) leaves the value unchanged in float64: such a token ties, and the tie, which
    goes to the larger T, would put it into T* even where it loses.  So the float maximum only
    picks the candidates (the positions whose value equals it), and among them the sums of the
    tokens' own changes across the candidates' span decide, each term to its own precision.
    """
    vocab = qs.shape[1]
    pos = torch.arange(vocab, device=qs.device)
    upper = q_below.clamp(max=1)
    lower = torch.cat([q_below[:, 1:], torch.zeros_like(q_below[:, :1])], dim=-1).clamp(max=1)
    width = torch.where(q_below <= 1, qs, upper - lower)  # upper^k - lower^k = width * h_k
    change = width * _power_sum(upper, lower, k) - ps  # [B, V] value(i) - value(i + 1)
    value = (_power(upper, k) - _suffix_sum(ps)).masked_fill_(qs == 0, float("-inf"))
    best = value.amax(dim=-1, keepdim=True)  # [B, 1]
    tied = value == best  # [B, V] the candidates
    first = torch.where(tied, pos, vocab).amin(dim=-1, keepdim=True)
    last = torch.where(tied, pos, -1).amax(dim=-1, keepdim=True)
    span = (pos >= first) & (pos < last)  # [B, V]
    fine = _suffix_sum(change * span).masked_fill_(~tied, float("-inf"))  # value(i) - value(last)
    cut = fine.argmax(dim=-1, keepdim=True)  # the first maximum: the largest T
    return torch.where(best >= 0, cut, vocab)  # T* = {} when every T loses to the empty one


def _tensor_plan(p: Tensor, q: Tensor, ratio: Tensor, order: Tensor, k: int) -> Plan:
    """The plan as [B, V] tensor ops (any device)."""
    vocab = p.shape[1]
    rs, qs, ps = ratio.gather(1, order), q.gather(1, order), p.gather(1, order)
    pos = torch.arange(vocab, device=p.device)

    # 1. The optimal cut: T* = {positions >= cut}, the largest T maximizing q(T)^k - p(T).
    q_below = _suffix_sum(qs)  # [B, V] q-mass of positions >= i
    cut = optimal_cut(qs, ps, q_below, k)  # [B, 1]
    in_t = (pos >= cut).to(p.dtype)  # [B, V] 1 on T*, 0 on H
    in_h = 1 - in_t
    top_h = q_below[:, :1]  # level at the top: the total q-mass
    a = torch.cat([q_below, q_below[:, :1] * 0], dim=-1).gather(1, cut)  # [B, 1] q(T*)
    top = top_h + (a - top_h) * in_t  # [B, V] level at the top of the position's block
    mass_t = _power(a, k)  # what T* wins

    def before(x: Tensor) -> Tensor:
        """Sum of x over the positions of i's block (H or T*) before i, summed from the block's
        top so that small sums keep their relative precision."""
        return _shift_right((x * in_h).cumsum(-1)) * in_h + _shift_right((x * in_t).cumsum(-1))

    q_group, p_group = before(qs), before(ps)  # [B, V]
    q_in, p_in = q_group + qs, p_group + ps  # through i

    # 2. Targets: min(p, c q) on H with c such that H wins mass_h; max(p, c' q) on T*.
    # H wins mass_h = p(H) - excess, excess = q(T*)^k - p(T*) >= 0 the cut's value, so position
    # i of H is capped (sum_H min(p, r_i q) > mass_h) when sum over H's first i positions of
    # p - r_i q is below the excess: small sums where H's first tokens are, not sums near p(H)
    # whose rounding would decide.
    excess = (mass_t - _suffix_sum(ps * in_t)[:, :1]).clamp(min=0)  # [B, 1]
    short = p_in - rs * q_in  # [B, V]; nan where q_in = 0
    j = (((short < excess) | (qs == 0)) & (pos < cut)).sum(dim=-1, keepdim=True)  # capped: pos < j
    last = (j - 1).clamp(min=0)
    cap = (p_in.gather(1, last) - excess) / q_in.gather(1, last)  # [B, 1]
    cap = torch.where(j > 0, cap, 0.0).nan_to_num(nan=0.0, posinf=0.0)
    under = p_group + rs * q_below  # [B, V] sum_T* max(p, r_i q)
    jt = (cut + ((under > mass_t) & (pos >= cut)).sum(dim=-1, keepdim=True)).clamp(max=vocab - 1)
    floor = ((mass_t - p_group.gather(1, jt)) / q_below.gather(1, jt)).nan_to_num(nan=0.0, posinf=0.0)
    capped = (pos < j).to(p.dtype)
    target = ps + capped * (torch.minimum(ps, cap * qs) - ps)  # H: min(p, c q) before j, else p
    target = target + in_t * (torch.maximum(ps, floor * qs) - target)  # T*: max(p, c' q)

    # 3. Processor sharing down each block: i joins the group of its block's earlier positions
    # when the group, with length L left, has win-mass sigma_i * L left (docs: Algorithm, step 3).
    # sigma is cap (floor) itself on the capped (floored) positions, so that a run of them is
    # seen to share it
    sigma = torch.where(qs > 0, rs, 0.0)
    sigma = torch.where((capped > 0) & (cap * qs < ps), cap.expand_as(sigma), sigma)
    sigma = torch.where((in_t > 0) & (floor * qs > ps), floor.expand_as(sigma), sigma)
    starts = _run_starts(sigma, qs, pos, cut)  # [B, V] where a join must be solved
    base = top - q_group  # level where the group would run out alone
    deficit = _deficits(q_group * _power_sum(top, base, k) - before(target), starts, in_h, in_t)
    left = _join_lengths(base, sigma, deficit, q_group, k)  # [B, V]; 0 at a block's top
    left = _shared_joins(left, starts, q_group, pos)
    left_before = _shift_right(left + qs)  # the group's length left at the previous join
    q_rest = _suffix_sum(qs * in_h) * in_h + q_below * in_t  # [B, V] mass of i's block from i on
    least = smallest_log_ratio(q_group, q_rest, k)
    seg = torch.maximum((torch.minimum(left, left_before) / left_before).log(), least).nan_to_num(nan=0.0)
    log_scale = seg.cumsum(dim=-1)
    # T* starts SEG_FLOOR below H's lowest scale: every tuple with a token of H selects one,
    # except with probability <= exp(-SEG_FLOOR)
    h_low = log_scale.gather(1, (cut - 1).clamp(min=0))
    t_top = log_scale.gather(1, cut.clamp(max=vocab - 1))
    shift = torch.where(cut > 0, h_low - SEG_FLOOR - t_top, 0.0)  # no H (cut = 0): no drop above T*
    log_scale = log_scale + in_t * shift

    marginal = race_marginal(qs, log_scale, k)
    return Plan(torch.empty_like(log_scale).scatter_(1, order, log_scale),
                torch.empty_like(marginal).scatter_(1, order, marginal))


def race_win_probabilities(log_scale: Tensor) -> Tensor:
    """P(draft i wins the bid race) [B, k] from the drafts' log scales [B, k].

    With the drafts sorted by scale (phi_1 >= ... >= phi_k), the top bid lies in
    [phi_{j+1}, phi_j] with probability (phi_j^j - phi_{j+1}^j) / (phi_1 ... phi_j)
    (phi_{k+1} = 0), and is then equally likely to be any of the first j bids.
    """
    ordered, idx = log_scale.sort(dim=-1, descending=True)  # [B, k]
    k = log_scale.shape[1]
    j = torch.arange(1, k + 1, device=log_scale.device, dtype=log_scale.dtype)  # [k]
    c = ordered.cumsum(dim=-1)  # [B, k]
    nxt = torch.cat([ordered[:, 1:], torch.full_like(ordered[:, :1], float("-inf"))], dim=-1)
    term = ((j * ordered - c).exp() - (j * nxt - c).exp()) / j  # [B, k]
    win_sorted = term.flip(-1).cumsum(-1).flip(-1)
    return torch.empty_like(win_sorted).scatter_(1, idx, win_sorted)


def _keep_probability(p64: Tensor, marginal: Tensor, token: Tensor) -> Tensor:
    """min(1, p / s) at ``token`` [B, n]."""
    px, sx = p64.gather(1, token), marginal.gather(1, token)
    return torch.where(sx > px, px / torch.where(sx > 0, sx, 1.0), 1.0)


def _residual(p64: Tensor, marginal: Tensor) -> Tensor:
    """normalize(max(p - s, 0)) [B, V]; p where it has no mass (reached with probability 0)."""
    residual = (p64 - marginal).clamp(min=0)
    mass = residual.sum(dim=-1, keepdim=True)
    return torch.where(mass > 0, residual / torch.where(mass > 0, mass, 1.0), p64)


def _verdict_uniforms(drafts: Tensor, generator) -> Tensor:
    """[B, k + 2] float64 uniforms per node: the k bids', the keep coin's, the residual draw's.
    Both paths draw them so, and so emit the same token for the same seed (up to rounding)."""
    return torch.rand((drafts.shape[0], drafts.shape[1] + 2), generator=generator, device=drafts.device, dtype=torch.float64)


def _fused_verify(p: Tensor, q: Tensor, drafts: Tensor, generator, run_width: float, cells: bool) -> Verdict:
    """``Optimal._verify`` in one pass of the fused kernel per row (``optimal_cpu.verify_rows``):
    the same plan, race, coin and residual draw, and which draft the token is, without the ~30
    small tensor ops around the plan that cost ~1 ms per call at B = 1.  The uniforms are drawn
    up front, [B, k + 2]."""
    from .optimal_cpu import verify_rows

    cpu_kernels.check_kernel_inputs(p, q, drafts)
    # float32 rows go in as they are (the kernel copies each to float64 as it reaches it);
    # anything else is converted to float64 first
    p_np, q_np = (cpu_kernels.kernel_array(x, None if x.dtype in (torch.float32, torch.float64) else numpy.float64)
                  for x in (p, q))
    d_np = cpu_kernels.kernel_array(drafts, numpy.int64)
    u = _verdict_uniforms(drafts, generator).numpy()
    token, accepted = numpy.empty(drafts.shape[0], numpy.int64), numpy.empty(drafts.shape[0], numpy.int64)

    def verify(rows: slice, work: numpy.ndarray) -> bool:
        return verify_rows(p_np[rows], q_np[rows], d_np[rows], u[rows], token[rows], accepted[rows], work, run_width, cells)

    if not all(_over_row_chunks(verify, drafts.shape[0], p_np.shape[1])):
        cpu_kernels.raise_for_draft_ids(drafts, p_np.shape[1])
    return Verdict(torch.from_numpy(token), torch.from_numpy(accepted))


@register_verifier("optimal")
class Optimal(Verifier):
    """Optimal acceptance for k i.i.d. drafts: bid-race selection, then speculative sampling.

    ``fused``: how the plan runs (``optimal_plan``): None picks the fused CPU kernel on the CPU
    and tensor ops elsewhere; True or False forces one (True needs CPU tensors).
    ``run_width``: the fused plan's merged runs (``RUN_WIDTH``, the same acceptance with ~60x
    fewer root solves); 0 gives the tensor plan's winner law, so that both paths emit the same
    tokens for a seed.  ``cells``: the fused plan's cells (``optimal_plan``), which leave most
    tokens of a row unsorted; False plans token by token (the merged runs alone).
    """

    iid_drafts = True
    exact_acceptance = True
    needs_exact_sums = False  # renormalizes p and q itself, in float64 (as_law)

    def __init__(self, validate_args: bool | None = None, fused: bool | None = None, run_width: float = RUN_WIDTH,
                 cells: bool = True):
        super().__init__(validate_args)
        if fused is not None and not isinstance(fused, bool):
            raise ValueError(f"fused must be None, True or False, got {fused!r}")
        self.fused = fused
        self.run_width = _check_run_width(run_width)
        self.cells = _check_cells(cells)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, validate_args={self.validate_args}, fused={self.fused}, "
                f"run_width={self.run_width}, cells={self.cells})")

    def _expected_acceptance(self, p, q, k):
        # The speculative step keeps the winner y with probability min(1, p(y)/s(y)), so the
        # acceptance is sum_y min(s(y), p(y)) for the plan's winner law s.
        p64 = as_law(p)
        s = _plan_of_laws(p64, as_law(q), k, self.fused, self.run_width, self.cells).marginal
        return torch.minimum(s, p64).sum(dim=-1).to(p.dtype)

    def _draft(self, q, k, generator):
        return sample_categorical(q, k, generator)  # [B, k]

    def _draft_probability(self, q, drafts):
        return q.gather(1, drafts).prod(dim=1)  # [B]

    def _kernel(self, p, q, drafts):
        p64 = as_law(p)
        plan = _plan_of_laws(p64, as_law(q), drafts.shape[1], self.fused, self.run_width, self.cells)
        win = race_win_probabilities(plan.log_scale.gather(1, drafts))  # [B, k]
        keep = _keep_probability(p64, plan.marginal, drafts)  # [B, k]
        kern = torch.zeros_like(p64).scatter_add_(1, drafts, win * keep)
        rejected = (win * (1 - keep)).sum(dim=-1, keepdim=True)  # [B, 1]
        return (kern + rejected * _residual(p64, plan.marginal)).to(p.dtype)

    def _verify(self, p, q, drafts, generator):
        if drafts.shape[1] > 1 and _runs_fused(self.fused, p.device):
            return _fused_verify(p, q, drafts, generator, self.run_width, self.cells)
        p64 = as_law(p)
        k = drafts.shape[1]
        plan = _plan_of_laws(p64, as_law(q), k, self.fused, self.run_width, self.cells)
        u = _verdict_uniforms(drafts, generator)  # [B, k + 2], as the fused path draws them
        bids = u[:, :k].log() + plan.log_scale.gather(1, drafts)  # [B, k]: log(U_i phi(x_i))
        winner = drafts.gather(1, bids.argmax(dim=1, keepdim=True))  # [B, 1]
        keep = _keep_probability(p64, plan.marginal, winner)  # [B, 1]
        fallback = sample_from_weights_with(_residual(p64, plan.marginal), u[:, k + 1 :])  # [B]
        token = torch.where(u[:, k] < keep.squeeze(1), winner.squeeze(1), fallback)
        return Verdict(token, first_match(drafts, token))
