"""Logits -> the probability rows the verifier sees: greedy, temperature, top-k, top-p.

The same transform is applied to the target's and the draft's logits.  Exactness is then with
respect to the *transformed* target: the engine emits tokens distributed as the target model
sampled with these settings, which is what plain (non-speculative) sampling would produce.
The draft's transform only affects speed; using the same one keeps q close to p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0  # 0: greedy (argmax)
    top_k: int | None = None  # keep the k largest logits (ties at the k-th value are all kept)
    top_p: float | None = None  # keep the smallest top set whose mass reaches top_p

    def __post_init__(self):
        t = self.temperature
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not (t >= 0) or t == float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {t!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {self.top_k!r}")
        if self.top_p is not None and (isinstance(self.top_p, bool) or not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1)):
            raise ValueError(f"top_p must be None or a number in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def probs_dtype(logits: Tensor) -> torch.dtype:
    """float64 for float64 logits, else float32: half precision is upcast, because the
    verifiers' sum checks and residual arithmetic need at least float32."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def logits_to_probs(logits: Tensor, config: SamplingConfig) -> Tensor:
    """Probability rows [..., V] from logits [..., V] under ``config``."""
    logits = logits.to(probs_dtype(logits))
    if config.greedy:
        # One-hot at the first maximum: any exact verifier then emits exactly the argmax.
        top = logits.argmax(dim=-1, keepdim=True)
        return torch.zeros_like(logits).scatter_(-1, top, 1.0)
    if 0 < config.temperature < torch.finfo(logits.dtype).tiny:
        raise ValueError(f"temperature = {config.temperature!r} is below the smallest normal {logits.dtype} "
                         f"({torch.finfo(logits.dtype).tiny:.3g}), where dividing by it is no longer exact; use 0 for greedy")
    if config.temperature != 1:
        # Shift the maximum to 0 first: a tiny temperature then sends the other logits to
        # -inf, not every logit to +-inf (which made the softmax NaN below T ~ 1e-38 in float32)
        logits = (logits - logits.amax(dim=-1, keepdim=True)) / config.temperature
    if config.top_k is not None and config.top_k < logits.shape[-1]:
        kth = torch.topk(logits, config.top_k, dim=-1).values[..., -1:]  # [..., 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if config.top_p is not None and config.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [..., V]
        # Drop a token once the tokens ranked above it already reach top_p; the top one stays.
        drop_sorted = mass_before >= config.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs
