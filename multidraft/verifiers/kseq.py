"""SpecTr's K-SEQ (Sun et al., NeurIPS 2023): k i.i.d. drafts, each tested against a
flattened target p / rho, with one scalar rho per row chosen so that the scheme is exact.

With beta(rho) = sum_v min(q(v), p(v) / rho), draft i is accepted with probability
min(1, p(x_i) / (rho q(x_i))) in order, independently of the earlier drafts.  A token y is then
emitted through acceptance with total mass c(rho) * min(q(y), p(y) / rho), where
c = (1 - (1 - beta)^k) / beta, and the rest comes from the residual p - c * min(q, p / rho),
which is nonnegative when c(rho) <= rho.  The best valid rho is the root of
f(rho) = 1 - (1 - beta(rho))^k - rho * beta(rho) in [1, k]; the solver keeps a bracket and
returns its valid end, so its precision can cost acceptance but never exactness.
Proof: docs/verifiers/kseq.md.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import Verdict, Verifier, first_match, register_verifier, sample_categorical, sample_from_weights

# The root is found until rho is pinned to a relative width of ROOT_TOLERANCE, or the acceptance
# at the valid end is provably within ACCEPTANCE_TOLERANCE of the best valid rho's (|f(hi)|
# bounds that loss); bisection took 41 passes over V for the first, the false-position steps
# below 11-26 on LLM-like rows.
ROOT_TOLERANCE = 2.0**-40
ACCEPTANCE_TOLERANCE = 2.0**-36  # 1.5e-11
FALSE_POSITION_STEPS = 12  # then bisection: at most this many steps more than bisection alone
CONVERGENCE_CHECK_EVERY = 3  # steps between host reads of "every row converged"


def accept_mass(p: Tensor, q: Tensor, rho: Tensor) -> Tensor:
    """beta(rho) = sum_v min(q, p / rho): [B, 1].  p target, q draft, rho [B, 1]."""
    return torch.minimum(q, p / rho).sum(dim=-1, keepdim=True)


def accept_chance(beta: Tensor, k: int) -> Tensor:
    """1 - (1 - beta)^k, accurate where beta is tiny (no cancellation against 1)."""
    return -torch.expm1(k * torch.log1p(-beta.clamp(max=1)))


def emitted_scale(beta: Tensor, k: int) -> Tensor:
    """c = (1 - (1 - beta)^k) / beta, the number of accept chances weighted; k where beta = 0."""
    safe = torch.where(beta > 0, beta, torch.ones_like(beta))
    return torch.where(beta > 0, accept_chance(beta, k) / safe, torch.full_like(beta, float(k)))


def root_gap(p: Tensor, q: Tensor, rho: Tensor, k: int) -> Tensor:
    """f(rho) = 1 - (1 - beta)^k - rho beta: [B, 1].  It falls with rho (the first term falls with
    beta, rho beta = sum min(rho q, p) rises), and for beta > 0, f(rho) <= 0 exactly when
    c(rho) <= rho.  At a valid rho the acceptance 1 - (1 - beta)^k is at most |f(rho)| below
    that of the best valid rho (docs/verifiers/kseq.md)."""
    beta = accept_mass(p, q, rho)
    return accept_chance(beta, k) - rho * beta


def solve_rho(p: Tensor, q: Tensor, k: int) -> Tensor:
    """Smallest rho in [1, k] with c(rho) <= rho, to ROOT_TOLERANCE and from above: [B, 1].

    A bracket [lo, hi] with f(lo) > 0 >= f(hi) (``root_gap``) shrinks by false position with
    the Illinois rule (an end kept twice in a row has its f halved, so neither end sticks) for
    FALSE_POSITION_STEPS steps, superlinear where f is smooth, then by bisection, which bounds
    the steps where f's kinks (at rho = p/q of a token) stall false position.  The answer is
    always the bracket's valid end, so the solver's precision can cost acceptance, never
    exactness.
    """
    if k == 1:
        return torch.ones_like(p[:, :1])  # c = 1 for every beta: single-draft speculative sampling
    eps = torch.finfo(p.dtype).eps
    tolerance = max(ROOT_TOLERANCE, 8 * eps)  # float32 rows: what their rounding resolves
    loss = max(ACCEPTANCE_TOLERANCE, 8 * eps)
    lo = torch.ones_like(p[:, :1])
    hi = torch.full_like(lo, float(k))  # c(k) <= k always (Bernoulli's inequality)
    f_lo, f_hi = root_gap(p, q, lo, k), root_gap(p, q, hi, k).clamp(max=0)
    # f(1) >= 0, with equality exactly when rho = 1 is valid (p = q, or p and q disjoint)
    at_one = f_lo <= 0
    hi, f_hi = torch.where(at_one, lo, hi), torch.where(at_one, 0.0, f_hi)
    w_lo, w_hi = f_lo.clamp(min=torch.finfo(p.dtype).tiny), f_hi  # the chord's end values
    moved_hi = torch.zeros_like(at_one)  # which end the last step moved
    steps = FALSE_POSITION_STEPS + math.ceil(math.log2((k - 1) / tolerance))  # bisection alone: the log
    for step in range(steps):
        rho = (lo + hi) / 2
        if step < FALSE_POSITION_STEPS:
            chord = (lo * w_hi - hi * w_lo) / (w_hi - w_lo)  # where the chord crosses 0
            rho = torch.where((chord > lo) & (chord < hi), chord, rho)
        gap = root_gap(p, q, rho, k)
        valid = gap <= 0
        # Illinois: an end kept for a second step in a row counts half as far from the root.
        w_lo = torch.where(valid, torch.where(moved_hi, w_lo / 2, w_lo), gap)
        w_hi = torch.where(valid, gap, torch.where(moved_hi | (step == 0), w_hi, w_hi / 2))
        hi, f_hi = torch.where(valid, rho, hi), torch.where(valid, gap, f_hi)
        lo = torch.where(valid, lo, rho)
        moved_hi = valid
        if step % CONVERGENCE_CHECK_EVERY == CONVERGENCE_CHECK_EVERY - 1:
            # rho pinned, or the acceptance at hi within `loss` of the best valid rho's
            if bool(((hi - lo <= tolerance * hi) | (f_hi >= -loss)).all()):
                break
    # hi passed f <= 0; the plan tests c(rho) <= rho on beta summed its own way, which rounding
    # can tip by an ulp or two: step up by the tolerance where it does (k itself always passes).
    bumped = torch.minimum(hi * (1 + tolerance), torch.full_like(hi, float(k)))
    return torch.where(emitted_scale(accept_mass(p, q, hi), k) <= hi, hi, bumped)


def kseq_plan(p: Tensor, q: Tensor, k: int):
    """rho [B, 1], the residual law [B, V] (p where it has no mass)."""
    rho = solve_rho(p, q, k)
    taken = torch.minimum(q, p / rho)  # [B, V]
    scale = emitted_scale(taken.sum(dim=-1, keepdim=True), k)
    residual = (p - scale * taken).clamp_(min=0)
    mass = residual.sum(dim=-1, keepdim=True)
    residual = torch.where(mass > 0, residual / torch.where(mass > 0, mass, torch.ones_like(mass)), p)
    return rho, residual


def accept_probabilities(p: Tensor, q: Tensor, drafts: Tensor, rho: Tensor) -> Tensor:
    """min(1, p(x_i) / (rho q(x_i))) for every draft: [B, k]."""
    return (p.gather(1, drafts) / (rho * q.gather(1, drafts))).clamp(max=1)


@register_verifier("kseq")
class KSequential(Verifier):
    """SpecTr's K-SEQ: sequential tests against p / rho over k i.i.d. drafts."""

    iid_drafts = True
    exact_acceptance = True

    def _expected_acceptance(self, p, q, k):
        return accept_chance(accept_mass(p, q, solve_rho(p, q, k)), k).squeeze(1)

    def _draft(self, q, k, generator):
        return sample_categorical(q, k, generator)

    def _draft_probability(self, q, drafts):
        return q.gather(1, drafts).prod(dim=1)

    def _kernel(self, p, q, drafts):
        rho, residual = kseq_plan(p, q, drafts.shape[1])
        accept = accept_probabilities(p, q, drafts, rho)  # [B, k]
        # reach_i = prod_{j<i} (1 - a_j): probability that draft i is examined
        reach = torch.cumprod(torch.cat([torch.ones_like(rho), 1 - accept], dim=1), dim=1)  # [B, k+1]
        kern = torch.zeros_like(p).scatter_add_(1, drafts, reach[:, :-1] * accept)
        return kern + reach[:, -1:] * residual

    def _verify(self, p, q, drafts, generator):
        rho, residual = kseq_plan(p, q, drafts.shape[1])
        accept = accept_probabilities(p, q, drafts, rho)
        uniforms = torch.rand(drafts.shape, generator=generator, device=p.device, dtype=p.dtype)
        passed = uniforms < accept  # [B, k]
        chosen = torch.where(passed.any(dim=1), passed.to(torch.uint8).argmax(dim=1), -1)  # [B]
        fallback = sample_from_weights(residual, generator)
        token = torch.where(chosen >= 0, drafts.gather(1, chosen.clamp(min=0).unsqueeze(1)).squeeze(1), fallback)
        return Verdict(token, first_match(drafts, token))
