"""Decoding behaviour: greedy equals plain greedy, seeds repeat, batches equal single requests,
stats add up, eos stops a request."""

from __future__ import annotations

import pytest
import torch

from engine_helpers import plain_greedy
from multidraft.engine import GPT, GPTConfig, Engine, TableModel

VOCAB = 48


def gpt(seed, dtype=torch.float64, **overrides):
    torch.manual_seed(seed)
    cfg = GPTConfig(**{"vocab_size": VOCAB, "n_layer": 2, "n_head": 4, "dim": 32, **overrides})
    return GPT(cfg).to(dtype).eval()


def noisy_copy(model, scale, seed):
    """A draft close to the target: acceptance is high but not perfect, so it is ragged."""
    torch.manual_seed(seed)
    draft = GPT(model.config).to(next(model.parameters()).dtype).eval()
    draft.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(scale * torch.randn_like(p))
    return draft


PROMPTS = [[3, 1, 4, 1, 5], [9], [2, 6, 5, 3, 5, 8, 9, 7], [0, 0]]


class Recording(torch.nn.Module):
    """``model`` behind the engine's protocol, recording the shape [B, T] of every forward's ids."""

    def __init__(self, model):
        super().__init__()
        self.model, self.vocab_size, self.shapes = model, model.vocab_size, []

    def new_cache(self, *args, **kwargs):
        return self.model.new_cache(*args, **kwargs)

    def forward(self, ids, pos, mask, cache):
        self.shapes.append(tuple(ids.shape))
        return self.model(ids, pos, mask, cache)


SHAPES = [("rrs", dict(num_drafts=2, depth=3)), ("single", dict(num_drafts=1, depth=4)), ("rrs-wor", dict(num_drafts=3, depth=2)),
          ("spechub", dict(num_drafts=2, depth=1)), ("spechub", dict(widths=(2, 2, 2))), ("rrs", dict(widths=(3, 2, 1)))]


@pytest.mark.parametrize("verifier,shape", SHAPES)
def test_greedy_equals_plain_greedy_token_for_token(verifier, shape):
    target = gpt(0)
    draft = noisy_copy(target, 0.15, seed=1)
    engine = Engine(target, draft, verifier=verifier, device="cpu", **shape)
    n = 12
    out = engine.generate(PROMPTS, max_new_tokens=n, temperature=0.0, seed=0)
    for b, prompt in enumerate(PROMPTS):
        assert out.tokens[b].tolist() == plain_greedy(target, prompt, n), f"request {b}"
    # Ragged acceptance actually happened: some depths accepted, some rejected.
    assert 0 < out.stats.accepted_by_depth[0] < out.stats.reached_by_depth[0]


def test_greedy_float32_model():
    target = gpt(0, dtype=torch.float32)
    draft = noisy_copy(target, 0.1, seed=2)
    engine = Engine(target, draft, verifier="rrs", num_drafts=2, depth=3, device="cpu")
    out = engine.generate(PROMPTS[:2], max_new_tokens=10, temperature=0.0)
    for b, prompt in enumerate(PROMPTS[:2]):
        assert out.tokens[b].tolist() == plain_greedy(target, prompt, 10)


def test_draft_equal_to_target_accepts_everything():
    target = gpt(0)
    depth, n = 3, 12
    engine = Engine(target, target, verifier="rrs", num_drafts=2, depth=depth, device="cpu")
    out = engine.generate(PROMPTS, max_new_tokens=n, temperature=0.0)
    assert out.stats.block_efficiency == depth + 1
    assert out.stats.acceptance_by_depth == [1.0] * depth
    assert out.stats.target_passes == n // (depth + 1)
    assert out.stats.draft_passes == depth * out.stats.target_passes
    assert out.stats.new_tokens == n * len(PROMPTS)
    # Sampling with p == q: every draft accepted too (rrs accepts x with min(1, p/q) = 1).
    out = engine.generate(PROMPTS, max_new_tokens=n, temperature=1.0, top_k=10, seed=3)
    assert out.stats.acceptance_by_depth == [1.0] * depth


def test_same_seed_same_output_and_seeds_matter():
    target, draft = gpt(0), gpt(5)
    engine = Engine(target, draft, verifier="rrs", num_drafts=3, depth=2, device="cpu")
    a = engine.generate(PROMPTS, max_new_tokens=10, temperature=1.0, top_p=0.95, seed=42)
    b = engine.generate(PROMPTS, max_new_tokens=10, temperature=1.0, top_p=0.95, seed=42)
    c = engine.generate(PROMPTS, max_new_tokens=10, temperature=1.0, top_p=0.95, seed=43)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)


