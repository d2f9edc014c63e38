"""Exact analysis of a verifier by enumerating every ordered draft tuple (small V only).

For a verifier with draft scheme D and kernel K, the emitted token has law

    out(y) = sum over ordered k-tuples t of D(t | q) * K(y | p, q, t)

and the verifier is exact iff out == p.  Everything here runs in float64 on the CPU.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from ..verifiers.base import SUM_TOLERANCE, Verifier, check_distribution

# V**k ordered tuples are enumerated; past this the enumeration is refused, not slow.
MAX_TUPLES = 2_000_000


def as_distribution(name: str, x) -> Tensor:
    """A 1-D float64 CPU law from a list, numpy array or tensor: checked against its own dtype's
    sum tolerance (a float32 row may be off from 1 by 1e-4, a float64 one by 1e-6), then divided
    by its sum, which is the law the verifiers take such a row for."""
    t = torch.as_tensor(x, dtype=torch.float64).cpu()
    if t.dim() != 1:
        raise ValueError(f"{name} must be a single probability vector [V], got shape {tuple(t.shape)}")
    given = x if isinstance(x, Tensor) and x.dtype in SUM_TOLERANCE else t
    check_distribution(name, given.detach().cpu().reshape(1, -1))
    return t / t.sum()


def all_tuples(vocab: int, k: int) -> Tensor:
    """Every ordered k-tuple over range(vocab): LongTensor [vocab**k, k]."""
    count = vocab**k
    if count > MAX_TUPLES:
        raise ValueError(
            f"exact enumeration needs V**k = {vocab}**{k} = {count} draft tuples; "
            f"the limit is {MAX_TUPLES}"
        )
    return torch.tensor(list(itertools.product(range(vocab), repeat=k)), dtype=torch.long).reshape(count, k)


def draft_law(verifier: Verifier, q: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The tuples the scheme can produce [N, k] and their probabilities [N] (summing to 1)."""
    tuples = all_tuples(q.shape[0], k)
    prob = verifier.draft_probability(q.expand(tuples.shape[0], -1), tuples)  # [N]
    keep = prob > 0
    return tuples[keep], prob[keep]


def tuple_kernels(verifier: Verifier, p, q, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(tuples [N, k], their draft probabilities [N], kernels [N, V]) in float64."""
    p, q = as_distribution("p", p), as_distribution("q", q)
    if p.shape != q.shape:
        raise ValueError(f"p and q must have the same length, got {p.shape[0]} and {q.shape[0]}")
    verifier.check_num_drafts(k, q.unsqueeze(0))
    tuples, prob = draft_law(verifier, q, k)
    n = tuples.shape[0]
    kernels = verifier.kernel(p.expand(n, -1), q.expand(n, -1), tuples)  # [N, V]
    return tuples, prob, kernels


def output_distribution(verifier: Verifier, p, q, k: int) -> Tensor:
    """Exact law [V] (float64) of the token the verifier emits with k drafts."""
    _, prob, kernels = tuple_kernels(verifier, p, q, k)
    return prob @ kernels


def acceptance_rate(verifier: Verifier, p, q, k: int) -> float:
    """Exact probability that the emitted token is one of the drafts."""
    tuples, prob, kernels = tuple_kernels(verifier, p, q, k)
    on_draft = torch.zeros_like(kernels, dtype=torch.bool).scatter_(1, tuples, True)  # [N, V]
    return float(prob @ (kernels * on_draft).sum(dim=1))
