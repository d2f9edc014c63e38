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
defaults), so there is no Python loop over rows; p_I is then recomputed from the clipped
weights, which makes the scheme exact however accurate the solver.

k = 1 is plain speculative sampling (p_I = q).  k > 2 is refused: the paper's multi-stage
extension is not implemented.  Proof and cost: docs/verifiers/importance.md.
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
TIE_BREAK = 1e-11
LP_OPTIONS = {"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10}


class Selection(NamedTuple):
    """The selection rule of a batch and the law it induces (float64, on p's device)."""

    unit: Tensor  # [B, V] the unit of each token: 0..top-1 single tokens, then the buckets
    beats: Tensor  # [B, U, U] P(unit u's draft is selected | drafts from units u != v)
    proposal: Tensor  # [B, V] p_I, the law of the selected token


def _pair_index(units: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.triu_indices(units, k=1)  # every a < b
    return a, b


def solve_weights(p_unit: np.ndarray, q_unit: np.ndarray) -> np.ndarray:
    """LP weights [B, P]: for each pair of units a < b, P(a's draft is selected), one LP per
    row, all rows in one block-diagonal problem.  p_unit, q_unit [B, U]: p and q mass per unit.

    The selected token lies in unit a with probability M_a = Q_a^2 + 2 Q_a sum_b Q_b W(a beats b)
    (both drafts in a, or one in a that wins), and the LP maximizes sum_a min(P_a, M_a): exact
    acceptance for single-token units, a pooled upper bound for buckets.
    """
    batch, units = q_unit.shape
    a, b = _pair_index(units)
    n_pairs = a.size
    n = n_pairs + units  # variables per row: the weights, then z
    c = 2.0 * q_unit[:, a] * q_unit[:, b]  # [B, P] mass of the pairs of units {a, b}
    # z_u <= M_u  reads  z_u - sum_{b>u} c_ub w_ub + sum_{a<u} c_au w_au <= Q_u^2 + sum_{a<u} c_au.
    lost = np.zeros((batch, units))
    np.add.at(lost.T, b, c.T)  # sum_{a < u} c_au
    rows = np.arange(batch)[:, None]
    con = np.concatenate([rows * units + a, rows * units + b, rows * units + np.arange(units)], axis=1)
    var = np.concatenate([rows * n + np.arange(n_pairs), rows * n + np.arange(n_pairs), rows * n + n_pairs + np.arange(units)], axis=1)
    val = np.concatenate([-c, c, np.ones((batch, units))], axis=1)
    matrix = sparse.csr_matrix((val.ravel(), (con.ravel(), var.ravel())), shape=(batch * units, batch * n))
    # A degenerate LP has many optimal weights, and which one a solver returns for a row could
    # depend on the other rows of the batch; the kernel must be a function of the row alone.  A
    # tiny generic tie-break (distinct per pair, scaled by the pair's mass, so it can cost at
    # most TIE_BREAK of acceptance) makes the optimum unique.
    tie_break = TIE_BREAK * c * (1 + np.arange(n_pairs) / max(n_pairs, 1))  # [B, P]
    objective = np.concatenate([tie_break, -np.ones((batch, units))], axis=1).ravel()
    bounds = np.zeros((batch, n, 2))
    bounds[:, :n_pairs, 1] = 1.0
    bounds[:, n_pairs:, 1] = p_unit
    result = linprog(objective, A_ub=matrix, b_ub=(q_unit**2 + lost).ravel(), bounds=bounds.reshape(-1, 2),
                     method="highs-ds", options=LP_OPTIONS)
    if result.x is None:  # never seen; any weights in [0, 1] stay exact: fall back to a fair coin
        return np.full((batch, n_pairs), 0.5)
    return np.clip(result.x.reshape(batch, n)[:, :n_pairs], 0.0, 1.0)


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


def select(p: Tensor, q: Tensor, top: int, buckets: int) -> Selection:
    """Units, LP weights and the selected token's law p_I for k = 2 i.i.d. drafts."""
    p64, q64 = p.double(), q.double()
    batch, vocab = p.shape
    unit = assign_units(p64, q64, top, buckets)
    units = min(top, vocab) + (buckets if top < vocab else 0)
    q_unit = torch.zeros(batch, units, dtype=torch.float64, device=p.device).scatter_add_(1, unit, q64)
    p_unit = torch.zeros_like(q_unit).scatter_add_(1, unit, p64)
    beats = torch.full((batch, units, units), 0.5, dtype=torch.float64, device=p.device)
    if units > 1:
        # Identical rows share one LP, so they get identical weights whatever the solver does
        # with ties (proofs.output_distribution batches every tuple of one (p, q)).
        distinct, inverse = torch.unique(torch.cat([p_unit, q_unit], dim=1), dim=0, return_inverse=True)
        solved = solve_weights(distinct[:, :units].cpu().numpy(), distinct[:, units:].cpu().numpy())
        w = torch.from_numpy(solved).to(p.device)[inverse]  # [B, P]
        a, b = (torch.from_numpy(i).to(p.device) for i in _pair_index(units))
        beats[:, a, b] = w
        beats[:, b, a] = 1 - w
    # A token y of unit u is selected with probability q(y) * m_u, m_u = Q_u + 2 sum_{v != u} Q_v
    # beats[u, v]: both drafts y; or y and another token of u (a fair coin); or y wins against
    # another unit.  From the clipped weights: exact whatever the solver did.
    off = beats * (1 - torch.eye(units, dtype=torch.float64, device=p.device))
    scale = q_unit + 2 * (off @ q_unit.unsqueeze(-1)).squeeze(-1)  # [B, U]
    return Selection(unit, beats, q64 * scale.gather(1, unit))


def selection_probabilities(selection: Selection, drafts: Tensor) -> tuple[Tensor, Tensor]:
    """P(select x1), P(select x2) [B, 1] each, for drafts [B, 2] (equal drafts: 1 and 0)."""
    u1, u2 = selection.unit.gather(1, drafts[:, :1]), selection.unit.gather(1, drafts[:, 1:2])  # [B, 1]
    rows = torch.arange(drafts.shape[0], device=drafts.device)
    first = selection.beats[rows, u1.squeeze(1), u2.squeeze(1)].unsqueeze(1)  # 1/2 within a unit
    first = torch.where(drafts[:, :1] == drafts[:, 1:2], torch.ones_like(first), first)
    return first, 1 - first


def _single_draft_parts(p64: Tensor, proposal: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """(min(1, p/p_I) at tokens [B, m], residual (p - p_I)+ [B, V])."""
    p_x, law_x = p64.gather(1, tokens), proposal.gather(1, tokens)
    accept = torch.where(law_x > 0, (p_x / torch.where(law_x > 0, law_x, torch.ones_like(law_x))).clamp(max=1), torch.ones_like(p_x))
    return accept, (p64 - proposal).clamp(min=0)


@register_verifier("importance")
class ImportanceSampling(Verifier):
    """Khisti et al.: select one draft by LP-chosen pair weights, then single-draft speculative sampling."""

    max_drafts = 2  # the multi-stage extension to k > 2 is not implemented
    iid_drafts = True
    exact_acceptance = True

    def __init__(self, top: int = DEFAULT_TOP, buckets: int = DEFAULT_BUCKETS, validate_args: bool | None = None):
        super().__init__(validate_args=validate_args)
        for name, value in [("top", top), ("buckets", buckets)]:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"importance: {name} must be an int >= 1, got {value!r}")
        self.top, self.buckets = top, buckets

    def _proposal_and_choice(self, p, q, drafts):
        """(p_I [B, V], P(select each draft) [B, k])."""
        if drafts.shape[1] == 1:
            return q.double(), torch.ones_like(drafts, dtype=torch.float64)
        selection = select(p, q, self.top, self.buckets)
        return selection.proposal, torch.cat(selection_probabilities(selection, drafts), dim=1)

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

    def _expected_acceptance(self, p, q, k):
        proposal = q.double() if k == 1 else select(p, q, self.top, self.buckets).proposal
        return torch.minimum(p.double(), proposal).sum(dim=-1).clamp(max=1).to(p.dtype)
