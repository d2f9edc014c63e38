"""The Hugging Face adapter: tiny Llama and GPT-2 models built from configs (no downloads).

References are the HF model's own plain forward (``model(input_ids).logits``, no custom mask,
no cache), so the adapter's masks, positions and cache are checked against HF itself."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from engine_helpers import check_tree_round
from multidraft.engine import Engine
from multidraft.engine.hf import HFModel

VOCAB = 64
# float64 models, but HF eager attention takes its softmax in float32: differences ~1e-8.
# A wrong mask, position or commit moves logits by ~1e-1.
TOL = dict(rtol=1e-6, atol=1e-6)


def llama(seed, impl="sdpa", **overrides):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**{
        "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "attn_implementation": impl, **overrides})
    return transformers.LlamaForCausalLM(cfg).double().eval()


def gpt2(seed, impl="eager"):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                  bos_token_id=0, eos_token_id=0, attn_implementation=impl)
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def noisy_copy(model, scale, seed):
    """A draft close to the target: acceptance is high but not perfect, so it is ragged."""
    torch.manual_seed(seed)
    draft = type(model)(model.config).double().eval()
    draft.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(scale * p.std().clamp(min=1e-3) * torch.randn_like(p))  # noise relative to each tensor
    return draft


@torch.no_grad()
def hf_logits(model, ids):
    return model(input_ids=ids).logits


@torch.no_grad()
def hf_greedy(model, prompt, n):
    """Plain target-only greedy decoding with the HF model's own forward, no cache."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(hf_logits(model, torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def falcon(seed, new_decoder_architecture):
    """Falcon's two K/V layouts: multi-query (falcon-7b: one K/V head, though num_kv_heads says
    4) and the new decoder architecture with num_kv_heads = 2.  The adapter sized the cache from
    num_key_value_heads, which Falcon does not have, so multi-query Falcon filled one head of
    four and its logits were silently wrong (a review: argmax off at 3 of 8 positions)."""
    torch.manual_seed(seed)
    cfg = transformers.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    multi_query=True, num_kv_heads=2, alibi=False, bos_token_id=0, eos_token_id=0,
                                    new_decoder_architecture=new_decoder_architecture, attn_implementation="eager")
    return transformers.FalconForCausalLM(cfg).double().eval()


MODELS = [
    pytest.param(lambda s: llama(s, "sdpa"), id="llama-sdpa"),
    pytest.param(lambda s: llama(s, "eager"), id="llama-eager"),
    pytest.param(lambda s: gpt2(s, "eager"), id="gpt2-eager"),
    pytest.param(lambda s: gpt2(s, "sdpa"), id="gpt2-sdpa"),
    pytest.param(lambda s: falcon(s, False), id="falcon-multi-query"),
    pytest.param(lambda s: falcon(s, True), id="falcon-new-architecture"),
]


@pytest.mark.parametrize("build", MODELS)
def test_tree_round_and_commit_match_hf_forward(build):
    """Ragged prefill, a tree whose true path is non-contiguous in the round's layout, a commit
    that gathers it into place, one more step (engine_helpers): every logit equals HF's plain
    forward."""
    hf = build(0)
    check_tree_round(HFModel(hf), lambda ids: hf_logits(hf, ids), VOCAB, TOL)


PROMPTS = [[3, 1, 4, 1, 5], [9], [2, 6, 5, 3, 5, 8, 9, 7]]


@pytest.mark.parametrize("build", [MODELS[0], MODELS[2]])
@pytest.mark.parametrize("verifier,shape", [("rrs", dict(num_drafts=2, depth=3)), ("single", dict(num_drafts=1, depth=2)),
                                            ("rrs-wor", dict(widths=(2, 2, 1)))])
def test_hf_greedy_equals_plain_hf_greedy(build, verifier, shape):
    target = build(0)
    draft = noisy_copy(target, 0.3, seed=1)
    engine = Engine(HFModel(target), HFModel(draft), verifier=verifier, device="cpu", **shape)
    n = 10
    out = engine.generate(PROMPTS, max_new_tokens=n, temperature=0.0, seed=0)
    for b, prompt in enumerate(PROMPTS):
        assert out.tokens[b].tolist() == hf_greedy(target, prompt, n), f"request {b}"
    # Ragged acceptance: some depth both accepts and rejects (with k = 2 greedy roots the first
    # depth may accept every time).
    assert any(0 < a < r for a, r in zip(out.stats.accepted_by_depth, out.stats.reached_by_depth))


def test_hf_sampling_is_seeded_and_mixed_pair():
    """An HF Llama target with an HF GPT-2 draft (shared vocabulary): seeds repeat and matter."""
    engine = Engine(HFModel(llama(0)), HFModel(gpt2(3)), verifier="rrs", num_drafts=3, depth=2, device="cpu")
    a = engine.generate(PROMPTS, max_new_tokens=8, temperature=1.0, top_p=0.95, seed=7)
    b = engine.generate(PROMPTS, max_new_tokens=8, temperature=1.0, top_p=0.95, seed=7)
    c = engine.generate(PROMPTS, max_new_tokens=8, temperature=1.0, top_p=0.95, seed=8)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    assert a.tokens.shape == (3, 8) and bool((a.tokens >= 0).all())


