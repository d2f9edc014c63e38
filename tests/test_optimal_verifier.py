"""The `optimal` verifier: exact, and its acceptance equals the max-flow bound.

The generic suites (test_exactness, test_statistical, test_validation) cover it through the
registry; here: the optimum itself, the bid-race formulas behind exactness for *any* scales,
the root solver, and large vocabularies where enumeration is impossible.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from chisquare import SAMPLES, assert_law

import multidraft as md
from multidraft.proofs.cases import CASES
from multidraft.proofs.enumeration import all_tuples
from multidraft.verifiers.optimal import (
    _join_lengths,
    optimal_plan,
    race_marginal,
    race_win_probabilities,
)
from multidraft.verifiers.optimal_cpu import descending_ratio_order, join_lengths
from rows_and_threads import llm_like, on_threads

OPTIMAL_TOL = 1e-9  # acceptance against optimal_acceptance
EXACT_TOL = 1e-12  # output law against p, by enumeration
MAX_TUPLES = 1300


def _random_case(g: torch.Generator, kind: int):
    """(p, q, k) for small V, cycling through kinds that stress different corners."""
    vocab = int(torch.randint(1, 7, (1,), generator=g))
    k = int(torch.randint(1, 6, (1,), generator=g))
    while vocab**k > MAX_TUPLES:
        k -= 1
    if kind == 0:  # zeros in p and q
        p = torch.rand(vocab, generator=g, dtype=torch.float64) * (torch.rand(vocab, generator=g) < 0.6)
        q = torch.rand(vocab, generator=g, dtype=torch.float64) * (torch.rand(vocab, generator=g) < 0.6)
    elif kind == 1:  # small integers: exact ties of ratios and of optimal cuts
        p = torch.randint(0, 3, (vocab,), generator=g).double()
        q = torch.randint(0, 3, (vocab,), generator=g).double()
    elif kind == 2:  # p == q
        p = torch.rand(vocab, generator=g, dtype=torch.float64)
        q = p.clone()
    else:  # peaked
        p = torch.rand(vocab, generator=g, dtype=torch.float64) ** 6
        q = torch.rand(vocab, generator=g, dtype=torch.float64) ** 6
    if p.sum() == 0:
        p[0] = 1.0
    if q.sum() == 0:
        q[-1] = 1.0
    return p / p.sum(), q / q.sum(), k


# The plan runs fused (numba, the CPU default) or as tensor ops (other devices): test both.
PLANS = [pytest.param(True, id="fused"), pytest.param(False, id="tensor")]


@pytest.mark.parametrize("fused", PLANS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_acceptance_is_optimal_on_corner_cases(case, k, fused):
    p, q = CASES[case]
    if p.shape[0] ** k > MAX_TUPLES:
        pytest.skip("too many tuples to enumerate")
    verifier = md.get_verifier("optimal", fused=fused)
    rate = md.proofs.acceptance_rate(verifier, p, q, k)
    assert rate == pytest.approx(md.proofs.optimal_acceptance(p, q, k), abs=OPTIMAL_TOL)
    out = md.proofs.output_distribution(verifier, p, q, k)
    torch.testing.assert_close(out, p, rtol=0, atol=EXACT_TOL)


@pytest.mark.parametrize("fused", PLANS)
def test_random_small_cases_are_exact_and_optimal(fused):
    g = torch.Generator().manual_seed(2024)
    verifier = md.get_verifier("optimal", fused=fused)
    for trial in range(200):
        p, q, k = _random_case(g, trial % 4)
        out = md.proofs.output_distribution(verifier, p, q, k)
        assert float((out - p).abs().max()) <= EXACT_TOL, (p, q, k)
        rate = md.proofs.acceptance_rate(verifier, p, q, k)
        assert rate == pytest.approx(md.proofs.optimal_acceptance(p, q, k), abs=OPTIMAL_TOL), (p, q, k)


@pytest.mark.parametrize("case", list(CASES))
def test_accepts_at_least_as_often_as_every_other_iid_verifier(case):
    p, q = CASES[case]
    for k in [2, 3]:
        if p.shape[0] ** k > MAX_TUPLES:
            continue
        best = md.proofs.acceptance_rate(md.get_verifier("optimal"), p, q, k)
        for name in md.available_verifiers():
            other = md.get_verifier(name)
            if name == "optimal" or not other.iid_drafts or other.distinct_drafts:
                continue
            if other.max_drafts is not None and k > other.max_drafts:
                continue
            assert best >= md.proofs.acceptance_rate(other, p, q, k) - 1e-12, name


def test_one_draft_is_standard_speculative_sampling():
    p, q = CASES["v6-dirichlet-a"]
    drafts = torch.arange(6).unsqueeze(1)
    ours = md.get_verifier("optimal").kernel(p.expand(6, -1), q.expand(6, -1), drafts)
    single = md.get_verifier("single").kernel(p.expand(6, -1), q.expand(6, -1), drafts)
    torch.testing.assert_close(ours, single, rtol=0, atol=1e-15)


@pytest.mark.parametrize("seed", range(6))
def test_race_marginal_is_the_winner_law_for_any_scales(seed):
    """Exactness rests on race_marginal being the law of race_win_probabilities' winner,
    whatever the scales: check it by enumerating every tuple, ties and zeros included."""
    g = torch.Generator().manual_seed(seed)
    vocab, k = 5, [2, 3, 4][seed % 3]
    q = torch.rand(vocab, generator=g, dtype=torch.float64) * (torch.rand(vocab, generator=g) < 0.8)
    q[0] += 0.1
    q = q / q.sum()
    log_scale = -torch.rand(vocab, generator=g, dtype=torch.float64) * [0.5, 5.0, 60.0][seed % 3]
    log_scale[1] = log_scale[2]  # a tie
    log_scale = log_scale.sort(descending=True).values  # race_marginal takes positions in scale order
    s = race_marginal(q.unsqueeze(0), log_scale.unsqueeze(0), k)[0]
    tuples = all_tuples(vocab, k)
    prob = q[tuples].prod(dim=1)  # [N]
    win = race_win_probabilities(log_scale[tuples])  # [N, k]
    torch.testing.assert_close(win.sum(dim=1), torch.ones(len(tuples), dtype=torch.float64), rtol=0, atol=1e-14)
    weight = (prob[:, None] * win).flatten()
    enumerated = torch.zeros(vocab, dtype=torch.float64).index_add_(0, tuples.flatten(), weight)
    torch.testing.assert_close(s, enumerated, rtol=0, atol=1e-14)


@pytest.mark.parametrize("solver", ["tensor", "fused-cold", "fused-warm", "fused-far"])
@pytest.mark.parametrize("k", [3, 4, 8, 16])
def test_join_solver_finds_the_largest_root(k, solver):
    g = torch.Generator().manual_seed(k)
    n = 2000
    base = torch.rand(n, generator=g, dtype=torch.float64) * 0.9 + 0.05
    root = torch.rand(n, generator=g, dtype=torch.float64) ** 4 * (1 - base)  # down to ~1e-10
    # mean slope of (base + L)^k over [base, base + root], summed without cancellation
    mean_slope = sum((base + root) ** j * base ** (k - 1 - j) for j in range(k))
    sigma = mean_slope * (1 - torch.rand(n, generator=g, dtype=torch.float64) ** 0.3 * 0.999)  # up to near-double
    deficit = root * (mean_slope - sigma)  # = (base + root)^k - base^k - sigma root
    group = root + torch.rand(n, generator=g, dtype=torch.float64) * (1 - base - root)
    if solver == "tensor":
        found = _join_lengths(base, sigma, deficit, group, k)
    else:  # the fused solver starts from the smallest of its bounds and a caller's upper bound
        near = root + (group - root) * torch.rand(n, generator=g, dtype=torch.float64) ** 3
        start = {"fused-cold": group, "fused-warm": near, "fused-far": (root + group) / 2}[solver]
        found = torch.empty_like(root)
        join_lengths(*(x.numpy() for x in (base, sigma, deficit, group, start)), k, found.numpy())
    torch.testing.assert_close(found, root, rtol=1e-9, atol=0)


@pytest.mark.parametrize("k", [3, 4, 8, 16])
def test_fused_join_solver_from_far_above_a_small_nearly_double_root(k):
    """a1 = k base^(k-1) - sigma ~ 0 and a tiny root: Halley from a far start comes down only
    linearly there, so the solver must start from the quadratic root (nearly exact here)."""
    g = torch.Generator().manual_seed(100 + k)
    n = 200
    base = torch.rand(n, generator=g, dtype=torch.float64) * 0.6 + 0.2
    root = 10 ** (-12 + 4 * torch.rand(n, generator=g, dtype=torch.float64))  # 1e-12 .. 1e-8
    a2 = k * (k - 1) / 2 * base ** (k - 2)
    a1 = 0.5 * a2 * root
    mean_slope = sum((base + root) ** j * base ** (k - 1 - j) for j in range(k))
    sigma = k * base ** (k - 1) - a1
    deficit = root * (mean_slope - sigma)
    group = torch.full_like(base, 0.5)
    found = torch.empty_like(root)
    join_lengths(*(x.numpy() for x in (base, sigma, deficit, group, group / 2)), k, found.numpy())
    torch.testing.assert_close(found, root, rtol=1e-4, atol=0)  # near the data's own precision (deficit cancels)


@pytest.mark.parametrize("fused", PLANS)
@pytest.mark.parametrize("k", [2, 3, 4, 8, 16])
@pytest.mark.parametrize("noise,scale", [(0.3, 3.0), (1.0, 1.0), (1.0, 3.0), (3.0, 3.0)])
def test_large_vocabulary_reaches_the_bound(k, noise, scale, fused):
    p, q = llm_like(4, 32_000, seed=10 * k + int(noise * 3), noise=noise, scale=scale)
    plan = optimal_plan(p, q, k, fused)
    s = plan.marginal
    assert bool((s >= 0).all())
    torch.testing.assert_close(s.sum(dim=-1), torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-10)
    accept = torch.minimum(s, p).sum(dim=-1)
    torch.testing.assert_close(accept, md.proofs.optimal_acceptance(p, q, k), rtol=0, atol=OPTIMAL_TOL)


@pytest.mark.parametrize("fused", PLANS)
@pytest.mark.parametrize("k", [2, 3, 4, 8])
@pytest.mark.parametrize("noise,scale", [(6.0, 20.0), (8.0, 25.0), (10.0, 30.0)])
def test_peaked_rows_with_tails_far_below_rounding_reach_the_bound(k, noise, scale, fused):
    """Rows like a language model's at a low temperature: a few tokens hold the mass and dozens
    sit at q ~ 1e-20 .. 1e-40, far below the rounding of q(T)^k - p(T) and of the targets' sums.
    Which side of the cut such a token falls on, and whether its group's targets fit, is then
    decided by rounding; before the plan handled that (the cut by per-token gains, the cap by the
    excess, debts written off, ratio floors by mass), each such token could end a group, cost the
    scales e^-40, and after 15 of them the race could not tell the real tokens apart: up to 0.16
    (fused) and 0.49 (tensor plan) of acceptance below the bound on these rows, and 0.19 on the
    shipped pair at T = 0.3, k = 4."""
    p, q = llm_like(300, 256, seed=1, noise=noise, scale=scale)
    plan = optimal_plan(p, q, k, fused)
    torch.testing.assert_close(plan.marginal.sum(dim=-1), torch.ones(300, dtype=torch.float64), rtol=0, atol=1e-10)
    accept = torch.minimum(plan.marginal, p).sum(dim=-1)
    torch.testing.assert_close(accept, md.proofs.optimal_acceptance(p, q, k), rtol=0, atol=OPTIMAL_TOL)


def _law_of_the_first_draft(q: torch.Tensor, k: int) -> torch.Tensor:
    """p = the law of the smallest token id among k draws from q: every suffix T then has
    p(T) = q(T)^k, so every suffix is an optimal cut (a tight set) and the bound is 1."""
    from_i = q.flip(-1).cumsum(-1).flip(-1)  # q-mass of the tokens >= i
    after_i = torch.cat([from_i[..., 1:], torch.zeros_like(from_i[..., :1])], dim=-1)
    return from_i**k - after_i**k


@pytest.mark.parametrize("fused", PLANS)
@pytest.mark.parametrize("vocab,k,noise", [(50, 4, 0.0), (1000, 8, 0.0), (5000, 4, 1e-3), (200, 2, 1e-4)])
def test_rows_with_a_tight_set_at_every_position_reach_the_bound(vocab, k, noise, fused):
    """Every position ends a group (or nearly), each dropping the scales by e^30 or so: they
    fall far below float64's range.  With scales floored at e^-600 (before the scales were kept
    as tiered mantissas and log scales) the race could not rank the lowest tokens any more: up
    to 0.54 below the bound at V = 1000, k = 8, and 4e-3 .. 2e-2 on the perturbed rows."""
    g = torch.Generator().manual_seed(vocab + k)
    q = torch.rand(1, vocab, generator=g, dtype=torch.float64)
    q /= q.sum()
    p = _law_of_the_first_draft(q, k) * (1 + noise * torch.rand(1, vocab, generator=g, dtype=torch.float64))
    p /= p.sum()
    plan = optimal_plan(p, q, k, fused)
    assert float(plan.log_scale.min()) < -600  # the case this is about
    torch.testing.assert_close(plan.marginal.sum(dim=-1), torch.ones(1, dtype=torch.float64), rtol=0, atol=1e-10)
    accept = torch.minimum(plan.marginal, p).sum(dim=-1)
    torch.testing.assert_close(accept, md.proofs.optimal_acceptance(p, q, k), rtol=0, atol=OPTIMAL_TOL)


@pytest.mark.parametrize("fused", PLANS)
@pytest.mark.parametrize("k", [2, 3])
def test_deep_scales_keep_the_output_law_exact(k, fused):
    """By enumeration, on a row whose scales go far below float64's range."""
    q = torch.arange(1, 7, dtype=torch.float64).flip(0) ** 3
    q /= q.sum()
    p = _law_of_the_first_draft(q, k)
    verifier = md.get_verifier("optimal", fused=fused)
    torch.testing.assert_close(md.proofs.output_distribution(verifier, p, q, k), p, rtol=0, atol=EXACT_TOL)
    assert abs(md.proofs.acceptance_rate(verifier, p, q, k) - float(md.proofs.optimal_acceptance(p, q, k))) < OPTIMAL_TOL


