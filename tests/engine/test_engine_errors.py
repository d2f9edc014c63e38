"""Bad input raises ValueError naming the value and the limit."""

from __future__ import annotations

import pytest
import torch

import multidraft as md
from multidraft.engine import GPT, GPTConfig, Engine, TableModel


@pytest.fixture(scope="module")
def engine():
    return Engine(TableModel.random(4, 2, seed=0), TableModel.random(4, 2, seed=1), device="cpu")


@pytest.mark.parametrize(
    "prompt,message",
    [
        ([[1, 2], []], "prompt 1 is empty"),
        ([], "prompt_ids is empty"),
        (torch.zeros(2, 0, dtype=torch.long), "prompts are empty \\(T = 0\\)"),
        ([[1, 4]], "prompt 0 token 1 has id 4, out of range for V = 4 \\(ids must be in 0..3\\)"),
        (torch.tensor([[0, -1]]), "prompt 0 token 1 has id -1, out of range for V = 4"),
        (torch.tensor([[0.5, 1.0]]), "prompt_ids must hold integer token ids, got dtype torch.float32"),
        (torch.zeros(1, 1, 2, dtype=torch.long), "prompt_ids must be \\[B, T\\] or \\[T\\], got shape \\(1, 1, 2\\)"),
        ([["a"]], "prompt_ids must be a LongTensor or a list of lists of ints"),
        ([[1.7, 2.2]], "prompt_ids must be a LongTensor or a list of lists of ints: 'float' object"),  # not truncated to [1, 2]
        ([[True, False]], "a bool \\(True\\) is not a token id"),
    ],
)
def test_bad_prompts(engine, prompt, message):
    with pytest.raises(ValueError, match=message):
        engine.generate(prompt, max_new_tokens=2)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"max_new_tokens": -1}, "max_new_tokens must be an int >= 0, got -1"),
        ({"max_new_tokens": 2.5}, "max_new_tokens must be an int >= 0, got 2.5"),
        ({"max_new_tokens": 2, "temperature": -0.1}, "temperature must be a finite number >= 0 \\(0 means greedy\\), got -0.1"),
        ({"max_new_tokens": 2, "top_k": 0}, "top_k must be None or an int >= 1, got 0"),
        ({"max_new_tokens": 2, "top_p": 0.0}, "top_p must be None or a number in \\(0, 1\\], got 0.0"),
        ({"max_new_tokens": 2, "top_p": 1.5}, "top_p must be None or a number in \\(0, 1\\], got 1.5"),
        ({"max_new_tokens": 2, "eos_token_id": 4}, "eos_token_id = 4 is out of range for V = 4"),
        ({"max_new_tokens": 2, "eos_token_id": 1.5}, "eos_token_id must be None or an int token id, got 1.5"),
        ({"max_new_tokens": 2, "eos_token_id": True}, "eos_token_id must be None or an int token id, got True"),
        ({"max_new_tokens": 2, "top_p": True}, "top_p must be None or a number in \\(0, 1\\], got True"),
        ({"max_new_tokens": 2, "temperature": 1e-320}, "temperature = 1e-320 is below the smallest normal torch.float64"),
        ({"max_new_tokens": 2, "seed": 2**64}, "seed 18446744073709551616 is out of range for a torch generator"),
        ({"max_new_tokens": 2, "seed": [0, -(2**63) - 1][1:]}, "seed -9223372036854775809 is out of range"),
    ],
)
def test_bad_generate_arguments(engine, kwargs, message):
    with pytest.raises(ValueError, match=message):
        engine.generate([[1, 2]], **kwargs)


