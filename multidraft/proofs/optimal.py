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

from ..quadrature import EXP_SINH_STEP, exp_sinh_nodes, reach_for
from ..verifiers.base import SUM_TOLERANCE, Verifier, check_distribution
from .enumeration import as_distribution, draft_law

# Set enumeration over 2**V subsets is refused beyond this vocabulary size.
MAX_SUBSET_VOCAB = 20


def ratio_order(p: Tensor, q: Tensor) -> Tensor:
    """Token order [..., V] by ascending p/q, tokens with q = 0 last: the order whose prefixes
    hold a worst set T (below)."""
    ratio = torch.where(q > 0, p / torch.where(q > 0, q, torch.ones_like(q)), torch.full_like(p, float("inf")))
    return ratio.argsort(dim=-1)


def optimal_acceptance_iid(p: Tensor, q: Tensor, k: int) -> Tensor:
    """1 - max_T [q(T)**k - p(T)] for rows p, q [..., V]: [...].

    With g(s) = s**k convex, a set T maximizing g(q(T)) - p(T) holds the tokens of smallest
    ratio p/q: removing x from T or adding y to it cannot help, and convexity turns those two
    conditions into p(x)/q(x) <= g'(q(T)) <= p(y)/q(y).  So the maximum is over the V + 1
    prefixes of the tokens sorted by p/q: one sort, two cumsums.  Tokens with q = 0 sort last
    (they only add p(T)).
    """
    order = ratio_order(p, q)  # [..., V]
    q_prefix = q.gather(-1, order).cumsum(dim=-1)  # [..., V]
    p_prefix = p.gather(-1, order).cumsum(dim=-1)
    gap = (q_prefix.clamp(max=1) ** k - p_prefix).amax(dim=-1).clamp(min=0)  # empty T gives 0
    return 1 - gap


# Blocking of the without-replacement optimum's prefix scan (its quadrature: multidraft/quadrature.py).
WOR_BLOCK = 256  # tokens per block of the prefix scan (at most)
WOR_CHUNK_ENTRIES = 1 << 23  # nodes per pass are limited to this many [nodes, V, k] entries
WOR_TOLERANCE = 1e-14  # the quadrature's step is halved until no prefix's 1 - Q moves by more
# Halvings at most: step 1/32 down to 1/32768.  Ordinary rows stop after one or two; a q down
# to 1e-300 needs about seven, as the nodes past t ~ 1 / q are step * log(64 / q) apart in log t.
WOR_REFINEMENTS = 10