@pytest.mark.parametrize("fused", PLANS)
def test_batch_rows_are_independent(fused):
    p, q = llm_like(5, 300, seed=1, noise=1.0, scale=2.0)
    p[2], q[2] = CASES["v6-tied-ratios"][0].repeat(50) / 50, CASES["v6-tied-ratios"][1].repeat(50) / 50
    plan = optimal_plan(p, q, 3, fused)
    for b in range(5):
        one = optimal_plan(p[b : b + 1], q[b : b + 1], 3, fused)
        torch.testing.assert_close(plan.marginal[b : b + 1], one.marginal, rtol=0, atol=1e-15)
        torch.testing.assert_close(plan.log_scale[b : b + 1], one.log_scale, rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_fused_and_tensor_plans_agree(k):
    """The two implementations of one algorithm: without merged runs, the same winner law to
    rounding, on LLM-like rows and on rows with zeros and exact ties (the scales differ where
    rounding decides a near-tied group's order, which moves s by rounding only)."""
    p, q = llm_like(6, 2000, seed=k, noise=1.0, scale=3.0)
    p[1, :1000], q[2, 1000:] = 0.0, 0.0  # zeros in p, in q
    p[3], q[3] = CASES["v6-tied-ratios"][0].repeat(2000 // 6 + 1)[:2000], CASES["v6-tied-ratios"][1].repeat(2000 // 6 + 1)[:2000]
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    fused, tensor = optimal_plan(p, q, k, fused=True, run_width=0), optimal_plan(p, q, k, fused=False)
    torch.testing.assert_close(fused.marginal, tensor.marginal, rtol=0, atol=1e-12)
    for plan in (fused, tensor):
        torch.testing.assert_close(torch.minimum(plan.marginal, p).sum(-1), md.proofs.optimal_acceptance(p, q, k),
                                   rtol=0, atol=OPTIMAL_TOL)


# Merged runs (fused plan, token by token: cells=False): T*'s targets raised to their run's first
# ratio, within half the slack of the prefixes.  A wide run_width spends the whole budget, so it
# would break the bound if the slack were not checked; the narrow default merges what costs least.
WIDE_RUNS = 0.9


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("k", [2, 3, 4])
def test_merged_runs_are_exact_and_optimal_on_corner_cases(case, k):
    p, q = CASES[case]
    if p.shape[0] ** k > MAX_TUPLES:
        pytest.skip("too many tuples to enumerate")
    verifier = md.get_verifier("optimal", fused=True, run_width=WIDE_RUNS, cells=False)
    assert md.proofs.acceptance_rate(verifier, p, q, k) == pytest.approx(md.proofs.optimal_acceptance(p, q, k), abs=OPTIMAL_TOL)
    torch.testing.assert_close(md.proofs.output_distribution(verifier, p, q, k), p, rtol=0, atol=EXACT_TOL)


def test_merged_runs_are_exact_and_optimal_on_random_small_cases():
    """Small LLM-like rows, where T* holds several tokens of nearby ratios: by enumeration."""
    verifier = md.get_verifier("optimal", fused=True, run_width=WIDE_RUNS, cells=False)
    merged = cases = 0
    for vocab, k in [(6, 2), (6, 3), (5, 4), (8, 3), (10, 3)]:
        ps, qs = llm_like(12, vocab, seed=vocab * k, noise=1.0, scale=1.0)
        for p, q in zip(ps, qs):
            rate = md.proofs.acceptance_rate(verifier, p, q, k)
            assert rate == pytest.approx(md.proofs.optimal_acceptance(p, q, k), abs=OPTIMAL_TOL), (vocab, k)
            torch.testing.assert_close(md.proofs.output_distribution(verifier, p, q, k), p, rtol=0, atol=EXACT_TOL)
            s_merged, s_exact = (optimal_plan(p.unsqueeze(0), q.unsqueeze(0), k, fused=True, run_width=w, cells=False).marginal
                                 for w in (WIDE_RUNS, 0))
            merged += not torch.allclose(s_merged, s_exact, rtol=0, atol=1e-12)
            cases += 1
    assert merged * 4 >= cases  # the runs changed the winner law in many of the cases


@pytest.mark.parametrize("rows", [torch.float64, torch.float32])
def test_merged_runs_verify_follows_the_kernel(rows):
    """The fused verify samples the kernel of its own merged plan: a row where the runs move the
    winner law by 0.08 (V = 8, k = 3), on a likely tuple with a random verdict, float64 and
    float32 rows (the latter copied to float64 inside the kernel), calibrated chi-square."""
    ps, qs = llm_like(12, 8, seed=24, noise=1.0, scale=1.0)
    p, q = ps[7], qs[7]
    verifier = md.get_verifier("optimal", fused=True, run_width=WIDE_RUNS, cells=False)
    moved = (optimal_plan(p[None], q[None], 3, fused=True, run_width=WIDE_RUNS, cells=False).marginal
             - optimal_plan(p[None], q[None], 3, fused=True, run_width=0).marginal).abs().max()
    assert moved > 0.05
    assert_verify_follows_kernel(verifier, p, q, 3, rows, seed=12, label="optimal merged runs")


def assert_verify_follows_kernel(verifier, p, q, k: int, rows: torch.dtype, seed: int, label: str) -> None:
    """verify on the likeliest tuple whose verdict is random (a rejection is likely, so the
    residual draw runs too), SAMPLES times on rows of dtype ``rows``, against the enumerated
    kernel of that tuple: calibrated chi-square."""
    tuples, prob, kernels = md.proofs.enumeration.tuple_kernels(verifier, p, q, k)
    pick = int(torch.argmax(prob * (1 - kernels.max(1).values)))
    drafts = tuples[pick].unsqueeze(0).expand(SAMPLES, -1).contiguous()
    tile = lambda x: x.to(rows).unsqueeze(0).expand(SAMPLES, -1).contiguous()  # noqa: E731
    verdict = verifier.verify(tile(p), tile(q), drafts, generator=torch.Generator().manual_seed(seed))
    counts = np.bincount(verdict.token.numpy(), minlength=p.shape[0])
    assert_law(counts, kernels[pick].numpy(), f"{label}, verify on {rows}, drafts {tuples[pick].tolist()}")


@pytest.mark.parametrize("run_width", [2.0**-7, 0.25, WIDE_RUNS])
@pytest.mark.parametrize("k", [2, 4, 8])
def test_merged_runs_keep_the_bound_on_large_rows(k, run_width):
    """The acceptance stays the bound and Σ s = 1, and runs share one scale: at the default width,
    rows whose drafts are rejected often enough to leave slack (1 - OPT > 0.03) keep 7-40x fewer
    distinct scales, each of which is a join solved.  Near-perfect drafts leave no slack
    (1 - OPT ~ 1e-3 or 0) and merge little."""
    rows = [llm_like(2, 32000, seed=k, noise=1.0, scale=3.0), llm_like(2, 32000, seed=k + 1, noise=0.3, scale=2.0),
            llm_like(2, 32000, seed=k + 2, noise=2.0, scale=6.0)]
    p, q = (torch.cat(x) for x in zip(*rows))
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    merged = optimal_plan(p, q, k, fused=True, run_width=run_width, cells=False)
    bound = md.proofs.optimal_acceptance(p, q, k)
    torch.testing.assert_close(torch.minimum(merged.marginal, p).sum(-1), bound, rtol=0, atol=OPTIMAL_TOL)
    torch.testing.assert_close(merged.marginal.sum(-1), torch.ones(6, dtype=torch.float64), rtol=0, atol=1e-10)
    if run_width == 2.0**-7:
        exact = optimal_plan(p, q, k, fused=True, run_width=0)
        slack = (bound < 0.97).nonzero().flatten().tolist()
        assert len(slack) >= 2
        distinct = lambda plan: sum(plan.log_scale[b].unique().numel() for b in slack)  # noqa: E731
        assert distinct(merged) * 4 < distinct(exact), (distinct(merged), distinct(exact))


# Cells (fused plan): whole buckets of tokens that share sigma -- capped in H, merged on T* --
# are one position each, and only the rest is sorted (docs/verifiers/optimal.md, "Cells").
def cells_of(p: torch.Tensor, q: torch.Tensor, k: int, run_width: float = 2.0**-7) -> tuple[int, int]:
    """(positions, buckets) of the cells layout of one row; buckets 0 where it is declined."""
    from multidraft.verifiers.optimal_cpu import cells_layout, workspace

    p, q = p.double().numpy(), q.double().numpy()
    p, q = p / p.sum(), q / q.sum()
    ratio = np.divide(p, q, out=np.full_like(p, np.inf), where=q > 0)
    n, _, _, _, buckets, _, _ = cells_layout(p, q, 1.0, 1.0, ratio, k, workspace(p.shape[0]), run_width)
    return n, buckets


@pytest.mark.parametrize("k", [2, 4, 8])
def test_cells_plan_rows_with_slack_on_few_positions(k):
    """LLM-like rows that leave slack are planned on a few thousand positions instead of 32,000,
    at the bound, with Σ s = 1 and the tokens of each cell on one scale."""
    p, q = llm_like(3, 32000, seed=40 + k, noise=1.0, scale=3.0)
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    layouts = [cells_of(p[b], q[b], k) for b in range(3)]
    assert all(buckets > 0 and n < 32000 // 8 for n, buckets in layouts), layouts
    plan = optimal_plan(p, q, k, fused=True)
    bound = md.proofs.optimal_acceptance(p, q, k)
    torch.testing.assert_close(torch.minimum(plan.marginal, p).sum(-1), bound, rtol=0, atol=OPTIMAL_TOL)
    torch.testing.assert_close(plan.marginal.sum(-1), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-10)
    for b, (n, _) in enumerate(layouts):
        assert plan.log_scale[b].unique().numel() <= n


def test_cells_are_declined_where_they_would_not_pay():
    """Near-perfect drafts leave no slack to merge T* with, so most tokens would stay single:
    declined (and planned token by token).  So are rows of V < 3 and rows without a finite
    positive ratio."""
    p, q = llm_like(2, 32000, seed=5, noise=0.3, scale=3.0)
    for k in (4, 8):
        assert [cells_of(p[b], q[b], k)[1] for b in range(2)] == [0, 0]
    two = torch.tensor([0.3, 0.7], dtype=torch.float64)
    assert cells_of(two, two.flip(0), 2)[1] == 0
    assert cells_of(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.5, 0.5]), 2)[1] == 0


def test_cells_are_exact_and_optimal_on_small_rows():
    """Small LLM-like rows, where cells hold whole buckets in a quarter of them or more: exact and
    optimal by enumeration, at the default width and at a wide one."""
    used = cases = 0
    for run_width in (2.0**-7, WIDE_RUNS):
        verifier = md.get_verifier("optimal", fused=True, run_width=run_width)
        for vocab, k in [(6, 2), (8, 3), (10, 2), (12, 2)]:
            ps, qs = llm_like(10, vocab, seed=vocab * k, noise=1.0, scale=2.0)
            for p, q in zip(ps, qs):
                n, buckets = cells_of(p, q, k, run_width)
                used += buckets > 0 and n < vocab
                cases += 1
                rate = md.proofs.acceptance_rate(verifier, p, q, k)
                assert rate == pytest.approx(md.proofs.optimal_acceptance(p, q, k), abs=OPTIMAL_TOL), (vocab, k, run_width)
                torch.testing.assert_close(md.proofs.output_distribution(verifier, p, q, k), p, rtol=0, atol=EXACT_TOL)
    assert used * 4 >= cases, (used, cases)


@pytest.mark.parametrize("rows", [torch.float64, torch.float32])
def test_cells_verify_follows_the_kernel(rows):
    """The fused verify with cells samples its own kernel: on a small row planned with cells, a
    likely tuple with a random verdict (so that the residual draw, which maps every token to its
    cell, runs too), calibrated chi-square."""
    ps, qs = llm_like(10, 12, seed=24, noise=1.0, scale=2.0)
    layouts = [cells_of(ps[i], qs[i], 2) for i in range(10)]
    pick_row = next(i for i, (n, buckets) in enumerate(layouts) if buckets > 0 and n < 12)
    p, q = ps[pick_row], qs[pick_row]
    assert_verify_follows_kernel(md.get_verifier("optimal", fused=True), p, q, 2, rows, seed=13, label="optimal with cells")


def test_run_width_is_checked():
    for bad in (-0.1, 1.0, "wide", float("nan")):
        with pytest.raises(ValueError, match=r"run_width must be a number in \[0, 1\)"):
            md.get_verifier("optimal", run_width=bad)
    for bad in (1, None, "yes"):
        with pytest.raises(ValueError, match="cells must be True or False"):
            md.get_verifier("optimal", cells=bad)


def test_fused_plan_refuses_other_devices_and_bad_options():
    with pytest.raises(ValueError, match="fused must be None, True or False"):
        md.get_verifier("optimal", fused="yes")
    if torch.cuda.is_available():
        p = torch.full((1, 4), 0.25, device="cuda", dtype=torch.float64)
        with pytest.raises(ValueError, match="CPU only"):
            optimal_plan(p, p, 2, fused=True)


@pytest.mark.parametrize("fused", PLANS)
@pytest.mark.parametrize("k", [4, 32])
def test_float32_inputs_reach_the_bound_of_their_rows(k, fused):
    """float32 rows sum to 1 only within ~1e-6; the plan renormalizes them in float64 (at
    k = 32 an unnormalized q moved the tensor plan's acceptance by 0.4), and reaches the bound of
    the rows it was given, renormalized."""
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(2, 20_000, generator=g) * 3
    p, q = logits.softmax(-1), (logits + torch.randn(2, 20_000, generator=g)).softmax(-1)  # float32
    plan = optimal_plan(p, q, k, fused)
    p64, q64 = p.double() / p.double().sum(-1, keepdim=True), q.double() / q.double().sum(-1, keepdim=True)
    accept = torch.minimum(plan.marginal, p64).sum(dim=-1)
    torch.testing.assert_close(accept, md.proofs.optimal_acceptance(p64, q64, k), rtol=0, atol=OPTIMAL_TOL)
    verifier = md.get_verifier("optimal", fused=fused)
    torch.testing.assert_close(verifier.expected_acceptance(p, q, k).double(), accept, rtol=0, atol=1e-6)


def test_without_numba_the_tensor_plan_serves(monkeypatch):
    from multidraft.verifiers import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "have_numba", lambda: False)
    p, q = llm_like(2, 300, seed=4, noise=1.0, scale=2.0)
    plan = optimal_plan(p, q, 3)  # the default falls back to tensor ops
    torch.testing.assert_close(plan.marginal, optimal_plan(p, q, 3, fused=False).marginal, rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs numba"):
        optimal_plan(p, q, 3, fused=True)


def test_fused_rows_split_over_threads_give_the_same_plan():
    p, q = llm_like(5, 2000, seed=5, noise=1.0, scale=3.0)
    one = on_threads(1, lambda: optimal_plan(p, q, 3, fused=True))
    split = on_threads(3, lambda: optimal_plan(p, q, 3, fused=True))  # 5 rows in chunks of 1-2, on three threads
    assert torch.equal(one.log_scale, split.log_scale) and torch.equal(one.marginal, split.marginal)


def _ratio_rows():
    """Rows of p/q that stress the fused plan's radix sort: ties, 0 and inf, near-equal values
    the key cannot tell apart, and outliers that stretch the key's range."""
    g = torch.Generator().manual_seed(6)
    p, q = llm_like(1, 5000, seed=6, noise=1.0, scale=3.0)
    dense = (p / q)[0]
    tied = dense.clone()
    tied[::3] = tied[0]  # one value a third of the row
    tied[1::7] = 0.0
    tied[2::11] = float("inf")
    near = 1 + 1e-13 * torch.randn(5000, generator=g, dtype=torch.float64)  # p == q up to rounding
    outliers = dense.clone()
    outliers[:3] = torch.tensor([1e-300, 1e300, 5e-324], dtype=torch.float64)  # the key resolves little else
    unresolved = near.clone()  # all but two share one key: the insertion pass gives up, a full sort runs
    unresolved[:2] = torch.tensor([1e-300, 1e300], dtype=torch.float64)
    small = torch.rand(7, generator=g, dtype=torch.float64)
    return [dense, tied, near, outliers, unresolved, small, torch.zeros(4, dtype=torch.float64),
            torch.ones(1, dtype=torch.float64)]


@pytest.mark.parametrize("row", range(8))
def test_fused_ratio_sort_orders_exactly(row):
    ratio = _ratio_rows()[row].contiguous()
    order = torch.empty(ratio.shape, dtype=torch.long)
    sorted_ratio = torch.empty_like(ratio)
    scratch = torch.empty((2, ratio.numel()), dtype=torch.long).numpy()
    descending_ratio_order(ratio.numpy(), order.numpy(), sorted_ratio.numpy(), scratch[0], scratch[1])
    assert torch.equal(order.sort().values, torch.arange(ratio.numel()))  # a permutation
    assert torch.equal(ratio[order], ratio.sort(descending=True).values)  # in exact order
    assert torch.equal(sorted_ratio, ratio[order])


@pytest.mark.parametrize("fused", PLANS)
@pytest.mark.parametrize("rows", [torch.float64, torch.float32])
@pytest.mark.parametrize("tuple_kind", ["random-verdict", "repeated-token"])
def test_verify_follows_the_kernel_on_both_paths(fused, rows, tuple_kind, monkeypatch):
    """The fused verify (plan, race, coin and residual draw in one kernel call per row) and the
    tensor one each sample the kernel of their own plan, given float64 or float32 rows, on a
    likely tuple with a random verdict and on one that repeats a token."""
    from multidraft.verifiers import optimal

    calls = []
    fused_verify = optimal._fused_verify
    monkeypatch.setattr(optimal, "_fused_verify", lambda *a: calls.append(1) or fused_verify(*a))
    p, q = CASES["v6-dirichlet-a"]
    verifier = md.get_verifier("optimal", fused=fused)
    tuples, prob, kernels = md.proofs.enumeration.tuple_kernels(verifier, p, q, 3)
    score = prob * (1 - kernels.max(1).values)  # likely, with a random verdict
    if tuple_kind == "repeated-token":
        score = score * (tuples[:, 0] == tuples[:, 1])
    pick = int(torch.argmax(score))
    drafts = tuples[pick].unsqueeze(0).expand(SAMPLES, -1).contiguous()
    tile = lambda x: x.to(rows).unsqueeze(0).expand(SAMPLES, -1).contiguous()  # noqa: E731
    verdict = verifier.verify(tile(p), tile(q), drafts, generator=torch.Generator().manual_seed(11))
    assert len(calls) == (1 if fused else 0)  # the path under test is the one that ran
    counts = np.bincount(verdict.token.numpy(), minlength=p.shape[0])
    assert_law(counts, kernels[pick].numpy(), f"optimal(fused={fused}) verify on {rows}, drafts {tuples[pick].tolist()}")


def test_both_verify_paths_emit_the_same_tokens_for_the_same_seed():
    """Both draw [B, k + 2] uniforms the same way, so only rounding (at a CDF step, or a keep
    probability within ~1e-12 of the coin) could part them."""
    for k, vocab, seed in [(2, 300, 0), (3, 700, 1), (4, 2000, 2)]:
        p, q = llm_like(1000, vocab, seed=seed, noise=1.0, scale=2.0)
        drafts = md.get_verifier("optimal").draft(q, k, torch.Generator().manual_seed(seed))
        tokens = [md.get_verifier("optimal", fused=fused, run_width=0).verify(p, q, drafts, torch.Generator().manual_seed(7)).token
                  for fused in (True, False)]
        assert torch.equal(tokens[0], tokens[1]), (k, vocab)


def test_both_verify_paths_agree_on_rows_off_from_one():
    """optimal renormalizes p and q itself (needs_exact_sums = False): a fused verify that read
    the rows as laws would part from the tensor path on p * 0.7, q * 1.3 (a mutation audit)."""
    p, q = llm_like(4096, 300, seed=3, noise=1.0, scale=2.0)
    p, q = p * 0.7, q * 1.3
    drafts = md.get_verifier("optimal").draft(q / q.sum(-1, keepdim=True), 3, torch.Generator().manual_seed(3))
    tokens = [md.get_verifier("optimal", fused=fused, validate_args=False, run_width=0)
              .verify(p, q, drafts, torch.Generator().manual_seed(8)).token for fused in (True, False)]
    assert torch.equal(tokens[0], tokens[1])


def test_both_verify_paths_agree_on_one_tuple_many_times():
    """One tuple of v6-dirichlet-a, 200,000 times: the keep coin and the residual draw are
    compared at every verdict (a keep probability clamped at 0.999 in the fused kernel moved 167
    of these tokens, and neither the 3,000-row comparison nor a chi-square saw it)."""
    p, q = CASES["v6-dirichlet-a"]
    drafts = torch.tensor([[1, 3]]).expand(200_000, -1)
    rows = p.expand(200_000, -1), q.expand(200_000, -1)
    tokens = [md.get_verifier("optimal", fused=fused, run_width=0).verify(*rows, drafts, torch.Generator().manual_seed(9)).token
              for fused in (True, False)]
    assert torch.equal(tokens[0], tokens[1])
    assert 0.05 < float((tokens[0] != drafts[:, 0]).double().mean()) < 0.95  # both verdicts occur


def test_fused_verify_is_the_same_on_any_number_of_threads():
    p, q = llm_like(7, 3000, seed=8, noise=1.0, scale=3.0)
    verifier = md.get_verifier("optimal", fused=True)
    drafts = verifier.draft(q, 3, torch.Generator().manual_seed(1))
    one, split = (on_threads(n, lambda: verifier.verify(p, q, drafts, torch.Generator().manual_seed(2)).token) for n in (1, 3))
    assert torch.equal(one, split)


def test_fused_scratch_always_fits_the_call():
    """The kernel runs without bounds checks, so every scratch array it is handed must hold
    WORK_ROWS rows of V + 1, whatever vocabulary sizes and row splits came before."""
    from multidraft.verifiers.optimal import _Workspaces
    from multidraft.verifiers.optimal_cpu import WORK_ROWS

    spaces = _Workspaces()
    for vocab, count in [(3000, 1), (32000, 2), (2000, 3), (3000, 4), (40000, 1), (5, 5)]:
        got = spaces.get(vocab, count)
        assert len(got) == count and all(w.shape[0] >= WORK_ROWS and w.shape[1] >= vocab + 1 for w in got), (vocab, count)


def test_fused_verify_checks_draft_ids_even_without_validation():
    p, q = llm_like(2, 50, seed=9, noise=1.0, scale=2.0)
    verifier = md.get_verifier("optimal", fused=True, validate_args=False)
    for bad in (torch.tensor([[1, 50], [2, 3]]), torch.tensor([[-1, 0], [2, 3]])):
        with pytest.raises(ValueError, match=r"drafts must be token ids in \[0, 50\)"):
            verifier.verify(p, q, bad, torch.Generator().manual_seed(0))
