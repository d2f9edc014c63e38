"""Small (p, q) corner cases for exactness checks: the places a verifier can get wrong."""

from __future__ import annotations

import torch

from ..verifiers.base import Verifier


def _row(values) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.float64)
    return t / t.sum()


def _dirichlet(vocab: int, seed: int, alpha: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch._standard_gamma(torch.full((vocab,), alpha, dtype=torch.float64), generator=g)
    return x / x.sum()


# name -> (p, q).  p is the target, q the draft.
CASES: dict[str, tuple[torch.Tensor, torch.Tensor]] = {
    "v2-mild": (_row([0.6, 0.4]), _row([0.3, 0.7])),
    "v3-equal": (_row([0.2, 0.5, 0.3]), _row([0.2, 0.5, 0.3])),
    "v3-zero-in-p": (_row([0.0, 0.7, 0.3]), _row([0.5, 0.25, 0.25])),
    "v3-zero-in-q": (_row([0.3, 0.3, 0.4]), _row([0.6, 0.4, 0.0])),
    "v4-disjoint": (_row([0.5, 0.5, 0.0, 0.0]), _row([0.0, 0.0, 0.3, 0.7])),
    "v4-onehot-p": (_row([0.0, 0.0, 1.0, 0.0]), _row([0.4, 0.3, 0.2, 0.1])),
    "v4-onehot-q": (_row([0.1, 0.2, 0.3, 0.4]), _row([0.0, 1.0, 0.0, 0.0])),
    "v4-both-onehot-same": (_row([0.0, 1.0, 0.0, 0.0]), _row([0.0, 1.0, 0.0, 0.0])),
    "v5-zeros-both": (_row([0.0, 0.1, 0.4, 0.5, 0.0]), _row([0.3, 0.0, 0.3, 0.2, 0.2])),
    "v5-peaked-draft": (_row([0.2, 0.2, 0.2, 0.2, 0.2]), _row([0.9, 0.04, 0.03, 0.02, 0.01])),
    "v6-dirichlet-a": (_dirichlet(6, 1), _dirichlet(6, 2)),
    "v6-dirichlet-sparse": (_dirichlet(6, 3, alpha=0.3), _dirichlet(6, 4, alpha=0.3)),
    "v6-tied-ratios": (_row([0.1, 0.2, 0.1, 0.2, 0.2, 0.2]), _row([0.05, 0.1, 0.2, 0.4, 0.15, 0.1])),
}

MAX_K = 4
MAX_TUPLES = 1300  # keeps enumeration of every verifier quick (6**4 = 1296)


def supported_ks(verifier: Verifier, q: torch.Tensor, max_k: int = MAX_K) -> list[int]:
    """The draft counts the verifier's capability flags allow for this q, within the test budget."""
    top = max_k if verifier.max_drafts is None else min(max_k, verifier.max_drafts)
    ks = range(verifier.min_drafts, top + 1)
    if verifier.distinct_drafts:
        ks = [k for k in ks if k <= int((q > 0).sum())]
    return [k for k in ks if q.shape[0] ** k <= MAX_TUPLES]


def exactness_cases(names=None):
    """(verifier name, case name, k) for every verifier, case and supported k."""
    from ..verifiers import available_verifiers, get_verifier

    out = []
    for name in names or available_verifiers():
        verifier = get_verifier(name)
        for case, (_, q) in CASES.items():
            for k in supported_ks(verifier, q):
                out.append((name, case, k))
    return out
