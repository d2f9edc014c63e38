"""rrs / rrs-wor's ``verify`` on the CPU, fused: one loop per row (numba).

The same walk as ``rrs._verify_dense``, from the same uniforms, but a row is one sequential
pass per rejected draft instead of ~50 tensor ops per call: at B = 1 those ops, not the
arithmetic, were the cost (0.45 ms for a [1, 256] row, a few percent of a target forward, and
the engine calls the verifier at every tree level).  p is the target law, q the draft law.

Per row, with r_i = max(p - c_i q, 0) / m_i the residual after i rejections (rrs.py's closed
form): draft i is kept when its uniform is below ``min(1, r_i(x) z_i / q(x))``, z_i the
q-mass still draftable; on rejection ``c += m_i / z_i`` and ``m = sum max(p - c q, 0)``; a
row that rejects every draft draws from the last residual by inverse CDF (p where it has no
mass, reached with probability 0).  Sums run in float64 whatever the rows' dtype, so a float32
row's masses are at least as accurate as the tensor path's; decisions then agree with it except
where a uniform falls within rounding of a threshold.
"""

from __future__ import annotations

import numba
import numpy

from .rrs import CANCELLATION_GUARD

_JIT = {"cache": True, "nogil": True, "error_model": "numpy", "boundscheck": False}
# The sums may be reassociated, which lets them run in SIMD lanes (4-8x faster at V = 32000):
# that changes only their rounding.  Not contracted: each term max(p - c q, 0) must round as in
# the draw's scan (an FMA had left a mass of 4e-17 where the scan saw no positive weight).  The
# inverse-CDF scan stays in order.
_SUM_JIT = {**_JIT, "fastmath": {"reassoc", "nsz"}}


@numba.njit(**_SUM_JIT)
def residual_mass(p, q, c):
    """sum(max(p - c q, 0)) in float64."""
    mass = 0.0
    for t in range(p.shape[0]):
        mass += max(p[t] - c * q[t], 0.0)  # no branch: the loop vectorizes
    return mass


@numba.njit(**_SUM_JIT)
def row_sums(p, q):
    """(sum p, sum q) in float64, in one pass."""
    p_sum = q_sum = 0.0
    for t in range(p.shape[0]):
        p_sum += p[t]
        q_sum += q[t]
    return p_sum, q_sum


@numba.njit(**_JIT)
def _undrafted_mass(q, drafts):
    """The q-mass of the tokens that are not drafts, as a sum of positive terms."""
    mass = 0.0
    for t in range(q.shape[0]):
        drafted = False
        for x in drafts:
            drafted |= x == t
        if not drafted:
            mass += q[t]
    return mass


@numba.njit(**_JIT)
def draftable_masses(q, total, drafts, without_replacement, z):
    """z[i]: the q-mass the walk divides by at step i (``rrs.draftable_q_mass``): all of q with
    replacement; without, the tokens not drafted before step i, summed from the undrafted
    tokens where ``total - drafted`` falls below CANCELLATION_GUARD (a peaked draft).  total:
    the sum of q."""
    k = drafts.shape[0]
    if not without_replacement:
        z[:k] = total
        return
    drawn, low = 0.0, False
    for i in range(k):
        z[i] = total - drawn
        low |= z[i] < CANCELLATION_GUARD
        drawn += q[drafts[i]]
    if low:
        later = 0.0
        undrafted = _undrafted_mass(q, drafts)
        for i in range(k - 1, -1, -1):
            later += q[drafts[i]]
            z[i] = undrafted + later


@numba.njit(**_JIT)
def residual_draw(p, q, c, mass, u):
    """A token from max(p - c q, 0) / mass by inverse CDF with u in [0, 1): the first token
    whose cumulative weight exceeds u times the total.  An empty residual (mass 0, reached with
    probability 0) draws from p instead, as c = 0.  A token of weight 0 is never returned: where
    rounding leaves the running sum below the goal (the total came from a reassociated sum), the
    last token of positive weight is."""
    if not mass > 0:
        c, mass = 0.0, residual_mass(p, q, 0.0)
    goal = min(u * mass, numpy.nextafter(mass, 0.0))
    acc, last = 0.0, -1
    for t in range(p.shape[0]):
        w = p[t] - c * q[t]
        if w > 0:
            acc += w
            last = t
            if acc > goal:
                return t
    if last < 0 and c != 0.0:  # no positive weight after all: the residual is empty, draw from p
        return residual_draw(p, q, c, 0.0, u)
    return last


@numba.njit(**_JIT)
def verify_row(p, q, drafts, uniforms, u_fallback, without_replacement, z):
    """The token one row emits (``rrs._verify_dense`` for that row); z: scratch of >= k."""
    m, q_total = row_sums(p, q)
    draftable_masses(q, q_total, drafts, without_replacement, z)
    c = 0.0
    k = drafts.shape[0]
    for i in range(k):
        x = drafts[i]
        px, qx = p[x], q[x]
        keep = 1.0  # where m = 0 the step is reached with probability 0: accept (rrs.acceptance_at)
        if m > 0:
            ratio = max(px - c * qx, 0.0) * z[i] / (m * qx)
            keep = 1.0 if ratio > 1 else ratio  # a nan ratio stays nan and rejects, as in torch
        if uniforms[i] < keep:
            return x
        if m > 0:
            c += m / z[i]
        m = residual_mass(p, q, c)
    return residual_draw(p, q, c, m, u_fallback)


@numba.njit(**_JIT)
def draft_ids_in_range(drafts, vocab):
    """Whether every id of drafts [B, k] lies in [0, vocab): the fused kernels check it before
    they index anything (they run without bounds checks)."""
    for b in range(drafts.shape[0]):
        for i in range(drafts.shape[1]):
            if not 0 <= drafts[b, i] < vocab:
                return False
    return True


@numba.njit(**_JIT)
def first_draft(drafts, token):
    """The index of the first of drafts [k] equal to token, or -1 (``base.first_match``, for
    one row): the fused kernels report it with the token."""
    for i in range(drafts.shape[0]):
        if drafts[i] == token:
            return i
    return -1


@numba.njit(**_JIT)
def verify_rows(p, q, drafts, uniforms, u_fallback, without_replacement, token, accepted):
    """token[b]: the token of row b, accepted[b]: the first draft equal to it or -1; p, q [B, V]
    (float32 or float64), drafts [B, k] int64, uniforms [B, k] and u_fallback [B] in the rows'
    dtype.  False, with nothing done, if a draft is not a token id in [0, V)."""
    k = drafts.shape[1]
    if not draft_ids_in_range(drafts, p.shape[1]):
        return False
    z = numpy.empty(k)
    for b in range(p.shape[0]):
        token[b] = verify_row(p[b], q[b], drafts[b], uniforms[b], u_fallback[b], without_replacement, z)
        accepted[b] = first_draft(drafts[b], token[b])
    return True
