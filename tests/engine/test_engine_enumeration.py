"""Exact enumeration of one speculation round: the tree walk's argument, checked in float64.

This mirrors walk_tree with the verifiers' exact ``kernel`` in place of sampling: it sums over
every draft tree (the first level by the verifier's ``draft_probability``, deeper levels i.i.d.
from q at each sequence's node) and every verifier outcome.  To compare with the target, a
round that ends after j < D + 1 tokens is continued by plain target sampling up to D + 1
tokens; exactness of the round means the law of those D + 1 tokens is the target's, to 1e-12.
The chi-square tests in test_engine_exactness.py check the implementation; this checks the
algorithm, including the rule that a child keeps the sequences whose token was emitted.
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import numpy as np
import pytest
import torch

import multidraft as md
from negative_control import ForgetfulRejection
from multidraft.engine import TableModel

VOCAB = 3


def cached_rows(model):
    """ctx (a tuple of ids) -> the table's next-token row [1, V], memoized."""

    @lru_cache(maxsize=None)
    def row(ctx):
        return model.next_probs(list(ctx)).unsqueeze(0)

    return row


def target_continuation(p, law: np.ndarray, length: int):
    """finish(ctx, emitted, weight): continue with plain target sampling until ``length`` tokens are
    emitted, adding each sequence's weight to ``law`` (indexed by its base-V number)."""

    def finish(ctx, emitted, weight):
        if len(emitted) == length:
            law[int(np.ravel_multi_index(emitted, (VOCAB,) * length))] += weight
            return
        row = p(ctx)[0]
        for tok in range(VOCAB):
            if row[tok] > 0:
                finish(ctx + (tok,), emitted + [tok], weight * float(row[tok]))

    return finish


def round_law(verifier, target, draft, prompt, k, depth, follow_rule="emitted"):
    """Law [V^(D+1)] of the first D + 1 tokens: one round, then plain target sampling."""
    p, q = cached_rows(target), cached_rows(draft)
    law = np.zeros(VOCAB ** (depth + 1))
    finish = target_continuation(p, law, depth + 1)

    def walk(ctx, x, alive, level, emitted, weight):
        if level == depth:  # every level accepted: bonus token from p after the leaf
            finish(ctx, emitted, weight)
            return
        drafts = torch.tensor([[x[i][level] for i in alive]])
        kernel = verifier.kernel(p(ctx), q(ctx), drafts)[0]
        for tok in range(VOCAB):
            w = float(kernel[tok])
            if w <= 0:
                continue
            survivors = [i for i in alive if x[i][level] == tok]
            if follow_rule == "first-only":  # a variant that is also exact: any sub-multiset works
                survivors = survivors[:1]
            if survivors:
                walk(ctx + (tok,), x, survivors, level + 1, emitted + [tok], weight * w)
            else:
                finish(ctx + (tok,), emitted + [tok], weight * w)

    root = tuple(prompt)
    for first in itertools.product(range(VOCAB), repeat=k):
        w_first = float(verifier.draft_probability(q(root), torch.tensor([first]))[0])
        if w_first <= 0:
            continue
        for rest in itertools.product(range(VOCAB), repeat=k * (depth - 1)):
            x = [(first[i],) + rest[i * (depth - 1) : (i + 1) * (depth - 1)] for i in range(k)]
            w = w_first
            for i in range(k):
                for level in range(1, depth):
                    w *= float(q(root + x[i][:level])[0, x[i][level]])
            if w > 0:
                walk(root, x, list(range(k)), 0, [], w)
    return law


def target_law(target, prompt, n):
    law = np.zeros(VOCAB**n)
    for code, seq in enumerate(itertools.product(range(VOCAB), repeat=n)):
        prob, ctx = 1.0, list(prompt)
        for tok in seq:
            prob *= float(target.next_probs(ctx)[tok])
            ctx.append(tok)
        law[code] = prob
    return law


@pytest.fixture(scope="module")
def tables():
    return (TableModel.random(VOCAB, 3, seed=21, zero_prob=0.2), TableModel.random(VOCAB, 3, seed=22, zero_prob=0.2))