def test_bad_engine_arguments():
    t4, t5 = TableModel.random(4, 2, seed=0), TableModel.random(5, 2, seed=0)
    with pytest.raises(ValueError, match="share a vocabulary, got V = 4 \\(target\\) and V = 5 \\(draft\\)"):
        Engine(t4, t5)
    with pytest.raises(ValueError, match="share a vocabulary, got V = 48 \\(target\\) and V = 4 \\(draft\\)"):
        Engine(GPT(GPTConfig(vocab_size=48, dim=32)), t4)
    with pytest.raises(ValueError, match="unknown verifier 'nope'"):
        Engine(t4, t4, verifier="nope")
    with pytest.raises(ValueError, match="verifier .single. takes 1..1 drafts per node, got num_drafts = 2"):
        Engine(t4, t4, verifier="single", num_drafts=2)
    with pytest.raises(ValueError, match="num_drafts must be an int in 1..4096, got 0"):
        Engine(t4, t4, num_drafts=0)
    with pytest.raises(ValueError, match="depth must be an int in 1..256, got 0"):
        Engine(t4, t4, depth=0)
    with pytest.raises(ValueError, match="depth must be an int in 1..256, got 1000000"):
        Engine(t4, t4, depth=10**6)  # had run without end, allocating caches of k * D slots
    with pytest.raises(ValueError, match="num_drafts must be an int in 1..4096, got 5000"):
        Engine(t4, t4, num_drafts=5000)
    with pytest.raises(ValueError, match="'spechub' drafts by its own non-i.i.d. scheme, which this engine supports only at depth = 1 \\(got depth = 2\\)"):
        Engine(t4, t4, verifier="spechub", num_drafts=2, depth=2)
    Engine(t4, t4, verifier="rrs-wor", num_drafts=3, depth=2)  # distinct drafts: one survivor per child
    Engine(t4, t4, verifier="spechub", widths=(2, 2))  # a branching tree: every node its own scheme
    with pytest.raises(ValueError, match="give either widths .* or num_drafts/depth"):
        Engine(t4, t4, widths=(2, 2), depth=2)
    with pytest.raises(ValueError, match="verifier 'spechub' takes 2..2 drafts per node, got widths\\[1\\] = 1"):
        Engine(t4, t4, verifier="spechub", widths=(2, 1))
    with pytest.raises(ValueError, match="widths is empty"):
        Engine(t4, t4, widths=())
    with pytest.raises(ValueError, match="widths\\[0\\] must be an int >= 1, got 0"):
        Engine(t4, t4, widths=(0, 2))
    with pytest.raises(ValueError, match="8192 root-to-leaf paths, above the limit 4096"):
        Engine(t4, t4, widths=(8, 8, 8, 16))
    with pytest.raises(ValueError, match="the target must have an int attribute vocab_size"):
        Engine(object(), t4)


def test_bad_table_and_config():
    with pytest.raises(ValueError, match="every dim equal"):
        TableModel(torch.full((4, 3), 1 / 3))
    with pytest.raises(ValueError, match="off by"):
        TableModel(torch.full((2, 2), 0.3))
    with pytest.raises(ValueError, match="GPTConfig.dim = 30 must be divisible by n_head = 4"):
        GPTConfig(dim=30, n_head=4)


def test_a_distinct_scheme_that_needs_more_tokens_than_top_k_leaves():
    t4 = TableModel.random(4, 2, seed=0)
    engine = Engine(t4, TableModel.random(4, 2, seed=1), verifier="greedy", num_drafts=2, depth=1)
    with pytest.raises(ValueError, match="'greedy' needs >= 2 distinct drafts, but a row of q has only 1 tokens"):
        engine.generate([[1]], max_new_tokens=2, top_k=1, temperature=1.0, seed=0)


def test_a_named_verifier_runs_unchecked_unless_asked():
    target, draft = TableModel.random(4, 2, seed=0), TableModel.random(4, 2, seed=1)
    assert not Engine(target, draft, verifier="rrs", device="cpu").verifier.validate_args
    assert Engine(target, draft, verifier="rrs", device="cpu", validate_args=True).verifier.validate_args
    given = md.get_verifier("rrs", validate_args=True)
    assert Engine(target, draft, verifier=given, device="cpu").verifier is given  # an instance is used as given


def test_a_tiny_temperature_is_the_argmax_not_nan():
    """Dividing float32 logits by T = 1e-30 overflowed every logit to +-inf (a NaN softmax, and
    the sampler then returned the last token); the maximum is shifted to 0 first."""
    from multidraft.engine.sampling import SamplingConfig, logits_to_probs

    logits = torch.tensor([[2.0, 5.0, -3.0], [1.0, 1.0, 0.0]])
    probs = logits_to_probs(logits, SamplingConfig(temperature=1e-30))
    torch.testing.assert_close(probs, torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]]))
    with pytest.raises(ValueError, match="temperature = 1e-39 is below the smallest normal torch.float32"):
        logits_to_probs(logits, SamplingConfig(temperature=1e-39))


def test_a_shape_per_round_must_suit_the_verifier():
    t = TableModel.random(4, 2, seed=0)
    engine = Engine(t, t, verifier="spechub", num_drafts=2, depth=1, device="cpu")
    with pytest.raises(ValueError, match="verifier 'spechub' takes 2..2 drafts per node, got shape_for_batch\\(2\\)'s k = 1"):
        engine.decode([[1, 2]] * 2, 4, seed=0, shape_for_batch=lambda rows: (1, 1))


def test_a_shape_per_round_must_be_two_ints():
    t = TableModel.random(4, 2, seed=0)
    engine = Engine(t, t, verifier="rrs", num_drafts=2, depth=2, device="cpu")
    for bad in [(2, 1.0), (2, True), (2.0, 1)]:
        with pytest.raises(ValueError, match="must give two ints \\(k, D\\)"):
            engine.decode([[1, 2]], 4, seed=0, shape_for_batch=lambda rows, bad=bad: bad)


def test_options_with_a_verifier_instance_are_refused():
    """They reach a verifier only through its name; with an instance they were dropped silently."""
    t = TableModel.random(4, 2, seed=0)
    with pytest.raises(ValueError, match="options \\['fused'\\] go to a verifier named by its string"):
        Engine(t, t, verifier=md.get_verifier("optimal"), fused=False, device="cpu")
