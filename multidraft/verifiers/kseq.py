"""SpecTr's K-SEQ (Sun et al., NeurIPS 2023): k i.i.d. drafts, each tested against a
flattened target p / rho, with one scalar rho per row chosen so that the scheme is exact.

With beta(rho) = sum_v min(q(v), p(v) / rho), draft i is accepted with probability
min(1, p(x_i) / (rho q(x_i))) in order, independently of the earlier drafts.  A token y is then
emitted through acceptance with total mass c(rho) * min(q(y), p(y) / rho), where
c = (1 - (1 - beta)^k) / beta, and the rest comes from the residual p - c * min(q, p / rho),
which is nonnegative exactly when c(rho) <= rho.  The best valid rho is the root of
1 - (1 - beta(rho))^k = rho * beta(rho) in [1, k]; bisection keeps the upper end, which always
satisfies c <= rho, so rounding in the root can cost acceptance but never exactness.
Proof: docs/verifiers/kseq.md.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Verdict, Verifier, first_match, register_verifier, sample_categorical, sample_from_weights

BISECTION_STEPS = 40  # 2**-40 of [1, k]: far below any acceptance difference that matters


def accept_mass(p: Tensor, q: Tensor, rho: Tensor) -> Tensor:
    """beta(rho) = sum_v min(q, p / rho): [B, 1].  p target, q draft, rho [B, 1]."""
    return torch.minimum(q, p / rho).sum(dim=-1, keepdim=True)


def emitted_scale(beta: Tensor, k: int) -> Tensor:
    """c = (1 - (1 - beta)^k) / beta, the number of accept chances weighted; k where beta = 0."""
    safe = torch.where(beta > 0, beta, torch.ones_like(beta))
    return torch.where(beta > 0, (1 - (1 - beta) ** k) / safe, torch.full_like(beta, float(k)))


def solve_rho(p: Tensor, q: Tensor, k: int) -> Tensor:
    """Smallest rho in [1, k] (to bisection precision, from above) with c(rho) <= rho: [B, 1]."""
    lo = torch.ones_like(p[:, :1])
    hi = torch.full_like(lo, float(k))  # c(k) <= k always (Bernoulli's inequality)
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        valid = emitted_scale(accept_mass(p, q, mid), k) <= mid
        hi = torch.where(valid, mid, hi)
        lo = torch.where(valid, lo, mid)
    # rho = 1 is valid exactly when k = 1 or beta(1) is 0 or 1; bisection never tests it.
    at_one = emitted_scale(accept_mass(p, q, lo), k) <= lo
    return torch.where(at_one & (lo == 1), lo, hi)


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
        beta = accept_mass(p, q, solve_rho(p, q, k))
        return 1 - (1 - beta.squeeze(1)) ** k

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
