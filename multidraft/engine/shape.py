"""Choosing the speculation shape (num_drafts k, depth D) by batch size, from measured costs.

Speculation trades target work for fewer target passes: a round costs one target forward over
``1 + k*D`` tokens per request plus D draft forwards, and emits ``E[tokens]`` per request. At
batch 1 a forward is memory-bound (its cost hardly grows with its token count), so deep trees
are nearly free; as the batch grows the target pass becomes compute-bound, its cost grows with
``B * (1 + k*D)``, and the best depth falls, down to no speculation at all.  This module
measures both models' forward times and picks the shape with the highest expected tokens/s:

    costs = measure_costs(target, draft, batch_sizes=[1, 16, 64], token_counts=[1, 2, 3, 5, 9, 13])
    acceptance = calibrate_acceptance(target, draft, "rrs", ks=[1, 2, 4], max_depth=6, prompts=many_prompts)
    overhead = measure_overhead(target, draft, "rrs", prompts=one_batch_of_16, costs=costs)
    choice = choose_shape(16, costs, acceptance, overhead_ms=overhead)   # ShapeChoice(num_drafts, depth, ...)

The acceptance at depth d does not depend on the depth the tree continues to (the walk decides
depth d before it looks deeper), so one calibration run per k at ``max_depth`` gives the
per-depth acceptance for every D <= max_depth.

Everything runs where ``Engine`` runs: ``device=None`` is ``engine.default_device()`` (CUDA when
present) for the timings as for the engine runs.
"""

from __future__ import annotations

import math
import numbers
import statistics
import time
from dataclasses import dataclass, field, replace

import torch

from ..verifiers import Verifier, get_verifier
from . import engine as _engine
from .engine import (Engine, autoregressive_generate, check_deep_tree_support, draft_limits, model_forward, prepare_prompts,
                     takes_drafts)

__all__ = ["AdaptiveEngine", "Overhead", "ShapeChoice", "ShapePolicy", "batch_efficiency_share", "calibrate_acceptance", "choose_shape",
           "expected_block_efficiency", "forward_ms", "measure_costs", "measure_overhead", "rank_shapes", "time_shapes"]


@dataclass(frozen=True)
class ShapeChoice:
    num_drafts: int  # k; 0 with depth 0 means "no speculation": plain autoregressive decoding
    depth: int
    block_efficiency: float  # expected tokens per request per round
    round_ms: float  # expected cost of one round (all requests)
    tokens_per_second: float  # expected, summed over the batch
    measured_tokens_per_second: float | None = None  # from a trial race (ShapePolicy), if one ran


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
def forward_ms(model, batch: int, tokens: int, context: int = 64, repeats: int = 5, device=None) -> float:
    """Median ms of one forward of ``tokens`` new tokens per request over ``context`` cached ones,
    on ``device`` (None: ``engine.default_device()``, where ``Engine`` runs; a torch module is
    moved there, as ``Engine`` moves it)."""
    device = torch.device(device if device is not None else _engine.default_device())
    if isinstance(model, torch.nn.Module):
        model.to(device).eval()
    cache = model.new_cache(batch, context + tokens, device)
    cache.lens[:] = context
    cache.max_committed = context
    ids = torch.zeros(batch, tokens, dtype=torch.long, device=device)
    pos = torch.arange(context, context + tokens, device=device).expand(batch, -1)
    rows = torch.ones(batch, tokens, tokens, dtype=torch.bool, device=device).tril()
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        cache.used = 0
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model_forward(model, cache, ids, pos, rows)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times[1:])


def measure_costs(target, draft, batch_sizes, token_counts, **kwargs) -> dict:
    """{"target": {(B, T): ms}, "draft": {(B, T): ms}} over the given batch sizes and token counts
    (``forward_ms``: ``device=None`` times them where ``Engine`` runs)."""
    return {name: {(b, t): forward_ms(model, b, t, **kwargs) for b in batch_sizes for t in token_counts}
            for name, model in (("target", target), ("draft", draft))}


