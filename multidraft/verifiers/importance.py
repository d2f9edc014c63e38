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

Selection rule (k = 2, drafts x1, x2 i.i.d. from q; p is the target, q the draft).  Equal
drafts select themselves.  Tokens are ranked by p(y) / q(y), highest first (ties by token id):
a token the draft under-proposes should win a pair against one it over-proposes.  For distinct
drafts,

- if both lie among the ``top`` tokens of largest p (the "LP tokens"), the higher-ranked one is
  selected with probability w(a, b), a weight per unordered pair chosen by a linear program;
- otherwise the higher-ranked draft is selected.

The LP maximizes the sum over the LP tokens of min(p(y), p_I(y)) (the other tokens' p_I does
not depend on w): variables w in [0, 1] and z_y <= p(y), z_y <= p_I(y), maximize sum z.  With
``top >= V`` it is the paper's full LP over pairs, whose optimum is the optimal acceptance for
two i.i.d. drafts (tests/test_importance.py checks it against ``optimal_acceptance``); with a
truncated LP (the paper's practical variant; here the deterministic part ranks by p / q, which
measured far better than ranking by p - q^2) it stays exact and loses a little acceptance:
about 0.009 below the optimum at V = 2000 with top = 8, against rrs's 0.08.  One
block-diagonal LP covers the whole batch (HiGHS dual simplex through scipy), so there is no
Python loop over rows; p_I is then recomputed from the clipped weights, which makes the scheme
exact however accurate the solver.

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

