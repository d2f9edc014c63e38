"""Staged speculative decoding: a second draft model (draft2) speculates for the draft.

The staged draft must produce the same law of draft sequences as plain drafting (each sequence an
autoregressive sample from the draft), its cached q at every node must equal a fresh forward of
the draft on that node's prefix, and the engine with draft2 must stay exact end to end.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chisquare import ALPHA, assert_law, chi_square_pvalue
from engine_helpers import encode, full_logits, plain_greedy, sequence_law
from multidraft.engine import GPT, Engine, GPTConfig, TableModel
from multidraft.engine.engine import RequestRandom, draft_tree_staged, speculate_chain
from multidraft.engine.sampling import SamplingConfig
from multidraft.verifiers import get_verifier

VOCAB, ORDER, NEW = 4, 3, 3


def tables(zero_prob=0.0):
    # target, draft and draft2 all different: draft2 proposals are refused often enough.
    return (TableModel.random(VOCAB, ORDER, seed=11, zero_prob=zero_prob),
            TableModel.random(VOCAB, ORDER, seed=12, zero_prob=zero_prob),
            TableModel.random(VOCAB, 2, seed=13))


def staged_round(draft, draft2, prompts, k, depth, seed, verifier="rrs", sampling=SamplingConfig(), widths=None):
    """One staged drafting round from fresh caches: (x [B, k, D], q_levels [B, D, k, V], canon, passes, passes2).
    With ``widths``, k and depth are the branching tree's paths and depth."""
    prompts = torch.as_tensor(prompts)
    bsz, t = prompts.shape
    seq = torch.cat([prompts, torch.zeros(bsz, depth + 2, dtype=torch.long)], dim=1)
    seq_len = torch.full((bsz,), t)
    size = t + 2 * depth + 3 + k * depth * (depth + 1)  # the engine's bound
    cache, cache2 = draft.new_cache(bsz, size), draft2.new_cache(bsz, size)
    out = draft_tree_staged(draft, draft2, cache, cache2, seq, seq_len, get_verifier(verifier), k, depth,
                            sampling, RequestRandom("cpu", seed, bsz), widths)
    tree, staged = out
    return tree.x, tree.q_levels, tree.canon, staged.passes, staged.passes2


def test_speculate_chain_keeps_a_prefix_and_replaces_the_first_refusal():
    # Position 0: q = r (always kept); position 1: q puts no mass on the proposal (always refused);
    # the replacement comes from normalize(max(q - r, 0)), here token 2 only.
    r = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]]).double()
    q = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.4, 0.6], [0.2, 0.3, 0.5]]).double()
    proposals = torch.tensor([[[1, 0, 2]]])
    out = speculate_chain(q.view(1, 1, 3, 3), r.view(1, 1, 3, 3), proposals, torch.tensor([[3]]), torch.Generator().manual_seed(0))
    assert out.tolist() == [[[1, 2]]]
    # A chain of length 1 whose one proposal is kept: kept = length.
    out = speculate_chain(q.view(1, 1, 3, 3), r.view(1, 1, 3, 3), proposals, torch.tensor([[1]]), torch.Generator().manual_seed(0))
    assert out[0, 0, 0] == 1


def test_staged_draft_sequences_follow_the_draft_law():
    """Sequence 0 of every request: its D tokens are an autoregressive sample from the draft,
    and so are sequence 1's; chi-square over the V^D sequences."""
    _, draft, draft2 = tables()
    prompt, k, depth, samples = [1, 2], 2, 3, 100_000
    x, _, _, passes, passes2 = staged_round(draft, draft2, [prompt] * samples, k, depth, seed=5)
    law = sequence_law(draft, prompt, depth)
    for i in range(k):
        counts = np.bincount(encode(x[:, i], VOCAB), minlength=VOCAB**depth)
        assert_law(counts, law, f"staged draft sequence {i}")
    # Speculation did something: fewer draft forwards than one per depth, and some refusals.
    assert 2 <= passes < 1 + depth and passes2 > passes


