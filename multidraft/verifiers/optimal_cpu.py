"""The `optimal` verifier's plan and verdict on the CPU, fused: a few sequential passes per row
(numba).

The same algorithm as ``optimal._tensor_plan`` (docs/verifiers/optimal.md, "Algorithm"), step
for step, but each stage is one loop over a row's ratio-sorted positions instead of dozens of
[B, V] tensor ops, which on the CPU cost far more in memory traffic and dispatch than in
arithmetic.  What differs besides the loop form:

- the ratio order comes from a radix sort on a 22-bit key fitted to the row's range of p/q
  (``descending_ratio_order``), put in exact order by an insertion pass afterwards;
- the scales are kept as products, a mantissa times 2^(-TIER_BITS * tier) (so that no depth
  of scales runs out of range), not as a running sum of logs, and the race marginal is
  computed from consecutive ratios alone, with no exp/expm1 per token: a join's ratio
  ``phi_{i+1} / phi_i`` and its complement ``1 - phi_{i+1} / phi_i`` come straight from the
  join lengths;
- a run of positions that share sigma (capped, floored, or tied) joins at the group's level
  without solving;
- the join equation is solved by Halley steps on the polynomial (no log/exp), started from
  the previous join's length, which bounds the root from above and is usually close to it;
  only when that has not converged after a few steps does it go on in the tensor path's
  k-th-root form;
- the plan works in position order and ``verify_rows`` stays there (it finds the drafts'
  positions by binary search on their ratios): only the kernel's rows, and a verdict's
  residual draw on rejection, scatter values back to token order;
- ``verify_rows`` runs a whole verdict per row: plan, bid race, coin and residual draw, and
  finds which draft the token is;
- merged runs (``run_width``): T*'s positions of nearby ratios share one sigma where the
  prefixes' slack allows, so that they join without solving (docs/verifiers/optimal.md,
  "Merged runs"); the tensor plan has none, and ``run_width = 0`` gives its targets;
- cells (``cells_layout``, with run_width > 0): whole ratio buckets of tokens that share sigma
  (capped in H, merged on T*) are one position each, decided from the buckets' sums, and only
  the other tokens are sorted; a row where that does not pay is planned token by token
  (docs/verifiers/optimal.md, "Cells").

Exactness does not depend on any of this (the marginal is recomputed from the scales used,
Theorem 1); optimality and agreement with the tensor plan are tested in
tests/test_optimal_verifier.py.  p is the target law, q the draft law, both float64 rows.
"""

from __future__ import annotations

import math

import numba
import numpy
from numba.extending import overload

from .optimal import SEG_FLOOR
from .rrs_cpu import draft_ids_in_range, first_draft

_JIT = {"fastmath": {"contract"}, "cache": True, "nogil": True, "error_model": "numpy", "boundscheck": False}
_SEG_RATIO = math.exp(-SEG_FLOOR)  # smallest ratio of consecutive scales inside a block
TIER_BITS = 512  # a scale is its mantissa times 2^(-TIER_BITS * tier)
_TIER = 2.0**-TIER_BITS
_TIER_UP = 2.0**TIER_BITS
_TIER_LOG = TIER_BITS * math.log(2.0)
# The join equation's root solver (join_length) stops when its error bound is below
# NEWTON_TOLERANCE * L (in the k-th-root form: when a step is).
NEWTON_TOLERANCE = 1e-12
POLYNOMIAL_STEPS = 6  # Halley on the polynomial: fast from a warm start
ROOT_FORM_STEPS = 30  # then in the k-th-root form: fast from far away
# Merged runs spend at most half the slack of T*'s prefixes less this share of a^k: the slack is
# a difference of two long float sums, pure rounding at and near tight sets.
RUN_SLACK_GUARD = 2.0**-40
WORK_ROWS = 17  # scratch rows of V + 1 doubles: 12 for one row's plan (a verdict's residual reuses
# row 11), 2 for a verdict's float32 rows in float64, 3 for the cells (their map from tokens to
# positions, and the buckets' lowest ratios)


@numba.njit(**_JIT)
def _fmin(a, b):
    """min that ignores a nan argument (torch.fmin)."""
    if math.isnan(a):
        return b
    if math.isnan(b):
        return a
    return min(a, b)


@numba.njit(**_JIT)
def power(x, n):
    """x**n for a small int n >= 0, by repeated squaring (a shorter chain of dependent
    multiplications than one by one: the join solver is bound by such chains)."""
    out = 1.0
    while n:
        if n & 1:
            out *= x
        n >>= 1
        if n:
            x *= x
    return out


@numba.njit(**_JIT)
def power_sum(a, b, k):
    """sum_{j<k} a^j b^(k-1-j) = (a^k - b^k) / (a - b) for a, b >= 0 and k >= 1, without the
    cancellation: every term stays >= 0 (a few ulps of relative error).  Up to k = 4 by Horner's
    rule; above, by binary splitting on k's bits, h_2m = h_m (a^m + b^m) and
    h_(m+1) = a^m + b h_m, whose chain of dependent operations grows with log2 k instead of k
    (the join solver is a chain of these: 6 % faster at k = 8, slower at k = 4)."""
    if k <= 4:
        total, b_pow = 1.0, 1.0
        for _ in range(k - 1):
            b_pow *= b
            total = total * a + b_pow
        return total
    total, a_pow, b_pow = 1.0, a, b  # h_1, a^1, b^1
    bit = 1
    while bit * 2 <= k:
        bit *= 2
    bit //= 2
    while bit:
        total *= a_pow + b_pow  # h_2m
        a_pow *= a_pow
        b_pow *= b_pow
        if k & bit:  # h_(2m+1) = a^2m + b h_2m
            total = a_pow + b * total
            a_pow *= a
            b_pow *= b
        bit //= 2
    return total


@numba.njit(**_JIT)
def _quadratic_bound(base, sigma, deficit, group, k):
    """min(group, the positive root of a2 L^2 + a1 L = deficit), a1 = k base^(k-1) - sigma,
    a2 = C(k, 2) base^(k-2), cancellation-free for either sign of a1 (a nan root, 0 / 0,
    leaves the group's length)."""
    base_k2 = power(base, k - 2)
    a1 = k * base_k2 * base - sigma
    a2 = k * (k - 1) / 2 * base_k2
    disc = math.sqrt(a1 * a1 + 4 * a2 * deficit)
    quad = 2 * deficit / (a1 + disc) if a1 >= 0 else (disc - a1) / (2 * a2)
    return _fmin(group, quad)