def test_batch_equals_each_request_alone_greedy():
    target = gpt(0)
    draft = noisy_copy(target, 0.15, seed=1)
    engine = Engine(target, draft, verifier="rrs", num_drafts=2, depth=3, device="cpu")
    batch = engine.generate(PROMPTS, max_new_tokens=9, temperature=0.0)
    for b, prompt in enumerate(PROMPTS):
        alone = engine.generate([prompt], max_new_tokens=9, temperature=0.0)
        assert alone.tokens[0].tolist() == batch.tokens[b].tolist()


@pytest.mark.parametrize("verifier,shape", [("rrs", dict(num_drafts=2, depth=3)), ("rrs-wor", dict(num_drafts=2, depth=2)),
                                            ("importance", dict(num_drafts=2, depth=2)), ("spechub", dict(num_drafts=2, depth=1)),
                                            ("spechub", dict(widths=(2, 2)))])
def test_batch_equals_each_request_alone_sampling_with_per_request_seeds(verifier, shape):
    # seed=[...]: one generator per request, so a request's tokens do not depend on the batch.
    target = gpt(0)
    draft = noisy_copy(target, 0.15, seed=1)
    engine = Engine(target, draft, verifier=verifier, device="cpu", **shape)
    seeds = [11, 12, 13, 14]
    batch = engine.generate(PROMPTS, max_new_tokens=9, temperature=1.0, top_k=20, seed=seeds)
    for b, prompt in enumerate(PROMPTS):
        alone = engine.generate([prompt], max_new_tokens=9, temperature=1.0, top_k=20, seed=[seeds[b]])
        assert alone.tokens[0].tolist() == batch.tokens[b].tolist(), f"request {b}"
    # and the seeds matter
    other = engine.generate(PROMPTS, max_new_tokens=9, temperature=1.0, top_k=20, seed=[21, 22, 23, 24])
    assert not torch.equal(other.tokens, batch.tokens)


def test_per_request_seeds_must_match_the_batch():
    engine = Engine(gpt(0), gpt(5), verifier="rrs", num_drafts=2, depth=2, device="cpu")
    with pytest.raises(ValueError, match=r"seed as a list needs one int per request \(4\), got \[1, 2\]"):
        engine.generate(PROMPTS, max_new_tokens=2, seed=[1, 2])
    with pytest.raises(ValueError, match="seed must be None, an int or a list of ints"):
        engine.generate(PROMPTS, max_new_tokens=2, seed=1.5)


def test_batch_equals_alone_with_table_models_sampling_single_request_seeded():
    """With one request the seeded sampler is a pure function of (prompt, seed)."""
    target, draft = TableModel.random(5, 3, seed=0), TableModel.random(5, 3, seed=1)
    engine = Engine(target, draft, verifier="rrs", num_drafts=2, depth=2, device="cpu")
    outs = [engine.generate([[1, 2]], max_new_tokens=8, seed=s).tokens for s in range(3)]
    again = [engine.generate(torch.tensor([1, 2]), max_new_tokens=8, seed=s).tokens for s in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(outs, again))


def test_eos_stops_a_request_and_pads():
    target = gpt(0)
    engine = Engine(target, noisy_copy(target, 0.1, seed=1), verifier="rrs", num_drafts=2, depth=3, device="cpu")
    ref = plain_greedy(target, PROMPTS[0], 12)
    eos = ref[4]
    out = engine.generate(PROMPTS[:1], max_new_tokens=12, temperature=0.0, eos_token_id=eos)
    cut = ref.index(eos) + 1
    assert out.lengths.tolist() == [cut]
    assert out.tokens[0, :cut].tolist() == ref[:cut]
    assert (out.tokens[0, cut:] == -1).all()