def prefix_below_k(rang: Tensor, k: int) -> Tensor:
    """P(fewer than k of the first i + 1 clocks rang) for every prefix i: [N, V] from ``rang``
    [N, V], the chance each token's clock rang by each node's time.

    The count over a prefix is Poisson-binomial: its generating function is the product of
    (1 - r + r z) over the prefix, truncated at z^(k-1).  The prefix products are scanned in
    blocks (within each block token by token, then across blocks), every coefficient a sum of
    products of numbers in [0, 1]: no cancellation.
    """
    n, vocab = rang.shape
    size = min(WOR_BLOCK, vocab)
    blocks = -(-vocab // size)
    padded = torch.zeros(n, blocks * size, dtype=rang.dtype)  # padding rings never: a factor 1
    padded[:, :vocab] = rang
    r = padded.view(n, blocks, size)
    poly = torch.zeros(n, blocks, k, dtype=rang.dtype)  # within-block prefix product
    poly[..., 0] = 1
    tail = torch.empty(n, blocks, size, k, dtype=rang.dtype)  # [.., j, m]: sum of coefficients 0..m
    for j in range(size):
        rj = r[:, :, j : j + 1]
        poly = torch.cat([poly[..., :1] * (1 - rj), poly[..., 1:] * (1 - rj) + poly[..., :-1] * rj], dim=-1)
        tail[:, :, j] = poly.cumsum(dim=-1)
    # before[b]: the product over all blocks before block b (exclusive scan, k coefficients)
    before = torch.zeros(n, blocks, k, dtype=rang.dtype)
    run = torch.zeros(n, k, dtype=rang.dtype)
    run[:, 0] = 1
    for b in range(blocks):
        before[:, b] = run
        block = poly[:, b]  # the whole block's product
        run = torch.stack([(run[:, : m + 1] * block[:, : m + 1].flip(-1)).sum(-1) for m in range(k)], dim=-1)
    # sum_{m < k} [before * within]_m = sum_a before_a * (sum_{m < k - a} within_m)
    below = (before.unsqueeze(2) * tail.flip(-1)).sum(-1)  # [N, blocks, BLOCK]
    return below.reshape(n, -1)[:, :vocab]


def optimal_acceptance_wor(p: Tensor, q: Tensor, k: int) -> float:
    """1 - max_T [Q(T) - p(T)] for k drafts drawn without replacement from q, Q(T) the chance
    that all k fall in T (docs/proofs/optimal-acceptance.md, "Drafts without replacement").

    The maximum is over the V + 1 prefixes of the tokens sorted by p/q, as with replacement (Hu
    et al. 2025; checked here against all 2**V sets).  Q comes from exponential clocks: drawing
    without replacement from q is the order in which independent clocks of rates q(x) ring, so
    with s = q(outside T), ``1 - Q(T) = integral_0^inf s e^(-s t) P(fewer than k clocks of T
    rang by t) dt``, computed by exp-sinh quadrature for all prefixes at once, its nodes
    reaching past 64 / (the smallest q), its step halved from 1/32 until no prefix moves by
    WOR_TOLERANCE.  O(N V k) for N ~ 300-600 nodes on most rows (the first halving checks the
    step); error ~1e-14.
    """
    order = ratio_order(p, q)
    ps, qs = p[order], q[order]
    outside = torch.cat([qs.flip(0).cumsum(0).flip(0)[1:], qs.new_zeros(1)])  # [V] s: q-mass after prefix i
    # Nodes out to where the slowest clock has surely rung (a prefix of tiny q-mass outside it
    # is decided at t ~ 1 / s, and s can be as small as the smallest q).
    # The clocks' order, and so Q, does not change when every rate is multiplied by one number:
    # rates below 1e-300 are scaled up to it, else the nodes out past 64 / rate overflow float64.
    smallest = float(qs[qs > 0].min())
    rates, outside_rates = (qs, outside) if smallest >= 1e-300 else (qs * (1e-300 / smallest), outside * (1e-300 / smallest))
    reach = reach_for(max(smallest, 1e-300))
    step = EXP_SINH_STEP
    miss = _miss_by_quadrature(rates, outside_rates, k, *exp_sinh_nodes(step, reach))  # [V] 1 - Q(prefix)
    for _ in range(WOR_REFINEMENTS):
        # Halve the step until no prefix moves by WOR_TOLERANCE: where s is tiny the integrand
        # sits at t ~ 1/s, where the nodes are 2.4x apart at step 1/32 (s = 1e-12 was 1e-4 off).
        t_mid, w_mid = exp_sinh_nodes(step, reach, offset=step / 2)
        finer = miss / 2 + _miss_by_quadrature(rates, outside_rates, k, t_mid, w_mid / 2)
        moved = float((finer - miss).abs().max())
        miss, step = finer, step / 2
        if moved <= WOR_TOLERANCE:
            break
    else:
        raise ValueError(f"the without-replacement optimum did not converge: prefixes still moved by {moved:.2e} "
                         f"at quadrature step {step:g} (tolerance {WOR_TOLERANCE:g})")
    held = (qs > 0).cumsum(0)  # [V] tokens of positive q in each prefix
    # Fewer than k of them: the k distinct drafts cannot all fall inside, Q = 0 exactly; all of
    # q's mass (and at least k tokens): Q = 1 exactly.
    inside = torch.where(outside > 0, 1 - miss, torch.ones_like(miss))
    inside = torch.where(held >= k, inside, torch.zeros_like(inside))
    gap = float((inside - ps.cumsum(0)).max().clamp(min=0))  # the empty set gives 0
    return 1 - gap


def _miss_by_quadrature(qs: Tensor, outside: Tensor, k: int, t: Tensor, w: Tensor) -> Tensor:
    """sum_n w_n s e^{-s t_n} P(fewer than k clocks of the prefix rang by t_n), for every
    prefix [V] (s = ``outside``, the q-mass after it; the prefix's clocks have rates ``qs``)."""
    miss = torch.zeros_like(qs)
    chunk = max(1, WOR_CHUNK_ENTRIES // (qs.shape[0] * k))
    for start in range(0, t.shape[0], chunk):
        tc, wc = t[start : start + chunk, None], w[start : start + chunk, None]
        below = prefix_below_k(-torch.expm1(-tc * qs), k)  # [n, V]
        # the density first: w * s overflows where t is huge and s is not (then e^{-st} = 0)
        miss += (wc * (outside * torch.exp(-tc * outside)) * below).sum(0)
    return miss


def optimal_acceptance(p, q, k: int, replacement: bool = True):
    """Best acceptance of any exact verifier with k drafts from q: a float for 1-D p, q.

    ``replacement=True``: k i.i.d. drafts; exact, O(V log V), batched over leading dims.
    ``replacement=False``: k distinct drafts drawn sequentially from q (rrs-wor's scheme);
    1-D p, q; O(V log V + N V k) by adaptive quadrature, to ~1e-14 (``optimal_acceptance_wor``);
    ``optimal_acceptance_for_scheme`` is the exact enumeration it is checked against.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if not isinstance(replacement, bool):
        raise ValueError(f"replacement must be True or False, got {replacement!r}")
    p_t = torch.as_tensor(p, dtype=torch.float64)
    if p_t.dim() == 0 or p_t.shape[-1] == 0:
        raise ValueError(f"p and q must be probability rows [..., V] with V >= 1, got shape {tuple(p_t.shape)}")
    q_t = torch.as_tensor(q, dtype=torch.float64)
    if p_t.shape != q_t.shape:
        raise ValueError(f"p and q must have the same shape, got {tuple(p_t.shape)} and {tuple(q_t.shape)}")
    for name, given, rows in (("p", p, p_t), ("q", q, q_t)):
        # NaN, negative or unnormalized rows had given numbers (nan, or 1.0 for an all-zero q);
        # a float32 tensor keeps its own sum tolerance
        checked = given if isinstance(given, Tensor) and given.dtype in SUM_TOLERANCE else rows
        check_distribution(name, checked.reshape(-1, checked.shape[-1]) if checked.dim() else checked.reshape(1, 1))
    # rows within the tolerance are the laws p / sum(p), q / sum(q), as the verifiers take them
    p_t, q_t = p_t / p_t.sum(-1, keepdim=True), q_t / q_t.sum(-1, keepdim=True)
    if replacement:
        value = optimal_acceptance_iid(p_t, q_t, k)
        return float(value) if value.dim() == 0 else value
    if p_t.dim() != 1:  # already checked and normalized above: only the shape is left to check
        raise ValueError(f"p must be a single probability vector [V], got shape {tuple(p_t.shape)}")
    support = int((q_t > 0).sum())
    if k > support:
        raise ValueError(f"k = {k} drafts without replacement need k tokens with q > 0; q has {support}")
    return optimal_acceptance_wor(p_t, q_t, k)


def _checked_rows(p, q, k: int) -> tuple[Tensor, Tensor]:
    """p, q as 1-D float64 laws of one shape, and k an int >= 1, or ValueError naming them."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    p, q = as_distribution("p", p), as_distribution("q", q)  # checked, and taken as laws
    if p.shape != q.shape:
        raise ValueError(f"p and q must have the same shape, got {tuple(p.shape)} and {tuple(q.shape)}")
    return p, q


def optimal_acceptance_for_scheme(verifier: Verifier, p, q, k: int) -> float:
    """Best acceptance of any exact verifier that uses ``verifier``'s draft law (small V).

    Computes max_T [D(all drafts in T) - p(T)] over all 2**V token sets: D(all in T) is the
    sum of D over tuples whose token set is inside T, a subset-sum (zeta) transform over the
    bitmask of each tuple's token set.
    """
    p, q = _checked_rows(p, q, k)
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
    p, q = _checked_rows(p, q, k)
    best = 0.0
    for size in range(1, p.shape[0] + 1):
        for subset in itertools.combinations(range(p.shape[0]), size):
            idx = list(subset)
            best = max(best, float(q[idx].sum() ** k - p[idx].sum()))
    return 1 - best