DEFAULT_TOP = 8
TIE_BREAK = 1e-11
LP_OPTIONS = {"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10}


class Selection(NamedTuple):
    """The selection rule of a batch and the law it induces (float64, on p's device)."""

    rank: Tensor  # [B, V] priority rank of each token (0 = highest)
    slot: Tensor  # [B, V] position among the LP tokens (in rank order), -1 outside them
    weights: Tensor  # [B, s, s] w[a, b] = P(select LP token a | drafts are LP tokens a < b)
    proposal: Tensor  # [B, V] p_I, the law of the selected token


def _pair_index(top: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.triu_indices(top, k=1)  # every a < b
    return a, b


def solve_weights(p_top: np.ndarray, q_top: np.ndarray, beaten: np.ndarray) -> np.ndarray:
    """LP weights [B, P] for the pairs of the LP tokens (in rank order), one LP per row, all
    rows in one block-diagonal problem.

    p_top, q_top [B, s]: p and q of the s LP tokens; beaten [B, s]: the q mass each of them
    wins for sure (lower-ranked tokens outside the LP set).
    """
    batch, s = q_top.shape
    a, b = _pair_index(s)
    n_pairs = a.size
    if n_pairs == 0:
        return np.ones((batch, 0))
    n = n_pairs + s  # variables per row: the weights, then z
    c = 2.0 * q_top[:, a] * q_top[:, b]  # [B, P] mass of the unordered pair {a, b}
    # p_I(y) = q_y^2 + 2 q_y beaten_y + sum_{b > y} c_yb w_yb + sum_{a < y} c_ay (1 - w_ay), so
    # z_y <= p_I(y) reads  z_y - sum_{b>y} c_yb w_yb + sum_{a<y} c_ay w_ay <= base_y + sum_{a<y} c_ay.
    base = q_top**2 + 2.0 * q_top * beaten  # [B, s]
    lost = np.zeros((batch, s))
    np.add.at(lost.T, b, c.T)  # sum_{a < y} c_ay
    rows = np.arange(batch)[:, None]
    con = np.concatenate([rows * s + a, rows * s + b, rows * s + np.arange(s)], axis=1)  # [B, 2P + s]
    var = np.concatenate([rows * n + np.arange(n_pairs), rows * n + np.arange(n_pairs), rows * n + n_pairs + np.arange(s)], axis=1)
    val = np.concatenate([-c, c, np.ones((batch, s))], axis=1)
    matrix = sparse.csr_matrix((val.ravel(), (con.ravel(), var.ravel())), shape=(batch * s, batch * n))
    # A degenerate LP has many optimal weights, and which one a solver returns for a row could
    # depend on the other rows of the batch; the kernel must be a function of the row alone.  A
    # tiny generic tie-break (distinct per pair, scaled by the pair's mass, so it can cost at
    # most TIE_BREAK of acceptance) makes the optimum unique.
    tie_break = TIE_BREAK * c * (1 + np.arange(n_pairs) / n_pairs)  # [B, P]
    objective = np.concatenate([tie_break, -np.ones((batch, s))], axis=1).ravel()
    bounds = np.zeros((batch, n, 2))
    bounds[:, :n_pairs, 1] = 1.0
    bounds[:, n_pairs:, 1] = p_top
    result = linprog(objective, A_ub=matrix, b_ub=(base + lost).ravel(), bounds=bounds.reshape(-1, 2),
                     method="highs-ds", options=LP_OPTIONS)
    if result.x is None:  # never seen; any weights in [0, 1] stay exact, so fall back to priority
        return np.ones((batch, n_pairs))
    return np.clip(result.x.reshape(batch, n)[:, :n_pairs], 0.0, 1.0)


def select(p: Tensor, q: Tensor, top: int) -> Selection:
    """Priorities, LP weights and the selected token's law p_I for k = 2 i.i.d. drafts."""
    p64, q64 = p.double(), q.double()
    batch, vocab = p.shape
    s = min(top, vocab)
    arange = torch.arange(vocab, device=p.device).expand(batch, -1)
    # Rank by p / q, highest first (q = 0 ranks last: such a token is never drafted).
    ratio = torch.where(q64 > 0, p64 / torch.where(q64 > 0, q64, torch.ones_like(q64)), torch.full_like(q64, -1.0))
    _, order = torch.sort(ratio, dim=-1, descending=True, stable=True)  # [B, V]
    rank = torch.empty_like(order).scatter_(1, order, arange)
    q_sorted = q64.gather(1, order)  # [B, V]
    below = q_sorted.flip(-1).cumsum(-1).flip(-1) - q_sorted  # q mass of strictly lower rank
    proposal = torch.empty_like(q64).scatter_(1, order, q_sorted * q_sorted + 2 * q_sorted * below)
    # The LP tokens: the s largest p, in rank order.
    lp_tokens = torch.topk(p64, s, dim=-1).indices  # [B, s]
    lp_tokens = lp_tokens.gather(1, rank.gather(1, lp_tokens).argsort(dim=-1))
    slot = torch.full_like(order, -1).scatter_(1, lp_tokens, torch.arange(s, device=p.device).expand(batch, -1))
    q_top, p_top = q64.gather(1, lp_tokens), p64.gather(1, lp_tokens)  # [B, s]
    # Each LP token beats every lower-ranked token outside the LP set for sure.
    later_in_lp = q_top.flip(-1).cumsum(-1).flip(-1) - q_top  # [B, s]
    beaten = below.gather(1, rank.gather(1, lp_tokens)) - later_in_lp  # [B, s]
    weights = torch.ones(batch, s, s, dtype=torch.float64, device=p.device)
    if s > 1:
        # Identical rows share one LP, so they get identical weights whatever the solver does
        # with ties (proofs.output_distribution batches every tuple of one (p, q)).
        inputs = torch.cat([p_top, q_top, beaten], dim=1)  # [B, 3s]
        distinct, inverse = torch.unique(inputs, dim=0, return_inverse=True)
        solved = solve_weights(*(distinct[:, i * s : (i + 1) * s].cpu().numpy() for i in range(3)))
        w = torch.from_numpy(solved).to(p.device)[inverse]  # [B, P]
        a, b = (torch.from_numpy(i).to(p.device) for i in _pair_index(s))
        weights[:, a, b] = w
        # p_I of the LP tokens from the clipped weights: exact whatever the solver did.
        c = 2 * q_top[:, a] * q_top[:, b]  # [B, P]
        top_law = (q_top * q_top + 2 * q_top * beaten).index_add(1, a, c * w).index_add(1, b, c * (1 - w))
        proposal = proposal.scatter(1, lp_tokens, top_law)
    return Selection(rank, slot, weights, proposal)


def selection_probabilities(selection: Selection, drafts: Tensor) -> tuple[Tensor, Tensor]:
    """P(select x1), P(select x2) [B, 1] each, for drafts [B, 2] (equal drafts: 1 and 0)."""
    r1, r2 = selection.rank.gather(1, drafts[:, :1]), selection.rank.gather(1, drafts[:, 1:2])  # [B, 1]
    s1, s2 = selection.slot.gather(1, drafts[:, :1]), selection.slot.gather(1, drafts[:, 1:2])
    both_lp = (s1 >= 0) & (s2 >= 0)
    high, low = torch.minimum(s1, s2).clamp(min=0), torch.maximum(s1, s2).clamp(min=0)  # slots follow rank
    w = selection.weights[torch.arange(drafts.shape[0], device=drafts.device), high.squeeze(1), low.squeeze(1)].unsqueeze(1)
    w_high = torch.where(both_lp, w, torch.ones_like(w))  # P(select the higher-ranked draft)
    first = torch.where(r1 == r2, torch.ones_like(w_high), torch.where(r1 < r2, w_high, 1 - w_high))
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

    def __init__(self, top: int = DEFAULT_TOP, validate_args: bool | None = None):
        super().__init__(validate_args=validate_args)
        if isinstance(top, bool) or not isinstance(top, int) or top < 1:
            raise ValueError(f"importance: top must be an int >= 1 (tokens whose pair weights the LP chooses), got {top!r}")
        self.top = top

    def _proposal_and_choice(self, p, q, drafts):
        """(p_I [B, V], P(select each draft) [B, k])."""
        if drafts.shape[1] == 1:
            return q.double(), torch.ones_like(drafts, dtype=torch.float64)
        selection = select(p, q, self.top)
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
        proposal = q.double() if k == 1 else select(p, q, self.top).proposal
        return torch.minimum(p.double(), proposal).sum(dim=-1).clamp(max=1).to(p.dtype)