def test_finished_requests_leave_the_batch():
    """A request stopped by eos leaves the batch: later target passes run on fewer rows, and the
    others still decode exactly as plain greedy."""
    target = gpt(0)
    spy = Recording(target)
    engine = Engine(spy, noisy_copy(target, 0.1, seed=1), verifier="rrs", num_drafts=2, depth=2, device="cpu")
    refs = [plain_greedy(target, prompt, 12) for prompt in PROMPTS]
    eos = refs[0][1]  # request 0 stops after two tokens
    out = engine.generate(PROMPTS, max_new_tokens=12, temperature=0.0, eos_token_id=eos)
    sizes = [shape[0] for shape in spy.shapes]
    assert sizes[0] == len(PROMPTS) and sizes == sorted(sizes, reverse=True) and sizes[-1] < len(PROMPTS)
    for b, ref in enumerate(refs):
        cut = ref.index(eos) + 1 if eos in ref else 12
        assert out.lengths[b] == cut and out.tokens[b, :cut].tolist() == ref[:cut], f"request {b}"


def test_a_branching_tree_runs_only_its_nodes():
    """Tree 2-2-2 has 8 paths, so 24 slots, of which 2 + 4 + 8 are nodes: the target pass sees
    the pending tokens and those 14, the draft the nodes of each depth, and the output is still
    exactly plain greedy's."""
    target = gpt(0)
    spy, draft = Recording(target), Recording(noisy_copy(target, 0.15, seed=1))
    engine = Engine(spy, draft, verifier="rrs", widths=(2, 2, 2), device="cpu")
    out = engine.generate(PROMPTS[:1], max_new_tokens=12, temperature=0.0)
    assert out.tokens[0].tolist() == plain_greedy(target, PROMPTS[0], 12)
    widths = [shape[1] for shape in spy.shapes]
    assert widths[0] == len(PROMPTS[0]) + 14 and all(w <= 2 + 14 for w in widths[1:])
    # The draft runs the pending tokens, then the 2 nodes of depth 1 and the 4 of depth 2.
    fed = [shape[1] for shape in draft.shapes]
    assert fed[1:3] == [2, 4] and fed[4:6] == [2, 4]


def test_zero_new_tokens_and_stats_fields():
    engine = Engine(gpt(0), gpt(1), device="cpu")
    out = engine.generate(PROMPTS, max_new_tokens=0)
    assert out.tokens.shape == (len(PROMPTS), 0) and out.stats.target_passes == 0
    out = engine.generate(PROMPTS, max_new_tokens=5, seed=0)
    s = out.stats
    assert out.tokens.shape == (len(PROMPTS), 5)
    assert s.rounds == s.target_passes > 0 and s.draft_passes == 3 * s.rounds
    assert 1 <= s.block_efficiency <= 4 and s.tokens_per_second > 0
    assert len(s.acceptance_by_depth) == 3


def test_verifier_instance_and_options():
    import multidraft as md
    engine = Engine(gpt(0), gpt(1), verifier=md.get_verifier("rrs", validate_args=False), num_drafts=2, depth=2, device="cpu")
    assert engine.generate(PROMPTS, max_new_tokens=4, seed=0).tokens.shape == (4, 4)
    assert "rrs" in repr(engine)


def test_greedy_roots_are_the_drafts_top_tokens():
    from multidraft.engine.engine import greedy_roots

    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0], [5.0, 0.5, 0.0, 1.0]])
    assert greedy_roots(logits, 2).tolist() == [[1, 2], [0, 3]]
    assert greedy_roots(logits, 6).tolist() == [[1, 2, 0, 3, 1, 1], [0, 3, 1, 2, 0, 0]]


def test_per_request_depth_counts_add_up():
    """stats.reached_by_request / accepted_by_request: summed over the requests they are the
    pooled per-depth counts, and each request's give its own block efficiency (every round
    reaches depth 1, and emits its accepted drafts plus one)."""
    target, draft = TableModel.random(8, 3, seed=1), TableModel.random(8, 3, seed=2)
    engine = Engine(target, draft, verifier="rrs", num_drafts=2, depth=3, device="cpu")
    stats = engine.generate([[1, 2], [3], [4, 5, 6]], max_new_tokens=12, seed=0).stats
    reached, accepted = torch.tensor(stats.reached_by_request), torch.tensor(stats.accepted_by_request)  # [B, D]
    assert reached.sum(0).tolist() == stats.reached_by_depth and accepted.sum(0).tolist() == stats.accepted_by_depth
    rounds = reached[:, 0].double()
    torch.testing.assert_close((accepted.sum(1) + rounds) / rounds, torch.tensor(stats.block_efficiency_per_request, dtype=torch.float64))
    assert bool((accepted <= reached).all()) and bool((reached[:, 1:] <= accepted[:, :-1]).all())
