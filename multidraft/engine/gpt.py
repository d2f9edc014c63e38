"""A small GPT/Llama-style decoder that speaks the engine's model protocol (see models.py).

Llama layout: token embedding, n_layer blocks of (RMSNorm -> attention with RoPE -> residual,
RMSNorm -> SwiGLU MLP -> residual), a final RMSNorm and an untied output head.  Grouped-query
attention when n_kv_head < n_head.  Causal and tree attention are one code path: the engine's
boolean mask [B, T, S] says which cached or new slots each new token sees, and RoPE takes the
position ids it is given, so siblings in a draft tree share a position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cache import KVCache

__all__ = ["GPT", "GPTConfig", "demo_pair", "early_exit"]


@dataclass
class GPTConfig:
    vocab_size: int = 256
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int | None = None  # None: n_head (plain multi-head attention)
    dim: int = 64
    intermediate_size: int | None = None  # None: the Llama rule, about 8/3 * dim rounded up to 32
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.intermediate_size is None:
            hidden = int(8 * self.dim / 3)
            self.intermediate_size = (hidden + 31) // 32 * 32
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "dim", "intermediate_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.n_head:
            raise ValueError(f"GPTConfig.dim = {self.dim} must be divisible by n_head = {self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"GPTConfig.n_head = {self.n_head} must be divisible by n_kv_head = {self.n_kv_head}")
        if (self.dim // self.n_head) % 2:
            raise ValueError(f"RoPE needs an even head_dim, got dim / n_head = {self.dim // self.n_head}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            # Normalize in float32: the mean of squares underflows in half precision.
            return F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype) * self.weight
        return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)  # one fused op: small forwards are op-bound


def rope_tables(pos: Tensor, head_dim: int, base: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(cos, sin_signed) [*pos.shape, head_dim] for the positions pos (rotate-half convention).

    Angles come from the positions directly (in float64), so any position works; the model
    computes them once per cache length and looks them up per forward (``GPT.rotary``).
    """
    half = head_dim // 2
    inv_freq = base ** (-torch.arange(half, device=pos.device, dtype=torch.float64) / half)  # [D/2]
    angle = pos.unsqueeze(-1).double() * inv_freq  # [..., D/2]
    cos, sin = angle.cos(), angle.sin()
    return torch.cat([cos, cos], dim=-1).to(dtype), torch.cat([-sin, sin], dim=-1).to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """Rotate x [B, H, T, D]: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([x[..., half:], x[..., :half]], dim=-1) * sin_signed


class Attention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        # q, k and v stacked in one projection: at decoding sizes a forward is bound by the
        # number of ops, so one matmul (and one rotation for q and k) beats three
        self.wqkv = nn.Linear(config.dim, (config.n_head + 2 * config.n_kv_head) * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_head * config.head_dim, config.dim, bias=False)
        self.register_load_state_dict_pre_hook(_stack_weights("wqkv", "wq", "wk", "wv"))

    def forward(self, x: Tensor, rotary: tuple[Tensor, Tensor], mask: Tensor, cache: KVCache) -> Tensor:
        b, t, _ = x.shape
        heads = self.n_head + self.n_kv_head
        qkv = self.wqkv(x).view(b, t, heads + self.n_kv_head, self.head_dim).transpose(1, 2)  # [B, H + 2 Hkv, T, D]
        q, k = apply_rope(qkv[:, :heads], *rotary).split([self.n_head, self.n_kv_head], dim=1)  # [B, H | Hkv, T, D]
        k, v = cache.write(self.layer, k, qkv[:, heads:])  # [B, Hkv, S, D]: cached slots and the new ones
        if self.n_kv_head != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)  # [B, H, S, D]
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1))  # [B, H, T, D]
        return self.wo(y.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.w13 = nn.Linear(config.dim, 2 * config.intermediate_size, bias=False)  # gate (w1) and up (w3) stacked
        self.w2 = nn.Linear(config.intermediate_size, config.dim, bias=False)
        self.register_load_state_dict_pre_hook(_stack_weights("w13", "w1", "w3"))

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


def _stack_weights(stacked: str, *parts: str):
    """A load_state_dict pre-hook that reads checkpoints with separate projections (``parts``,
    e.g. wq, wk, wv: the layout train.py wrote before they were stacked) into ``stacked``."""

    def hook(module, state_dict, prefix, *args):
        names = [f"{prefix}{part}.weight" for part in parts]
        if all(name in state_dict for name in names):
            state_dict[f"{prefix}{stacked}.weight"] = torch.cat([state_dict.pop(name) for name in names], dim=0)

    return hook


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config, layer)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: Tensor, rotary: tuple[Tensor, Tensor], mask: Tensor, cache: KVCache) -> Tensor:
        x = x + self.attention(self.attention_norm(x), rotary, mask, cache)
        return x + self.feed_forward(self.ffn_norm(x))


class GPT(nn.Module):
    """Decoder-only transformer; ``GPT(config)(ids, pos, mask, cache) -> logits [B, T, V]``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.vocab_size = config.vocab_size
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self._rotary_table: tuple[Tensor, Tensor] | None = None  # (cos, sin_signed) [positions, head_dim]
        self._init_weights()

    def _init_weights(self) -> None:
        # Unit-variance activations: 1/sqrt(fan_in) for every projection, residual outputs
        # damped by 1/sqrt(2 n_layer), and an output head scaled so that a random model's
        # next-token rows are peaked and varied rather than nearly uniform (useful in tests).
        for name, p in self.named_parameters():
            if name.endswith("tok_embeddings.weight"):
                nn.init.normal_(p, std=1.0)
            elif p.dim() == 2:
                std = p.shape[1] ** -0.5
                if name.endswith(("wo.weight", "w2.weight")):
                    std /= (2 * self.config.n_layer) ** 0.5
                if name == "output.weight":
                    std *= 2.0
                nn.init.normal_(p, std=std)

    def new_cache(self, batch_size: int, max_len: int, device: torch.device | str = "cpu") -> KVCache:
        c = self.config
        dtype = self.output.weight.dtype
        return KVCache(c.n_layer, batch_size, c.n_kv_head, max_len, c.head_dim, dtype=dtype, device=device)

    def rotary(self, pos: Tensor, dtype: torch.dtype, max_len: int) -> tuple[Tensor, Tensor]:
        """(cos, sin_signed) [B, 1, T, head_dim] for positions pos [B, T] below ``max_len``,
        looked up in tables built once per cache length (a lookup is two ops, the angles ~12)."""
        table = self._rotary_table
        if table is None or table[0].shape[0] < max_len or table[0].dtype != dtype or table[0].device != pos.device:
            every = torch.arange(max_len, device=pos.device)
            table = self._rotary_table = rope_tables(every, self.config.head_dim, self.config.rope_base, dtype)
        return table[0][pos].unsqueeze(1), table[1][pos].unsqueeze(1)

    def forward(self, ids: Tensor, pos: Tensor, mask: Tensor, cache: KVCache) -> Tensor:
        x = self.tok_embeddings(ids)  # [B, T, dim]
        # a token's position never exceeds its slot, so the cache length bounds the positions
        rotary = self.rotary(pos, x.dtype, cache.max_len)
        for block in self.layers:
            x = block(x, rotary, mask, cache)
        return self.output(self.norm(x))  # [B, T, V]