@numba.njit(**_JIT)
def join_length(base, sigma, deficit, group, start, k):
    """The largest root L in [0, group] of ``(base + L)^k - base^k - sigma L = deficit``.

    The left side less the right, ``f(L) = L (a1 + a2 L + ... + a_k L^(k-1)) - deficit``
    with ``a1 = k base^(k-1) - sigma`` and ``a_j = C(k, j) base^(k-j) >= 0`` for j >= 2,
    is convex, and its higher derivatives are >= 0 for L >= 0, so from any point right of
    the root Newton falls monotonically to it.  It starts from ``start``, an upper bound the
    caller knows (the previous join's length: join levels descend down a block,
    docs/verifiers/optimal.md, step D), which is usually close to the root.  The root of the
    quadratic part is also an upper bound (the terms past a2 are >= 0) and the root itself for
    k = 2; it is where a cold start begins, and a warm start that turns out far from the root
    (a step's ``c s`` above 0.1, where Newton's steps replace Halley's) drops to it: it is
    close where the root is small and nearly double (a1 ~ 0), from which the steps would
    come down only linearly.  f is
    evaluated as ``L h_k(base + L, base) - sigma L - deficit`` (``power_sum``: every term
    >= 0), so that a small L keeps its relative precision.

    The steps are Halley's, ``s = s_N / (1 - c s_N)`` with the Newton step s_N and
    ``c = f2 / (2 f1)`` (f1, f2, f3: the derivatives).  Their error is
    ``(c^2 - d) e0^3 + O(e0^4)`` with ``d = f3 / (6 f1)``, and here ``0 <= d <= 2/3 c^2``, so
    a step leaves about ``c^2 s^3`` and stays right of the root to that order.  The solver
    stops once twice that is below NEWTON_TOLERANCE * L: from a warm start, usually after the
    first step.
    """
    have_quad = k == 2 or not 0 < start < group
    if have_quad:
        length = _quadratic_bound(base, sigma, deficit, group, k)
        if k == 2 or not length > 0:
            return length
    else:
        length = start
    for _ in range(POLYNOMIAL_STEPS):
        # with x = base + L: f = (x^k - base^k) - sigma L - deficit, x^k - base^k = L h_k(x, base)
        # (power_sum: all terms >= 0, so a small L keeps its relative precision)
        x = base + length
        x_pow = power(x, k - 2)
        f = (length * power_sum(x, base, k) - sigma * length) - deficit
        df = k * x_pow * x - sigma
        ddf = k * (k - 1) * x_pow
        if not f > 0 or not df > 0:
            return max(length, 0.0)
        # c s_N = f f'' / (2 f'^2) = bend / (2 slope2), compared without a division: only the
        # step's one division is on the chain of dependent operations that bounds the solver
        slope2, bend = df * df, f * ddf
        if bend > 0.2 * slope2:  # c s_N > 0.1, far from the root: Newton's step, right of it
            length -= f / df
            if not have_quad:  # and the quadratic root, close where the root is small and
                have_quad = True  # nearly double, from which these steps come down slowly
                length = min(length, _quadratic_bound(base, sigma, deficit, group, k))
            continue
        step = 2 * f * df / (2 * slope2 - bend)  # Halley's s_N / (1 - c s_N)
        length -= step
        # stop when the error bound 2 (c s_N)^2 s = bend^2 s / (2 slope2^2) is below tol * L
        if bend * bend * step <= 2 * slope2 * slope2 * (length * NEWTON_TOLERANCE):
            return max(length, 0.0)
    # Still far from the root (a cold start for a large k, where the polynomial's Newton
    # steps shrink L only by ~1/k): Newton on the k-th-root form, nearly linear, as the
    # tensor path does (optimal._join_lengths).
    base_k = power(base, k)
    for _ in range(ROOT_FORM_STEPS):
        rise = deficit + sigma * length
        total = base_k + rise
        if not total > 0:
            break
        tau = math.exp(math.log(total) / k)
        h = length - rise / power_sum(tau, base, k)
        slope = 1 - sigma / k * tau / total  # H'(L) = 1 - sigma/k * tau^(1 - k)
        step = h / slope
        if not step > 0:
            break
        length -= step
        if step <= length * NEWTON_TOLERANCE:
            break
    return max(length, 0.0)


# Radix sort of the ratios: DIGIT_BITS-bit digit passes on a key of KEY_BITS bits, packed with
# the token id into one word.  Each pass scatters from RADIX_STREAMS interleaved chunks with their
# own counters: with a single counter array the CPU stalls whenever a digit repeats within the
# instructions in flight (a load of a counter that was just stored), and the streams cut that.
# Two passes of 11 bits with two streams (32 KiB of counters) took 0.39 ms at V = 32,000 against
# 0.52 for three of 8 bits with eight.  Tokens whose ratios share a key are then put in exact
# order by one insertion pass, cheap because the key leaves few of them; a row whose ratios the
# key does not resolve (a few outliers stretch its range) falls back to a full sort once the
# insertions pass a budget.
DIGIT_BITS = 11
RADIX_STREAMS = 2
KEY_BITS = 2 * DIGIT_BITS
INSERTION_BUDGET = 8  # insertion moves per token before the full sort takes over
_DIGIT_MASK = (1 << DIGIT_BITS) - 1


_INF_BITS = 0x7FF0000000000000  # the bit pattern of inf; a non-negative double's is monotone in it


@numba.njit(**_JIT)
def finite_positive_range(bits):
    """(lowest, highest) bit pattern among the finite positive doubles whose patterns are
    ``bits`` ((pattern of inf, 0) if there is none)."""
    lo, hi = numpy.int64(_INF_BITS), numpy.int64(0)
    for t in range(bits.shape[0]):
        b = bits[t]
        if b > 0 and b < _INF_BITS:
            lo, hi = min(lo, b), max(hi, b)
    return lo, hi


@numba.njit(**_JIT)
def _packed_keys(ratio, packed):
    """packed[t] = key << 32 | t, the key in [0, 2^KEY_BITS) non-increasing in ratio[t] (0
    for inf), exact ties sharing a key.  The key is the double's bit pattern, monotone for
    x >= 0, shifted so that the row's finite positive ratios fill the key range."""
    bits = ratio.view(numpy.int64)
    top = numpy.int64((1 << KEY_BITS) - 1)
    inf_bits = numpy.int64(_INF_BITS)
    lo, hi = finite_positive_range(bits)
    shift = 0
    while (hi - lo) >> shift > top - 2:
        shift += 1
    for t in range(bits.shape[0]):
        b = bits[t]
        if b >= inf_bits:
            key = numpy.int64(0)
        elif b <= 0:  # 0 (or -0.0)
            key = top
        else:
            key = top - 1 - ((b - lo) >> shift)
        packed[t] = (key << 32) | t


