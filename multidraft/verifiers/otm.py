"""SpecTr's optimal transport over draft tuples (Sun et al., NeurIPS 2023), solved as an LP.

Draft scheme: k i.i.d. drafts from q.  The verifier is the best coupling of the tuple law with
p: it maximizes P(emitted token is a draft), so its acceptance is the optimum
``multidraft.proofs.optimal_acceptance(p, q, k) = 1 - max_T [q(T)**k - p(T)]``.

The LP.  The tuple law is symmetric, so the plan may depend only on the multiset m of the
tuple.  Over the multisets of size k of tokens in q's support S (s = |S| tokens,
M = C(s+k-1, k) multisets, probability Q(m) = k!/prod(mult!) * prod q), the variables are
a(m, y) >= 0 for each distinct y in m with p(y) > 0, the mass of "emit draft y":

    maximize  sum a    s.t.  sum_y a(m, y) <= Q(m)  (each m),   sum_m a(m, y) <= p(y)  (each y).

At most s * C(s+k-2, k-1) variables (pairs (m, y) with y in m are pairs (y, m - {y})) and
M + s constraints, two nonzeros per variable.  The kernel of an ordered tuple t with multiset m

    K(y) = a(m, y) / Q(m) + (1 - sum_y' a(m, y') / Q(m)) * res(y),   res ∝ p - sum_m a(m, .)

is exact for *any* feasible a and optimal for an optimal a (docs/verifiers/otm.md).  So the
solver's tolerance can only cost acceptance, never exactness, once its answer is repaired to
be exactly feasible in float64 (``repair``).

Solver: HiGHS through ``scipy.optimize.linprog(method="highs-ipm")`` (interior point, then
crossover to a vertex) with its tightest tolerances: accurate to rounding, no extra dependency.
It matched dual simplex up to 200,000 variables at k = 2 and was 2-10x faster for k >= 3;
highspy called directly and cvxpy were slower (timings in docs/verifiers/otm.md).

Cost is exponential in k: above ``max_variables`` LP variables (a constructor option) the
verifier raises ValueError instead of hanging.  Solutions are cached per (p, q, k) row
contents (an LRU of ``cache_size`` entries), and identical rows in one batch share one LP:
``proofs.output_distribution`` calls the kernel with the same (p, q) for all V**k tuples.

The LP runs on the CPU in float64; the kernel is returned on p's device in p's dtype.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import OrderedDict
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
import torch
from scipy.optimize import linprog
from torch import Tensor

from .base import Verifier, register_verifier, sample_categorical

# One LP at this size took 1.5 s (k = 2) to 4.5 s (k = 3) of CPU on the development machine
# (docs/verifiers/otm.md); the solve time grows faster than linearly past it.
DEFAULT_MAX_VARIABLES = 200_000
DEFAULT_CACHE_SIZE = 64

# HiGHS refuses feasibility tolerances below 1e-10.  The interior point method is followed by
# crossover (scipy's default for "highs-ipm"), which ends on a vertex whose values are exact up
# to rounding: the tolerances only bound how far from optimal it may stop.  Without crossover
# the value is off by ~1e-9, too loose for the optimality tests.
IPM_OPTIONS = {
    "primal_feasibility_tolerance": 1e-10,
    "dual_feasibility_tolerance": 1e-10,
    "ipm_optimality_tolerance": 1e-12,
}
SIMPLEX_OPTIONS = {
    "primal_feasibility_tolerance": 1e-10,
    "dual_feasibility_tolerance": 1e-10,
}


def count_multisets(s: int, k: int) -> int:
    """Number of multisets of size k over s tokens: C(s+k-1, k)."""
    return math.comb(s + k - 1, k) if s > 0 else 0


def count_variables(s: int, k: int, distinct: bool = False) -> int:
    """Pairs (draft set m, distinct token y in m), an upper bound on the LP's variables (tokens
    with p = 0 are left out): s * C(s+k-2, k-1) for multisets, k * C(s, k) for k-subsets."""
    if distinct:
        return k * math.comb(s, k)
    return s * math.comb(s + k - 2, k - 1) if s > 0 else 0


class DraftSetIndex(NamedTuple):
    """The unordered draft sets of size k over range(s), in colexicographic rank order: multisets
    for i.i.d. drafts, k-subsets for distinct ones (``optimal-wor``)."""

    members: np.ndarray  # [M, k] int64, each row sorted ascending
    first: np.ndarray  # [M, k] bool: slot j holds the first occurrence of its token
    coef: np.ndarray  # [M] float64 multinomial coefficient k! / prod(multiplicity!) (1 for k-subsets)
    binom: np.ndarray  # [s+k, k+1] int64 binomial table for ranking
    distinct: bool  # k-subsets (no repeats) rather than multisets

    def rank(self, members: np.ndarray) -> np.ndarray:
        """Colex rank [n] of sorted sets [n, k] of this kind."""
        if not self.distinct:
            return multiset_rank(members, self.binom)
        return self.binom[members, np.arange(1, members.shape[1] + 1)].sum(axis=1)


def binomial_table(n: int, r: int) -> np.ndarray:
    """C(i, j) for 0 <= i < n, 0 <= j <= r as int64 (Pascal's triangle)."""
    table = np.zeros((n, r + 1), dtype=np.int64)
    table[:, 0] = 1
    for i in range(1, n):
        table[i, 1:] = table[i - 1, 1:] + table[i - 1, :-1]
    return table


def multiset_rank(members: np.ndarray, binom: np.ndarray) -> np.ndarray:
    """Colex rank [n] of sorted multisets [n, k]: the shift d_j = c_j + j turns a multiset into a
    strictly increasing combination, ranked by sum_j C(d_j, j+1) (combinatorial number system)."""
    k = members.shape[1]
    rank = np.zeros(members.shape[0], dtype=np.int64)
    for j in range(k):
        rank += binom[members[:, j] + j, j + 1]
    return rank


@functools.lru_cache(maxsize=8)
def multiset_index(s: int, k: int) -> DraftSetIndex:
    """Enumerate the C(s+k-1, k) multisets once per (s, k); they depend on nothing else."""
    count = count_multisets(s, k)
    flat = itertools.chain.from_iterable(itertools.combinations_with_replacement(range(s), k))
    lex = np.fromiter(flat, dtype=np.int64, count=count * k).reshape(count, k)
    binom = binomial_table(s + k, k)
    members = np.empty_like(lex)
    members[multiset_rank(lex, binom)] = lex  # reorder so that row i has rank i
    # run[:, j] = how many copies of members[:, j] are in slots 0..j; their product over the
    # row is prod(multiplicity!).
    run = np.ones_like(members)
    for j in range(1, k):
        run[:, j] = np.where(members[:, j] == members[:, j - 1], run[:, j - 1] + 1, 1)
    coef = math.factorial(k) / run.prod(axis=1).astype(np.float64)
    return DraftSetIndex(members, run == 1, coef, binom, distinct=False)


@functools.lru_cache(maxsize=8)
def subset_index(s: int, k: int) -> DraftSetIndex:
    """Enumerate the C(s, k) k-subsets once per (s, k), in colex order (rank sum_j C(c_j, j+1))."""
    count = math.comb(s, k)
    flat = itertools.chain.from_iterable(itertools.combinations(range(s), k))
    lex = np.fromiter(flat, dtype=np.int64, count=count * k).reshape(count, k)
    index = DraftSetIndex(lex, np.ones_like(lex, dtype=bool), np.ones(count), binomial_table(s + k, k), distinct=True)
    members = np.empty_like(lex)
    members[index.rank(lex)] = lex
    return index._replace(members=members)


def set_mass(index: DraftSetIndex, q_s: np.ndarray) -> np.ndarray:
    """[M] probability that the k drafts form each set: k i.i.d. draws from q for multisets,
    k sequential draws without replacement (rrs-wor's scheme) for k-subsets."""
    members = index.members
    if not index.distinct:
        return index.coef * q_s[members].prod(axis=1)
    # Over the 2^k subsets A of a set's slots (bit masks), first[A] = P(the first |A| draws are
    # A's tokens, in any order) = sum over the last one drawn, x in A, of
    # first[A - x] * q(x) / (mass not yet drawn before it): 2^k k steps where the k! orderings
    # would take k! k.  The mass not yet drawn is the set's complement plus its slots outside
    # A - x, both sums of positive terms (total - drawn would cancel when A holds nearly all of q).
    k = members.shape[1]
    qx = q_s[members]  # [M, k]
    slots = (np.arange(1 << k)[:, None] >> np.arange(k)) & 1  # [2^k, k] slots in each mask
    undrawn = outside_mass(q_s, members)[:, None] + qx @ (1 - slots).T  # [M, 2^k]
    first = np.zeros((1 << k, members.shape[0]))
    first[0] = 1.0
    for mask in range(1, 1 << k):
        for j in range(k):
            if mask >> j & 1:
                before = mask ^ (1 << j)
                first[mask] += first[before] * qx[:, j] / undrawn[:, before]
    return first[-1]


def outside_mass(q_s: np.ndarray, members: np.ndarray) -> np.ndarray:
    """[M] q-mass of the tokens outside each set, without cancellation: with the tokens ranked
    by descending q and tail[i] the mass from rank i on, the complement is the ranges between
    the set's ranks, each tail[a] - tail[b] with an error of ~1e-16 tail[a], and tail[a] is at
    most s times that range's own mass (every token after a range weighs at most its last one)."""
    order = np.argsort(-q_s, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(q_s.size)
    tail = np.concatenate([np.cumsum(q_s[order][::-1])[::-1], [0.0]])  # [s + 1]
    ranks = np.sort(rank[members], axis=1)  # [M, k]
    starts = np.concatenate([np.zeros_like(ranks[:, :1]), ranks[:, :-1] + 1], axis=1)  # [M, k] gap before each member
    gaps = (tail[starts] - tail[ranks]).sum(axis=1)
    return gaps + tail[ranks[:, -1] + 1]


class TransportPlan(NamedTuple):
    """A repaired LP solution for one (p, q, k), in the form the kernel needs."""

    support: np.ndarray  # [s] token ids with q > 0, ascending
    rank_of_token: np.ndarray  # [V] position in support, -1 outside it
    accept: np.ndarray  # [M, k] a(m, y)/Q(m) at the first slot holding y, else 0
    reject: np.ndarray  # [M] 1 - sum of accept over the row
    residual: np.ndarray  # [V] res, a distribution (p itself where no mass is left)
    acceptance: float  # exact P(emitted token is a draft) under this kernel
    index: DraftSetIndex


def too_large_error(name: str, s: int, k: int, limit: int, distinct: bool, row: int | None = None) -> ValueError:
    where = "" if row is None else f" (row {row})"
    sets = f"{math.comb(s, k)} k-subsets" if distinct else f"{count_multisets(s, k)} multisets"
    return ValueError(
        f"{name} is exponential in k: k = {k} drafts over the s = {s} tokens in q's support{where} "
        f"give {sets} and up to {count_variables(s, k, distinct)} LP variables, "
        f"above the limit max_variables = {limit}; use a smaller k, truncate q (top-k / top-p), "
        f"or a verifier without an LP (e.g. 'spechub', 'rrs')"
    )


def solve_transport(p: np.ndarray, q: np.ndarray, k: int, distinct: bool = False) -> TransportPlan:
    """Solve the LP for one row (p, q float64 [V]) and repair it to exact feasibility; the draft
    sets are multisets of k i.i.d. drafts, or with ``distinct`` k-subsets drawn without
    replacement."""
    support = np.flatnonzero(q > 0)
    s = support.size
    rank_of_token = np.full(q.size, -1, dtype=np.int64)
    rank_of_token[support] = np.arange(s)
    index = subset_index(s, k) if distinct else multiset_index(s, k)
    members, first = index.members, index.first
    count = members.shape[0]
    p_s, q_s = p[support], q[support]  # [s]
    mass = set_mass(index, q_s)  # [M] Q(m)

    # One variable per (set, first slot of a token) with p > 0: a token the target never
    # emits can carry no accepted mass.
    live = first & (p_s[members] > 0)  # [M, k]
    var_row, var_slot = np.nonzero(live)  # [n] each
    var_token = members[var_row, var_slot]  # [n] support rank
    n = var_row.size
    x = np.zeros(n)
    if k == 1:
        # Each set is one token and each token one set: the LP decouples into
        # a(y) = min(q(y), p(y)), ordinary speculative sampling.
        x = np.minimum(mass[var_row], p_s[var_token])
    elif n:
        # Constraint rows: 0..M-1 the multisets, M..M+s-1 the tokens; two nonzeros per column.
        rows = np.stack([var_row, count + var_token], axis=1).ravel()
        a_ub = sp.csc_array((np.ones(2 * n), rows, np.arange(0, 2 * n + 1, 2)), shape=(count + s, n))
        # Without replacement at k = 2, dual simplex took 0.4x the interior point's time
        # (docs/verifiers/optimal-wor.md); elsewhere the interior point is as fast or faster.
        result = solve_lp(a_ub, np.concatenate([mass, p_s]), simplex_first=distinct and k == 2)
        x = repair(result.x, var_row, var_token, mass, p_s)

    accept = np.zeros((count, k))
    with np.errstate(divide="ignore", invalid="ignore"):
        accept[var_row, var_slot] = np.where(mass[var_row] > 0, x / mass[var_row], 0.0)
    total = accept.sum(axis=1)  # [M]
    # Rounding in x / Q(m) can leave a row a few ulps above 1; rescale so that reject >= 0.
    over = total > 1
    accept[over] /= total[over, None]
    reject = np.clip(1 - accept.sum(axis=1), 0, None)

    served = np.zeros(q.size)
    served[support] = np.bincount(var_token, weights=x, minlength=s)  # sum_m a(m, y)
    left = np.clip(p - served, 0, None)  # [V]
    left_mass = left.sum()
    # With no mass left every tuple accepts surely (reject = 0 up to rounding), so the residual
    # is never used; p keeps the kernel a distribution.
    residual = left / left_mass if left_mass > 0 else p / p.sum()

    # Exact acceptance of this kernel: the accepted mass plus the residual's mass on the
    # rejected tuple's own tokens (zero at the exact optimum, where those tokens are saturated).
    on_tuple = (residual[support][members] * first).sum(axis=1)  # [M]
    acceptance = float(x.sum() + (mass * reject * on_tuple).sum())
    return TransportPlan(support, rank_of_token, accept, reject, residual, acceptance, index)


def solve_lp(a_ub, b_ub: np.ndarray, simplex_first: bool = False):
    """maximize sum x s.t. a_ub x <= b_ub, x >= 0, with HiGHS: interior point + crossover, and
    dual simplex if that does not report an optimum (it has not happened in our tests); with
    ``simplex_first`` the other way round."""
    c = -np.ones(a_ub.shape[1])
    methods = [("highs-ipm", IPM_OPTIONS), ("highs-ds", SIMPLEX_OPTIONS)]
    for method, options in methods[::-1] if simplex_first else methods:
        result = linprog(c, A_ub=a_ub, b_ub=b_ub, bounds=(0, None), method=method, options=options)
        if result.status == 0 and result.x is not None:
            return result
    raise RuntimeError(f"HiGHS found no optimum of the transport LP: {result.message}")


def repair(x: np.ndarray, var_row, var_token, mass: np.ndarray, p_s: np.ndarray) -> np.ndarray:
    """Make an LP solution exactly feasible in float64: clip negatives, then scale down every
    multiset row above Q(m) and every token column above p(y).  Scaling down keeps the other
    constraints satisfied, so one pass of each suffices."""
    x = np.clip(x, 0, None)
    rows = np.bincount(var_row, weights=x, minlength=mass.size)
    x = x * np.where(rows > mass, mass / np.where(rows > 0, rows, 1), 1.0)[var_row]
    cols = np.bincount(var_token, weights=x, minlength=p_s.size)
    x = x * np.where(cols > p_s, p_s / np.where(cols > 0, cols, 1), 1.0)[var_token]
    return x


@register_verifier("otm")
class OptimalTransport(Verifier):
    """SpecTr's OTM: the acceptance-optimal coupling of k i.i.d. drafts with p, by LP."""

    iid_drafts = True
    exact_acceptance = True
    # The LP's draft sets: multisets of i.i.d. drafts here, k-subsets in optimal_wor.py.
    distinct_sets = False

    def __init__(
        self,
        validate_args: bool | None = None,
        max_variables: int = DEFAULT_MAX_VARIABLES,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ):
        super().__init__(validate_args)
        if isinstance(max_variables, bool) or not isinstance(max_variables, int) or max_variables < 1:
            raise ValueError(f"max_variables must be an int >= 1, got {max_variables!r}")
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size must be an int >= 0, got {cache_size!r}")
        self.max_variables = max_variables
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, TransportPlan] = OrderedDict()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, validate_args={self.validate_args}, "
            f"max_variables={self.max_variables}, cache_size={self.cache_size})"
        )

    # ---- plans ----------------------------------------------------------------------------

    def plans(self, p: Tensor, q: Tensor, k: int) -> tuple[list[TransportPlan], np.ndarray]:
        """One plan per distinct (p, q) row and the row -> plan map [B]."""
        # Refuse before copying or solving anything, so a batch fails fast rather than after
        # some LPs (and a large V fails in microseconds).
        support = (q > 0).sum(dim=-1)  # [B]
        worst = int(torch.argmax(support))
        if count_variables(int(support[worst]), k, self.distinct_sets) > self.max_variables:
            raise too_large_error(self.name, int(support[worst]), k, self.max_variables, self.distinct_sets, worst)
        p64 = p.detach().to("cpu", torch.float64).numpy()
        q64 = q.detach().to("cpu", torch.float64).numpy()
        first, inverse = distinct_rows(np.concatenate([p64, q64], axis=1))
        return [self.plan(p64[b], q64[b], k) for b in first], inverse

    def plan(self, p: np.ndarray, q: np.ndarray, k: int) -> TransportPlan:
        """The repaired LP solution for one row, from the LRU cache when it is there."""
        key = (k, p.tobytes(), q.tobytes())
        found = self._cache.get(key)
        if found is not None:
            self._cache.move_to_end(key)
            return found
        s = int((q > 0).sum())
        if count_variables(s, k, self.distinct_sets) > self.max_variables:
            raise too_large_error(self.name, s, k, self.max_variables, self.distinct_sets)
        found = solve_transport(p, q, k, self.distinct_sets)
        if self.cache_size:
            self._cache[key] = found
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return found

    def clear_cache(self) -> None:
        self._cache.clear()

    # ---- the contract -----------------------------------------------------------------

    def _draft(self, q, k, generator):
        return sample_categorical(q, k, generator)  # [B, k]

    def _draft_probability(self, q, drafts):
        return q.gather(1, drafts).prod(dim=1)  # [B]

    def _expected_acceptance(self, p, q, k):
        plans, inverse = self.plans(p, q, k)
        values = np.array([plan.acceptance for plan in plans])[inverse]  # [B]
        return torch.from_numpy(values).to(device=p.device, dtype=p.dtype)

    def _kernel(self, p, q, drafts):
        k = drafts.shape[1]
        plans, inverse = self.plans(p, q, k)
        tokens = drafts.detach().cpu().numpy()  # [B, k]
        out = np.empty(p.shape, dtype=np.float64)  # [B, V]
        order = np.argsort(inverse, kind="stable")  # rows grouped by plan
        groups = np.split(order, np.cumsum(np.bincount(inverse, minlength=len(plans)))[:-1])
        for plan, rows in zip(plans, groups):
            out[rows] = kernel_rows(plan, tokens[rows])
        return torch.from_numpy(out).to(device=p.device, dtype=p.dtype)


