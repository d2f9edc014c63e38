"""Khisti et al. (ICLR 2025): select one draft by importance weights, then speculate on it alone.

Khisti, Ebrahimi, Dbouk, Behboodi, Memisevic and Louizos show that every multi-draft verifier
can be rearranged into two steps without losing acceptance: (1) select one token Y of the draft
tuple, with probabilities beta_y(tuple) that may depend on the whole tuple; (2) ordinary
single-draft speculative sampling of Y against the target p, with Y's own law

    p_I(y) = sum over tuples t of P(t) * beta_y(t)

as the proposal: accept Y with prob. min(1, p(Y) / p_I(Y)), else draw from (p - p_I)+.  The
output is exactly p for *any* selection rule (step 2 is single-draft speculative sampling with
proposal p_I), and the acceptance is sum_y min(p(y), p_I(y)): choosing beta well is the whole
game.  For k = 2 i.i.d. drafts the best beta reaches the optimal acceptance.

Selection rule (k = 2, drafts x1, x2 i.i.d. from q; p is the target, q the draft).  The
vocabulary is split into units: the ``top`` tokens of largest p are units of their own, and the
other tokens, ranked by p / q, fall into ``buckets`` contiguous rank ranges of about equal q
mass (a token the draft under-proposes sits in a higher bucket than one it over-proposes).
Equal drafts select themselves; two tokens of one unit select each other by a fair coin; drafts
from units u != v select u's with probability W(u, v), one LP weight per pair of units.

With W fixed, a token y of unit u is selected with probability p_I(y) = q(y) * m_u, where
m_u = Q_u + 2 sum_{v != u} Q_v W(u, v) and Q is q's mass per unit.  The LP maximizes
sum_u min(P_u, Q_u m_u) over W in [0, 1] (P is p's mass per unit): the exact acceptance for
single-token units, a pooled upper bound for buckets; the true acceptance sum_y min(p, p_I) is
computed afterwards.  With ``top >= V`` every token is its own unit, the LP ranges over every
symmetric selection rule for two i.i.d. drafts, and its optimum is the optimal acceptance
(tests/test_importance.py checks it against ``optimal_acceptance``).  Truncated (the paper's
practical variant; the buckets are ours), it stays exact and loses a little: at V = 2000 the
mean acceptance is 0.802 against the optimum's 0.811 and rrs's 0.734, and 0.972 against 0.987
and 0.894 on near-uniform rows, where ranking alone would waste the pair.  One block-diagonal
LP covers the whole batch (HiGHS dual simplex through scipy; 136 variables per row at the
defaults; HiGHS gets 16 rows at a time, as its time grows faster than the problem), so there
is no Python loop over single rows; p_I is then recomputed from the clipped weights, which
makes the scheme exact however accurate the solver.

k > 2: the paper's multi-stage extension, a knockout.  The incumbent (the selected token so
far, of law r) meets draft j (law q, independent): equal tokens keep the incumbent; otherwise
the incumbent from unit u is kept against a newcomer from unit v with probability keep(u, v),
one LP weight per ordered pair of units, chosen by the same LP with the new token law
r'(y) = r(y) a_u + q(y) b_u  (a_u = sum_v Q_v keep(u, v), b_u = sum_v R_v (1 - keep(v, u))).
With single-token units keeping the incumbent always is feasible, so acceptance never falls
as k grows (with buckets it can: docs/verifiers/importance.md).  k = 1 is
plain speculative sampling (p_I = q).  Up to k = 4 (each stage is one more LP).  Proof and
cost: docs/verifiers/importance.md.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.sparse as sparse
import torch
from scipy.optimize import linprog
from torch import Tensor

from .base import Verdict, Verifier, first_match, inverse_cdf, register_verifier, sample_categorical

DEFAULT_TOP = 6
DEFAULT_BUCKETS = 10
# Far above the solver's feasibility tolerances (LP_OPTIONS): at 1e-11, and still at 1e-8,
# HiGHS returned vertices that depended on the other rows of the block.  The penalty can cost at
# most 2 TIE_BREAK sum(c) of acceptance; on every case the tests check (k = 2 at the optimum to
# 1e-9) it costs none beyond the solver's tolerance.
TIE_BREAK = 1e-7
LP_ROWS = 16  # rows per HiGHS call (see solve_pair_lp)
LP_OPTIONS = {"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10}


class Selection(NamedTuple):
    """The selection rule of a batch and the law it induces (float64, on p's device)."""

    unit: Tensor  # [B, V] the unit of each token: 0..top-1 single tokens, then the buckets
    stages: list[Tensor]  # k - 1 tensors [B, U, U]: at stage j, P(keep the incumbent from unit u
    #                       against draft j from unit v != u); 1/2 within a unit
    proposal: Tensor  # [B, V] p_I, the law of the finally selected token


def solve_pair_lp(p_unit: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Weights w [B, P] in [0, 1] for the unit pairs (a[i], b[i]), one LP per row, all rows in
    one block-diagonal problem: maximize sum_u z_u subject to z_u <= P_u and z_u <= M_u, where
    the selected token's mass in unit u is M_u = rhs_u + sum_{i: a_i = u} c_i w_i
    - sum_{i: b_i = u} c_i w_i (w_i moves mass c_i from unit b_i to unit a_i).

    M_u is the exact acceptance of a single-token unit and a pooled upper bound for a bucket.
    """
    batch, units = p_unit.shape
    if batch > LP_ROWS:
        # HiGHS's time grows faster than the block LP's size (512 rows in one LP: 16 s; in
        # blocks of 16 rows: 2.4 s), so the rows are solved a few at a time.
        return np.concatenate([solve_pair_lp(p_unit[i : i + LP_ROWS], a, b, c[i : i + LP_ROWS], rhs[i : i + LP_ROWS])
                               for i in range(0, batch, LP_ROWS)])
    n_pairs = a.size
    n = n_pairs + units  # variables per row: the weights, then z
    # z_u - sum_{a_i = u} c_i w_i + sum_{b_i = u} c_i w_i <= rhs_u
    rows = np.arange(batch)[:, None]
    con = np.concatenate([rows * units + a, rows * units + b, rows * units + np.arange(units)], axis=1)
    var = np.concatenate([rows * n + np.arange(n_pairs), rows * n + np.arange(n_pairs), rows * n + n_pairs + np.arange(units)], axis=1)
    val = np.concatenate([-c, c, np.ones((batch, units))], axis=1)
    matrix = sparse.csr_matrix((val.ravel(), (con.ravel(), var.ravel())), shape=(batch * units, batch * n))
    # A degenerate LP has many optimal weights, and which one a solver returns for a row could
    # depend on the other rows of the batch; the kernel must be a function of the row alone.  A
    # small generic tie-break (distinct per pair, scaled by the pair's mass) makes the optimum
    # unique.
    tie_break = TIE_BREAK * c * (1 + np.arange(n_pairs) / max(n_pairs, 1))  # [B, P]
    objective = np.concatenate([tie_break, -np.ones((batch, units))], axis=1).ravel()
    bounds = np.zeros((batch, n, 2))
    bounds[:, :n_pairs, 1] = 1.0
    bounds[:, n_pairs:, 1] = p_unit
    result = linprog(objective, A_ub=matrix, b_ub=rhs.ravel(), bounds=bounds.reshape(-1, 2), method="highs-ds", options=LP_OPTIONS)
    if result.x is None:  # never seen; any weights in [0, 1] stay exact: fall back to a fair coin
        return np.full((batch, n_pairs), 0.5)
    return np.clip(result.x.reshape(batch, n)[:, :n_pairs], 0.0, 1.0)


def _solve_rows(inputs: Tensor, solve) -> Tensor:
    """``solve(distinct rows as numpy)`` for the distinct rows of ``inputs`` [B, W], spread back
    to [B, ...].  Identical rows share one LP, so they get identical weights whatever the solver
    does with ties (proofs.output_distribution batches every tuple of one (p, q))."""
    distinct, inverse = torch.unique(inputs, dim=0, return_inverse=True)
    return torch.from_numpy(solve(distinct.cpu().numpy())).to(inputs.device)[inverse]


def first_stage(p_unit: Tensor, q_unit: Tensor) -> Tensor:
    """[B, U, U] P(x1's unit wins | units u != v) for two i.i.d. drafts: one weight per unordered
    pair (only the sum of the two orders matters), w moving mass 2 Q_a Q_b between a and b."""
    batch, units = q_unit.shape
    beats = torch.full((batch, units, units), 0.5, dtype=torch.float64, device=q_unit.device)
    if units == 1:
        return beats
    a, b = np.triu_indices(units, k=1)  # every unordered pair a < b

    def solve(rows: np.ndarray) -> np.ndarray:
        p_u, q_u = rows[:, :units], rows[:, units:]
        c = 2.0 * q_u[:, a] * q_u[:, b]  # [B, P] mass of the pairs of units {a, b}
        lost = np.zeros_like(q_u)
        np.add.at(lost.T, b, c.T)  # b's share when w = 0 counts in rhs; w moves it to a
        return solve_pair_lp(p_u, a, b, c, q_u**2 + lost)

    w = _solve_rows(torch.cat([p_unit, q_unit], dim=1), solve)  # [B, P]
    a, b = torch.from_numpy(a).to(q_unit.device), torch.from_numpy(b).to(q_unit.device)
    beats[:, a, b] = w
    beats[:, b, a] = 1 - w
    return beats


def later_stage(p_unit: Tensor, r_unit: Tensor, q_unit: Tensor) -> Tensor:
    """[B, U, U] P(keep the incumbent from unit u | newcomer from unit v != u), for an incumbent
    of law r against a new draft of law q (independent): one weight per ordered pair, w moving
    mass R_u Q_v from v to u; the unit masses do not depend on the diagonal (1/2)."""
    batch, units = q_unit.shape
    keep = torch.full((batch, units, units), 0.5, dtype=torch.float64, device=q_unit.device)
    if units == 1:
        return keep
    a, b = np.nonzero(~np.eye(units, dtype=bool))  # every ordered pair u != v

    def solve(rows: np.ndarray) -> np.ndarray:
        p_u, r_u, q_u = rows[:, :units], rows[:, units : 2 * units], rows[:, 2 * units :]
        c = r_u[:, a] * q_u[:, b]  # incumbent in a, newcomer in b
        # With every w = 0 the newcomer always wins, so unit u holds Q_u times r's total mass.
        return solve_pair_lp(p_u, a, b, c, q_u * r_u.sum(axis=1, keepdims=True))

    w = _solve_rows(torch.cat([p_unit, r_unit, q_unit], dim=1), solve)  # [B, U(U-1)]
    keep[:, torch.from_numpy(a).to(q_unit.device), torch.from_numpy(b).to(q_unit.device)] = w
    return keep


def assign_units(p64: Tensor, q64: Tensor, top: int, buckets: int) -> Tensor:
    """unit [B, V]: the ``top`` tokens of largest p are units of their own (0..top-1); the rest,
    ranked by p / q, fall into ``buckets`` contiguous rank ranges of about equal q mass."""
    batch, vocab = p64.shape
    s = min(top, vocab)
    unit = torch.full((batch, vocab), -1, dtype=torch.long, device=p64.device)
    unit.scatter_(1, torch.topk(p64, s, dim=-1).indices, torch.arange(s, device=p64.device).expand(batch, -1))
    if s == vocab:
        return unit
    rest = unit < 0
    ratio = torch.where(q64 > 0, p64 / torch.where(q64 > 0, q64, torch.ones_like(q64)), torch.full_like(q64, -1.0))
    ratio = torch.where(rest, ratio, torch.full_like(ratio, float("inf")))  # single tokens first, then by ratio
    _, order = torch.sort(ratio, dim=-1, descending=True, stable=True)  # [B, V]
    q_rest = torch.where(rest, q64, torch.zeros_like(q64)).gather(1, order)  # [B, V]
    before = q_rest.cumsum(-1) - q_rest  # rest mass ranked above each token
    total = q_rest.sum(-1, keepdim=True)
    bucket = (before / torch.where(total > 0, total, torch.ones_like(total)) * buckets).long().clamp(max=buckets - 1)
    return unit.scatter(1, order, torch.where(rest.gather(1, order), s + bucket, unit.gather(1, order)))


def select(p: Tensor, q: Tensor, k: int, top: int, buckets: int) -> Selection:
    """Units, the weights of every stage and the selected token's law p_I for k i.i.d. drafts."""
    p64, q64 = p.double(), q.double()
    batch, vocab = p.shape
    unit = assign_units(p64, q64, top, buckets)
    units = min(top, vocab) + (buckets if top < vocab else 0)

    def per_unit(x: Tensor) -> Tensor:
        return torch.zeros(batch, units, dtype=torch.float64, device=p.device).scatter_add_(1, unit, x)

    p_unit, q_unit = per_unit(p64), per_unit(q64)
    stages, law = [], q64
    for stage in range(1, k):
        # Recomputed from the clipped weights: exact whatever the solver did.  A token y of unit
        # u ends up selected with probability r(y) a_u + q(y) b_u: it was the incumbent (law r)
        # and was kept against the newcomer, a_u = sum_v Q_v keep[u, v]; or it is the newcomer
        # and won, b_u = sum_v R_v (1 - keep[v, u]).  (Equal tokens: either way the same y.)
        r_unit = per_unit(law)
        keep = first_stage(p_unit, q_unit) if stage == 1 else later_stage(p_unit, r_unit, q_unit)
        kept = (keep @ q_unit.unsqueeze(-1)).squeeze(-1)  # [B, U] a_u
        won = ((1 - keep).transpose(1, 2) @ r_unit.unsqueeze(-1)).squeeze(-1)  # [B, U] b_u
        law = law * kept.gather(1, unit) + q64 * won.gather(1, unit)
        stages.append(keep)
    return Selection(unit, stages, law)


def select_distinct_rows(p: Tensor, q: Tensor, k: int, top: int, buckets: int) -> Selection:
    """``select`` with one LP per distinct (p, q) row: a batch that repeats a node's rows (many
    tuples of one node, as the comparison report's sampled acceptance draws them) pays for its
    LP once.  The rows' weights do not depend on which rows share an LP (TIE_BREAK)."""
    rows = torch.cat([p, q], dim=1)
    distinct, inverse = torch.unique(rows, dim=0, return_inverse=True)
    if distinct.shape[0] == rows.shape[0]:
        return select(p, q, k, top, buckets)
    vocab = p.shape[1]
    once = select(distinct[:, :vocab], distinct[:, vocab:], k, top, buckets)
    return Selection(once.unit[inverse], [stage[inverse] for stage in once.stages], once.proposal[inverse])


def selected_acceptance(p: Tensor, q: Tensor, k: int, top: int = DEFAULT_TOP, buckets: int = DEFAULT_BUCKETS) -> Tensor:
    """sum_y min(p, p_I) [B]: the chance that the selected draft is kept.  A lower bound on the
    acceptance, which also counts a fallback draw that lands on another draft of the tuple; at
    k = 2 with the full LP (top >= V) the two are equal, both the optimum."""
    proposal = select(p, q, k, top, buckets).proposal
    return torch.minimum(p.double(), proposal).sum(dim=-1).clamp(max=1)


def selection_probabilities(selection: Selection, drafts: Tensor) -> Tensor:
    """P(draft i is the one finally selected) [B, k] for drafts [B, k] (a knockout: the
    incumbent meets drafts 2, 3, ... in turn; equal tokens keep the incumbent)."""
    batch, k = drafts.shape
    units = selection.unit.gather(1, drafts)  # [B, k]
    rows = torch.arange(batch, device=drafts.device).unsqueeze(1)
    chance = torch.zeros(batch, k, dtype=torch.float64, device=drafts.device)
    chance[:, 0] = 1
    for j in range(1, k):
        keep = selection.stages[j - 1][rows, units[:, :j], units[:, j : j + 1].expand(-1, j)]  # [B, j]
        keep = torch.where(drafts[:, :j] == drafts[:, j : j + 1], torch.ones_like(keep), keep)
        chance[:, j] = (chance[:, :j] * (1 - keep)).sum(dim=1)
        chance[:, :j] = chance[:, :j] * keep
    return chance


def _single_draft_parts(p64: Tensor, proposal: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """(min(1, p/p_I) at tokens [B, m], residual (p - p_I)+ [B, V])."""
    p_x, law_x = p64.gather(1, tokens), proposal.gather(1, tokens)
    accept = torch.where(law_x > 0, (p_x / torch.where(law_x > 0, law_x, torch.ones_like(law_x))).clamp(max=1), torch.ones_like(p_x))
    return accept, (p64 - proposal).clamp(min=0)


@register_verifier("importance")
class ImportanceSampling(Verifier):
    """Khisti et al.: select one draft by LP-chosen pair weights, then single-draft speculative sampling."""

    # Each draft past the second adds a knockout stage and one LP of U(U-1) + U variables per
    # row (256 at the defaults, about 20 ms a row): k = 8 costs ~60 ms a row.  Past 4 drafts use
    # `optimal`, which is exact, optimal and cheaper.
    max_drafts = 4
    iid_drafts = True
    # No closed form: sum_y min(p, p_I), the chance that the *selected* draft is kept, leaves out
    # a fallback draw that lands on another draft of the tuple (3e-5 .. 1e-4 at k = 3, 4), and
    # the acceptance counts any emitted draft (``selected_acceptance`` is that lower bound).
    # Reports estimate it by sampling tuples.
    exact_acceptance = False

    def __init__(self, top: int = DEFAULT_TOP, buckets: int = DEFAULT_BUCKETS, validate_args: bool | None = None):
        super().__init__(validate_args=validate_args)
        for name, value in [("top", top), ("buckets", buckets)]:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"importance: {name} must be an int >= 1, got {value!r}")
        self.top, self.buckets = top, buckets

    def _proposal_and_choice(self, p, q, drafts):
        """(p_I [B, V], P(select each draft) [B, k])."""
        selection = select_distinct_rows(p, q, drafts.shape[1], self.top, self.buckets)
        return selection.proposal, selection_probabilities(selection, drafts)

    def _draft(self, q, k, generator):
        return sample_categorical(q, k, generator)  # [B, k]

    def _draft_probability(self, q, drafts):
        return q.gather(1, drafts).prod(dim=1)

    def _kernel(self, p, q, drafts):
        proposal, choice = self._proposal_and_choice(p, q, drafts)  # [B, V], [B, k]
        p64 = p.double()
        accept, residual = _single_draft_parts(p64, proposal, drafts)  # [B, k], [B, V]
        emit = choice * accept  # [B, k] P(select draft i and accept it)
        mass = residual.sum(dim=-1, keepdim=True)
        # Where the residual is empty it is reached with probability 0; p keeps it finite.
        fallback = torch.where(mass > 0, residual / torch.where(mass > 0, mass, torch.ones_like(mass)), p64)
        kern = (1 - emit.sum(dim=1, keepdim=True)) * fallback
        return kern.scatter_add_(1, drafts, emit).to(p.dtype)

    def _verify(self, p, q, drafts, generator):
        proposal, choice = self._proposal_and_choice(p, q, drafts)
        p64 = p.double()
        u = torch.rand((p.shape[0], 3), generator=generator, device=p.device, dtype=torch.float64)  # [B, 3]
        # Step 1: select one draft (by inverse CDF over the k selection probabilities).
        picked = (u[:, :1] >= choice.cumsum(dim=1)).sum(dim=1, keepdim=True).clamp(max=drafts.shape[1] - 1)
        y = drafts.gather(1, picked)  # [B, 1]
        # Step 2: single-draft speculative sampling of y with proposal p_I.
        accept, residual = _single_draft_parts(p64, proposal, y)
        mass = residual.sum(dim=-1, keepdim=True)
        drawn = inverse_cdf(torch.where(mass > 0, residual, p64), u[:, 2:3])  # [B, 1]
        token = torch.where(u[:, 1:2] < accept, y, drawn).squeeze(1)
        return Verdict(token, first_match(drafts, token))