def test_a_wrong_staged_sampler_is_caught(monkeypatch):
    """Negative control: replacing a refused proposal by a draw from q itself (no residual)
    over-weights draft2's tokens; the same test must reject it."""
    import multidraft.engine.engine as engine_module

    def no_residual(q, r, proposals, length, generator):
        out = speculate_chain(q, q.clone(), proposals, length, generator)  # kept as if r == q: wrong
        return out

    monkeypatch.setattr(engine_module, "speculate_chain", no_residual)
    _, draft, draft2 = tables()
    prompt, depth = [1, 2], 3
    x, _, _, _, _ = staged_round(draft, draft2, [prompt] * 50_000, 2, depth, seed=5)
    counts = np.bincount(encode(x[:, 0], VOCAB), minlength=VOCAB**depth)
    assert chi_square_pvalue(counts, sequence_law(draft, prompt, depth)) < ALPHA


def test_staged_q_equals_a_fresh_draft_forward():
    """The staged draft's q at every node (read through its chained cache slots) equals a fresh
    causal forward of the draft over that node's prefix: masks, positions and offsets are right."""
    torch.manual_seed(0)
    draft = GPT(GPTConfig(vocab_size=16, n_layer=2, n_head=2, dim=16)).double().eval()
    draft2 = GPT(GPTConfig(vocab_size=16, n_layer=1, n_head=2, dim=8)).double().eval()
    prompts = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    with torch.no_grad():
        x, q_levels, _, _, _ = staged_round(draft, draft2, prompts, 3, 4, seed=2)
        for b in range(2):
            for i in range(3):
                full = full_logits(draft, torch.cat([prompts[b], x[b, i]]).unsqueeze(0))[0].softmax(-1)  # [T + D, V]
                for level in range(4):
                    torch.testing.assert_close(q_levels[b, level, i], full[prompts.shape[1] - 1 + level], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name,shape,sampling,zero_prob,seed", [
    ("rrs", {"num_drafts": 2, "depth": 3}, {}, 0.0, 77),
    ("rrs-wor", {"num_drafts": 2, "depth": 3}, {"temperature": 0.8, "top_k": 3}, 0.0, 77),
    ("kseq", {"num_drafts": 3, "depth": 2}, {}, 0.3, 77),
    # branching trees: draft2 speeds up their chains (width-1 depths below the root)
    ("rrs", {"widths": (2, 1, 1)}, {}, 0.0, 78),
    ("rrs-wor", {"widths": (2, 1, 1)}, {"temperature": 0.8, "top_k": 3}, 0.0, 78),
    ("kseq", {"widths": (1, 2, 1)}, {}, 0.0, 78),
])
def test_engine_with_draft2_is_exact(name, shape, sampling, zero_prob, seed):
    target, draft, draft2 = tables(zero_prob)
    engine = Engine(target, draft, verifier=name, device="cpu", draft2=draft2, **shape)
    prompt, samples = [1, 2], 100_000
    out = engine.generate(torch.tensor([prompt]).expand(samples, -1), max_new_tokens=NEW, seed=seed, **sampling)
    counts = np.bincount(encode(out.tokens, VOCAB), minlength=VOCAB**NEW)
    assert_law(counts, sequence_law(target, prompt, NEW, **sampling), f"engine {name} {shape} with draft2")
    assert all(0 < a < 1 for a in out.stats.acceptance_by_depth), out.stats.acceptance_by_depth
    assert out.stats.draft2_passes > 0


@pytest.mark.parametrize("name,shape,n", [("rrs", {"num_drafts": 2, "depth": 4}, 10),
                                          ("rrs-wor", {"widths": (3, 1, 2, 1, 1)}, 12)])
