"""A preallocated key/value cache with per-request lengths and commit-by-gather.

Layout of one model's cache: keys and values are each ``[layers, B, heads, max_len, head_dim]``,
allocated once per ``generate`` call.  For request b the slots are

    [0, lens[b])                       committed: K/V of the accepted sequence, in order
    [lens[b], lens[b] + used)          written this round and not committed yet: the pending
                                       tokens, the draft-tree nodes, and padding

``used`` is shared by the batch (every request writes the same number of slots per forward,
padding included), while ``lens`` is ragged: requests accept different numbers of tokens.
A forward writes its T new tokens at ``lens[b] + used + t``; after verification ``commit``
gathers the accepted slots (any subset, in order) to ``lens[b], lens[b] + 1, ...`` and drops the
rest by leaving them beyond the new length, where the next round overwrites them.  Only the
accepted entries move; the cache is never copied or compacted as a whole.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Keys and values of one model for a batch of B requests.  See the module docstring."""

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        for name, value, low in [
            ("n_layers", n_layers, 1), ("batch_size", batch_size, 1), ("n_heads", n_heads, 1),
            ("max_len", max_len, 1), ("head_dim", head_dim, 1),
        ]:
            if value < low:
                raise ValueError(f"KVCache needs {name} >= {low}, got {value}")
        shape = (n_layers, batch_size, n_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, H, M, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, H, M, D]
        self.lens = torch.zeros(batch_size, dtype=torch.long, device=device)  # [B] committed
        self.max_committed = 0  # host copy of lens.max(): slicing needs a Python int
        self.used = 0  # slots written since the last commit, same for every request

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def span(self, num_new: int) -> int:
        """S: the number of slots a forward of ``num_new`` tokens attends over (cache + new)."""
        return self.max_committed + self.used + num_new

    def slots(self, num_new: int) -> Tensor:
        """Where the next forward's tokens go: [B, T] absolute slot indices."""
        if self.span(num_new) > self.max_len:
            raise ValueError(
                f"KV cache overflow: {self.max_committed} committed + {self.used} pending + "
                f"{num_new} new slots = {self.span(num_new)} > max_len = {self.max_len}"
            )
        offsets = torch.arange(num_new, device=self.lens.device) + self.used  # [T]
        return self.lens.unsqueeze(1) + offsets  # [B, T]

    def write(self, layer: int, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        """Store one layer's K/V for the new tokens and return that layer's K/V over all S slots.

        k_new, v_new: [B, H, T, D].  Returns views [B, H, S, D], S = ``span(T)``; slots a token
        may not see (other requests' lengths, stale rounds, padding) are hidden by the mask.
        """
        b, h, t, d = k_new.shape
        if (b, h, d) != (self.k.shape[1], self.k.shape[2], self.k.shape[4]):
            # a model whose K/V layout the cache was not sized for (heads, head size): scattering
            # would fill part of the cache and leave the rest zeros, silently
            raise ValueError(
                f"layer {layer} wrote K/V of shape {tuple(k_new.shape)} [B, heads, T, head_dim], but the cache holds "
                f"batch {self.k.shape[1]}, {self.k.shape[2]} heads of size {self.k.shape[4]}"
            )
        index = self.slots(t).view(b, 1, t, 1).expand(b, h, t, d)  # [B, H, T, D]
        self.k[layer].scatter_(2, index, k_new.to(self.k.dtype))
        self.v[layer].scatter_(2, index, v_new.to(self.v.dtype))
        s = self.span(t)
        return self.k[layer, :, :, :s], self.v[layer, :, :, :s]

    def advance(self, num_new: int) -> None:
        """Record that a forward wrote ``num_new`` slots per request (called once per forward)."""
        self.used += num_new

    def keep_rows(self, index: Tensor) -> None:
        """Keep only the requests ``index`` [B'] (in that order), between rounds: finished requests
        leave the batch, and every later forward computes for the rest only."""
        if self.used:
            raise ValueError(f"keep_rows between rounds only: {self.used} slots of this round are not committed")
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)
        self.lens = self.lens[index]
        self.max_committed = int(self.lens.max()) if index.numel() else 0

    def commit(self, keep: Tensor, num_keep: Tensor) -> None:
        """Keep the round's slots ``keep[b, :num_keep[b]]`` (offsets from lens[b]) and drop the rest.

        keep: LongTensor [B, P], offsets in [0, used); entries past num_keep[b] are ignored
        (any valid offset).  num_keep: LongTensor [B].  Cost: O(layers * B * heads * P * head_dim).
        """
        bsz, width = keep.shape
        if width > self.used:
            raise ValueError(f"commit keeps up to {width} slots per request, but only {self.used} were written this round")
        if width > 0:
            if int(keep.min()) < 0 or int(keep.max()) >= self.used:
                raise ValueError(
                    f"commit offsets must lie in [0, {self.used}) (the slots written this round), "
                    f"got min {int(keep.min())} and max {int(keep.max())}"
                )
            layers, _, heads, _, dim = self.k.shape
            src = (self.lens.unsqueeze(1) + keep).view(1, bsz, 1, width, 1)  # [1, B, 1, P, 1]
            src = src.expand(layers, bsz, heads, width, dim)
            dst = self.lens.unsqueeze(1) + torch.arange(width, device=keep.device)  # [B, P]
            dst = dst.view(1, bsz, 1, width, 1).expand(layers, bsz, heads, width, dim)
            # Gather first, then scatter: a kept slot may be overwritten by an earlier one's move.
            # Destinations past num_keep[b] receive junk, but they lie beyond the new length.
            for cache in (self.k, self.v):
                cache.scatter_(3, dst, cache.gather(3, src))
        self.lens += num_keep
        self.max_committed = int(self.lens.max())
        self.used = 0