@pytest.mark.parametrize("name,k,depth", [("rrs", 2, 2), ("rrs", 3, 2), ("rrs", 2, 3), ("single", 1, 3), ("rrs-wor", 2, 1), ("rrs-wor", 2, 2), ("rrs-wor", 2, 3), ("spechub", 2, 1), ("kseq", 2, 2), ("importance", 2, 2), ("optimal", 2, 2), ("optimal-wor", 2, 2), ("gls", 2, 2), ("otm", 2, 2), ("greedy", 2, 1)])
def test_one_round_is_exact(tables, name, k, depth):
    target, draft = tables
    verifier = md.get_verifier(name)
    got = round_law(verifier, target, draft, [1, 0], k, depth)
    np.testing.assert_allclose(got, target_law(target, [1, 0], depth + 1), rtol=0, atol=1e-12)


def test_keeping_a_subset_of_the_survivors_is_also_exact(tables):
    target, draft = tables
    got = round_law(md.get_verifier("rrs"), target, draft, [2, 2], 2, 3, follow_rule="first-only")
    np.testing.assert_allclose(got, target_law(target, [2, 2], 4), rtol=0, atol=1e-12)


def test_enumeration_catches_a_wrong_verifier(tables):
    target, draft = tables
    got = round_law(ForgetfulRejection(), target, draft, [2, 2], 2, 2)
    assert np.abs(got - target_law(target, [2, 2], 3)).max() > 1e-2


def branching_round_law(verifier, target, draft, prompt, widths):
    """Law [V^(D+1)] of the first D + 1 tokens for a branching tree: every node draws widths[l]
    children by the verifier's scheme, the walk follows the first child equal to the emitted
    token, then plain target sampling continues.  Sums over every whole tree."""
    depth = len(widths)
    p, q = cached_rows(target), cached_rows(draft)

    @lru_cache(maxsize=None)
    def trees(ctx, level):
        """Every subtree under ctx at this depth with its probability: [(children, prob)], where
        children is a tuple of (token, subtree) pairs."""
        if level == depth:
            return [((), 1.0)]
        out = []
        for tokens in itertools.product(range(VOCAB), repeat=widths[level]):
            w = float(verifier.draft_probability(q(ctx), torch.tensor([tokens]))[0])
            if w <= 0:
                continue
            for subs in itertools.product(*(trees(ctx + (t,), level + 1) for t in tokens)):
                prob = w
                for _, sub_prob in subs:
                    prob *= sub_prob
                out.append((tuple((t, sub) for t, (sub, _) in zip(tokens, subs)), prob))
        return out

    law = np.zeros(VOCAB ** (depth + 1))
    finish = target_continuation(p, law, depth + 1)

    def walk(ctx, children, emitted, weight):
        if not children:  # a leaf: the bonus token from p
            finish(ctx, emitted, weight)
            return
        drafts = torch.tensor([[t for t, _ in children]])
        kernel = verifier.kernel(p(ctx), q(ctx), drafts)[0]
        for tok in range(VOCAB):
            w = float(kernel[tok])
            if w <= 0:
                continue
            match = [sub for t, sub in children if t == tok]
            if match:
                walk(ctx + (tok,), match[0], emitted + [tok], weight * w)
            else:
                finish(ctx + (tok,), emitted + [tok], weight * w)

    root = tuple(prompt)
    for children, prob in trees(root, 0):
        walk(root, children, [], prob)
    return law


@pytest.mark.parametrize("name,widths", [("rrs", (2, 2)), ("rrs", (3, 1)), ("rrs-wor", (2, 2)), ("spechub", (2, 2)),
                                         ("greedy", (2, 2)), ("optimal", (2, 1)), ("optimal-wor", (2, 2)), ("gls", (2, 2)), ("single", (1, 1, 1)), ("otm", (2, 1))])
def test_branching_round_is_exact(tables, name, widths):
    target, draft = tables
    got = branching_round_law(md.get_verifier(name), target, draft, [1, 0], widths)
    np.testing.assert_allclose(got, target_law(target, [1, 0], len(widths) + 1), rtol=0, atol=1e-12)


def test_branching_enumeration_catches_a_wrong_verifier(tables):
    target, draft = tables
    got = branching_round_law(ForgetfulRejection(), target, draft, [2, 2], (2, 2))
    assert np.abs(got - target_law(target, [2, 2], 3)).max() > 1e-2