def test_draft2_greedy_equals_plain_greedy_and_seeds_repeat(name, shape, n):
    torch.manual_seed(0)
    target = GPT(GPTConfig(vocab_size=32, n_layer=2, n_head=2, dim=32)).double().eval()
    draft = GPT(GPTConfig(vocab_size=32, n_layer=1, n_head=2, dim=16)).double().eval()
    draft2 = TableModel.random(32, 2, seed=3)
    prompts = [[3, 1, 4, 1, 5], [9], [2, 6, 5, 3, 5, 8]]
    engine = Engine(target, draft, verifier=name, device="cpu", draft2=draft2, **shape)
    out = engine.generate(prompts, max_new_tokens=n, temperature=0.0)
    for b, prompt in enumerate(prompts):
        assert out.tokens[b].tolist() == plain_greedy(target, prompt, n), f"request {b}"
    a = engine.generate(prompts, max_new_tokens=n, temperature=1.0, seed=[1, 2, 3])
    b = engine.generate(prompts, max_new_tokens=n, temperature=1.0, seed=[1, 2, 3])
    alone = engine.generate([prompts[1]], max_new_tokens=n, temperature=1.0, seed=[2])
    assert torch.equal(a.tokens, b.tokens) and a.tokens[1].tolist() == alone.tokens[0].tolist()


def test_draft2_errors():
    target, draft, _ = tables()
    with pytest.raises(ValueError, match="draft2 must share the draft's vocabulary, got V = 5 \\(draft2\\) and V = 4 \\(draft\\)"):
        Engine(target, draft, draft2=TableModel.random(5, 2, seed=0))
    with pytest.raises(ValueError, match="widths \\(2, 2\\) have none, so draft2 would never run"):
        Engine(target, draft, widths=(2, 2), draft2=TableModel.random(4, 2, seed=0))
    with pytest.raises(ValueError, match="depth = 1 has none, so draft2 would never run"):
        Engine(target, draft, num_drafts=2, depth=1, draft2=TableModel.random(4, 2, seed=0))
    with pytest.raises(ValueError, match="the draft2 must have an int attribute vocab_size"):
        Engine(target, draft, draft2=object())


def test_staged_caches_stay_right_across_rounds(monkeypatch):
    """Over many rounds (commits of the staged drafts' chained slots included), q at every node
    equals the draft table's row for that node's true context.  The draft is a 5-gram table, so a
    wrong token or position kept in its cache changes its rows."""
    import multidraft.engine.engine as engine_module

    target = TableModel.random(VOCAB, 3, seed=11)
    draft = TableModel.random(VOCAB, 5, seed=12)
    draft2 = TableModel.random(VOCAB, 3, seed=13)
    real = engine_module.draft_tree_staged
    checked = []

    def checking(draft_model, draft2_model, cache, cache2, seq, seq_len, verifier, k, depth, sampling, random, widths=None):
        out = real(draft_model, draft2_model, cache, cache2, seq, seq_len, verifier, k, depth, sampling, random, widths)
        x, q_levels = out[0].x, out[0].q_levels
        for b in range(seq.shape[0]):
            prefix = seq[b, : int(seq_len[b])].tolist()
            for i in range(k):
                for level in range(depth):
                    want = draft.next_probs(prefix + x[b, i, :level].tolist())
                    torch.testing.assert_close(q_levels[b, level, i], want, rtol=0, atol=1e-12)
        checked.append(1)
        return out

    monkeypatch.setattr(engine_module, "draft_tree_staged", checking)
    shapes = [{"num_drafts": 3, "depth": 4}, {"widths": (2, 1, 2, 1)}, {"widths": (1, 2, 1, 1)}]
    for shape in shapes:
        engine = Engine(target, draft, verifier="rrs", device="cpu", draft2=draft2, **shape)
        engine.generate([[1, 2, 3], [0], [3, 3]], max_new_tokens=20, seed=3)
    assert len(checked) >= 5 * len(shapes)


# ---- branching trees: draft2 speeds up their chains (width-1 depths below the root) ----------

