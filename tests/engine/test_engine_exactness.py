"""End to end exactness: the engine's law over whole generated sequences is the target's.

Table models (V = 4, trigram) make the target law exactly computable (engine_helpers.sequence_law).
One generate call with N identical requests gives N independent samples of the first n new
tokens; the chi-square plan of tests/chisquare.py (family-wise false-failure rate <= 1e-6,
fixed seeds) judges the counts over all V^n sequences, and support is checked separately.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chisquare import ALPHA, assert_law, chi_square_pvalue
from engine_helpers import encode, sequence_law
from negative_control import ForgetfulRejection
from multidraft.engine import Engine, TableModel

VOCAB, ORDER, NEW = 4, 3, 3
SAMPLES = 200_000  # the headline case; variants use half (power stays ample for 64 cells)


def models(zero_prob=0.0):
    # Different Dirichlet draws: q is far enough from p that every depth both accepts and rejects.
    target = TableModel.random(VOCAB, ORDER, seed=11, zero_prob=zero_prob)
    draft = TableModel.random(VOCAB, ORDER, seed=12, zero_prob=zero_prob)
    return target, draft


def run(engine, prompts, seed, **sampling):
    out = engine.generate(prompts, max_new_tokens=NEW, seed=seed, **sampling)
    assert (out.lengths == NEW).all()
    return out


PLAN = [
    # verifier, k, depth, sampling, zero_prob, samples
    ("rrs", 2, 3, {}, 0.0, SAMPLES),
    ("rrs", 3, 2, {"temperature": 0.8, "top_k": 3, "top_p": 0.9}, 0.0, SAMPLES // 2),
    ("rrs", 2, 2, {}, 0.3, SAMPLES // 2),  # tables with holes: p or q zero on some tokens
    ("single", 1, 3, {}, 0.0, SAMPLES // 2),
    ("rrs-wor", 2, 2, {}, 0.0, SAMPLES // 2),  # distinct root drafts, one survivor per child
    # k = 3 distinct drafts but top-k 2 leaves two tokens: the root draws both (fewer drafts)
    ("rrs-wor", 3, 2, {"top_k": 2}, 0.0, SAMPLES // 2),
    ("optimal-wor", 2, 2, {}, 0.0, SAMPLES // 2),  # the LP over k-subsets, one per context
]


@pytest.mark.parametrize("name,k,depth,sampling,zero_prob,samples", PLAN)
def test_sequence_law_matches_target(name, k, depth, sampling, zero_prob, samples):
    target, draft = models(zero_prob)
    engine = Engine(target, draft, verifier=name, num_drafts=k, depth=depth, device="cpu")
    prompt = [1, 2]
    out = run(engine, torch.tensor([prompt]).expand(samples, -1), seed=1234, **sampling)
    counts = np.bincount(encode(out.tokens, VOCAB), minlength=VOCAB**NEW)
    law = sequence_law(target, prompt, NEW, **sampling)
    assert_law(counts, law, f"engine {name} k={k} depth={depth} {sampling} zero_prob={zero_prob}")
    # The run must actually exercise the tree: some walks accept at every depth, some reject.
    acc = out.stats.acceptance_by_depth
    assert all(0 < a < 1 for a in acc), acc


@pytest.mark.parametrize("name,widths,sampling", [("spechub", (2, 2), {}), ("rrs", (3, 1), {}), ("rrs-wor", (3, 2), {"top_p": 0.7}),
                                                 ("rrs-wor", (2, 4), {"top_k": 2}), ("optimal-wor", (2, 3), {"top_k": 2})])
def test_branching_tree_sequence_law_matches_target(name, widths, sampling):
    """Branching trees: every node draws its own children (spechub, not i.i.d., at depth 2;
    rrs-wor with nodes whose top-p support is below the width, which draw fewer children; and
    below the root, where top-k leaves a node fewer tokens than its width: a mutation audit
    found that verifying the spare children as real drafts went unseen)."""
    target, draft = models()
    engine = Engine(target, draft, verifier=name, widths=widths, device="cpu")
    prompt = [1, 2]
    out = run(engine, torch.tensor([prompt]).expand(SAMPLES // 2, -1), seed=4321, **sampling)
    counts = np.bincount(encode(out.tokens, VOCAB), minlength=VOCAB**NEW)
    assert_law(counts, sequence_law(target, prompt, NEW, **sampling), f"engine {name} widths={widths} {sampling}")
    acc = out.stats.acceptance_by_depth  # (three distinct drafts cover a top-p root: it always accepts)
    assert all(a > 0 for a in acc) and acc[-1] < 1, acc


def test_ragged_batch_each_request_follows_its_law():
    """Requests with different prompts (and lengths) share a batch; each follows its own law."""
    target, draft = models()
    engine = Engine(target, draft, verifier="rrs", num_drafts=2, depth=3, device="cpu")
    prompts = [[1, 2], [3]] * (SAMPLES // 4)  # interleaved so ragged rows sit side by side
    out = run(engine, prompts, seed=99)
    for parity, prompt in enumerate([[1, 2], [3]]):
        counts = np.bincount(encode(out.tokens[parity::2], VOCAB), minlength=VOCAB**NEW)
        assert_law(counts, sequence_law(target, prompt, NEW), f"ragged batch, prompt {prompt}")


def test_negative_control_wrong_verifier_is_caught():
    """The same test must reject a plausible but wrong verifier (no residual update)."""
    target, draft = models()
    engine = Engine(target, draft, verifier=ForgetfulRejection(), num_drafts=2, depth=2, device="cpu")
    prompt = [1, 2]
    # A quarter of the samples already rejects it with a p-value far below ALPHA.
    out = run(engine, torch.tensor([prompt]).expand(SAMPLES // 4, -1), seed=7)
    counts = np.bincount(encode(out.tokens, VOCAB), minlength=VOCAB**NEW)
    assert chi_square_pvalue(counts, sequence_law(target, prompt, NEW)) < ALPHA


def test_a_shape_re_chosen_every_round_keeps_the_sequence_law():
    """Engine.decode with the shape a function of the batch still running (as AdaptiveEngine
    uses it): (2, 2) at the full batch, plain steps while most requests remain, then (1, 3).
    Each round is exact given the past, so every request's sequence follows the target."""
    target, draft = models()
    samples = SAMPLES // 2
    engine = Engine(target, draft, verifier="rrs", num_drafts=2, depth=3, device="cpu")

    def shape(rows):
        return (2, 2) if rows == samples else (0, 0) if rows > samples // 2 else (1, 3)

    prompt = [1, 2]
    out = engine.decode(torch.tensor([prompt]).expand(samples, -1), max_new_tokens=NEW, seed=99, shape_for_batch=shape)
    assert (out.lengths == NEW).all()
    assert set(out.stats.rounds_by_shape) == {(2, 2), (0, 0), (1, 3)}, out.stats.rounds_by_shape
    counts = np.bincount(encode(out.tokens, VOCAB), minlength=VOCAB**NEW)
    assert_law(counts, sequence_law(target, prompt, NEW), "engine rrs, shape re-chosen per round")
