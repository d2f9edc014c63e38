"""OTM-specific checks (the generic exactness and chi-square tests cover it too).

- its acceptance equals the optimum 1 - max_T [q(T)^k - p(T)] (fast formula and brute force);
- its output law equals p to 1e-12 on the same cases, also when the LP solution is perturbed
  (the repair step, not the solver's tolerance, carries exactness);
- the size limit refuses large LPs with a clear error, before doing any work;
- identical rows share one LP and the LRU cache returns the same kernel.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import multidraft as md
import multidraft.verifiers.otm as otm
from multidraft.proofs.enumeration import tuple_kernels
from rows_and_threads import llm_like

TOL = 1e-12
OPT_TOL = 1e-9


def _row(values) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.float64)
    return t / t.sum()


def _dirichlet(vocab: int, seed: int, alpha: float, zero_share: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch._standard_gamma(torch.full((vocab,), alpha, dtype=torch.float64), generator=g)
    if zero_share:
        x[torch.rand(vocab, generator=g) < zero_share] = 0
        if x.sum() == 0:
            x[seed % vocab] = 1
    return x / x.sum()


CORNERS = {
    "equal": (_row([0.1, 0.2, 0.3, 0.4]), _row([0.1, 0.2, 0.3, 0.4])),
    "disjoint": (_row([0.0, 0.0, 0.5, 0.5]), _row([0.2, 0.8, 0.0, 0.0])),
    "onehot-p": (_row([0.0, 1.0, 0.0]), _row([0.5, 0.3, 0.2])),
    "onehot-q": (_row([0.2, 0.3, 0.5]), _row([0.0, 0.0, 1.0])),
    "onehot-same": (_row([0.0, 1.0, 0.0]), _row([0.0, 1.0, 0.0])),
    "onehot-apart": (_row([1.0, 0.0, 0.0]), _row([0.0, 1.0, 0.0])),
    "zeros-both": (_row([0.0, 0.2, 0.3, 0.5, 0.0]), _row([0.4, 0.0, 0.1, 0.3, 0.2])),
    "peaked-draft": (_row([0.25, 0.25, 0.25, 0.25]), _row([0.97, 0.01, 0.01, 0.01])),
    "v2": (_row([0.9, 0.1]), _row([0.2, 0.8])),
    "tiny-q": (_row([0.3, 0.3, 0.4]), _row([1.0, 1e-9, 1.0 - 1e-9])),
}


def random_cases():
    out = []
    for vocab in range(2, 7):
        for seed in range(3):
            alpha, zeros = [(1.0, 0.0), (0.3, 0.0), (1.0, 0.35)][seed]
            p = _dirichlet(vocab, 100 * vocab + 2 * seed, alpha, zeros)
            q = _dirichlet(vocab, 100 * vocab + 2 * seed + 1, alpha, zeros)
            out.append((f"dirichlet-v{vocab}-{seed}", p, q))
    return out


def exact_cases():
    cases = [(name, p, q) for name, (p, q) in CORNERS.items()] + random_cases()
    return [
        pytest.param(p, q, k, id=f"{name}-k{k}")
        for name, p, q in cases
        for k in range(1, 5)
        if p.shape[0] ** k <= 1300
    ]


@pytest.mark.parametrize("p,q,k", exact_cases())
def test_exact_and_optimal(p, q, k):
    verifier = md.get_verifier("otm")
    tuples, prob, kernels = tuple_kernels(verifier, p, q, k)
    torch.testing.assert_close(prob @ kernels, p, rtol=0, atol=TOL)
    assert bool((kernels >= 0).all())
    # No token with p = 0 is ever emitted, whatever the drafts.
    assert bool((kernels[:, p == 0] == 0).all())
    on_draft = torch.zeros_like(kernels, dtype=torch.bool).scatter_(1, tuples, True)
    rate = float(prob @ (kernels * on_draft).sum(dim=1))
    assert rate == pytest.approx(md.proofs.optimal_acceptance(p, q, k), abs=OPT_TOL)
    closed = verifier.expected_acceptance(p[None], q[None], k)
    assert float(closed) == pytest.approx(rate, abs=1e-12)


def test_output_distribution_through_the_public_function():
    p, q = CORNERS["zeros-both"]
    out = md.proofs.output_distribution(md.get_verifier("otm"), p, q, 3)
    torch.testing.assert_close(out, p, rtol=0, atol=TOL)


@pytest.mark.parametrize("vocab,k", [(4, 5), (8, 3), (10, 2), (12, 2), (7, 4)])
def test_lp_optimum_equals_bruteforce(vocab, k):
    for seed in range(4):
        p = _dirichlet(vocab, 7 * seed + vocab, alpha=[1.0, 0.3][seed % 2], zero_share=0.2 * (seed // 2))
        q = _dirichlet(vocab, 7 * seed + vocab + 1000, alpha=[1.0, 0.3][seed % 2], zero_share=0.2 * (seed // 2))
        plan = otm.solve_transport(p.numpy(), q.numpy(), k)
        assert plan.acceptance == pytest.approx(md.proofs.optimal_acceptance_bruteforce(p, q, k), abs=OPT_TOL)


def test_moderate_vocabulary_reaches_the_optimum():
    # Batched expected_acceptance: one LP per row (V = 40, k = 2: 1600 variables each).
    p, q = llm_like(3, 40, seed=5)
    got = md.get_verifier("otm").expected_acceptance(p, q, 2)
    torch.testing.assert_close(got, md.proofs.optimal_acceptance(p, q, 2), rtol=0, atol=OPT_TOL)


def test_extreme_cases_have_known_acceptance():
    verifier = md.get_verifier("otm")
    for name, want in [("equal", 1.0), ("disjoint", 0.0), ("onehot-same", 1.0), ("onehot-apart", 0.0)]:
        p, q = CORNERS[name]
        assert float(verifier.expected_acceptance(p[None], q[None], 2)) == pytest.approx(want, abs=TOL)


def test_repair_keeps_a_perturbed_solution_exact(monkeypatch):
    """Exactness must not rest on the solver's tolerance: perturb its answer by ~1e-6 (some
    entries negative, some rows and columns over their capacity) and the output is still p."""
    solve = otm.solve_lp
    rng = np.random.default_rng(0)

    def sloppy(a_ub, b_ub, **options):
        result = solve(a_ub, b_ub, **options)
        result.x = result.x * (1 + 1e-6 * rng.standard_normal(result.x.size)) + 1e-7 * rng.standard_normal(result.x.size)
        return result

    monkeypatch.setattr(otm, "solve_lp", sloppy)
    for name in ["zeros-both", "peaked-draft", "equal"]:
        p, q = CORNERS[name]
        for k in (2, 3):
            verifier = md.get_verifier("otm")
            out = md.proofs.output_distribution(verifier, p, q, k)
            torch.testing.assert_close(out, p, rtol=0, atol=TOL)
            rate = md.proofs.acceptance_rate(verifier, p, q, k)
            assert rate >= md.proofs.optimal_acceptance(p, q, k) - 1e-4
            assert float(verifier.expected_acceptance(p[None], q[None], k)) == pytest.approx(rate, abs=1e-12)


# ---- size limit -----------------------------------------------------------------------------


def test_size_limit_names_the_numbers():
    verifier = md.get_verifier("otm", max_variables=1000)
    assert verifier.max_variables == 1000
    p, q = _dirichlet(20, 1, 1.0), _dirichlet(20, 2, 1.0)
    drafts = verifier.draft(q[None], 3)
    with pytest.raises(ValueError) as err:
        verifier.kernel(p[None], q[None], drafts)
    message = str(err.value)
    for part in ["exponential in k", "1540 multisets", "max_variables = 1000", "s = 20", "k = 3"]:
        assert part in message
    with pytest.raises(ValueError, match="exponential in k"):
        verifier.expected_acceptance(p[None], q[None], 3)
    # Within the limit for k = 2 (20 * 20 = 400 variables).
    assert verifier.expected_acceptance(p[None], q[None], 2).shape == (1,)


def test_size_limit_counts_q_support_only():
    # V = 1000, but q has 5 tokens: 5 * C(7, 3) = 175 variables at k = 4.
    q = torch.zeros(1, 1000, dtype=torch.float64)
    q[0, [3, 100, 500, 501, 999]] = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15], dtype=torch.float64)
    p = torch.full((1, 1000), 1e-3, dtype=torch.float64)
    verifier = md.get_verifier("otm", max_variables=175)
    got = verifier.expected_acceptance(p, q, 4)
    assert float(got) == pytest.approx(md.proofs.optimal_acceptance(p[0], q[0], 4), abs=OPT_TOL)
    with pytest.raises(ValueError, match="max_variables = 174"):
        md.get_verifier("otm", max_variables=174).expected_acceptance(p, q, 4)


def test_large_vocabulary_is_refused_fast():
    verifier = md.get_verifier("otm", validate_args=False)
    assert verifier.validate_args is False
    p = torch.randn(4, 32000).softmax(-1)
    q = torch.randn(4, 32000).softmax(-1)
    drafts = verifier.draft(q, 2)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="exponential in k"):
        verifier.verify(p, q, drafts)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("option,bad", [("max_variables", 0), ("max_variables", 2.5), ("max_variables", True), ("cache_size", -1), ("cache_size", None)])
def test_bad_options_are_refused(option, bad):
    with pytest.raises(ValueError, match=option):
        md.get_verifier("otm", **{option: bad})


# ---- deduplication and the cache --------------------------------------------------------------


def _count_solves(monkeypatch) -> list:
    calls = []
    solve = otm.solve_transport

    def counted(p, q, k, *args):
        calls.append(k)
        return solve(p, q, k, *args)

    monkeypatch.setattr(otm, "solve_transport", counted)
    return calls


def test_enumeration_solves_one_lp(monkeypatch):
    calls = _count_solves(monkeypatch)
    p, q = CORNERS["zeros-both"]
    md.proofs.output_distribution(md.get_verifier("otm"), p, q, 3)  # 125 tuples, one (p, q)
    assert len(calls) == 1


def test_batch_dedupe_and_cache_give_the_same_kernels(monkeypatch):
    calls = _count_solves(monkeypatch)
    p0, q0 = CORNERS["zeros-both"]
    p1, q1 = _dirichlet(5, 11, 1.0), _dirichlet(5, 12, 1.0)
    order = [0, 1, 0, 0, 1, 1, 0]
    p = torch.stack([[p0, p1][i] for i in order])
    q = torch.stack([[q0, q1][i] for i in order])
    g = torch.Generator().manual_seed(3)
    verifier = md.get_verifier("otm")
    drafts = verifier.draft(q, 3, generator=g)
    batch = verifier.kernel(p, q, drafts)
    assert len(calls) == 2 and len(verifier._cache) == 2
    # Row by row with a verifier that keeps no cache: the same kernels.
    alone = md.get_verifier("otm", cache_size=0)
    for b in range(len(order)):
        torch.testing.assert_close(batch[b : b + 1], alone.kernel(p[b : b + 1], q[b : b + 1], drafts[b : b + 1]), rtol=0, atol=0)
    assert len(alone._cache) == 0 and len(calls) == 2 + len(order)
    # A second call on the cached verifier solves nothing and returns the same numbers.
    again = verifier.kernel(p, q, drafts)
    assert len(calls) == 2 + len(order)
    assert torch.equal(again, batch)


def test_cache_is_lru_and_keyed_on_k(monkeypatch):
    calls = _count_solves(monkeypatch)
    verifier = md.get_verifier("otm", cache_size=2)
    rows = [(_dirichlet(4, 20 + i, 1.0), _dirichlet(4, 40 + i, 1.0)) for i in range(3)]
    for p, q in rows[:2]:
        verifier.expected_acceptance(p[None], q[None], 2)
    verifier.expected_acceptance(rows[0][0][None], rows[0][1][None], 2)  # hit: row 0 is now newest
    assert len(calls) == 2
    verifier.expected_acceptance(rows[2][0][None], rows[2][1][None], 2)  # evicts row 1
    verifier.expected_acceptance(rows[0][0][None], rows[0][1][None], 2)  # still cached
    assert len(calls) == 3
    verifier.expected_acceptance(rows[1][0][None], rows[1][1][None], 2)  # solved again
    verifier.expected_acceptance(rows[1][0][None], rows[1][1][None], 3)  # another k: another LP
    assert len(calls) == 5 and len(verifier._cache) == 2


# ---- dtypes and drafts outside the support ------------------------------------------------------


def test_float32_rows_give_a_float32_kernel():
    p, q = CORNERS["zeros-both"]
    verifier = md.get_verifier("otm")
    drafts = torch.tensor([[0, 2, 2], [4, 3, 0]])
    k32 = verifier.kernel(p.float().expand(2, -1), q.float().expand(2, -1), drafts)
    k64 = verifier.kernel(p.expand(2, -1), q.expand(2, -1), drafts)
    assert k32.dtype == torch.float32
    torch.testing.assert_close(k32.double(), k64, rtol=0, atol=1e-6)


def test_tuple_outside_q_support_gets_a_distribution_without_validation():
    # Such a tuple has draft probability 0; with validation off it must still not crash.
    p, q = CORNERS["zeros-both"]  # q[1] = 0
    verifier = md.get_verifier("otm", validate_args=False)
    kern = verifier.kernel(p[None].expand(2, -1), q[None].expand(2, -1), torch.tensor([[1, 0], [0, 2]]))
    torch.testing.assert_close(kern.sum(-1), torch.ones(2, dtype=torch.float64), rtol=0, atol=TOL)
    assert bool((kern >= 0).all())
    with pytest.raises(ValueError, match="cannot propose"):
        md.get_verifier("otm").kernel(p[None], q[None], torch.tensor([[1, 0]]))


def test_multiset_ranks_are_a_bijection():
    for s, k in [(1, 3), (4, 1), (5, 3), (7, 4), (3, 6)]:
        index = otm.multiset_index(s, k)
        assert index.members.shape == (otm.count_multisets(s, k), k)
        np.testing.assert_array_equal(
            otm.multiset_rank(index.members, index.binom), np.arange(index.members.shape[0])
        )
        assert int(index.first.sum()) == otm.count_variables(s, k)
        # Multinomial coefficients: the ordered tuples of all multisets number s**k.
        assert index.coef.sum() == pytest.approx(s**k)


def test_distinct_rows_survives_a_projection_collision():
    # Two different rows with the same random projection must not share a plan.
    weights = np.random.default_rng(0).random(2) + 0.5
    a = np.array([0.3, 0.7])
    b = a + 1e-3 * np.array([weights[1], -weights[0]])
    x = np.stack([a, b, a, b])
    first, inverse = otm.distinct_rows(x)
    np.testing.assert_array_equal(x[first][inverse], x)
    assert len(first) == 2