@numba.njit(**_JIT)
def _radix_pass(src, dst, shift):
    """One stable counting-sort pass of the packed words on their DIGIT_BITS-bit digit at ``shift``."""
    n = src.shape[0]
    chunk = (n + RADIX_STREAMS - 1) // RADIX_STREAMS
    count = numpy.zeros((1 << DIGIT_BITS, RADIX_STREAMS), numpy.int64)
    for s in range(RADIX_STREAMS):
        for t in range(s * chunk, min(n, (s + 1) * chunk)):
            count[(src[t] >> shift) & _DIGIT_MASK, s] += 1
    total = 0
    for d in range(1 << DIGIT_BITS):  # stream s's share of digit d follows stream s - 1's: stable
        for s in range(RADIX_STREAMS):
            c = count[d, s]
            count[d, s] = total
            total += c
    for t in range(chunk):
        for s in range(RADIX_STREAMS):
            u = s * chunk + t
            if u < n:
                word = src[u]
                d = (word >> shift) & _DIGIT_MASK
                pos = count[d, s]
                count[d, s] = pos + 1
                dst[pos] = word


@numba.njit(inline="always", **_JIT)
def insert_descending(order, rs, start, a):
    """One insertion step, where rs[a - 1] < rs[a]: moves position a (rs[a] and order[a]) back
    into the non-increasing run rs[start:a]; returns how many positions it passed.  Callers
    test the order first, so that a position already in place costs one comparison."""
    r = rs[a]
    t = order[a]
    c = a - 1
    while c >= start and rs[c] < r:
        order[c + 1], rs[c + 1] = order[c], rs[c]
        c -= 1
    order[c + 1], rs[c + 1] = t, r
    return a - 1 - c