def calibrate_acceptance(target, draft, verifier, ks, max_depth: int, prompts, max_new_tokens: int = 48,
                         device=None, per_request: bool = False, **generate_options):
    """{k: [acceptance at depth 1 .. max_depth]} from one engine run per k (see the module docstring).

    Acceptance does not depend on the batch size, only on the content, so calibrate on more
    prompts than one batch holds (a single prompt gives a very noisy estimate, greedy above all).
    With ``per_request`` it also returns {k: [[acceptance at depth 1 .. max_depth] of each
    request]} (NaN at a depth a request never reached), from the same run: the spread
    ``choose_shape`` needs to charge a batch for waiting on its slowest request, at each depth
    (``expected_block_efficiency`` of a request's first D rates is its block efficiency at
    depth D; at max_depth it is the run's ``block_efficiency_per_request``).
    """
    out, spread = {}, {}
    for k in ks:
        engine = Engine(target, draft, verifier=verifier, num_drafts=k, depth=max_depth, device=device)
        stats = engine.generate(prompts, max_new_tokens, **generate_options).stats
        out[k] = stats.acceptance_by_depth
        spread[k] = [[a / r if r else float("nan") for a, r in zip(acc, rea)]
                     for acc, rea in zip(stats.accepted_by_request, stats.reached_by_request)]
    return (out, spread) if per_request else out


def batch_efficiency_share(efficiencies, batch: int) -> float:
    """How much of a request's speculative gain a batch keeps: a batch decodes until its slowest
    request is done, so it runs E[max_b n / e_b] = n E[1 / min_b e_b] rounds for requests of block
    efficiency e_b.  With the e_b drawn from ``efficiencies`` (calibrated per request), returns
    (1 / E[1 / min] - 1) / (1 / E[1 / e] - 1) in [0, 1], relative to batch 1 (whose rate over
    many requests is already the harmonic mean, as the pooled acceptance gives it): 1 when every
    request is alike or batch = 1."""
    values = sorted(float(e) for e in efficiencies)
    m = len(values)
    if m == 0:
        return 1.0
    single = m / sum(1 / v for v in values)  # 1 / E[1 / e]
    if single <= 1:
        return 1.0
    # P(the minimum of `batch` draws with replacement is the i-th smallest value)
    inverse = sum((((m - i) / m) ** batch - ((m - i - 1) / m) ** batch) / v for i, v in enumerate(values))
    return min(max((1 / inverse - 1) / (single - 1), 0.0), 1.0)


