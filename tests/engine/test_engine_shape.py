"""Choosing (num_drafts, depth) by batch size from measured costs and acceptance."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from multidraft.engine import (
    GPT,
    Engine,
    GPTConfig,
    autoregressive_generate,
    early_exit,
)
from multidraft.engine.shape import (
    AdaptiveEngine,
    Overhead,
    ShapePolicy,
    batch_efficiency_share,
    calibrate_acceptance,
    choose_shape,
    expected_block_efficiency,
    measure_costs,
    measure_overhead,
    rank_shapes,
    time_shapes,
)


def test_expected_block_efficiency():
    assert expected_block_efficiency([]) == 1.0
    assert expected_block_efficiency([1.0, 1.0, 1.0]) == 4.0
    assert expected_block_efficiency([0.5, 0.5]) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_block_efficiency([0.8, float("nan"), 1.0]) == pytest.approx(1.8)
    with pytest.raises(ValueError, match="acceptance rates must lie in \\[0, 1\\], got 1.5"):
        expected_block_efficiency([1.5])


def synthetic_costs(batches, tokens):
    """Memory-bound at small batch (a fixed 10 ms per target pass), compute-bound at large batch
    (0.05 ms per token); the draft is 10x cheaper."""
    target = {(b, t): max(10.0, 0.05 * b * t) for b in batches for t in tokens}
    return {"target": target, "draft": {key: ms / 10 for key, ms in target.items()}}


def test_depth_falls_as_the_batch_grows():
    batches, tokens = [1, 4, 16, 64, 256, 1024], list(range(1, 26))
    costs = synthetic_costs(batches, tokens)
    acceptance = {1: [0.8] * 6, 2: [0.9] * 6, 4: [0.95] * 6}
    choices = [choose_shape(b, costs, acceptance) for b in batches]
    depths = [c.depth for c in choices]
    assert depths == sorted(depths, reverse=True), depths
    assert choices[0].depth >= 4 and choices[-1].depth == 0 and choices[-1].num_drafts == 0  # plain decoding wins
    # The chosen shape's rate is what the formula says.
    c = choices[0]
    ms = costs["target"][1, 1 + c.num_drafts * c.depth] + costs["draft"][1, 1] + (c.depth - 1) * costs["draft"][1, c.num_drafts]
    assert c.round_ms == pytest.approx(ms)
    assert c.tokens_per_second == pytest.approx(1e3 * c.block_efficiency / ms)
    # At batch 1 the target pass costs the same for any tree: more drafts and depth only help.
    assert choices[0].num_drafts == 4
    with pytest.raises(ValueError, match="no cost measured at batch size 3"):
        choose_shape(3, costs, acceptance)


def test_measured_costs_and_calibrated_acceptance_on_a_real_pair():
    torch.manual_seed(0)
    target = GPT(GPTConfig(vocab_size=64, n_layer=4, dim=64, n_head=4)).eval()
    draft = early_exit(target, 1)
    costs = measure_costs(target, draft, batch_sizes=[1, 4], token_counts=[1, 2, 3, 5, 7], repeats=2)
    assert all(ms > 0 for table in costs.values() for ms in table.values())
    prompts = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    acceptance = calibrate_acceptance(target, draft, "rrs", ks=[1, 2], max_depth=3, prompts=prompts,
                                      max_new_tokens=24, seed=0, device="cpu")
    assert set(acceptance) == {1, 2} and all(len(a) == 3 for a in acceptance.values())
    choice = choose_shape(1, costs, acceptance)
    assert 0 <= choice.depth <= 3 and choice.tokens_per_second > 0
    if choice.depth:  # the chosen shape runs
        Engine(target, draft, verifier="rrs", num_drafts=choice.num_drafts, depth=choice.depth, device="cpu").generate(prompts, 4, seed=0)
    assert math.isfinite(choice.block_efficiency)


def test_overhead_has_a_part_per_depth():
    torch.manual_seed(0)
    target = GPT(GPTConfig(vocab_size=64, n_layer=2, dim=32, n_head=4)).eval()
    draft = early_exit(target, 1)
    costs = measure_costs(target, draft, batch_sizes=[2], token_counts=[1, 2, 5, 9], repeats=1)
    prompts = [[1, 2, 3], [4, 5]]
    overhead = measure_overhead(target, draft, "rrs", prompts, costs, k=2, depths=(1, 4), max_new_tokens=8, seed=0, device="cpu")
    assert overhead.per_round_ms >= 0 and overhead.per_depth_ms >= 0 and overhead.plain_ms >= 0
    assert overhead.at(0) == overhead.plain_ms
    assert overhead.at(3) == pytest.approx(overhead.per_round_ms + 3 * overhead.per_depth_ms)
    acceptance = calibrate_acceptance(target, draft, "rrs", ks=[2], max_depth=2, prompts=prompts, max_new_tokens=8, seed=0, device="cpu")
    assert choose_shape(2, costs, acceptance, overhead_ms=overhead).round_ms > 0
    with pytest.raises(ValueError, match="two increasing depths"):
        measure_overhead(target, draft, "rrs", prompts, costs, depths=(3, 1))


def test_a_per_depth_overhead_makes_shallower_trees_win():
    costs = synthetic_costs([1], list(range(1, 26)))
    acceptance = {1: [0.7] * 6}
    deep = choose_shape(1, costs, acceptance, overhead_ms=Overhead(1.0, 0.0))
    shallow = choose_shape(1, costs, acceptance, overhead_ms=Overhead(1.0, 4.0))
    assert shallow.depth < deep.depth
    # Plain decoding's own overhead counts against it: with a costly plain step, speculation wins.
    costs = synthetic_costs([256], list(range(1, 26)))
    assert choose_shape(256, costs, acceptance, overhead_ms=Overhead(1.0, 0.0)).depth == 0
    assert choose_shape(256, costs, acceptance, overhead_ms=Overhead(1.0, 0.0, plain_ms=50.0)).depth > 0


def test_a_margin_keeps_plain_decoding_unless_speculation_clearly_wins():
    costs = synthetic_costs([1], list(range(1, 26)))
    plain = costs["target"][1, 1]
    # One depth, acceptance tuned so that speculation is predicted 3% faster than plain decoding.
    ms = costs["target"][1, 3] + costs["draft"][1, 1]
    rate = 1.03 * 1e3 / plain
    acceptance = {2: [rate * ms / 1e3 - 1]}
    assert choose_shape(1, costs, acceptance).depth == 1
    kept = choose_shape(1, costs, acceptance, margin=0.05)
    assert kept.depth == 0 and kept.tokens_per_second == pytest.approx(1e3 / plain)
    with pytest.raises(ValueError, match="margin must be in \\[0, 1\\), got 1.5"):
        choose_shape(1, costs, acceptance, margin=1.5)


def test_a_batch_waits_for_its_slowest_request():
    assert batch_efficiency_share([3.0, 3.0, 3.0], 16) == pytest.approx(1.0)  # alike: nothing lost
    assert batch_efficiency_share([2.0, 4.0], 1) == pytest.approx(1.0)  # relative to batch 1
    # Two kinds of request, block efficiency 2 and 4.  One at a time they give 1 / E[1/e] = 8/3
    # tokens per round; a batch of 2 is slowed by any 2 in it: E[1/min] = 3/4 * 1/2 + 1/4 * 1/4
    # = 7/16, so 16/7 tokens per round, and the share of the gain kept is (16/7 - 1) / (8/3 - 1).
    assert batch_efficiency_share([2.0, 4.0], 2) == pytest.approx((16 / 7 - 1) / (8 / 3 - 1))
    # Large batches hold the slowest request almost surely.
    assert batch_efficiency_share([2.0, 4.0], 64) == pytest.approx((2 - 1) / (8 / 3 - 1), abs=1e-12)
    costs = synthetic_costs([1, 64], list(range(1, 26)))
    acceptance = {2: [0.9] * 4}
    alike = choose_shape(64, costs, acceptance, request_efficiency={2: [[0.9] * 4] * 8})
    ragged = choose_shape(64, costs, acceptance, request_efficiency={2: [[0.2, 0.0, 0.0, 0.0]] + [[0.9] * 4] * 3})
    assert ragged.tokens_per_second < alike.tokens_per_second
    with pytest.raises(ValueError, match=r"request_efficiency\[2\] must hold each request's acceptance at depths 1..4"):
        choose_shape(64, costs, acceptance, request_efficiency={2: [4.4] * 8})  # block efficiencies say nothing per depth


def test_calibration_can_return_per_request_efficiencies():
    torch.manual_seed(0)
    target = GPT(GPTConfig(vocab_size=64, n_layer=2, dim=32, n_head=4)).eval()
    draft = early_exit(target, 1)
    acceptance, spread = calibrate_acceptance(target, draft, "rrs", ks=[2], max_depth=2, prompts=[[1, 2], [3], [4, 5, 6]],
                                              max_new_tokens=6, seed=0, device="cpu", per_request=True)
    assert len(acceptance[2]) == 2 and len(spread[2]) == 3 and all(len(rates) == 2 for rates in spread[2])
    assert all(1 <= expected_block_efficiency(rates) <= 3 for rates in spread[2])


def _policy(costs, acceptance, batches):
    return ShapePolicy("rrs", costs, acceptance, {}, {b: Overhead(0.0, 0.0) for b in batches}, margin=0.0)


def test_a_policy_chooses_by_the_nearest_measured_batch_size():
    batches = [1, 16, 1024]
    costs = synthetic_costs(batches, list(range(1, 26)))
    acceptance = {1: [0.8] * 6, 2: [0.9] * 6, 4: [0.95] * 6}
    policy = _policy(costs, acceptance, batches)
    for batch, nearest in [(1, 1), (3, 1), (5, 16), (12, 16), (200, 1024), (5000, 1024)]:
        assert policy.choose(batch) == choose_shape(nearest, costs, acceptance, margin=0.0), batch
    assert policy.choose(1).depth > 0 and policy.choose(2000).depth == 0  # large batches decode plainly
    with pytest.raises(ValueError, match="batch must be an int >= 1, got 0"):
        policy.choose(0)


def test_the_adaptive_engine_follows_its_policy_and_stays_exact_in_greedy():
    torch.manual_seed(0)
    target = GPT(GPTConfig(vocab_size=64, n_layer=2, dim=32, n_head=4)).eval()
    draft = early_exit(target, 1)
    prompts = torch.randint(0, 64, (4, 6), generator=torch.Generator().manual_seed(1))
    # Costs that make speculation pay at batch 1 and lose at batch 4.
    costs = synthetic_costs([1, 4], list(range(1, 26)))
    costs["target"].update({(4, t): 10.0 * t for t in range(1, 26)})
    engine = AdaptiveEngine(target, draft, _policy(costs, {2: [0.9] * 3}, [1, 4]), device="cpu")
    plain = autoregressive_generate(target, prompts, 10, temperature=0.0, device="cpu").tokens
    one = engine.generate(prompts[:1], 10, temperature=0.0)
    assert (engine.last_choice.num_drafts, engine.last_choice.depth) == (2, 3)
    assert one.stats.draft_passes > 0 and torch.equal(one.tokens, plain[:1])
    flat = engine.generate(prompts[0], 10, temperature=0.0)  # a LongTensor [T] is one request, not T of them
    assert engine.last_choice.depth == 3 and torch.equal(flat.tokens, plain[:1])
    four = engine.generate(prompts, 10, temperature=0.0)
    assert engine.last_choice.depth == 0 and four.stats.draft_passes == 0 and torch.equal(four.tokens, plain)
    seeded = engine.generate(prompts, 6, seed=[1, 2, 3, 4])  # per-request seeds work either way
    assert seeded.tokens.shape == (4, 6) and engine.last_choice.depth == 0
    with pytest.raises(ValueError, match="policy must be a ShapePolicy"):
        AdaptiveEngine(target, draft, {"k": 2})


def test_a_policy_calibrates_on_a_real_pair():
    torch.manual_seed(0)
    target = GPT(GPTConfig(vocab_size=64, n_layer=2, dim=32, n_head=4)).eval()
    draft = early_exit(target, 1)
    prompts = torch.randint(0, 64, (4, 6), generator=torch.Generator().manual_seed(2))
    policy = ShapePolicy.calibrate(target, draft, "rrs", prompts, batch_sizes=[1, 4], ks=[1, 2], max_depth=3,
                                   max_new_tokens=8, seed=0, device="cpu")
    assert policy.batch_sizes == [1, 4] and set(policy.acceptance) == {1, 2}
    assert all((b, 1 + 2 * 3) in policy.costs["target"] for b in (1, 4))  # the largest tree was timed
    for b in (1, 4):  # the model's three best shapes and plain decoding were raced
        assert len(policy.trials[b]) == 4 and (0, 0) in policy.trials[b]
        choice = policy.choose(b)
        assert choice.measured_tokens_per_second == policy.trials[b][choice.num_drafts, choice.depth]
    out = AdaptiveEngine(target, draft, policy, device="cpu").generate(prompts[:2], 5, seed=0)
    assert out.tokens.shape == (2, 5)
    modelled = ShapePolicy.calibrate(target, draft, "rrs", prompts, batch_sizes=[1], ks=[2], max_depth=2,
                                     max_new_tokens=4, seed=0, device="cpu", trial_shapes=0)
    assert modelled.trials == {} and modelled.choose(1).measured_tokens_per_second is None
    with pytest.raises(ValueError, match="trial_repeats must be an int >= 1, got 0"):
        ShapePolicy.calibrate(target, draft, "rrs", prompts, batch_sizes=[1], trial_repeats=0)
    with pytest.raises(ValueError, match="needs as many prompts"):
        ShapePolicy.calibrate(target, draft, "rrs", prompts[:2], batch_sizes=[4])
    with pytest.raises(ValueError, match="max_depth must be an int >= 1, got 0"):
        ShapePolicy.calibrate(target, draft, "rrs", prompts, batch_sizes=[1], max_depth=0)


def test_a_trial_race_overrules_the_model_and_keeps_its_margin():
    batches = [1, 16]
    costs = synthetic_costs(batches, list(range(1, 26)))
    acceptance = {1: [0.8] * 6, 2: [0.9] * 6}
    modelled = _policy(costs, acceptance, batches)
    assert modelled.choose(1).depth > 0  # the model alone speculates at batch 1
    trials = {1: {(2, 3): 120.0, (1, 4): 150.0, (0, 0): 100.0}, 16: {(2, 2): 1030.0, (0, 0): 1000.0}}
    policy = ShapePolicy("rrs", costs, acceptance, {}, {b: Overhead(0.0, 0.0) for b in batches}, margin=0.05, trials=trials)
    one = policy.choose(1)  # the race's winner, with the model's prediction for it and the measured rate
    assert (one.num_drafts, one.depth, one.measured_tokens_per_second) == (1, 4, 150.0)
    predicted = {(c.num_drafts, c.depth): c for c in rank_shapes(1, costs, acceptance)}
    assert one.tokens_per_second == predicted[1, 4].tokens_per_second
    sixteen = policy.choose(12)  # 3 % over plain decoding is inside the 5 % margin: decode plainly
    assert (sixteen.num_drafts, sixteen.depth, sixteen.measured_tokens_per_second) == (0, 0, 1000.0)
    plain_wins = replace(policy, trials={1: {(2, 3): 90.0, (0, 0): 100.0}, 16: trials[16]})
    assert plain_wins.choose(1).depth == 0 and plain_wins.choose(1).measured_tokens_per_second == 100.0
    with pytest.raises(ValueError, match=r"must time plain decoding, \(0, 0\)"):
        replace(policy, trials={1: {(2, 3): 120.0}})
    with pytest.raises(ValueError, match="timed \\(k=4, D=2\\), which the acceptance table"):
        replace(policy, trials={1: {(4, 2): 120.0, (0, 0): 100.0}})
    with pytest.raises(ValueError, match="needs an overhead measured there"):
        replace(policy, trials={4: {(0, 0): 100.0}})
    with pytest.raises(ValueError, match="margin must be in"):
        replace(policy, margin=1.5)


def test_the_trial_race_runs_on_whole_batches_of_enough_requests(monkeypatch):
    from multidraft.engine import shape

    raced = {}
    monkeypatch.setattr(shape, "measure_costs", lambda target, draft, batch_sizes, tokens, **kw: synthetic_costs(batch_sizes, tokens))
    monkeypatch.setattr(shape, "calibrate_acceptance", lambda *a, **kw: ({2: [0.9] * 3}, {2: [[0.5] * 3] * 4}))
    monkeypatch.setattr(shape, "measure_overhead", lambda *a, **kw: Overhead(0.0, 0.0))

    def race(target, draft, verifier, batches, shapes, *args, **kwargs):  # records what was raced
        raced[len(batches[0])] = ([len(x) for x in batches], shapes)
        return {s: 1.0 for s in shapes}

    monkeypatch.setattr(shape, "time_shapes", race)
    prompts = [[1, 2]] * 24
    ShapePolicy.calibrate(None, None, "rrs", prompts, batch_sizes=[1, 3, 5, 24], ks=[2], max_depth=3)
    assert raced[1][0] == [1] * 8 and raced[3][0] == [3] * 3 and raced[5][0] == [5] * 2 and raced[24][0] == [24]
    assert all(shapes[-1] == (0, 0) and len(shapes) == 4 for _, shapes in raced.values())


def test_rank_shapes_lists_every_option_fastest_first():
    costs = synthetic_costs([1], list(range(1, 26)))
    ranked = rank_shapes(1, costs, {1: [0.8] * 3, 2: [0.9] * 3})
    assert len(ranked) == 1 + 3 + 3 and sum(c.depth == 0 for c in ranked) == 1
    rates = [c.tokens_per_second for c in ranked]
    assert rates == sorted(rates, reverse=True)
    assert choose_shape(1, costs, {1: [0.8] * 3, 2: [0.9] * 3}) == ranked[0]


def test_time_shapes_races_each_shape_and_plain_decoding():
    torch.manual_seed(0)
    target = GPT(GPTConfig(vocab_size=64, n_layer=2, dim=32, n_head=4)).eval()
    draft = early_exit(target, 1)
    prompts = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(3))
    rates = time_shapes(target, draft, "rrs", [prompts, prompts[:1]], [(2, 2), (1, 3), (2, 2), (0, 0)], max_new_tokens=6,
                        repeats=2, seed=0, device="cpu")
    assert list(rates) == [(2, 2), (1, 3), (0, 0)] and all(r > 0 for r in rates.values())


def test_the_adaptive_engine_re_chooses_the_shape_as_requests_finish():
    """Speculation at batch 3-4, plain steps at 1-2 (trial rates made up to say so): requests
    finish at different rounds (ragged acceptance), the batch shrinks, and the rounds switch to
    plain decoding within one generate; greedy output stays plain greedy decoding."""
    torch.manual_seed(0)
    target = GPT(GPTConfig(vocab_size=64, n_layer=2, dim=32, n_head=4)).eval()
    draft = early_exit(target, 1)
    prompts = torch.randint(0, 64, (4, 6), generator=torch.Generator().manual_seed(1))
    batches = [1, 4]
    trials = {1: {(2, 3): 50.0, (0, 0): 100.0}, 4: {(2, 3): 200.0, (0, 0): 100.0}}
    policy = ShapePolicy("rrs", synthetic_costs(batches, list(range(1, 26))), {2: [0.9] * 3}, {},
                         {b: Overhead(0.0, 0.0) for b in batches}, margin=0.0, trials=trials)
    engine = AdaptiveEngine(target, draft, policy, device="cpu")
    out = engine.generate(prompts, 12, temperature=0.0)
    assert (engine.last_choice.num_drafts, engine.last_choice.depth) == (2, 3)
    assert set(out.stats.rounds_by_shape) == {(2, 3), (0, 0)}, out.stats.rounds_by_shape
    assert torch.equal(out.tokens, autoregressive_generate(target, prompts, 12, temperature=0.0, device="cpu").tokens)
    assert engine.shape_for_batch(2) == (0, 0) and engine.shape_for_batch(3) == (2, 3)


def test_a_shape_per_round_must_fit_the_engine():
    torch.manual_seed(0)
    target = GPT(GPTConfig(vocab_size=64, n_layer=2, dim=32, n_head=4)).eval()
    engine = Engine(target, early_exit(target, 1), verifier="rrs", num_drafts=2, depth=3, device="cpu")
    prompts = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"gave \(k=4, D=2\); this engine's caches hold k <= 2 and D <= 3"):
        engine.decode(prompts, 4, shape_for_batch=lambda rows: (4, 2))
    staged = Engine(target, early_exit(target, 1), verifier="rrs", num_drafts=2, depth=3, device="cpu", draft2=early_exit(target, 1))
    with pytest.raises(ValueError, match="no widths, no draft2"):
        staged.decode(prompts, 4, shape_for_batch=lambda rows: (2, 2))


def test_a_policy_calibrates_within_the_verifiers_draft_counts_and_depths():
    """'single' takes k = 1 only, 'spechub' k = 2 at depth 1, 'greedy' k >= 2 at depth 1: the
    default ks = (1, 2, 4) are cut to what the verifier takes, a depth-1-only verifier is
    calibrated at depth 1 (overhead per round only), and the overhead is fitted at a k of ks."""
    torch.manual_seed(0)
    target = GPT(GPTConfig(vocab_size=64, n_layer=2, dim=32, n_head=4)).eval()
    draft = early_exit(target, 1)
    prompts = torch.randint(0, 64, (2, 4), generator=torch.Generator().manual_seed(4))
    quick = dict(batch_sizes=[1], max_new_tokens=4, seed=0, device="cpu", trial_shapes=0)
    for verifier, ks, depth in [("single", {1}, 6), ("spechub", {2}, 1), ("greedy", {2, 4}, 1)]:
        policy = ShapePolicy.calibrate(target, draft, verifier, prompts, **quick)
        assert set(policy.acceptance) == ks and all(len(a) == depth for a in policy.acceptance.values()), verifier
        assert all(len(r) == depth for spread in policy.request_efficiency.values() for r in spread)
        if depth == 1:
            assert policy.overhead[1].per_depth_ms == 0.0
        out = AdaptiveEngine(target, draft, policy, device="cpu").generate(prompts, 4, seed=0)
        assert out.tokens.shape == (2, 4)
    one = ShapePolicy.calibrate(target, draft, "rrs", prompts, ks=[1], max_depth=2, **quick)  # overhead fitted at k = 1
    assert set(one.acceptance) == {1} and one.overhead[1].per_round_ms >= 0
    flat = ShapePolicy.calibrate(target, draft, "rrs", prompts, ks=[2], max_depth=1, **quick)
    assert flat.overhead[1].per_depth_ms == 0.0 and len(flat.acceptance[2]) == 1
    with pytest.raises(ValueError, match=r"verifier 'spechub' takes 2..2 drafts per node; none of ks = \[1, 3\]"):
        ShapePolicy.calibrate(target, draft, "spechub", prompts, ks=[1, 3], **quick)
    with pytest.raises(ValueError, match=r"verifier 'greedy' runs at depth 1 only .*got max_depth = 3"):
        ShapePolicy.calibrate(target, draft, "greedy", prompts, max_depth=3, **quick)
    with pytest.raises(ValueError, match=r"ks must be draft counts, ints >= 1, got \[0\]"):
        ShapePolicy.calibrate(target, draft, "rrs", prompts, ks=[0], **quick)


def test_calibration_times_where_the_engine_runs(monkeypatch):
    """device=None is the engine's default device for the cost timings as for the engine runs
    (CUDA when present); forward_ms defaults to it too, not to the CPU."""
    from multidraft.engine import engine as engine_module
    from multidraft.engine import shape

    seen = {}

    def record(name, result):
        def fn(*args, **kwargs):
            seen.setdefault(name, []).append(kwargs.get("device"))
            return result(*args) if callable(result) else result
        return fn

    monkeypatch.setattr(engine_module, "default_device", lambda: "cuda:5")
    monkeypatch.setattr(shape, "measure_costs", record("costs", lambda target, draft, b, t: synthetic_costs(b, t)))
    monkeypatch.setattr(shape, "calibrate_acceptance", record("acceptance", ({2: [0.9] * 3}, {})))
    monkeypatch.setattr(shape, "measure_overhead", record("overhead", Overhead(0.0, 0.0)))
    monkeypatch.setattr(shape, "time_shapes", record("trials", lambda target, draft, verifier, batches, shapes, *a: {s: 1.0 for s in shapes}))
    ShapePolicy.calibrate(None, None, "rrs", [[1, 2]] * 4, batch_sizes=[1, 4], ks=[2], max_depth=3)
    assert set(seen) == {"costs", "acceptance", "overhead", "trials"}
    assert all(device == "cuda:5" for devices in seen.values() for device in devices), seen

    class Built(Exception):
        pass

    class Model:  # records where forward_ms builds its cache, and stops there
        def new_cache(self, batch, length, device):
            seen["forward"] = torch.device(device)
            raise Built

    with pytest.raises(Built):
        shape.forward_ms(Model(), 2, 3)
    assert seen["forward"] == torch.device("cuda:5")


def test_the_request_spread_is_taken_at_each_depth():
    """Each request's block efficiency at depth D (its first D acceptance rates) gives the share
    of the gain a batch keeps at D: at depth 1 requests at 0.5 and 0.9 differ by 1.5 vs 1.9
    tokens, at depth 6 by 1.98 vs 5.69, so the shares differ."""
    costs = synthetic_costs([16], list(range(1, 26)))
    acceptance = {2: [0.7] * 6}
    spread = {2: [[0.5] * 6] * 8 + [[0.9] * 6] * 8}
    ranked = {(c.num_drafts, c.depth): c for c in rank_shapes(16, costs, acceptance, request_efficiency=spread)}
    shares = {}
    for depth in (1, 6):
        pooled = expected_block_efficiency([0.7] * depth)
        shares[depth] = (ranked[2, depth].block_efficiency - 1) / (pooled - 1)
        direct = batch_efficiency_share([expected_block_efficiency([0.5] * depth)] * 8 + [expected_block_efficiency([0.9] * depth)] * 8, 16)
        assert shares[depth] == pytest.approx(direct, rel=1e-12), depth
    assert abs(shares[1] - shares[6]) > 0.05, shares


def test_per_request_acceptance_by_depth_follows_each_request():
    """The per-request rates come from the calibration run itself: at max_depth they give each
    request's block efficiency as the engine counted it, though requests leave the batch at
    different rounds."""
    torch.manual_seed(0)
    target = GPT(GPTConfig(vocab_size=64, n_layer=2, dim=32, n_head=4)).eval()
    draft = early_exit(target, 1)
    prompts = [[1, 2], [3], [4, 5, 6], [7, 8]]
    acceptance, spread = calibrate_acceptance(target, draft, "rrs", ks=[2], max_depth=3, prompts=prompts,
                                              max_new_tokens=10, seed=0, device="cpu", per_request=True)
    stats = Engine(target, draft, verifier="rrs", num_drafts=2, depth=3, device="cpu").generate(prompts, 10, seed=0).stats
    assert stats.acceptance_by_depth == acceptance[2]
    efficiencies = [expected_block_efficiency(rates) for rates in spread[2]]
    assert efficiencies == pytest.approx(stats.block_efficiency_per_request, rel=1e-6)  # the engine divides in float32
    assert len(set(stats.block_efficiency_per_request)) > 1  # the requests differ, so a mix-up would show


def test_bad_inputs_to_the_shape_chooser():
    costs = synthetic_costs([1], list(range(1, 26)))
    acceptance = {2: [0.8] * 3}
    for depth in (0, -1):
        with pytest.raises(ValueError, match=f"max_depth must be None \\(no limit\\) or an int >= 1, got {depth}"):
            rank_shapes(1, costs, acceptance, max_depth=depth)
    assert {c.depth for c in rank_shapes(1, costs, acceptance, max_depth=None)} == {0, 1, 2, 3}
    zero = {"target": {key: 0.0 for key in costs["target"]}, "draft": {key: 0.0 for key in costs["draft"]}}
    with pytest.raises(ValueError, match="a plain decoding step at batch 1 costs 0.0 ms"):
        choose_shape(1, zero, acceptance)
    negative = {"target": {**costs["target"], (1, 5): -1.0}, "draft": costs["draft"]}
    with pytest.raises(ValueError, match=r"costs\['target'\]\[1, 5\] is -1.0; costs must be finite numbers of ms >= 0"):
        choose_shape(1, negative, acceptance)
    with pytest.raises(ValueError, match="Overhead.per_depth_ms must be a finite number of ms >= 0, got -0.5"):
        Overhead(1.0, -0.5)
    with pytest.raises(ValueError, match="Overhead.per_round_ms must be a finite number of ms >= 0, got -2.0"):
        choose_shape(1, costs, acceptance, overhead_ms=-2.0)
    with pytest.raises(ValueError, match="the acceptance table is empty"):
        AdaptiveEngine(None, None, ShapePolicy("rrs", costs, {}, {}, {1: Overhead(0.0, 0.0)}))
    with pytest.raises(ValueError, match="overhead is empty"):
        ShapePolicy("rrs", costs, acceptance, {}, {})


def test_measure_overhead_reads_a_flat_prompt_as_one_request():
    torch.manual_seed(0)
    target = GPT(GPTConfig(vocab_size=64, n_layer=2, dim=32, n_head=4)).eval()
    draft = early_exit(target, 1)
    costs = measure_costs(target, draft, batch_sizes=[1], token_counts=[1, 2, 3, 5, 9], repeats=1, device="cpu")
    overhead = measure_overhead(target, draft, "rrs", torch.tensor([1, 2, 3]), costs, k=2, depths=(1, 4), max_new_tokens=4,
                                repeats=1, seed=0, device="cpu")  # batch 1, not 3
    assert overhead.per_round_ms >= 0
    single = measure_overhead(target, draft, "spechub", [[1, 2, 3]], costs, max_new_tokens=4, repeats=1, seed=0, device="cpu")
    assert single.per_depth_ms == 0.0  # k = 2 at depth 1 only: per-round part only