@numba.njit(**_JIT)
def descending_ratio_order(ratio, order, sorted_ratio, packed, spare):
    """order: the indices of ``ratio`` by non-increasing value (exact ties in any order), and
    ``sorted_ratio = ratio[order]``.  ``packed``, ``spare``: int64 scratch of the same length."""
    n = ratio.shape[0]
    _packed_keys(ratio, packed)
    for digit in range(KEY_BITS // DIGIT_BITS):
        _radix_pass(packed, spare, 32 + DIGIT_BITS * digit)
        packed, spare = spare, packed
    low = numpy.int64(0xFFFFFFFF)
    for i in range(n):
        t = packed[i] & low
        order[i], sorted_ratio[i] = t, ratio[t]
    # Sorted by key: only tokens sharing a key can be out of order.  The insertions compare
    # the gathered ratios, in memory order, and move them with their tokens.
    moves, budget = 0, INSERTION_BUDGET * n
    for a in range(1, n):
        if not sorted_ratio[a - 1] < sorted_ratio[a]:
            continue
        moves += insert_descending(order, sorted_ratio, 0, a)
        if moves > budget:
            order[:] = numpy.argsort(-ratio)
            for i in range(n):
                sorted_ratio[i] = ratio[order[i]]
            return


# Cells (docs/verifiers/optimal.md, "Cells"): buckets of tokens whose ratios share a
# double's exponent and top mantissa bits (a relative width of at most run_width), fitted to the
# row's range of ratios in at most V buckets.  Bucket 0 holds the tokens with q = 0 (ratio
# inf), the last one those with p = 0, and the others the finite positive ratios, highest first.
# Cells are declined when more of the tokens than this share would stay single (and more than
# SHORT_SPAN: a short row takes cells wherever it can, which is cheap either way).
CELL_EXPANSION_SHARE = 0.25
SHORT_SPAN = 64  # a bucket of single tokens up to this size is sorted by insertion
@numba.njit(**_JIT)
def bucket_of(bits, shift, key_hi, buckets):
    """The bucket of a ratio p/q >= 0 (inf for q = 0), given as its bit pattern."""
    if bits >= _INF_BITS:
        return 0
    if bits <= 0:
        return buckets - 1
    return 1 + key_hi - (bits >> shift)


@numba.njit(**_JIT)
def _reach(below, above, b, q_mass, lowest, highest, q_from, k):
    """The most a set {positions >= m} with m inside bucket b, or right after it, can exceed
    the best value by, given the values ``below`` and ``above`` (less the best) of the sets
    starting after and at b.  Each token x of b changes the value by q_x (h_k - r_x), with
    k Q'^(k-1) <= h_k <= k Q^(k-1) (Q, Q' the q-mass from b and after it, at most 1): counted
    up from below, the set gains at most q(b) (k Q^(k-1) - lowest); counted down from above, it
    loses no more than it would gain back, q(b) (highest - k Q'^(k-1))."""
    if b == 0 or q_mass[b] == 0:  # the tokens with q = 0 change nothing but p
        return max(below, above)
    up = q_mass[b] * (k * power(min(q_from[b], 1.0), k - 1) - lowest[b])
    down = q_mass[b] * (highest[b] - k * power(min(q_from[b + 1], 1.0), k - 1))
    return min(below + max(up, 0.0), above + max(down, 0.0))


@numba.njit(**_JIT)
def cells_layout(p, q, p_scale, q_scale, ratio, k, work, run_width):
    """The positions of the plan with cells, written to work rows 1-4 (order, qs, ps, rs):
    a bucket that is surely capped in H or merged on T* is one position (order -1, its q- and
    p-mass, and its lowest ratio in H, its highest on T*); every other bucket's tokens are
    positions of their own, sorted.  Work rows 14 and 15 keep each bucket's position (-1 for
    one sorted token by token) and each such token's position, for ``token_position``.

    Decided from the buckets' sums alone, with bounds that hold for any order inside a bucket
    (docs/verifiers/optimal.md, "Cells"): the cut lies in, or next to, the buckets where a set
    {positions >= m} could reach the best value of the buckets' boundaries; a bucket of H above
    them is capped if the cap test, run with its lowest ratio, passes against that value (a lower
    bound of the cut's); a bucket of T* below them merges if raising it to its highest ratio
    keeps what the merges add within half of what every later prefix can spare.

    Returns (n, pos_lo, pos_hi, h_last, buckets, shift, key_hi): the positions, the range the
    cut must fall in, the last merged cell of H (-1: none), and the buckets' layout; buckets 0
    if the row is declined (V < 3, no finite positive ratio, or more than CELL_EXPANSION_SHARE of
    the tokens, and more than SHORT_SPAN, would stay single)."""
    vocab = ratio.shape[0]
    declined = (vocab, 0, vocab, -1, 0, 0, 0)
    bits = ratio.view(numpy.int64)
    lo, hi = finite_positive_range(bits)
    if hi == 0:
        return declined
    mantissa_bits = 0
    while 2.0**-mantissa_bits > run_width and mantissa_bits < 52:
        mantissa_bits += 1
    shift = 52 - mantissa_bits
    while (hi >> shift) - (lo >> shift) + 3 > vocab and shift < 62:  # rows of V + 1 hold buckets + 1
        shift += 1
    key_hi = hi >> shift
    buckets = key_hi - (lo >> shift) + 3
    if buckets > vocab:  # V < 3
        return declined

    q_mass, p_mass = work[5, :buckets], work[6, :buckets]
    count = work[7, :buckets].view(numpy.int64)
    lowest, highest = work[16, :buckets], work[9, :buckets]  # each bucket's extreme ratios
    bucket = work[15, :vocab].view(numpy.int64)  # each token's; a single token's position later
    q_mass[:] = 0.0
    p_mass[:] = 0.0
    count[:] = 0
    lowest[:] = math.inf
    highest[:] = 0.0
    for t in range(vocab):
        b = bucket_of(bits[t], shift, key_hi, buckets)
        bucket[t] = b
        q_mass[b] += q[t] * q_scale
        p_mass[b] += p[t] * p_scale
        count[b] += 1
        lowest[b] = min(lowest[b], ratio[t])
        highest[b] = max(highest[b], ratio[t])

    # The value q(T)^k - p(T) of the sets {buckets >= b}, summed from each bucket's change as
    # the plan's cut loop sums tokens' (a best set is one that no later gain beats); row 2 is
    # free until the positions are written.
    q_from = work[8, : buckets + 1]
    change = work[2, :buckets]
    q_from[buckets] = 0.0
    value = best = gain = 0.0
    best_b = buckets  # the empty set first; ties go to the larger set
    for b in range(buckets - 1, -1, -1):
        q_from[b] = q_from[b + 1] + q_mass[b]
        upper, lower = min(q_from[b], 1.0), min(q_from[b + 1], 1.0)
        width = q_mass[b] if q_from[b] <= 1.0 else upper - lower
        change[b] = width * power_sum(upper, lower, k) - p_mass[b]
        value += change[b]
        gain += change[b]
        if q_mass[b] > 0 and gain >= 0:
            best, best_b, gain = value, b, 0.0
    # reach[b]: the most by which a set {positions >= m}, m after b's first position (b's
    # tokens in any order), can exceed the best value; from the changes between the two (so
    # that small ones keep their precision).  slack[b]: the least by which every set
    # {positions > l}, l from b's first position on, falls short of it.
    guard = RUN_SLACK_GUARD  # the merged runs' guard with a^k <= 1: the cut is not known yet
    reach = work[4, :buckets]  # row 4 is free until the positions are written too
    slack = work[10, : buckets + 1]
    above = 0.0  # the value of {buckets >= b} less the best
    for b in range(best_b - 1, -1, -1):
        above += change[b]
        reach[b] = _reach(above - change[b], above, b, q_mass, lowest, highest, q_from, k)
    above = 0.0
    for b in range(best_b, buckets):
        reach[b] = _reach(above - change[b], above, b, q_mass, lowest, highest, q_from, k)
        above -= change[b]
    slack[buckets] = best  # the empty set
    for b in range(buckets - 1, -1, -1):
        slack[b] = min(slack[b + 1], -reach[b])
    b_lo, b_hi = max(best_b - 1, 0), min(best_b, buckets - 1)
    for b in range(buckets):  # where a set inside a bucket could beat the best by more than the guard
        if count[b] > 0 and reach[b] > guard:
            b_lo, b_hi = min(b_lo, b), max(b_hi, b)

    # Roles: 1 a capped cell of H, 2 a merged cell of T*, 0 tokens one by one, 3 empty.
    role = work[11, :buckets].view(numpy.int64)
    p_acc = q_acc = 0.0
    capping = True
    for b in range(b_lo):
        p_acc += p_mass[b]
        q_acc += q_mass[b]
        if count[b] == 0:
            role[b] = 3
        elif b == 0:  # q = 0: single, and capped as the plan counts them
            role[b] = 0
        elif capping and p_acc - lowest[b] * q_acc < best - guard:  # the plan's test at b's last token
            role[b] = 1
        else:
            capping = False
            role[b] = 0
    for b in range(b_lo, b_hi + 1):
        role[b] = 0 if count[b] > 0 else 3
    spent = 0.0
    for b in range(b_hi + 1, buckets):
        more = max(highest[b] * q_mass[b] - p_mass[b], 0.0)
        if count[b] == 0:
            role[b] = 3
        elif spent + more <= 0.5 * slack[b] - guard:
            role[b] = 2
            spent += more
        else:
            role[b] = 0
    single = 0
    for b in range(buckets):
        if role[b] == 0:
            single += count[b]
    if single > CELL_EXPANSION_SHARE * vocab and single > SHORT_SPAN:
        return declined

    # Positions: one per cell, count[b] per bucket of single tokens (filled, then sorted).
    order = work[1, :vocab].view(numpy.int64)
    qs, ps, rs = work[2, :vocab], work[3, :vocab], work[4, :vocab]
    cell_at = work[14, :buckets].view(numpy.int64)  # a cell's position, or -1
    fill = work[10, :buckets].view(numpy.int64)  # slack is not needed past the roles
    n, h_last, pos_lo, pos_hi = 0, -1, 0, 0
    for b in range(buckets):
        if b == b_lo:
            pos_lo = n
        cell_at[b] = -1
        fill[b] = n
        if role[b] == 1 or role[b] == 2:
            cell_at[b] = n
            order[n], qs[n], ps[n], rs[n] = -1, q_mass[b], p_mass[b], lowest[b] if role[b] == 1 else highest[b]
            if role[b] == 1:
                h_last = n
            n += 1
        elif role[b] == 0:
            n += count[b]
        if b == b_hi:
            pos_hi = n
    position = bucket  # each single token's, once sorted
    for t in range(vocab):
        b = bucket[t]
        if role[b] == 0:
            i = fill[b]
            fill[b] = i + 1
            order[i], rs[i] = t, ratio[t]
    for b in range(buckets):  # each bucket of single tokens in order, then their p and q
        if role[b] == 0:
            _sort_span(order, rs, fill[b] - count[b], fill[b], work)
            for i in range(fill[b] - count[b], fill[b]):
                t = order[i]
                qs[i], ps[i], position[t] = q[t] * q_scale, p[t] * p_scale, i
    return n, pos_lo, pos_hi, h_last, buckets, shift, key_hi


@numba.njit(**_JIT)
def _sort_span(order, rs, start, end, work):
    """Positions start..end-1 by non-increasing rs, moving order along: by insertion when
    short, else through an argsort (work rows 5 and 8 as scratch)."""
    if end - start <= SHORT_SPAN:
        for a in range(start + 1, end):
            if rs[a - 1] < rs[a]:
                insert_descending(order, rs, start, a)
        return
    size = end - start
    by = numpy.argsort(-rs[start:end])
    t_order, t_r = work[8, :size].view(numpy.int64), work[5, :size]
    for i in range(size):
        t_order[i], t_r[i] = order[start + by[i]], rs[start + by[i]]
    for i in range(size):
        order[start + i], rs[start + i] = t_order[i], t_r[i]


@numba.njit(inline="always", **_JIT)
def plan_positions(p, q, p_total, q_total, k, work, run_width, cells):
    """One row's plan in position order (the tokens by non-increasing p/q), for the laws
    ``p / p_total`` and ``q / q_total`` (``optimal.as_law``'s renormalization, to an ulp).
    ``work``: scratch of at least [WORK_ROWS, V + 1] (``workspace``).  ``run_width``: T*'s
    positions whose ratios lie within this relative width of a run's first merge into it where
    the slack allows (0: no runs, the tensor plan's targets).

    With run_width > 0 and ``cells`` the plan first tries cells (``cells_layout``): tokens of one ratio
    bucket that would share sigma anyway (capped in H, merged on T*) become one position, and
    only the buckets near the cut and those the slack cannot cover are sorted token by token;
    a row where too many are, or whose checks fail, is planned token by token.

    Returns ``(order, phi, tiers, marginal, n, layout)``: views into ``work`` of the n
    positions -- ``order`` (the token at each position, -1 for a cell), ``phi`` and ``tiers``
    (the scale there is phi * 2^(-TIER_BITS * tier)) and ``marginal`` (s there) -- and
    ``layout`` (the cells' (buckets, shift, top key), buckets 0 without cells), for
    ``token_position``.  Staying in
    position order spares ``verify_row`` two scatters of V values to token order, which only
    the kernel needs.
    """
    vocab = p.shape[0]
    ratio = work[0, :vocab]
    # one division per token: renormalizing by reciprocals moves values by an ulp at most
    p_scale, q_scale = 1 / p_total, 1 / q_total
    for t in range(vocab):
        ratio[t] = (p[t] * p_scale) / (q[t] * q_scale) if q[t] > 0 else math.inf
    order = work[1, :vocab].view(numpy.int64)  # the token ids by non-increasing p/q ("positions")
    qs, ps, rs = work[2, :vocab], work[3, :vocab], work[4, :vocab]
    buckets = shift = key_hi = 0
    n, pos_lo, pos_hi, h_last = vocab, 0, vocab, -1
    if run_width > 0 and cells:
        n, pos_lo, pos_hi, h_last, buckets, shift, key_hi = cells_layout(p, q, p_scale, q_scale, ratio, k, work, run_width)
    while True:  # twice at most: cells, then token by token if they were declined
        if buckets == 0:
            n, pos_lo, pos_hi, h_last = vocab, 0, vocab, -1
            descending_ratio_order(ratio, order, rs, work[2, :vocab].view(numpy.int64), work[3, :vocab].view(numpy.int64))
            for i in range(vocab):
                t = order[i]
                qs[i], ps[i] = q[t] * q_scale, p[t] * p_scale
        ok, phi, tiers, marginal = plan_stages(qs, ps, rs, order, n, k, work, 0.0 if buckets else run_width,
                                               buckets > 0, pos_lo, pos_hi, h_last)
        if ok or buckets == 0:
            return order[:n], phi, tiers, marginal, n, (buckets, shift, key_hi)
        buckets = 0


@numba.njit(inline="always", **_JIT)
def plan_stages(qs, ps, rs, order, vocab, k, work, run_width, cells, pos_lo, pos_hi, h_last):
    """Steps 1-4 of the plan on ``vocab`` positions (qs, ps, rs: q, p and p/q there, in
    non-increasing order of rs).  With ``cells``, the cut must fall in [pos_lo, pos_hi] and
    every merged cell of H (the last at h_last) must be capped, as ``cells_layout`` planned;
    else ``ok`` is False and nothing else is meaningful.  Returns (ok, phi, tiers, marginal)."""
    # 1. The optimal cut T* = {positions >= cut}: the largest T maximizing q(T)^k - p(T).
    # Suffix sums run from the bottom, so that small sums keep their relative precision.  Sets
    # are compared by ``gain``, the value of {positions >= i} less that of the best set so far,
    # summed from each token's own change (as optimal.optimal_cut): a token far below the
    # rounding of q(T)^k - p(T) would otherwise tie, and join T* even where it loses.
    # Also kept for the merged runs of step 2: best_below[i], the best value of the sets
    # {positions >= m} for m > i.  The first positions cut..i of T* then have the slack
    # value(T*) - value({positions > i}) >= 0 (the win-mass of their levels less their p-mass),
    # and value(T*) - best_below[i] is its minimum over them and all longer prefixes.
    # The loop also gathers p and q into position order, and p(T*).
    q_below = work[5, : vocab + 1]  # q-mass of positions >= i
    q_below[vocab] = 0.0
    best_below = work[10, :vocab]
    gain, cut = 0.0, vocab  # the empty set, value 0, is the first best
    value = best = value_t = 0.0
    p_below = p_t = 0.0
    for i in range(vocab - 1, -1, -1):
        p_below += ps[i]
        q_below[i] = q_below[i + 1] + qs[i]
        upper, lower = min(q_below[i], 1.0), min(q_below[i + 1], 1.0)
        width = qs[i] if q_below[i] <= 1.0 else upper - lower  # upper^k - lower^k = width h_k
        change = width * power_sum(upper, lower, k) - ps[i]
        best_below[i] = best
        value += change
        best = max(best, value)
        gain += change
        if qs[i] > 0 and gain >= 0:  # at least as good as the best: on ties the larger T
            gain, cut, value_t, p_t = 0.0, i, value, p_below
    top_h, a = q_below[0], q_below[cut]
    mass_t = power(a, k)  # what T* wins
    if cells:
        if not pos_lo <= cut <= pos_hi:
            return False, work[8, :vocab], work[9, :vocab].view(numpy.int64), work[10, :vocab]
        for i in range(cut, vocab):  # a merged cell of T* aims at its bucket's top ratio
            if order[i] < 0:
                ps[i] = rs[i] * qs[i]

    # 2. Targets: min(p, c q) on H's first j positions, max(p, c' q) on T*.
    # H wins mass_h = p(H) - excess, excess = q(T*)^k - p(T*) >= 0 the cut's value: position i
    # of H is capped when sum_H min(p, r_i q) > mass_h, i.e. when p - r_i q summed over H's first
    # i positions is below the excess.  Both sides are small where H's first tokens are (a
    # comparison of sums near p(H) instead would be decided by their rounding).
    # On T* the targets are max(u, c' q) with u = p, or, in merged runs (run_width > 0), u = the
    # run's first ratio times q >= p: a run extends over the next positions while their ratios
    # stay within run_width of its first and what u then adds over p stays within half the
    # slack of every prefix from there on (docs/verifiers/optimal.md, "Merged runs").  A run
    # shares one sigma, so its positions join without solving.
    q_group, p_group = work[6, :vocab], work[7, :vocab]  # q- and target mass of the block before i
    sigma_t = work[11, :vocab]  # sigma and target of T*'s positions before the floor
    target_t = best_below  # each best_below[i] is read just before its slot is overwritten
    excess = max(mass_t - p_t, 0.0)
    q_acc = p_acc = 0.0
    spent, run_sigma, run_floor = 0.0, -1.0, math.inf  # T*'s first position starts a run
    guard = RUN_SLACK_GUARD * mass_t  # where the slack is rounding noise, nothing merges
    j, jt = 0, cut
    for i in range(vocab):
        if i == cut:
            q_acc = p_acc = 0.0
        q_group[i], p_group[i] = q_acc, p_acc
        target = ps[i]
        if i >= cut:
            more = (run_sigma - rs[i]) * qs[i]  # what merging i into the run adds over p
            if run_sigma >= rs[i] >= run_floor and spent + more <= 0.5 * (value_t - best_below[i]) - guard:
                spent += more
                if more > 0:  # an exact tie keeps its p
                    target = run_sigma * qs[i]
            else:
                run_sigma, run_floor = rs[i], rs[i] * (1 - run_width)
            sigma_t[i], target_t[i] = run_sigma, target
            if p_acc + run_sigma * q_below[i] > mass_t:
                jt += 1
        q_acc += qs[i]
        p_acc += target
        if i < cut and (qs[i] == 0 or p_acc - rs[i] * q_acc < excess):
            j += 1
    if cells and h_last >= j:
        return False, work[8, :vocab], work[9, :vocab].view(numpy.int64), work[10, :vocab]
    cap = 0.0
    if j > 0:
        last = j - 1
        cap = (p_group[last] + ps[last] - excess) / (q_group[last] + qs[last])
        if not math.isfinite(cap):
            cap = 0.0
    jt = min(jt, vocab - 1)
    floor = (mass_t - p_group[jt]) / q_below[jt]
    if not math.isfinite(floor):
        floor = 0.0

    # 3. Processor sharing down each block.  Position i joins its block's group of earlier
    # positions with length ``left`` left; the scale falls by left / (the group's length at
    # the previous join), kept with its complement ``drop`` for the marginal.
    # The scales as mantissa * 2^(-TIER_BITS * tier): the ratios alone can take them below any
    # float's range (rows whose every suffix is a tight set drop e^30 per position), and
    # multiplying by a power of two is exact.
    # 4. The winner's law from the scales used (optimal.race_marginal, Lemma 1), from the ratios
    # of consecutive scales alone: s_m = q_m X_m with X_m = d_m + (phi_{m+1} / phi_m) X_{m+1}, and
    # phi_m beta_m = (phi_m / phi_{m-1}) phi_{m-1} beta_{m-1} + q_m.  Each d_m needs the join's
    # ratio to position m + 1, so this loop writes it one position late, and a backward pass
    # sums the X_m.
    phi = work[8, :vocab]  # the mantissa, in [2^-TIER_BITS, 1]
    tiers = work[9, :vocab].view(numpy.int64)
    step = work[7, : vocab + 1]  # phi_i / phi_{i-1} (p_group is not needed past step 2)
    piece = work[10, :vocab]  # d_m; piece[i - 1] is written after target_t[i - 1] was read
    slope = 0.0  # phi_m beta_m
    tier = 0
    s_acc = left_prev = 0.0
    sigma_prev = -1.0
    running = 1.0
    for i in range(vocab):
        if i == cut:
            s_acc = left_prev = 0.0
        # sigma is cap (floor) itself on the capped (floored) positions, so that a run of them
        # is seen to share it: such a position joins at the group's current level
        if i < cut:
            target, sigma = ps[i], rs[i]
            if i < j and cap * qs[i] < ps[i]:
                target, sigma = cap * qs[i], cap
        else:
            target, sigma = target_t[i], sigma_t[i]
            if floor * qs[i] > target:
                target, sigma = floor * qs[i], floor
        if not qs[i] > 0:
            sigma = 0.0
        shared = sigma == sigma_prev and left_prev > 0 and i != cut
        if shared:  # F_i(l_i) = 0: the root is l_i, and the scale stays (ratio 1, drop 0)
            left = left_prev
        else:
            top = top_h if i < cut else a
            base = top - q_group[i]
            deficit = q_group[i] * power_sum(top, base, k) - s_acc
            if deficit < 0:  # the group's targets exceed what its levels can win (optimal._deficits)
                s_acc += deficit
                deficit = 0.0
            left = join_length(base, sigma, deficit, q_group[i], left_prev, k)
        sigma_prev = sigma
        s_acc += target
        ratio, drop = 1.0, 0.0
        if i == cut and cut > 0:  # T* starts SEG_FLOOR below H's lowest scale
            ratio, drop = _SEG_RATIO, 1 - _SEG_RATIO
        elif not shared and left_prev > 0 and not math.isnan(left):
            kept = min(left, left_prev)
            ratio = kept / left_prev
            drop = (left_prev - kept) / left_prev
            # the floor of optimal.smallest_log_ratio, without a division unless it binds
            # the block's q-mass from i on: to rounding in H (q_below - a), enough for a floor
            rest = q_below[i] if i >= cut else max(q_below[i] - a, 0.0)
            pairs = min(max(k * (k - 1) * q_group[i] * rest, _SEG_RATIO), 1.0)
            if ratio * pairs < _SEG_RATIO:
                ratio = _SEG_RATIO / pairs
                drop = 1 - ratio
        running *= ratio
        if running < _TIER:
            running *= _TIER_UP
            tier += 1
        phi[i], tiers[i], step[i] = running, tier, ratio
        left_prev = left + qs[i]
        if i > 0:  # d_{i-1}, from the join's ratio to i and its own complement
            lower = q_below[i]
            piece[i - 1] = drop * power_sum(lower + slope, lower + slope * ratio, k) if drop > 0 else 0.0
        slope = slope * ratio + qs[i]
    # after the last position: G(0) = 0, and all of it is dropped
    step[vocab] = 0.0
    piece[vocab - 1] = power_sum(slope, 0.0, k)
    marginal = piece  # each piece is read once, just before its slot is overwritten
    acc = piece[vocab - 1]
    marginal[vocab - 1] = qs[vocab - 1] * acc
    for m in range(vocab - 2, -1, -1):
        acc = piece[m] + step[m + 1] * acc
        marginal[m] = qs[m] * acc
    return True, phi, tiers, marginal


# Compiled copies of the plan with k a constant, for the draft counts used most: plan_positions
# is inlined, so its loops over k unroll and power_sum's splitting on k's bits folds away.
# Against the copy for any k, on LLM-like rows at V = 32,000: 34 % faster at k = 2, 10-15 %
# at k = 4, 20-25 % at k = 8.  Each copy adds ~13 s to the first compile (then cached on disk).
@numba.njit(**_JIT)
def _plan_positions_two(p, q, p_total, q_total, work, run_width, cells):
    return plan_positions(p, q, p_total, q_total, 2, work, run_width, cells)


@numba.njit(**_JIT)
def _plan_positions_four(p, q, p_total, q_total, work, run_width, cells):
    return plan_positions(p, q, p_total, q_total, 4, work, run_width, cells)


@numba.njit(**_JIT)
def _plan_positions_eight(p, q, p_total, q_total, work, run_width, cells):
    return plan_positions(p, q, p_total, q_total, 8, work, run_width, cells)


@numba.njit(**_JIT)
def _plan_positions_any_k(p, q, p_total, q_total, k, work, run_width, cells):
    return plan_positions(p, q, p_total, q_total, k, work, run_width, cells)


@numba.njit(**_JIT)
def plan_positions_compiled(p, q, p_total, q_total, k, work, run_width, cells):
    """plan_positions through its compiled copies (callers link them instead of inlining the
    plan, which keeps the first use's compile time down)."""
    if k == 2:
        return _plan_positions_two(p, q, p_total, q_total, work, run_width, cells)
    if k == 4:
        return _plan_positions_four(p, q, p_total, q_total, work, run_width, cells)
    if k == 8:
        return _plan_positions_eight(p, q, p_total, q_total, work, run_width, cells)
    return _plan_positions_any_k(p, q, p_total, q_total, k, work, run_width, cells)


@numba.njit(**_JIT)
def plan_one_row(p, q, k, log_scale_out, marginal_out, work, run_width, cells):
    """One row's plan in token order: the log scales log(phi) and the winner law s."""
    order, phi, tiers, marginal, n, layout = plan_positions_compiled(p, q, 1.0, 1.0, k, work, run_width, cells)
    marginal_by_token(q, 1.0, order, marginal, n, layout, work, marginal_out)
    log_scale = work[6, :n]  # per position, then per token (q_group is not needed past the plan)
    for m in range(n):
        log_scale[m] = math.log(phi[m]) - tiers[m] * _TIER_LOG
    if layout[0] == 0:
        for m in range(n):
            log_scale_out[order[m]] = log_scale[m]
        return
    position = work[15, : p.shape[0]].view(numpy.int64)  # as marginal_by_token wrote it
    for t in range(p.shape[0]):
        log_scale_out[t] = log_scale[position[t]]


@numba.njit(**_JIT)
def marginal_by_token(q, q_scale, order, marginal, n, layout, work, out):
    """out[t] = s of token t, for a plan of n positions (plan_positions): scattered from the
    positions, or, with cells, a token's own position's s or its share q_t / q(cell) of its
    cell's (work row 15 then holds every token's position, row 5 the cells' factors)."""
    if layout[0] == 0:
        for m in range(n):
            out[order[m]] = marginal[m]
        return
    position = token_positions(work, q.shape[0], layout)
    factor = cell_factors(order, work[2, :n], marginal, work[5, :n])
    for t in range(q.shape[0]):
        m = position[t]
        out[t] = marginal[m] if order[m] >= 0 else (q[t] * q_scale) * factor[m]


@numba.njit(**_JIT)
def token_positions(work, vocab, layout):
    """Every token's position in a plan with cells (work row 15, as int64): a single token's
    own, which the layout wrote, and a cell's for the others."""
    buckets, shift, key_hi = layout
    bits = work[0, :vocab].view(numpy.int64)
    cell_at = work[14, :buckets].view(numpy.int64)
    position = work[15, :vocab].view(numpy.int64)
    for t in range(vocab):
        cell = cell_at[bucket_of(bits[t], shift, key_hi, buckets)]
        if cell >= 0:
            position[t] = cell
    return position


@numba.njit(**_JIT)
def cell_factors(order, qs, marginal, out):
    """s(cell) / q(cell) at each cell's position (0 elsewhere): a token x of the cell has
    s_x = q_x times that (its tokens bid with one scale, Lemma 1)."""
    for m in range(order.shape[0]):
        out[m] = marginal[m] / qs[m] if order[m] < 0 else 0.0
    return out


@numba.njit(**_JIT)
def token_position(token, work, order, n, layout):
    """The position of ``token`` in a plan of n positions with ``layout`` (plan_positions):
    its cell's, or its own (found by ratio among the sorted ones when there are no cells)."""
    buckets, shift, key_hi = layout
    ratio = work[0]
    if buckets == 0:
        return position_of(token, ratio, work[4, :n], order)
    cell = work[14].view(numpy.int64)[bucket_of(ratio.view(numpy.int64)[token], shift, key_hi, buckets)]
    return cell if cell >= 0 else work[15].view(numpy.int64)[token]


@numba.njit(**_JIT)
def token_marginal(token, m, order, qs, marginal, q_token):
    """s of ``token`` at its position m: the position's own, or, in a cell (a group of tokens
    with one scale, whose law is q times a common factor), its share q_token / q(cell)."""
    if order[m] == token:
        return marginal[m]
    return q_token * (marginal[m] / qs[m])


@numba.njit(**_JIT)
def plan_rows(p, q, k, log_scale_out, marginal_out, work, run_width, cells):
    """The plan of every row of p, q [B, V] (float64), with the scratch ``work``."""
    for b in range(p.shape[0]):
        plan_one_row(p[b], q[b], k, log_scale_out[b], marginal_out[b], work, run_width, cells)


def workspace(vocab: int) -> numpy.ndarray:
    """Scratch for one row's plan or verdict at a time, [WORK_ROWS, vocab + 1] float64.

    Passed in rather than allocated in the kernel: a dozen fresh arrays of V doubles per row
    come from mmap at V = 32000 (above glibc's threshold), and faulting their pages in cost
    ~1 ms per call, a third of the plan.  Callers keep one per thread and reuse it.
    """
    return numpy.empty((WORK_ROWS, vocab + 1))


@numba.njit(**_JIT)
def join_lengths(base, sigma, deficit, group, start, k, out):
    """join_length over arrays (out[i] for each i), for tests of the root solver."""
    for i in range(base.shape[0]):
        out[i] = join_length(base[i], sigma[i], deficit[i], group[i], start[i], k)


@numba.njit(**_JIT)
def residual_draw(p, p_total, marginal, u):
    """A token from normalize(max(p / p_total - s, 0)) (p where that has no mass), by inverse
    CDF in token order with the uniform u in [0, 1): a token of weight 0 is never returned."""
    mass = 0.0
    for t in range(p.shape[0]):
        mass += max(p[t] / p_total - marginal[t], 0.0)
    use_p = not mass > 0  # reached with probability 0: the kernel falls back to p there too
    if use_p:
        mass = 0.0
        for t in range(p.shape[0]):
            mass += p[t] / p_total
    goal, acc, last = u * mass, 0.0, -1
    for t in range(p.shape[0]):
        weight = p[t] / p_total if use_p else max(p[t] / p_total - marginal[t], 0.0)
        if weight > 0:
            acc += weight
            last = t
            if acc > goal:
                break
    return last  # the last positive weight if rounding left acc <= goal


@numba.njit(**_JIT)
def position_of(token, ratio, rs, order):
    """The position of ``token``: a binary search for its ratio in ``rs`` (the ratios in
    position order, non-increasing), then a scan of the positions that tie with it."""
    r = ratio[token]
    lo, hi = 0, rs.shape[0]
    while lo < hi:  # the first position whose ratio is not above r
        mid = (lo + hi) // 2
        if rs[mid] > r:
            lo = mid + 1
        else:
            hi = mid
    for i in range(lo, rs.shape[0]):
        if order[i] == token:
            return i
    for i in range(lo):  # unreachable while rs is in order; kept so a token is always found
        if order[i] == token:
            return i
    return -1


def as_float64_row(row, scratch):
    """row as float64 in compiled code: itself, or copied into scratch (the plan's compiled
    copies take float64 rows only; copying a float32 row here spares the caller a conversion
    of the whole [B, V] batch)."""
    raise TypeError("as_float64_row runs in compiled code only")


@overload(as_float64_row, jit_options={"cache": True})
def _as_float64_row(row, scratch):
    if row.dtype == numba.types.float64:
        return lambda row, scratch: row

    def copy(row, scratch):
        out = scratch[: row.shape[0]]
        for t in range(row.shape[0]):
            out[t] = row[t]
        return out

    return copy


@numba.njit(**_JIT)
def verify_row(p_row, q_row, drafts, u, k, work, run_width, cells):
    """One node's verdict token: the plan, the bid race, the keep coin and, on rejection, the
    residual draw, as ``Optimal._verify`` does with tensors.  p_row, q_row: float64 or float32
    rows as given, renormalized like ``optimal.as_law``; drafts [k]; u [k + 2]: the k bids'
    uniforms, the coin, the residual's uniform; ``work``: as for ``plan_positions``.

    Everything stays in position order but the residual draw, which (run on rejection only)
    scatters s to token order and draws there, as the tensor path does: both paths then emit
    the same token for the same uniforms."""
    p, q = as_float64_row(p_row, work[12]), as_float64_row(q_row, work[13])
    vocab = p.shape[0]
    p_total = q_total = 0.0
    for t in range(vocab):
        p_total += p[t]
        q_total += q[t]
    order, phi, tiers, marginal, n, layout = plan_positions_compiled(p, q, p_total, q_total, k, work, run_width, cells)
    qs = work[2, :n]
    q_scale = 1 / q_total
    winner, at, best = drafts[0], 0, -math.inf
    for i in range(k):  # the highest bid U_i phi(x_i) wins, compared as logs (tiered scales)
        pos = token_position(drafts[i], work, order, n, layout)
        bid = (math.log(u[i]) if u[i] > 0 else -math.inf) + math.log(phi[pos]) - tiers[pos] * _TIER_LOG
        if bid > best or i == 0:
            winner, at, best = drafts[i], pos, bid
    s_winner = token_marginal(winner, at, order, qs, marginal, q[winner] * q_scale)
    p_winner = p[winner] * (1 / p_total)  # as the plan scaled it
    keep = 1.0
    if s_winner > p_winner:
        keep = p_winner / s_winner
    if u[k] < keep:
        return winner
    by_token = work[11, :vocab]
    marginal_by_token(q, q_scale, order, marginal, n, layout, work, by_token)
    return residual_draw(p, p_total, by_token, u[k + 1])


@numba.njit(**_JIT)
def verify_rows(p, q, drafts, u, token, accepted, work, run_width, cells):
    """The verdict of every row: p, q [B, V] (float32 or float64), drafts [B, k] (int64),
    u [B, k + 2] uniforms (float64); out: token [B] and accepted [B] (int64: the first draft
    equal to the token, or -1), with the scratch ``work``.  False, with nothing done, if a
    draft is not a token id in [0, V)."""
    k = drafts.shape[1]
    if not draft_ids_in_range(drafts, p.shape[1]):
        return False
    for b in range(p.shape[0]):
        token[b] = verify_row(p[b], q[b], drafts[b], u[b], k, work, run_width, cells)
        accepted[b] = first_draft(drafts[b], token[b])
    return True
