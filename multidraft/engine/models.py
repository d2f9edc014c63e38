"""The model protocol the engine drives, and ``TableModel``, an exact n-gram model for tests.

One forward call scores a block of T new tokens per request against everything the model has
cached for that request:

    logits = model(ids, pos, mask, cache)
        ids    LongTensor [B, T]   the new tokens (pending prompt/accepted tokens, tree nodes, padding)
        pos    LongTensor [B, T]   their position ids: index in the sequence, so a tree node at
                                   depth d sits at (sequence length + d - 1); padding uses 0
        mask   BoolTensor [B, T, S] True where new token t may attend to slot s, S = cache.span(T):
                                   slots [0, S) are the cache's slots, new tokens included
        cache  KVCache              the model writes its K/V for the T new tokens via cache.write
        logits Tensor     [B, T, V] next-token logits after each new token

The model does not advance the cache or decide what is kept: the engine calls
``cache.advance(T)`` after the forward and ``cache.commit`` after verification.
``model.new_cache(batch_size, max_len, device)`` allocates the cache in the model's layout.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .cache import KVCache

__all__ = ["CausalLM", "TableModel"]


@runtime_checkable
class CausalLM(Protocol):
    """What the engine needs from a target or draft model.  See the module docstring."""

    vocab_size: int

    def new_cache(self, batch_size: int, max_len: int, device: torch.device | str) -> KVCache: ...

    def __call__(self, ids: Tensor, pos: Tensor, mask: Tensor, cache: KVCache) -> Tensor: ...


class TableModel(nn.Module):
    """An n-gram model given by an explicit table: the last n-1 tokens -> a probability row.

    ``probs`` has shape [V] * n: ``probs[c_1, ..., c_{n-1}]`` is the next-token distribution
    after the context c_1 ... c_{n-1} (c_{n-1} the most recent token).  n = 1 is a unigram
    model.  Context before the start of the sequence reads as token 0.

    It keeps no hidden state, but it honours the protocol for real: it stores each token id
    (as the "key") and its position (as the "value") in its KVCache and recovers the context
    by looking through the attention mask for the visible slots at positions pos-1, ..., pos-n+2.
    A mistake in the engine's masks, positions or cache commits therefore changes its output,
    and ``strict`` turns an ill-formed mask (a position visible twice, or an ancestor missing)
    into an error.
    """

    def __init__(self, probs: Tensor, strict: bool = True):
        super().__init__()
        probs = torch.as_tensor(probs, dtype=torch.float64)
        if probs.dim() < 1:
            raise ValueError("TableModel needs probs of shape [V] * n with n >= 1, got a scalar")
        vocab = probs.shape[-1]
        if any(size != vocab for size in probs.shape):
            raise ValueError(f"TableModel needs probs of shape [V] * n (every dim equal), got {tuple(probs.shape)}")
        rows = probs.reshape(-1, vocab)  # [V^(n-1), V]
        if not bool(torch.isfinite(rows).all()) or bool((rows < 0).any()):
            raise ValueError("TableModel probabilities must be finite and >= 0")
        worst = float((rows.sum(-1) - 1).abs().max())
        if worst > 1e-9:
            raise ValueError(f"every TableModel row must sum to 1; the worst is off by {worst:.3g} > 1e-9")
        self.vocab_size = vocab
        self.order = probs.dim()  # n of the n-gram
        self.strict = strict
        self.register_buffer("probs", rows)  # [V^(n-1), V]
        # Powers that turn a context (oldest first) into a row index: lag j has weight V^j.
        self.register_buffer("lag_weight", vocab ** torch.arange(max(self.order - 1, 1), dtype=torch.long))

    @classmethod
    def random(cls, vocab_size: int, order: int, seed: int, concentration: float = 1.0,
               zero_prob: float = 0.0, strict: bool = True) -> "TableModel":
        """Dirichlet(concentration) rows; each entry is zeroed with probability ``zero_prob``
        (a row keeps at least its largest entry), to exercise distributions with holes."""
        g = torch.Generator().manual_seed(seed)
        shape = (vocab_size ** (order - 1), vocab_size)
        gamma = torch._standard_gamma(torch.full(shape, float(concentration), dtype=torch.float64), generator=g)
        if zero_prob > 0:
            holes = torch.rand(shape, generator=g, dtype=torch.float64) < zero_prob
            keep = gamma == gamma.max(dim=-1, keepdim=True).values
            gamma = torch.where(holes & ~keep, torch.zeros_like(gamma), gamma)
        rows = gamma / gamma.sum(-1, keepdim=True)
        return cls(rows.reshape((vocab_size,) * order), strict=strict)

    def next_probs(self, context: list[int]) -> Tensor:
        """The table's row [V] after ``context`` (a list of token ids; missing history reads as 0)."""
        n = self.order - 1
        ctx = ([0] * n + list(context))[-n:] if n else []
        index = sum(tok * self.vocab_size ** (n - 1 - j) for j, tok in enumerate(ctx))
        return self.probs[index]

    def new_cache(self, batch_size: int, max_len: int, device: torch.device | str = "cpu") -> KVCache:
        # One layer, one head, head_dim 1: key = token id, value = position (float64 is exact).
        return KVCache(1, batch_size, 1, max_len, 1, dtype=torch.float64, device=device)

    def forward(self, ids: Tensor, pos: Tensor, mask: Tensor, cache: KVCache) -> Tensor:
        b, t = ids.shape
        keys, values = cache.write(0, ids.double().view(b, 1, t, 1), pos.double().view(b, 1, t, 1))
        slot_token, slot_pos = keys[:, 0, :, 0], values[:, 0, :, 0]  # [B, S], [B, S]
        if mask.shape != (b, t, slot_token.shape[1]):
            raise ValueError(f"mask must have shape [B, T, S] = {(b, t, slot_token.shape[1])}, got {tuple(mask.shape)}")
        index = ids.clone()  # [B, T] lag 0: the token itself
        for lag in range(1, self.order - 1):
            want = pos - lag  # [B, T] the ancestor's position
            match = mask & (slot_pos.unsqueeze(1) == want.unsqueeze(2).double())  # [B, T, S]
            if self.strict:
                count = match.sum(-1)  # [B, T]
                bad = (count > 1) | ((count == 0) & (want >= 0))
                if bool(bad.any()):
                    i, j = bad.nonzero()[0].tolist()
                    raise ValueError(
                        f"TableModel: token {j} of request {i} (position {int(pos[i, j])}) sees "
                        f"{int(count[i, j])} slots at position {int(want[i, j])}; a well-formed mask shows exactly one"
                    )
            token = torch.where(match, slot_token.unsqueeze(1), torch.zeros_like(slot_token).unsqueeze(1)).sum(-1)
            index = index + token.round().long() * int(self.lag_weight[lag])
        if self.order == 1:
            index = torch.zeros_like(ids)
        rows = self.probs[index]  # [B, T, V]
        return torch.log(rows)  # -inf where the table has a zero: softmax gives it back exactly


def check_positions(models: dict, needed: int) -> None:
    """Raise unless every model that declares ``max_positions`` (a table of learned absolute
    positions, or the length its configuration names) has room for positions 0..needed - 1."""
    for name, model in models.items():
        limit = getattr(model, "max_positions", None)  # None for a model that declares none (or no model)
        if limit is not None and needed > limit:
            raise ValueError(f"the {name} model takes positions below {limit} (max_positions), but this call needs "
                             f"{needed}: prompt length + max_new_tokens (+ depth while speculating); shorten one")


def _check_vocab(name: str, model) -> int:
    vocab = getattr(model, "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 1:
        raise ValueError(f"the {name} must have an int attribute vocab_size >= 1, got {vocab!r}")
    if not callable(getattr(model, "new_cache", None)):
        raise ValueError(f"the {name} must have a new_cache(batch_size, max_len, device) method")
    return vocab