BRANCHING = [(2, 1, 1), (1, 2, 1), (2, 1, 2, 1), (3, 2, 1, 1)]


@pytest.mark.parametrize("widths", BRANCHING)
def test_staged_branching_q_equals_a_fresh_draft_forward(widths):
    """Every path of a staged branching tree holds its nodes' tokens (paths through one node
    agree), and q at every node, read through the chained and caught-up cache slots of both
    drafts, equals a fresh causal forward of the draft over the node's prefix."""
    from multidraft.engine.tree import subtree_spans

    torch.manual_seed(0)
    draft = GPT(GPTConfig(vocab_size=16, n_layer=2, n_head=2, dim=16)).double().eval()
    draft2 = GPT(GPTConfig(vocab_size=16, n_layer=1, n_head=2, dim=8)).double().eval()
    prompts = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    spans = subtree_spans(widths)
    k, depth = spans[0] * widths[0], len(widths)
    with torch.no_grad():
        x, q_levels, canon, passes, passes2 = staged_round(draft, draft2, prompts, k, depth, seed=2, widths=widths)
        for b in range(2):
            for level in range(depth):
                heads = x[b, canon[b, level], level]  # [k] each path's node token at this depth
                assert torch.equal(x[b, :, level], heads)
            for i in range(k):
                full = full_logits(draft, torch.cat([prompts[b], x[b, i]]).unsqueeze(0))[0].softmax(-1)  # [T + D, V]
                for level in range(depth):
                    torch.testing.assert_close(q_levels[b, level, i], full[prompts.shape[1] - 1 + level], rtol=1e-9, atol=1e-12)
    assert passes2 > 0 and passes <= depth


def test_staged_branching_paths_follow_the_draft_law():
    """Each root-to-leaf path of a staged 2-1-2-1 tree (rrs: i.i.d. children) is an autoregressive
    sample of the draft, and the two children of a depth-2 node are independent given it."""
    _, draft, draft2 = tables()
    prompt, widths, samples = [1, 2], (2, 1, 2, 1), 100_000
    x, _, _, _, _ = staged_round(draft, draft2, [prompt] * samples, 4, 4, seed=9, widths=widths)
    law = sequence_law(draft, prompt, 4)
    for i in (0, 3):
        counts = np.bincount(encode(x[:, i], VOCAB), minlength=VOCAB**4)
        assert_law(counts, law, f"staged branching path {i}")
    # paths 0 and 1 share depths 1-2 and then draw their own depths 3-4: the joint law of
    # (path 0, path 1's last two tokens) is the draft's law continued twice independently
    first = encode(x[:, 0], VOCAB)
    second = encode(x[:, 1, 2:], VOCAB)
    counts = np.bincount(first * VOCAB**2 + second, minlength=VOCAB**6)
    prefixes = sequence_law(draft, prompt, 2)
    joint = np.zeros(VOCAB**6)
    for head in range(VOCAB**2):
        tail = sequence_law(draft, prompt + [head // VOCAB, head % VOCAB], 2)  # [V^2]
        joint[head * VOCAB**4 : (head + 1) * VOCAB**4] = prefixes[head] * np.outer(tail, tail).reshape(-1)
    assert_law(counts, joint, "staged branching siblings")


def test_draft2_on_a_tree_needs_a_plain_one_draft_scheme(monkeypatch):
    import multidraft.engine.engine as engine_module

    target, draft, draft2 = tables()
    monkeypatch.setattr(engine_module, "one_draft_is_a_plain_draw", lambda verifier: False)
    with pytest.raises(ValueError, match="verifier 'rrs-wor' does not draft one token as a plain draw from q"):
        Engine(target, draft, verifier="rrs-wor", widths=(2, 1), draft2=draft2)
    Engine(target, draft, verifier="rrs", widths=(2, 1), draft2=draft2)  # i.i.d.: a plain draw
