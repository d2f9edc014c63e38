"""The best acceptance any exact verifier can reach for a given draft law.

Let the drafts be a random tuple t with law D, and let a verifier emit y with y ~ p overall.
The acceptance P(y in t) is the value of a flow from tuples (supply D(t)) to tokens (demand
p(y)) along the edges y in t.  By max-flow/min-cut the best value is

    1 - max over token sets T of [ D(all drafts in T) - p(T) ],

and for k i.i.d. drafts from q, D(all drafts in T) = q(T)**k.  (k = 1 gives 1 - TV(p, q).)
The proof and the reduction of the maximum to V + 1 candidate sets are in
docs/proofs/optimal-acceptance.md.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from ..verifiers.base import Verifier
from .enumeration import as_distribution, draft_law

# Set enumeration over 2**V subsets is refused beyond this vocabulary size.
MAX_SUBSET_VOCAB = 20


def optimal_acceptance_iid(p: Tensor, q: Tensor, k: int) -> Tensor:
    """1 - max_T [q(T)**k - p(T)] for rows p, q [..., V]: [...].

    With g(s) = s**k convex, a set T maximizing g(q(T)) - p(T) holds the tokens of smallest
    ratio p/q: removing x from T or adding y to it cannot help, and convexity turns those two
    conditions into p(x)/q(x) <= g'(q(T)) <= p(y)/q(y).  So the maximum is over the V + 1
    prefixes of the tokens sorted by p/q: one sort, two cumsums.  Tokens with q = 0 sort last
    (they only add p(T)).
    """
    ratio = torch.where(q > 0, p / torch.where(q > 0, q, torch.ones_like(q)), torch.full_like(p, float("inf")))
    order = ratio.argsort(dim=-1)  # [..., V]
    q_prefix = q.gather(-1, order).cumsum(dim=-1)  # [..., V]
    p_prefix = p.gather(-1, order).cumsum(dim=-1)
    gap = (q_prefix.clamp(max=1) ** k - p_prefix).amax(dim=-1).clamp(min=0)  # empty T gives 0
    return 1 - gap


def optimal_acceptance(p, q, k: int, replacement: bool = True):
    """Best acceptance of any exact verifier with k drafts from q: a float for 1-D p, q.

    ``replacement=True``: k i.i.d. drafts; exact, O(V log V), batched over leading dims.
    ``replacement=False``: k distinct drafts drawn sequentially from q; computed exactly by
    enumerating draft tuples and token sets, so V is limited to MAX_SUBSET_VOCAB.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if replacement:
        p_t = torch.as_tensor(p, dtype=torch.float64)
        q_t = torch.as_tensor(q, dtype=torch.float64)
        if p_t.shape != q_t.shape:
            raise ValueError(f"p and q must have the same shape, got {tuple(p_t.shape)} and {tuple(q_t.shape)}")
        value = optimal_acceptance_iid(p_t, q_t, k)
        return float(value) if value.dim() == 0 else value
    from ..verifiers import get_verifier

    return optimal_acceptance_for_scheme(get_verifier("rrs-wor"), p, q, k)


def optimal_acceptance_for_scheme(verifier: Verifier, p, q, k: int) -> float:
    """Best acceptance of any exact verifier that uses ``verifier``'s draft law (small V).

    Computes max_T [D(all drafts in T) - p(T)] over all 2**V token sets: D(all in T) is the
    sum of D over tuples whose token set is inside T, a subset-sum (zeta) transform over the
    bitmask of each tuple's token set.
    """
    p, q = as_distribution("p", p), as_distribution("q", q)
    vocab = p.shape[0]
    if vocab > MAX_SUBSET_VOCAB:
        raise ValueError(
            f"the optimum for a general draft law enumerates 2**V token sets; V = {vocab} is "
            f"above the limit {MAX_SUBSET_VOCAB}"
        )
    verifier.check_num_drafts(k, q.unsqueeze(0))
    tuples, prob = draft_law(verifier, q, k)
    bits = torch.zeros(len(tuples), dtype=torch.long)  # [N] bitmask of each tuple's token set
    for i in range(k):
        bits |= 1 << tuples[:, i]
    inside = torch.zeros(1 << vocab, dtype=torch.float64).index_add_(0, bits, prob)  # D(set == T)
    for v in range(vocab):  # zeta transform: D(set subset of T)
        view = inside.view(-1, 2, 1 << v)
        view[:, 1, :] += view[:, 0, :]
    masks = torch.arange(1 << vocab)
    members = ((masks.unsqueeze(1) >> torch.arange(vocab)) & 1).to(torch.float64)  # [2**V, V]
    gap = (inside - members @ p).max().clamp(min=0)
    return float(1 - gap)


def optimal_acceptance_bruteforce(p, q, k: int) -> float:
    """1 - max_T [q(T)**k - p(T)] by listing all token sets: the check for the fast version."""
    p, q = as_distribution("p", p), as_distribution("q", q)
    best = 0.0
    for size in range(1, p.shape[0] + 1):
        for subset in itertools.combinations(range(p.shape[0]), size):
            idx = list(subset)
            best = max(best, float(q[idx].sum() ** k - p[idx].sum()))
    return 1 - best
