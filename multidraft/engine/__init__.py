"""Token-tree speculative decoding engine: real models, any verifier by name, exact in distribution.

    from multidraft.engine import Engine
    out = Engine(target, draft, verifier="rrs", num_drafts=2, depth=3).generate(prompt_ids, max_new_tokens=16)

Pipeline and exactness argument: docs/engine.md.
"""

from .cache import KVCache
from .engine import Engine, GenerationOutput, GenerationStats, autoregressive_generate
from .gpt import GPT, GPTConfig, demo_pair, early_exit
from .hf import HFModel
from .models import CausalLM, TableModel
from .sampling import SamplingConfig, logits_to_probs
from .shape import AdaptiveEngine, ShapePolicy

__all__ = [
    "Engine",
    "AdaptiveEngine",
    "ShapePolicy",
    "GenerationOutput",
    "GenerationStats",
    "KVCache",
    "GPT",
    "GPTConfig",
    "early_exit",
    "demo_pair",
    "HFModel",
    "autoregressive_generate",
    "CausalLM",
    "TableModel",
    "SamplingConfig",
    "logits_to_probs",
]