def early_exit(model: GPT, n_layer: int) -> GPT:
    """A draft made of ``model``'s first ``n_layer`` blocks, its final norm and its output head
    (copies, not shared).  Its logits read the target's residual stream early, so its next-token
    law is correlated with the target's: a cheap, honest stand-in for a trained draft when the
    target itself is untrained (with random weights an independent draft accepts ~nothing)."""
    if not 1 <= n_layer <= model.config.n_layer:
        raise ValueError(f"early_exit needs 1 <= n_layer <= {model.config.n_layer} (the model's layers), got {n_layer}")
    config = GPTConfig(**{**model.config.__dict__, "n_layer": n_layer})
    draft = GPT(config).to(next(model.parameters()).dtype)
    state = {name: p for name, p in model.state_dict().items()
             if not name.startswith("layers.") or int(name.split(".")[1]) < n_layer}
    draft.load_state_dict(state)
    return draft.eval()


def demo_pair(seed: int = 0, vocab_size: int = 256, n_layer: int = 8, dim: int = 256, n_head: int = 8,
              draft_layers: int = 1) -> tuple[GPT, GPT]:
    """The built-in (target, draft) pair: a randomly initialised GPT (fixed seed) and its
    ``draft_layers``-block early exit (see ``early_exit``).  Untrained: the tokens mean nothing,
    but the speculation mechanics, costs and a non-trivial acceptance are real."""
    torch.manual_seed(seed)
    target = GPT(GPTConfig(vocab_size=vocab_size, n_layer=n_layer, dim=dim, n_head=n_head)).eval()
    return target, early_exit(target, draft_layers)
