"""Synthetic (target, draft) logit families for acceptance comparisons.

Each family draws B pairs of logit rows [B, V] from a fixed seed, shaped like what a real
target/draft pair produces: the draft sees a noisy or flattened version of the target's logits.
Temperatures are applied later, to both rows alike, as the engine does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    sample: Callable[[int, int, torch.Generator], tuple[Tensor, Tensor]]  # (B, V, gen) -> target, draft logits


def _dirichlet(batch: int, vocab: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    # q is a noisy estimate of p: half its mass from p, half from an independent Dirichlet draw.
    alpha = torch.full((batch, vocab), 0.1, dtype=torch.float64)
    p = torch._standard_gamma(alpha, generator=g)
    noise = torch._standard_gamma(alpha, generator=g)
    p = p / p.sum(-1, keepdim=True)
    q = 0.5 * p + 0.5 * noise / noise.sum(-1, keepdim=True)
    tiny = torch.finfo(torch.float64).tiny
    return p.clamp(min=tiny).log(), q.clamp(min=tiny).log()


def _zipf_perturbed(batch: int, vocab: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    # Zipfian target over a random token order; the draft perturbs its log-probabilities.
    ranks = (torch.rand(batch, vocab, generator=g).argsort(-1) + 1).to(torch.float64)
    logits = -1.1 * ranks.log()
    return logits, logits + 0.7 * torch.randn(batch, vocab, generator=g, dtype=torch.float64)


def _temperature_shifted(batch: int, vocab: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    # Same logits, the draft flatter (1.6x temperature) and slightly noisy, as a smaller model is.
    logits = 3.0 * torch.randn(batch, vocab, generator=g, dtype=torch.float64)
    return logits, logits / 1.6 + 0.3 * torch.randn(batch, vocab, generator=g, dtype=torch.float64)


FAMILIES = {
    f.name: f
    for f in [
        Family("dirichlet", "p ~ Dir(0.1); q = (p + independent Dir(0.1)) / 2", _dirichlet),
        Family("zipf-perturbed", "Zipf(1.1) target logits; draft logits + N(0, 0.7^2)", _zipf_perturbed),
        Family("temperature-shifted", "logits ~ N(0, 3^2); draft logits / 1.6 + N(0, 0.3^2)", _temperature_shifted),
    ]
}
