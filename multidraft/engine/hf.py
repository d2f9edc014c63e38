"""A Hugging Face ``transformers`` causal LM behind the engine's model protocol (see models.py).

    from transformers import AutoModelForCausalLM
    target = HFModel(AutoModelForCausalLM.from_pretrained("path/to/model"))
    Engine(target, HFModel(draft_hf), verifier="rrs").generate(...)

The adapter calls the HF model's own forward with

- ``position_ids`` = the engine's position ids (siblings in a draft tree share one),
- ``attention_mask`` = the engine's [B, T, S] mask as a 4-D *additive* float mask
  [B, 1, T, S] (0 where visible, the dtype's minimum elsewhere).  HF passes a 4-D mask through
  untouched; additive rather than boolean because the eager attention adds the mask to the
  scores, while sdpa accepts either,
- ``past_key_values`` (``cache`` from transformers 5.24) = ``EngineCache``, a ``transformers.Cache`` whose ``update`` writes the new
  keys/values through the engine's ``KVCache.write`` and returns the layer's K/V over all S slots.

So the engine's KVCache is the only store: ``commit`` gathers the kept slots into place exactly
as for the built-in GPT, and the HF model never decides what is kept.

Not every architecture can take that: the check in ``HFModel.__init__`` refuses models whose
forward lacks ``position_ids`` / ``past_key_values``, attention backends that ignore a 4-D mask
(flash attention), linear-attention / recurrent layers, ALiBi models (their bias comes from a 2-D
padding mask, not from positions), and a sliding window shorter than the cache (a custom mask
bypasses HF's window).
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import Tensor, nn

from .cache import KVCache

__all__ = ["HFModel"]  # EngineCache: see __getattr__ below (imports transformers lazily)

# Attention backends that add (or apply) a 4-D mask as given.  flash_attention_* take only a
# 2-D padding mask and would silently ignore the tree structure.
_MASK_BACKENDS = ("eager", "sdpa")
# Position information from a 2-D padding mask (ALiBi) or no positions at all: a tree cannot be expressed.
_UNSUPPORTED_TYPES = {"bloom": "ALiBi biases", "mpt": "ALiBi biases", "falcon": "ALiBi biases (alibi=True)"}


@functools.cache
def _cache_class():
    from transformers.cache_utils import Cache

    class EngineCache(Cache):
        """A ``transformers.Cache`` that stores into the engine's ``KVCache``; one per forward."""

        def __init__(self, kv: KVCache):
            super().__init__(layers=[])
            self.kv = kv

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            # key_states [B, Hkv, T, D] -> the layer's keys/values [B, Hkv, S, D] (cache + new).
            return self.kv.write(layer_idx, key_states, value_states)

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return self.kv.max_committed + self.kv.used

        def __len__(self) -> int:
            return self.kv.k.shape[0]

    return EngineCache


def __getattr__(name):  # EngineCache imports transformers only when asked for
    if name == "EngineCache":
        return _cache_class()
    raise AttributeError(name)


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def cache_argument(model: nn.Module) -> str | None:
    """The name under which the model's forward takes a KV cache: ``past_key_values`` (until
    transformers 5.23), ``cache`` (from 5.24), or None."""
    params = inspect.signature(model.forward).parameters
    return next((name for name in ("past_key_values", "cache") if name in params), None)


def check_architecture(model: nn.Module) -> None:
    """Raise ValueError naming the architecture when it cannot take custom masks and positions."""
    config = _text_config(model.config)
    arch = f"{type(model).__name__} (model_type {getattr(config, 'model_type', '?')!r})"
    params = inspect.signature(model.forward).parameters
    missing = [p for p in ("attention_mask", "position_ids") if p not in params]
    if cache_argument(model) is None:
        missing.append("past_key_values (or cache)")
    if missing:
        raise ValueError(f"{arch} cannot run in the engine: its forward takes no {', '.join(missing)}")
    reason = _UNSUPPORTED_TYPES.get(getattr(config, "model_type", None))
    if reason and (config.model_type != "falcon" or getattr(config, "alibi", False)):
        raise ValueError(f"{arch} cannot run in the engine: {reason} come from a 2-D padding mask, not from position ids, so a token tree cannot be expressed")
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl not in _MASK_BACKENDS:
        raise ValueError(
            f"{arch} uses attn_implementation={impl!r}, which ignores a 4-D tree mask; load it with "
            f"attn_implementation in {_MASK_BACKENDS}"
        )
    layer_types = getattr(config, "layer_types", None) or []
    odd = sorted({t for t in layer_types if t not in ("full_attention", "sliding_attention")})
    if odd:
        raise ValueError(f"{arch} cannot run in the engine: layer types {odd} are neither full nor sliding-window "
                         f"attention (recurrent state, chunked attention, ...), which one per-token KV cache and a "
                         f"tree mask do not express")
    if getattr(config, "kv_lora_rank", None) is not None:
        raise ValueError(f"{arch} cannot run in the engine: multi-head latent attention (kv_lora_rank = {config.kv_lora_rank}) "
                         f"caches keys and values of their own sizes (qk_nope_head_dim + qk_rope_head_dim, v_head_dim), and "
                         f"the KV cache holds one head size")


