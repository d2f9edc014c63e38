"""`multidraft generate`, the autoregressive baseline and the built-in early-exit pair."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import plain_greedy

from multidraft.cli import main
from multidraft.engine import (
    GPT,
    Engine,
    GPTConfig,
    autoregressive_generate,
    early_exit,
)
from multidraft.engine.gpt import demo_pair

PROMPTS = [[3, 1, 4, 1, 5], [9], [2, 6, 5, 3, 5, 8, 9, 7]]


def small_pair():
    torch.manual_seed(0)
    target = GPT(GPTConfig(vocab_size=48, n_layer=3, n_head=4, dim=32)).double().eval()
    return target, early_exit(target, 1)


def test_autoregressive_greedy_equals_plain_greedy_and_eos():
    target, _ = small_pair()
    out = autoregressive_generate(target, PROMPTS, 9, temperature=0.0, device="cpu")
    for b, prompt in enumerate(PROMPTS):
        assert out.tokens[b].tolist() == plain_greedy(target, prompt, 9)
    assert out.stats.target_passes == 9 and out.stats.block_efficiency == 1.0
    eos = out.tokens[0, 3].item()
    cut = out.tokens[0].tolist().index(eos) + 1
    stopped = autoregressive_generate(target, PROMPTS[:1], 9, temperature=0.0, eos_token_id=eos, device="cpu")
    assert stopped.lengths.tolist() == [cut] and (stopped.tokens[0, cut:] == -1).all()
    assert autoregressive_generate(target, PROMPTS, 0, device="cpu").tokens.shape == (3, 0)


def test_autoregressive_sampling_is_seeded():
    target, _ = small_pair()
    a, b, c = (autoregressive_generate(target, PROMPTS, 8, top_k=20, seed=s, device="cpu").tokens for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # per-request seeds, as Engine.generate takes them: a batch gives what each request gives alone
    batch = autoregressive_generate(target, PROMPTS, 8, top_k=20, seed=[5, 6, 7], device="cpu").tokens
    for i, s in enumerate([5, 6, 7]):
        alone = autoregressive_generate(target, PROMPTS[i : i + 1], 8, top_k=20, seed=[s], device="cpu").tokens
        assert torch.equal(batch[i : i + 1], alone)


def test_early_exit_shares_the_first_layers_and_head():
    target, draft = small_pair()
    assert draft.config.n_layer == 1 and draft.config.dim == target.config.dim
    torch.testing.assert_close(draft.output.weight, target.output.weight)
    torch.testing.assert_close(draft.layers[0].attention.wqkv.weight, target.layers[0].attention.wqkv.weight)
    assert draft.output.weight.data_ptr() != target.output.weight.data_ptr()  # a copy
    with pytest.raises(ValueError, match="early_exit needs 1 <= n_layer <= 3 \\(the model's layers\\), got 4"):
        early_exit(target, 4)
    # Correlated enough to accept: the speculative greedy run is exact and accepts drafts.
    out = Engine(target, draft, verifier="rrs", num_drafts=2, depth=3, device="cpu").generate(PROMPTS, 12, temperature=0.0)
    for b, prompt in enumerate(PROMPTS):
        assert out.tokens[b].tolist() == plain_greedy(target, prompt, 12)
    assert out.stats.block_efficiency > 1.2


def test_cli_generate_builtin_pair_greedy(capsys):
    assert main(["generate", "--pair", "demo", "--verifier", "single", "-k", "1", "-d", "2", "-n", "6", "-t", "0",
                 "--prompt", "5,6,7", "--device", "cpu", "--compare"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    target, _ = demo_pair(seed=0)
    assert lines[0].split() == [str(t) for t in plain_greedy(target.double(), [5, 6, 7], 6)]
    assert "verifier single" in out and "block efficiency" in out and "tokens/s" in out
    assert "target alone:" in out and "speedup" in out


def generate_prints_plain_greedy(capsys, *shape) -> str:
    """Run `generate` greedily on the shipped pair with these shape options; its first line must
    be plain greedy decoding's text.  Returns the whole output."""
    from multidraft.engine.pretrained import decode, encode, load_pair

    assert main(["generate", *shape, "-n", "12", "-t", "0", "--prompt-text", "import os\\n", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    target, _ = load_pair()
    expected = decode(autoregressive_generate(target, [encode("import os\n").tolist()], 12, temperature=0.0, device="cpu").tokens[0].tolist())
    assert out.splitlines()[0] == repr(expected)
    return out


def test_cli_generate_shipped_pair_prints_text(capsys):
    generate_prints_plain_greedy(capsys, "--verifier", "rrs-wor", "-k", "2", "-d", "3")


def test_cli_generate_branching_tree(capsys):
    out = generate_prints_plain_greedy(capsys, "--verifier", "spechub", "--widths", "2,2,2")
    assert "verifier spechub  widths=2,2,2" in out
    assert main(["generate", "--widths", "2,2", "--depth", "2", "-n", "2", "--device", "cpu"]) == 2
    assert "give either widths" in capsys.readouterr().err


def test_cli_generate_staged_with_the_shipped_bigram(capsys):
    out = generate_prints_plain_greedy(capsys, "--draft2", "bigram", "-k", "2", "-d", "4")
    assert "draft2 passes" in out


def test_cli_generate_unknown_verifier_gives_the_registry_error(capsys):
    assert main(["generate", "--verifier", "nope", "-n", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "unknown verifier 'nope'; known verifiers:" in err and "rrs" in err


def test_cli_generate_target_without_draft_is_an_error(capsys):
    assert main(["generate", "--target", "somewhere", "--device", "cpu"]) == 2
    assert "give both --target and --draft" in capsys.readouterr().err


def test_cli_generate_local_hf_models(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "target")
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "draft")
    argv = ["generate", "--target", str(tmp_path / "target"), "--draft", str(tmp_path / "draft"),
            "-n", "5", "--batch", "2", "--prompt", "1,2", "--seed", "3", "--device", "cpu"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines()[:2] == first.splitlines()[:2]  # seeded: same tokens
    assert len(first.splitlines()[0].split()) == 5


def test_cli_generate_verifier_options_are_literals(capsys):
    argv = ["generate", "--verifier", "rrs", "--verifier-option", "validate_args=False", "-n", "3", "--device", "cpu"]
    assert main(argv) == 0
    assert main(["generate", "--verifier-option", "oops", "-n", "3", "--device", "cpu"]) == 2
    assert "--verifier-option takes KEY=VALUE, got 'oops'" in capsys.readouterr().err


def test_cli_generate_adaptive_chooses_a_shape(capsys):
    out = generate_prints_plain_greedy(capsys, "--adaptive")
    assert "verifier rrs  adaptive: " in out
    assert main(["generate", "--adaptive", "-k", "2", "-n", "2", "--device", "cpu"]) == 2
    assert "--adaptive chooses num_drafts and depth itself" in capsys.readouterr().err


def test_cli_generate_bad_prompts_and_threads_are_errors(capsys):
    """An explicitly empty prompt is the engine's error (it had been replaced by [1]), and so is
    a thread count below 1 (it had been a traceback)."""
    for args in (["--pair", "demo", "--prompt", ""], ["--prompt-text", ""], ["--threads", "-1"]):
        assert main(["generate", *args, "-n", "2", "--device", "cpu"]) == 2, args
        err = capsys.readouterr().err
        assert ("prompt 0 is empty" in err) or ("--threads must be >= 1, got -1" in err), (args, err)


def test_cli_prompt_text_is_utf8_with_escapes():
    from multidraft.cli import prompt_bytes

    assert list(prompt_bytes("é")) == [195, 169]  # had been encoded twice: [195, 131, 194, 169]
    assert prompt_bytes("def f():\\n\\treturn") == b"def f():\n\treturn"
    assert prompt_bytes("\\xff") == b"\xff"  # a raw byte


@pytest.mark.parametrize("args,message", [
    (["--model-seed", "5"], "--model-seed initialises the untrained demo pair"),
    (["--pair", "demo", "--prompt-text", "hi"], "--prompt-text is for the shipped byte-level pair"),
    (["--prompt", "1,2", "--prompt-text", "hi"], "give --prompt (token ids) or --prompt-text, not both"),
    (["--batch", "0"], "--batch must be >= 1 (copies of the prompt decoded together), got 0"),
    (["--device", "foo"], "--device 'foo' is not a device torch knows"),
])
def test_cli_generate_refuses_options_it_would_ignore_or_crash_on(capsys, args, message):
    """Options that did nothing without a word (a model seed for a loaded pair, prompt text next
    to token ids) and values that ended in a traceback (review)."""
    assert main(["generate", *args, "-n", "2"]) == 2, args
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a build without CUDA")
def test_cli_generate_refuses_cuda_without_cuda(capsys):
    assert main(["generate", "--device", "cuda", "-n", "2"]) == 2
    assert "this torch build sees no CUDA device" in capsys.readouterr().err


def test_cli_compare_refuses_options_a_switch_drops(capsys):
    assert main(["compare", "--no-pair", "--context-length", "8"]) == 2
    assert "--no-pair leaves out the model pair and the engine, so --context-length would do nothing" in capsys.readouterr().err
    assert main(["compare", "--no-engine", "--tree-shapes", "2x2"]) == 2
    assert "--no-engine skips the engine section, so --tree-shapes would do nothing" in capsys.readouterr().err
