"""Choosing the speculation shape (num_drafts k, depth D) by batch size, from measured costs.

Speculation trades target work for fewer target passes: a round costs one target forward over
``1 + k*D`` tokens per request plus D draft forwards, and emits ``E[tokens]`` per request. At
batch 1 a forward is memory-bound (its cost hardly grows with its token count), so deep trees
are nearly free; as the batch grows the target pass becomes compute-bound, its cost grows with
``B * (1 + k*D)``, and the best depth falls, down to no speculation at all.  This module
measures both models' forward times and picks the shape with the highest expected tokens/s:

    costs = measure_costs(target, draft, batch_sizes=[1, 16, 64], token_counts=[1, 2, 3, 5, 9, 13])
    acceptance = calibrate_acceptance(target, draft, "rrs", ks=[1, 2, 4], max_depth=6, prompts=...)
    choice = choose_shape(16, costs, acceptance)      # ShapeChoice(num_drafts, depth, ...)

The acceptance at depth d does not depend on the depth the tree continues to (the walk decides
depth d before it looks deeper), so one calibration run per k at ``max_depth`` gives the
per-depth acceptance for every D <= max_depth.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch

from .engine import Engine, model_forward

__all__ = ["ShapeChoice", "calibrate_acceptance", "choose_shape", "expected_block_efficiency", "forward_ms", "measure_costs"]


@dataclass(frozen=True)
class ShapeChoice:
    num_drafts: int  # k; 0 with depth 0 means "no speculation": plain autoregressive decoding
    depth: int
    block_efficiency: float  # expected tokens per request per round
    round_ms: float  # expected cost of one round (all requests)
    tokens_per_second: float  # expected, summed over the batch


def expected_block_efficiency(acceptance) -> float:
    """E[tokens per round] = 1 + sum_d prod_{i <= d} a_i, where a_i is the probability of
    accepting at depth i given that depth i was reached (a NaN, a depth never reached, counts 0)."""
    total, reach = 1.0, 1.0
    for a in acceptance:
        a = 0.0 if a is None or math.isnan(a) else float(a)
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"acceptance rates must lie in [0, 1], got {a}")
        reach *= a
        total += reach
    return total


@torch.no_grad()
def forward_ms(model, batch: int, tokens: int, context: int = 64, repeats: int = 5, device="cpu") -> float:
    """Median ms of one forward of ``tokens`` new tokens per request over ``context`` cached ones."""
    cache = model.new_cache(batch, context + tokens, device)
    cache.lens[:] = context
    cache.max_committed = context
    ids = torch.zeros(batch, tokens, dtype=torch.long, device=device)
    pos = torch.arange(context, context + tokens, device=device).expand(batch, -1)
    rows = torch.ones(batch, tokens, tokens, dtype=torch.bool, device=device).tril()
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        cache.used = 0
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model_forward(model, cache, ids, pos, rows)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times[1:])


def measure_costs(target, draft, batch_sizes, token_counts, **kwargs) -> dict:
    """{"target": {(B, T): ms}, "draft": {(B, T): ms}} over the given batch sizes and token counts."""
    return {name: {(b, t): forward_ms(model, b, t, **kwargs) for b in batch_sizes for t in token_counts}
            for name, model in (("target", target), ("draft", draft))}


def calibrate_acceptance(target, draft, verifier, ks, max_depth: int, prompts, max_new_tokens: int = 48,
                         device=None, costs: dict | None = None, **generate_options):
    """{k: [acceptance at depth 1 .. max_depth]} from one engine run per k (see the module docstring).

    With ``costs`` (from ``measure_costs`` at this batch size) it returns (acceptance, overhead_ms):
    the engine's own per-round time beyond the model forwards, the smallest over the runs (timing
    noise only adds time), at least 0.
    """
    out, overhead = {}, float("inf")
    for k in ks:
        engine = Engine(target, draft, verifier=verifier, num_drafts=k, depth=max_depth, device=device)
        stats = engine.generate(prompts, max_new_tokens, **generate_options).stats
        out[k] = stats.acceptance_by_depth
        if costs is not None:
            batch = len(prompts)
            model_ms = (_cost(costs["target"], batch, 1 + k * max_depth) + _cost(costs["draft"], batch, 1)
                        + (max_depth - 1) * _cost(costs["draft"], batch, k))
            overhead = min(overhead, 1e3 * stats.seconds / stats.rounds - model_ms)
    return (out, max(overhead, 0.0)) if costs is not None else out


def _cost(table: dict, batch: int, tokens: int) -> float:
    """A measured cost, linearly interpolated in the token count (batch sizes must be measured)."""
    measured = sorted(t for (b, t) in table if b == batch)
    if not measured:
        raise ValueError(f"no cost measured at batch size {batch}; measured: {sorted({b for b, _ in table})}")
    if tokens in measured:
        return table[batch, tokens]
    lo = max((t for t in measured if t < tokens), default=None)
    hi = min((t for t in measured if t > tokens), default=None)
    if lo is None or hi is None:
        raise ValueError(f"{tokens} tokens per request lies outside the measured token counts {measured[0]}..{measured[-1]} at batch {batch}")
    w = (tokens - lo) / (hi - lo)
    return (1 - w) * table[batch, lo] + w * table[batch, hi]


def choose_shape(batch: int, costs: dict, acceptance: dict, max_depth: int | None = None, overhead_ms: float = 0.0) -> ShapeChoice:
    """The (k, D) with the highest expected tokens/s at this batch size, or (0, 0), plain decoding,
    when no shape beats it.  A round costs target(B, 1 + k*D) + draft(B, 1) + (D - 1) * draft(B, k)
    + overhead_ms (the engine's own per-round work: the walk, masks, commits)."""
    target, draft = costs["target"], costs["draft"]
    plain = _cost(target, batch, 1)
    best = ShapeChoice(0, 0, 1.0, plain, 1e3 * batch / plain)
    for k, rates in sorted(acceptance.items()):
        for depth in range(1, min(len(rates), max_depth or len(rates)) + 1):
            try:
                ms = _cost(target, batch, 1 + k * depth) + _cost(draft, batch, 1) + (depth - 1) * _cost(draft, batch, k) + overhead_ms
            except ValueError:
                continue  # a tree larger than anything measured: not a candidate
            eff = expected_block_efficiency(rates[:depth])
            rate = 1e3 * batch * eff / ms
            if rate > best.tokens_per_second:
                best = ShapeChoice(k, depth, eff, ms, rate)
    return best