def distinct_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index of one row per distinct row [U], row -> distinct row [B]) for x [B, W].

    np.unique(axis=0) sorts whole rows (seconds at B = 200,000); instead group by one random
    projection of each row, a 1-D sort, and check that every row equals its group's first row.
    Equal rows may land in different groups (rounding in the projection): that costs only a
    cache hit.  A projection collision between different rows falls back to np.unique.
    """
    if x.shape[0] == 1 or bool((x == x[0]).all()):  # the common case: one (p, q) for all rows
        return np.zeros(1, dtype=np.int64), np.zeros(x.shape[0], dtype=np.int64)
    weights = np.random.default_rng(0).random(x.shape[1]) + 0.5
    _, first, inverse = np.unique(x @ weights, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    if not bool((x[first][inverse] == x).all()):
        _, first, inverse = np.unique(x, axis=0, return_index=True, return_inverse=True)
        inverse = inverse.reshape(-1)
    return first, inverse


def kernel_rows(plan: TransportPlan, tokens: np.ndarray) -> np.ndarray:
    """Kernels [n, V] of the ordered tuples ``tokens`` [n, k] under one plan."""
    ranks = np.sort(plan.rank_of_token[tokens], axis=1)  # [n, k] the draft sets, sorted
    valid = ranks[:, 0] >= 0  # a token with q = 0 has rank -1 and sorts first
    if plan.index.distinct:  # a repeat is impossible without replacement
        valid &= (ranks[:, 1:] != ranks[:, :-1]).all(axis=1)
    m = plan.index.rank(np.where(valid[:, None], ranks, 0))  # [n]
    out = plan.reject[m, None] * plan.residual[None, :]  # [n, V]
    arange = np.arange(tokens.shape[0])
    for j in range(ranks.shape[1]):
        # Only the first slot of a token carries mass, so repeated tokens add 0.
        out[arange, plan.support[np.where(valid, ranks[:, j], 0)]] += plan.accept[m, j]
    # A tuple with a token outside q's support (or, without replacement, a repeat) has draft
    # probability 0; any distribution will do, and the residual is one.
    out[~valid] = plan.residual
    return out