@dataclass(frozen=True)
class Overhead:
    """The engine's own time per round beyond the model forwards: a fixed part (drafting the
    first level, scoring setup, commits) and a part per depth (each level's masks, draft sampling
    and verifier calls in the walk)."""

    per_round_ms: float
    per_depth_ms: float  # 0 where fitted at one depth (a verifier the engine runs at depth 1 only)
    plain_ms: float = 0.0  # the same for plain decoding: per step, beyond the target forward

    def __post_init__(self):
        for name in ("per_round_ms", "per_depth_ms", "plain_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
                raise ValueError(f"Overhead.{name} must be a finite number of ms >= 0, got {value!r}")

    def at(self, depth: int) -> float:
        return self.plain_ms if depth == 0 else self.per_round_ms + self.per_depth_ms * depth


def _verifier(verifier) -> Verifier:
    return verifier if isinstance(verifier, Verifier) else get_verifier(verifier)


def _takes_deep_trees(verifier: Verifier) -> bool:
    """Whether the engine runs this verifier's drafted sequences at depths > 1."""
    try:
        check_deep_tree_support(verifier, 2)
    except ValueError:
        return False
    return True


def measure_overhead(target, draft, verifier, prompts, costs: dict, k: int | None = None, depths=None, max_new_tokens: int = 48,
                     device=None, repeats: int = 2, **generate_options) -> Overhead:
    """Fit ``Overhead`` from engine runs with k drafts at two depths on ``prompts`` (one batch, at
    the batch size the costs were measured for): at each depth, seconds per round less the model
    forwards that ``choose_shape`` charges, the smallest over ``repeats`` runs (timing noise only
    adds time).  ``depths`` of one depth fit a per-round part only (per-depth part 0): what a
    verifier the engine runs at depth 1 only allows.  Defaults: k = 2, or the nearest draft
    count the verifier takes; depths (1, 4), or (1,) for a depth-1-only verifier."""
    v = _verifier(verifier)
    if k is None:
        k = max(2, v.min_drafts) if v.max_drafts is None else min(max(2, v.min_drafts), v.max_drafts)
    if depths is None:
        depths = (1, 4) if _takes_deep_trees(v) else (1,)
    depths = tuple(depths)
    if not (len(depths) == 1 or (len(depths) == 2 and depths[0] < depths[1])):
        raise ValueError(f"depths must be one depth or two increasing depths, got {depths!r}")
    batch = None
    totals = []
    for depth in depths:
        engine = Engine(target, draft, verifier=verifier, num_drafts=k, depth=depth, device=device)
        if batch is None:  # a LongTensor [T] is one request, as the engine reads it
            batch = prepare_prompts(prompts, engine.vocab_size, "cpu")[0].shape[0]
        engine.generate(prompts, 4, **generate_options)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            stats = engine.generate(prompts, max_new_tokens, **generate_options).stats
            best = min(best, 1e3 * stats.seconds / stats.rounds - _model_ms(costs, batch, k, depth))
        totals.append(best)
    per_depth = max((totals[1] - totals[0]) / (depths[1] - depths[0]), 0.0) if len(depths) == 2 else 0.0
    plain = float("inf")
    for _ in range(repeats):  # plain decoding pays its own sampling, masks and commits per step
        stats = autoregressive_generate(target, prompts, max_new_tokens, device=device, **generate_options).stats
        plain = min(plain, 1e3 * stats.seconds / stats.rounds - _cost(costs["target"], batch, 1))
    return Overhead(max(totals[0] - per_depth * depths[0], 0.0), per_depth, max(plain, 0.0))


def _model_ms(costs: dict, batch: int, k: int, depth: int) -> float:
    """The model forwards of one round: target(B, 1 + k*D) + draft(B, 1) + (D - 1) * draft(B, k)."""
    return _cost(costs["target"], batch, 1 + k * depth) + _cost(costs["draft"], batch, 1) + (depth - 1) * _cost(costs["draft"], batch, k)


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


def rank_shapes(batch: int, costs: dict, acceptance: dict, max_depth: int | None = None,
                overhead_ms: float | Overhead = 0.0, request_efficiency: dict | None = None) -> list[ShapeChoice]:
    """Every option at this batch size with its prediction, fastest first: each (k, D) with
    measured costs, and plain decoding as (0, 0).  A round costs target(B, 1 + k*D) + draft(B, 1)
    + (D - 1) * draft(B, k) plus the engine's own work: ``overhead_ms`` per round, or an
    ``Overhead`` with a part per depth (and one per step of plain decoding, charged to that
    option).  With ``request_efficiency`` ({k: [[acceptance by depth] of each request]}, from
    ``calibrate_acceptance(per_request=True)``) the speculative gain at depth D is scaled by
    ``batch_efficiency_share`` of the requests' block efficiencies at depth D: the batch waits
    for its slowest request, a loss that grows with the batch and with how much requests
    differ.  ``max_depth``: None for no limit, else an int >= 1."""
    if max_depth is not None and (isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 1):
        raise ValueError(f"max_depth must be None (no limit) or an int >= 1, got {max_depth!r}")
    for model in ("target", "draft"):
        for (b, t), ms in costs[model].items():
            if isinstance(ms, bool) or not isinstance(ms, numbers.Real) or not math.isfinite(ms) or ms < 0:
                raise ValueError(f"costs[{model!r}][{b}, {t}] is {ms!r}; costs must be finite numbers of ms >= 0")
    overhead = overhead_ms if isinstance(overhead_ms, Overhead) else Overhead(float(overhead_ms), 0.0)
    plain = _cost(costs["target"], batch, 1) + overhead.at(0)
    if plain <= 0:
        raise ValueError(f"a plain decoding step at batch {batch} costs {plain} ms (target forward plus overhead); "
                         f"it must cost > 0 ms")
    options = [ShapeChoice(0, 0, 1.0, plain, 1e3 * batch / plain)]
    for k, rates in sorted(acceptance.items()):
        depths = min(len(rates), max_depth or len(rates))
        per_request = (request_efficiency or {}).get(k)
        if per_request:
            for r in per_request:
                if isinstance(r, numbers.Real) or len(r) < depths:
                    raise ValueError(f"request_efficiency[{k}] must hold each request's acceptance at depths 1..{depths} "
                                     f"(calibrate_acceptance(per_request=True)), got {r!r}")
        for depth in range(1, depths + 1):
            try:
                ms = _model_ms(costs, batch, k, depth) + overhead.at(depth)
            except ValueError:
                continue  # a tree larger than anything measured: not a candidate
            if ms <= 0:
                raise ValueError(f"a round of (k={k}, D={depth}) at batch {batch} costs {ms} ms; it must cost > 0 ms")
            eff = expected_block_efficiency(rates[:depth])
            if per_request:
                share = batch_efficiency_share([expected_block_efficiency(r[:depth]) for r in per_request], batch)
                eff = 1 + (eff - 1) * share
            options.append(ShapeChoice(k, depth, eff, ms, 1e3 * batch * eff / ms))
    return sorted(options, key=lambda c: -c.tokens_per_second)  # stable: plain first among equals


def choose_shape(batch: int, costs: dict, acceptance: dict, max_depth: int | None = None,
                 overhead_ms: float | Overhead = 0.0, margin: float = 0.0, request_efficiency: dict | None = None) -> ShapeChoice:
    """The (k, D) with the highest expected tokens/s at this batch size (``rank_shapes``), or
    (0, 0), plain decoding, when no shape beats it by more than ``margin`` (a fraction:
    acceptance calibrated on other prompts and timed costs are estimates, and a shape that is
    predicted to win by a hair loses as often as it wins)."""
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    options = rank_shapes(batch, costs, acceptance, max_depth, overhead_ms, request_efficiency)
    plain = next(c for c in options if c.depth == 0)
    best = options[0]
    return best if best.tokens_per_second > plain.tokens_per_second * (1 + margin) else plain


def time_shapes(target, draft, verifier: str, batches, shapes, max_new_tokens: int = 48, repeats: int = 3,
                device=None, **generate_options) -> dict:
    """{(k, D): tokens/s} of decoding each batch of prompts in ``batches`` with each shape
    ((0, 0): plain decoding), a rate being total tokens over total seconds across the batches.
    The shapes are timed in turn ``repeats`` times, in alternating order, so that a drift of
    the machine's speed falls on all of them alike; each is warmed up first.  Each shape's rate
    is its best run: on a shared machine noise only ever slows a run down (a burst during one
    shape's slot had moved a median by a third), as ``measure_overhead`` takes its fastest."""
    def rate(shape, new_tokens):
        tokens = seconds = 0.0
        for prompts in batches:
            if shape[1] == 0:
                stats = autoregressive_generate(target, prompts, new_tokens, device=device, **generate_options).stats
            else:
                stats = engines[shape].generate(prompts, new_tokens, **generate_options).stats
            tokens, seconds = tokens + stats.new_tokens, seconds + stats.seconds
        return tokens / seconds

    shapes = list(dict.fromkeys(tuple(s) for s in shapes))
    engines = {s: Engine(target, draft, verifier=verifier, num_drafts=s[0], depth=s[1], device=device) for s in shapes if s[1]}
    for shape in shapes:
        rate(shape, 4)
    rates = {shape: [] for shape in shapes}
    for repeat in range(repeats):  # forward, then backward: a drift within a round favours no one
        for shape in shapes if repeat % 2 == 0 else shapes[::-1]:
            rates[shape].append(rate(shape, max_new_tokens))
    return {shape: max(r) for shape, r in rates.items()}


# ---- a policy measured once, an engine that follows it -----------------------------------------

@dataclass(frozen=True)
class ShapePolicy:
    """Everything ``choose_shape`` needs, measured once for a model pair, a verifier and a
    sampling setting, at a few batch sizes: ``ShapePolicy.calibrate(...)``, then
    ``AdaptiveEngine(target, draft, policy)`` decodes each batch with the shape chosen for its
    size (plain decoding where speculation is predicted to lose)."""

    verifier: str
    costs: dict  # measure_costs at every batch size of ``overhead``
    acceptance: dict  # {k: per-depth acceptance}: calibrate_acceptance
    request_efficiency: dict  # {k: [per-depth acceptance of each request]}: its per_request part ({}: none)
    overhead: dict  # {batch size: Overhead}
    margin: float = 0.05
    trials: dict = field(default_factory=dict)  # {batch size: {(k, D): measured tokens/s}}: time_shapes

    def __post_init__(self):
        if not 0.0 <= self.margin < 1.0:
            raise ValueError(f"margin must be in [0, 1), got {self.margin}")
        if not self.acceptance:
            raise ValueError("the acceptance table is empty: a policy needs {k: per-depth acceptance} for at least one k")
        for k, rates in self.acceptance.items():
            if isinstance(k, bool) or not isinstance(k, int) or k < 1 or len(rates) < 1:
                raise ValueError(f"acceptance maps draft counts k >= 1 to per-depth acceptance at depths 1.., "
                                 f"got k = {k!r} -> {rates!r}")
        if not self.overhead:
            raise ValueError("overhead is empty: a policy needs an Overhead at one batch size at least")
        for b, overhead in self.overhead.items():
            if isinstance(b, bool) or not isinstance(b, int) or b < 1 or not isinstance(overhead, Overhead):
                raise ValueError(f"overhead maps batch sizes >= 1 to an Overhead, got {b!r} -> {overhead!r}")
        for b, trial in self.trials.items():
            if b not in self.overhead:
                raise ValueError(f"a trial at batch size {b} needs an overhead measured there; measured: {sorted(self.overhead)}")
            if (0, 0) not in trial:
                raise ValueError(f"the trial at batch size {b} must time plain decoding, (0, 0), the bar a shape must clear; got {sorted(trial)}")
            for k, depth in trial:
                if depth and not (k in self.acceptance and 1 <= depth <= len(self.acceptance[k])):
                    raise ValueError(f"the trial at batch size {b} timed (k={k}, D={depth}), which the acceptance table "
                                     f"(k in {sorted(self.acceptance)}) does not cover")

    @property
    def batch_sizes(self) -> list[int]:
        return sorted(self.overhead)

    def choose(self, batch: int) -> ShapeChoice:
        """The shape for a batch of ``batch`` requests, at the nearest measured batch size
        (nearest in ratio, as costs scale with the batch: 12 is nearer 16 than 4): the fastest
        in that size's trial race if one ran (a shape must beat plain decoding by ``margin``
        there too), else ``choose_shape``.  The choice carries its prediction, and the
        measured rate where there is one."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be an int >= 1, got {batch!r}")
        nearest = min(self.batch_sizes, key=lambda b: abs(math.log(b / batch)))
        trial = self.trials.get(nearest)
        if not trial:
            return choose_shape(nearest, self.costs, self.acceptance, overhead_ms=self.overhead[nearest],
                                margin=self.margin, request_efficiency=self.request_efficiency)
        shape = max(trial, key=trial.get)
        if shape != (0, 0) and trial[shape] <= trial[0, 0] * (1 + self.margin):  # (0, 0): validated present
            shape = (0, 0)
        predicted = {(c.num_drafts, c.depth): c for c in rank_shapes(
            nearest, self.costs, self.acceptance, overhead_ms=self.overhead[nearest], request_efficiency=self.request_efficiency)}
        if shape not in predicted:  # raced, but outside the measured costs: no prediction to carry
            nan = float("nan")
            return ShapeChoice(shape[0], shape[1], nan, nan, nan, trial[shape])
        return replace(predicted[shape], measured_tokens_per_second=trial[shape])

    @classmethod
    def calibrate(cls, target, draft, verifier: str, prompts, batch_sizes=(1, 4, 16, 64), ks=(1, 2, 4), max_depth: int | None = None,
                  max_new_tokens: int = 48, margin: float = 0.05, device=None, trial_shapes: int = 3, trial_repeats: int = 3,
                  trial_requests: int = 8, **generate_options) -> ShapePolicy:
        """Measure forward costs and the engine's overhead at each batch size and the per-depth
        acceptance for each k (on all of ``prompts``: acceptance does not depend on the batch
        size, and more prompts give a steadier estimate).  Then, at each batch size b, race the
        ``trial_shapes`` shapes the model predicts fastest and plain decoding (``time_shapes``,
        ``trial_repeats`` rounds) on batches of b prompts, at least ``trial_requests`` requests
        in all where there are prompts enough, and keep the measured rates: on a
        machine whose speed drifts, a cost model fed one set of timings can be 10-25 % off,
        and the race checks its short list against the real thing (``trial_shapes=0``: trust
        the model alone).  ``generate_options`` (temperature, top_k, top_p, seed) must be the
        ones the policy will decode with: acceptance depends on them.  Needs at least
        max(batch_sizes) prompts; takes a few engine runs per k and per batch size.

        ``ks`` are kept where the verifier takes them (``min_drafts .. max_drafts``).
        ``max_depth`` None is 6, or 1 for a verifier the engine runs at depth 1 only (spechub,
        greedy: ``check_deep_tree_support``); at max_depth 1 the overhead has a per-round part
        only (per-depth part 0), else it is fitted at depths 1 and min(4, max_depth), with the k
        in ``ks`` nearest 2.  ``device`` None is ``engine.default_device()`` for every timing and
        engine run alike."""
        batch_sizes = sorted(set(batch_sizes))
        if not batch_sizes or batch_sizes[0] < 1:
            raise ValueError(f"batch_sizes must be ints >= 1, got {batch_sizes!r}")
        if len(prompts) < batch_sizes[-1]:
            raise ValueError(f"calibrating at batch size {batch_sizes[-1]} needs as many prompts, got {len(prompts)}")
        for name, value, low in [("trial_shapes", trial_shapes, 0), ("trial_repeats", trial_repeats, 1),
                                 ("trial_requests", trial_requests, 1)]:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        v = _verifier(verifier)
        ks = list(dict.fromkeys(ks))
        if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
            raise ValueError(f"ks must be draft counts, ints >= 1, got {ks!r}")
        usable = [k for k in ks if takes_drafts(v, k)]
        if not usable:
            raise ValueError(f"verifier {v.name!r} takes {draft_limits(v)} drafts per node; none of ks = {ks} is in that range")
        ks = usable
        deep = _takes_deep_trees(v)
        if max_depth is None:
            max_depth = 6 if deep else 1
        if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 1:
            raise ValueError(f"max_depth must be an int >= 1, got {max_depth!r}")
        if max_depth > 1 and not deep:
            raise ValueError(f"verifier {v.name!r} runs at depth 1 only (drafted sequences), got max_depth = {max_depth}; "
                             f"use max_depth=1 (or None)")
        device = device if device is not None else _engine.default_device()
        # every forward a round of these shapes makes: target 1 + k*D tokens, draft 1 and k
        tokens = sorted({1, *ks} | {1 + k * d for k in ks for d in range(1, max_depth + 1)})
        costs = measure_costs(target, draft, batch_sizes, tokens, device=device)
        acceptance, spread = calibrate_acceptance(target, draft, verifier, ks, max_depth, prompts, max_new_tokens,
                                                  device=device, per_request=True, **generate_options)
        overhead_k = min(ks, key=lambda k: (abs(k - 2), k))  # its trees were timed at every depth
        depths = (1, min(4, max_depth)) if max_depth > 1 else (1,)
        overhead = {b: measure_overhead(target, draft, verifier, prompts[:b], costs, k=overhead_k, depths=depths,
                                        max_new_tokens=max_new_tokens, device=device, **generate_options)
                    for b in batch_sizes}
        trials = {}
        if trial_shapes:
            for b in batch_sizes:
                ranked = rank_shapes(b, costs, acceptance, overhead_ms=overhead[b], request_efficiency=spread)
                shortlist = [(c.num_drafts, c.depth) for c in ranked if c.depth][:trial_shapes] + [(0, 0)]
                count = max(1, min(len(prompts) // b, -(-trial_requests // b)))  # whole batches of b
                batches = [prompts[i * b : (i + 1) * b] for i in range(count)]
                trials[b] = time_shapes(target, draft, verifier, batches, shortlist, max_new_tokens, trial_repeats,
                                        device=device, **generate_options)
        return cls(verifier, costs, acceptance, spread, overhead, margin, trials)


class AdaptiveEngine:
    """Speculative decoding whose shape follows the batch size: every round asks the policy for
    (k, D) at the number of requests still running, so a batch that shrinks as requests finish
    moves to the shape chosen for its new size -- plain decoding steps where the policy predicts
    that speculation loses (Su et al. 2023: the best speculation length falls as the batch
    grows).  One engine, sized for the largest shape the policy can choose, runs every round
    (``Engine.decode``).  ``last_choice`` is the shape chosen for the last call's first round;
    ``stats.rounds_by_shape`` counts the rounds of each shape."""

    def __init__(self, target, draft, policy: ShapePolicy, device=None):
        if not isinstance(policy, ShapePolicy):
            raise ValueError(f"policy must be a ShapePolicy (ShapePolicy.calibrate), got {type(policy).__name__}")
        self.target, self.draft, self.policy, self.device = target, draft, policy, device
        self.last_choice: ShapeChoice | None = None
        largest_k = max(policy.acceptance)
        deepest = max(len(per_depth) for per_depth in policy.acceptance.values())
        self._engine = Engine(target, draft, verifier=policy.verifier, num_drafts=largest_k, depth=deepest, device=device)
        self._shapes: dict[int, tuple[int, int]] = {}  # batch size -> (k, D): choose() once per size

    def __repr__(self) -> str:
        sizes = ", ".join(map(str, self.policy.batch_sizes))
        return f"AdaptiveEngine(verifier={self.policy.verifier!r}, calibrated at batch sizes {sizes})"

    def shape_for_batch(self, batch: int) -> tuple[int, int]:
        if batch not in self._shapes:
            choice = self.policy.choose(batch)
            self._shapes[batch] = (choice.num_drafts, choice.depth)
        return self._shapes[batch]

    def generate(self, prompt_ids, max_new_tokens: int, **options):
        # a LongTensor [T] is one request, as Engine.generate reads it
        one = isinstance(prompt_ids, torch.Tensor) and prompt_ids.dim() == 1
        self.last_choice = self.policy.choose(1 if one else len(prompt_ids))
        return self._engine.decode(prompt_ids, max_new_tokens, **options, shape_for_batch=self.shape_for_batch)