def test_hf_float32_greedy():
    target = llama(0).float()
    engine = Engine(HFModel(target), HFModel(noisy_copy(target, 0.05, seed=2).float()), verifier="rrs", num_drafts=2, depth=3, device="cpu")
    out = engine.generate(PROMPTS[:1], max_new_tokens=8, temperature=0.0)
    assert out.tokens[0].tolist() == hf_greedy(target, PROMPTS[0], 8)


def test_unsupported_architectures_are_named():
    with pytest.raises(ValueError, match=r"LlamaForCausalLM .*attn_implementation='flash_attention_2'"):
        model = llama(0)
        model.config._attn_implementation = "flash_attention_2"  # set after build: no flash-attn on CPU
        HFModel(model)
    bloom = transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match=r"BloomForCausalLM \(model_type 'bloom'\) cannot run in the engine: its forward takes no position_ids"):
        HFModel(bloom)
    window = HFModel(llama(0, sliding_window=16, layer_types=["sliding_attention"] * 2))
    with pytest.raises(ValueError, match="sliding window of 16 tokens.*max_len = 40"):
        window.new_cache(1, 40)
    assert window.new_cache(1, 16).max_len == 16
    # GPT-Neo says its window differently (local layers of window_size cache slots): the same
    # refusal, where it had run with wrong tree logits once sequences neared the window
    neo_config = transformers.GPTNeoConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2, window_size=4,
                                           attention_types=[[["global", "local"], 1]], max_position_embeddings=64)
    neo = HFModel(transformers.GPTNeoForCausalLM(neo_config).eval())
    with pytest.raises(ValueError, match="sliding window of 4 tokens"):
        neo.new_cache(1, 40)
    # multi-head latent attention (DeepSeek-V3): keys and values of different sizes, which had
    # failed later with a cache-shape message
    mla = transformers.DeepseekV3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=None,
                                        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                                        n_routed_experts=2, num_experts_per_tok=1, first_k_dense_replace=1)
    with pytest.raises(ValueError, match=r"multi-head latent attention \(kv_lora_rank = 16\)"):
        HFModel(transformers.DeepseekV3ForCausalLM(mla).eval())
    mla.v_head_dim = 16  # equal key and value sizes: still MLA, still refused (review)
    with pytest.raises(ValueError, match=r"multi-head latent attention"):
        HFModel(transformers.DeepseekV3ForCausalLM(mla).eval())
    # an all-global GPT-Neo still slices a causal buffer of max_position_embeddings slots
    neo_config = transformers.GPTNeoConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2,
                                           attention_types=[[["global", "global"], 1]], max_position_embeddings=40)
    neo = HFModel(transformers.GPTNeoForCausalLM(neo_config).eval())
    with pytest.raises(ValueError, match="up to max_position_embeddings = 40; .* max_len = 44"):
        neo.new_cache(1, 44)


OTHER = {  # more decoder-only architectures, built tiny from their configs
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"num_key_value_heads": 2}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),  # partial rotary, parallel residual
    "mistral": ("MistralConfig", "MistralForCausalLM", {"num_key_value_heads": 2}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"num_key_value_heads": 2, "pad_token_id": 0}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"num_key_value_heads": 2, "head_dim": 16}),
}


@pytest.mark.parametrize("name", sorted(OTHER))
def test_other_architectures_greedy_equals_plain_hf_greedy(name):
    config_cls, model_cls, extra = OTHER[name]
    torch.manual_seed(0)
    cfg = getattr(transformers, config_cls)(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, attn_implementation="sdpa", **extra)
    target = getattr(transformers, model_cls)(cfg).double().eval()
    engine = Engine(HFModel(target), HFModel(noisy_copy(target, 0.3, seed=1)), verifier="rrs", num_drafts=2, depth=3, device="cpu")
    out = engine.generate(PROMPTS, max_new_tokens=6, temperature=0.0)
    for b, prompt in enumerate(PROMPTS):
        assert out.tokens[b].tolist() == hf_greedy(target, prompt, 6), f"request {b}"


def test_learned_positions_past_their_table_are_refused_up_front():
    """GPT-2's position table has n_positions rows: past it the lookup failed with an index
    error (a device assert on CUDA); the engine now names both numbers before decoding."""
    from multidraft.engine import autoregressive_generate

    target = HFModel(gpt2(0))  # n_positions = 128
    engine = Engine(target, HFModel(gpt2(1)), verifier="rrs", num_drafts=2, depth=3, device="cpu")
    with pytest.raises(ValueError, match="the target model takes positions below 128 .max_positions., but this call needs 130"):
        engine.generate([[1, 2, 3]], 125)
    with pytest.raises(ValueError, match="takes positions below 128 .max_positions., but this call needs 129"):
        autoregressive_generate(target, [[1, 2, 3]], 127)
    assert autoregressive_generate(target, [[1, 2, 3]], 126).tokens.shape == (1, 126)  # positions 0..127