def kv_heads(config) -> int:
    """Key/value heads per layer, as the layers hand them to the cache.  Most configs say
    ``num_key_value_heads``.  Falcon says ``multi_query`` (the falcon-7b layout: one K/V head,
    whatever ``num_kv_heads`` says) unless ``new_decoder_architecture``, whose layers hand over
    their K/V repeated to every attention head; GPT-BigCode says ``multi_query``.  A model that
    writes another layout gets KVCache.write's error rather than a partly filled cache."""
    n_heads = int(config.num_attention_heads)
    if getattr(config, "model_type", None) == "falcon" and getattr(config, "new_decoder_architecture", False):
        return n_heads
    if getattr(config, "multi_query", False):
        return 1
    return int(getattr(config, "num_key_value_heads", None) or n_heads)


class HFModel(nn.Module):
    """Wrap a ``transformers`` causal LM (``…ForCausalLM``) for the engine.  See the module docstring.

    The model is used as it is (its dtype, its attention backend, eager or sdpa); the engine
    moves it to its device and calls ``.eval()``.  ``vocab_size`` is ``config.vocab_size``, the
    logits' width.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        check_architecture(model)
        self.model = model
        self.cache_argument = cache_argument(model)  # the forward keyword for the KV cache
        config = _text_config(model.config)
        self.vocab_size = int(config.vocab_size)
        self.n_layers = int(config.num_hidden_layers)
        n_heads = int(config.num_attention_heads)
        self.n_kv_heads = kv_heads(config)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // n_heads)
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        sliding = window is not None and (layer_types is None or "sliding_attention" in layer_types)
        self.sliding_window = int(window) if sliding and getattr(config, "use_sliding_window", True) is not False else None
        # Cache slots the model indexes by slot, not by position: GPT-Neo slices a causal buffer
        # of max_position_embeddings slots in every layer, and its local layers keep the last
        # window_size slots.  A tree round uses more slots than positions, so the cache is capped.
        self.max_slots = None
        if getattr(config, "model_type", None) == "gpt_neo":
            self.max_slots = int(config.max_position_embeddings)
            if "local" in (getattr(config, "attention_layers", None) or []):
                self.sliding_window = int(config.window_size)
        # The positions the model is configured for: past a learned table (GPT-2's n_positions,
        # OPT's max_position_embeddings) the embedding lookup fails with an index error, so the
        # engine checks this up front (``models.check_positions``)
        limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        self.max_positions = int(limit) if limit else None

    @classmethod
    def from_pretrained(cls, path: str, attn_implementation: str = "sdpa") -> HFModel:
        """A local causal-LM directory (``AutoModelForCausalLM``), in eval mode, wrapped."""
        from transformers import AutoModelForCausalLM

        return cls(AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn_implementation).eval())

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def new_cache(self, batch_size: int, max_len: int, device: torch.device | str = "cpu") -> KVCache:
        if self.sliding_window is not None and max_len > self.sliding_window:
            raise ValueError(
                f"{type(self.model).__name__} has a sliding window of {self.sliding_window} tokens, which the engine's "
                f"4-D mask does not apply; sequences must fit in it, got a cache of max_len = {max_len}"
            )
        if self.max_slots is not None and max_len > self.max_slots:
            raise ValueError(
                f"{type(self.model).__name__} indexes its causal mask buffer by cache slot, up to max_position_embeddings = "
                f"{self.max_slots}; a round's tree needs more slots than positions, got a cache of max_len = {max_len}"
            )
        return KVCache(self.n_layers, batch_size, self.n_kv_heads, max_len, self.head_dim, dtype=self.dtype, device=device)

    def forward(self, ids: Tensor, pos: Tensor, mask: Tensor, cache: KVCache) -> Tensor:
        dtype = self.dtype
        # Additive mask [B, 1, T, S]: eager attention adds it to the scores, sdpa takes it as is.
        # Every row sees at least itself, so no row is all -inf.
        additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
        out = self.model(input_ids=ids, position_ids=pos, attention_mask=additive.unsqueeze(1),
                         use_cache=True, **{self.cache_argument: _cache_class()(cache)})
        return out.logits  # [B, T, V]
