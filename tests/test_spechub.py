"""SpecHub-specific checks (the generic exactness and chi-square tests cover it too).

- its acceptance equals the optimum of the transport LP over its own draft law (scipy);
- the closed form 1 - sum_{x != a} (p(x) - q(x) / (1 - q(a)))+;
- the vectorized kernel equals a plain sequential re-statement of the authors' procedure;
- every draft holds the hub; one-hot q, ties, zeros, near-one-hot rows; k != 2 is refused.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import multidraft as md
from transport_lp import transport_lp_optimum
from multidraft.proofs.cases import CASES
from multidraft.verifiers.base import CDF_BLOCK
from multidraft.verifiers.spechub import (
    _verify_dense,
    _verify_shrinking,
    draft_test,
    hub_acceptance,
    hub_stats,
    hub_and_rest,
    spare_masses,
)

TOL = 1e-12
SH = md.get_verifier("spechub")


def _random_row(gen: torch.Generator, vocab: int) -> torch.Tensor:
    """A float64 probability row with a random shape: dense, with zeros, one-hot, or tied."""
    kind = int(torch.randint(0, 5, (1,), generator=gen))
    x = torch.rand(vocab, generator=gen, dtype=torch.float64)
    if kind == 0:
        x[torch.rand(vocab, generator=gen) < 0.4] = 0
    elif kind == 1:
        x = torch.zeros(vocab, dtype=torch.float64)
        x[int(torch.randint(0, vocab, (1,), generator=gen))] = 1
    elif kind == 2:
        x = torch.ones(vocab, dtype=torch.float64)  # every token tied for the hub
    elif kind == 3:
        x = torch.round(x * 3)  # many ties, some zeros
    if x.sum() == 0:
        x[0] = 1
    return x / x.sum()


def random_cases(count: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        vocab = 2 + i % 5  # V from 2 to 6
        p, q = _random_row(gen, vocab), _random_row(gen, vocab)
        if i % 9 == 0:
            p = q.clone()
        elif i % 9 == 1:  # disjoint supports where possible
            p = torch.where(q > 0, torch.zeros_like(q), torch.ones_like(q))
            p = p / p.sum() if p.sum() > 0 else _random_row(gen, vocab)
        out.append((p, q))
    return out


ALL_CASES = list(CASES.values()) + random_cases(120)


def lp_optimum(p: torch.Tensor, q: torch.Tensor) -> float:
    """max P(emitted token is a draft) over all couplings of SpecHub's draft law with p (scipy)."""
    return transport_lp_optimum(SH, p, q, 2)


def closed_form_acceptance(p: torch.Tensor, q: torch.Tensor) -> float:
    """1 - sum_{x != a} (p(x) - q(x) / (1 - q(a)))+, and p(a) when q is one-hot."""
    a = int(torch.argmax(q))
    rest = float(q.sum() - q[a])
    if rest == 0:
        return float(p[a])
    off = [x for x in range(len(p)) if x != a]
    return 1 - sum(max(float(p[x]) - float(q[x]) / rest, 0.0) for x in off)


def authors_procedure(p: list[float], q: list[float], tup: tuple[int, int]) -> list[float]:
    """The emitted-token law for one tuple, stated the way the authors' code walks it: serve the
    non-hub tokens from the (x, a) tuples, then from the (a, x) tuples, then the hub from the
    (a, x) leftovers, then from the (x, a) leftovers; renormalize what p has left."""
    vocab = len(p)
    a = max(range(vocab), key=lambda v: (q[v], -v))  # first index of the maximum
    off = [x for x in range(vocab) if x != a]
    rest = sum(q[x] for x in off)
    out = [0.0] * vocab
    if rest == 0:
        assert tup == (a, a)
        take = min(1.0, p[a] / q[a])
        left = [0.0 if v == a else p[v] for v in range(vocab)]
        out[a] = take
        for v in range(vocab):
            out[v] += (1 - take) * left[v] / sum(left) if sum(left) > 0 else 0.0
        return out
    u = {x: q[x] for x in off}  # mass of (x, a)
    w = {x: q[a] * q[x] / rest for x in off}  # mass of (a, x)
    p1 = {x: max(p[x] - u[x], 0.0) for x in off}
    left_xa = {x: max(u[x] - p[x], 0.0) for x in off}
    p2 = {x: max(p1[x] - w[x], 0.0) for x in off}
    left_ax = {x: max(w[x] - p1[x], 0.0) for x in off}
    d1, d2 = sum(left_ax.values()), sum(left_xa.values())
    hub_after_ax = max(p[a] - d1, 0.0)
    hub_left = max(hub_after_ax - d2, 0.0)
    assert hub_left < 1e-12  # the hub is always fully served
    first, second = tup
    if second == a:
        x = first
        take_x = min(1.0, p[x] / u[x])
        take_hub = min(1.0, hub_after_ax / d2) if d2 > 0 else 1.0
    else:
        assert first == a
        x = second
        take_x = min(1.0, p1[x] / w[x])
        take_hub = min(1.0, p[a] / d1) if d1 > 0 else 1.0
    out[x] += take_x
    out[a] += (1 - take_x) * take_hub
    reject = (1 - take_x) * (1 - take_hub)
    residual_mass = sum(p2.values())
    for y in off:
        out[y] += reject * (p2[y] / residual_mass if residual_mass > 0 else p[y])
    if residual_mass == 0:
        out[a] += reject * p[a]
    return out


@pytest.mark.parametrize("index", range(len(ALL_CASES)))
def test_exact_and_lp_optimal(index):
    p, q = ALL_CASES[index]
    out = md.proofs.output_distribution(SH, p, q, 2)
    torch.testing.assert_close(out, p, rtol=0, atol=TOL)
    rate = md.proofs.acceptance_rate(SH, p, q, 2)
    assert rate == pytest.approx(lp_optimum(p, q), abs=1e-9)
    assert rate == pytest.approx(closed_form_acceptance(p, q), abs=1e-12)
    assert rate == pytest.approx(float(SH.expected_acceptance(p[None], q[None], 2)), abs=1e-12)
    assert rate == pytest.approx(md.proofs.optimal_acceptance_for_scheme(SH, p, q, 2), abs=1e-12)


@pytest.mark.parametrize("index", range(0, len(ALL_CASES), 3))
def test_kernel_matches_the_authors_procedure(index):
    p, q = ALL_CASES[index]
    tuples, _, kernels = md.proofs.enumeration.tuple_kernels(SH, p, q, 2)
    for tup, kern in zip(tuples.tolist(), kernels):
        expected = torch.tensor(authors_procedure(p.tolist(), q.tolist(), tuple(tup)), dtype=torch.float64)
        torch.testing.assert_close(kern, expected, rtol=0, atol=1e-12)


def test_draft_law_is_the_hub_scheme():
    # q(a) = 0.5 is the hub; (x, a) has prob q(x); (a, x) has prob q(a) q(x) / (1 - q(a)).
    q = torch.tensor([[0.2, 0.5, 0.3, 0.0]], dtype=torch.float64)
    prob = {t: float(SH.draft_probability(q, torch.tensor([t]))) for t in itertools.product(range(4), repeat=2)}
    assert prob[(0, 1)] == pytest.approx(0.2) and prob[(2, 1)] == pytest.approx(0.3)
    assert prob[(1, 0)] == pytest.approx(0.5 * 0.2 / 0.5) and prob[(1, 2)] == pytest.approx(0.5 * 0.3 / 0.5)
    assert sum(v for t, v in prob.items() if t not in {(0, 1), (2, 1), (1, 0), (1, 2)}) == 0
    assert sum(prob.values()) == pytest.approx(1, abs=TOL)


def test_drafts_always_hold_the_hub():
    gen = torch.Generator().manual_seed(7)
    q = torch.stack([_random_row(gen, 6) for _ in range(400)]).float()
    drafts = SH.draft(q.repeat(20, 1), 2, generator=gen)
    hub = q.repeat(20, 1).argmax(dim=1, keepdim=True)
    assert bool((drafts == hub).any(dim=1).all())
    one_hot = (q.repeat(20, 1) > 0).sum(dim=1) == 1
    repeats = drafts[:, 0] == drafts[:, 1]
    assert bool((repeats == one_hot).all())  # (a, a) exactly when q is one-hot
    assert bool((q.repeat(20, 1).gather(1, drafts) > 0).all())


def test_ties_take_the_first_index_as_hub():
    q = torch.tensor([[0.1, 0.3, 0.3, 0.3]], dtype=torch.float64)
    assert int(hub_stats(q).hub) == 1
    assert float(SH.draft_probability(q, torch.tensor([[2, 1]]))) == pytest.approx(0.3)
    assert float(SH.draft_probability(q, torch.tensor([[2, 3]]))) == 0  # 3 is not the hub
    drafts = SH.draft(q.expand(2000, -1), 2, generator=torch.Generator().manual_seed(0))
    assert bool((drafts == 1).any(dim=1).all())


def test_one_hot_draft_repeats_the_hub():
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    q = torch.tensor([[0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    drafts = SH.draft(q.expand(50, -1), 2)
    assert bool((drafts == 1).all())
    assert float(SH.draft_probability(q, torch.tensor([[1, 1]]))) == 1
    kern = SH.kernel(p, q, torch.tensor([[1, 1]]))
    # Speculative sampling of the hub alone: keep it with prob. p(a), else p off the hub
    # renormalized, which together give back p.
    torch.testing.assert_close(kern, p, rtol=0, atol=TOL)
    verdict = SH.verify(p.expand(4000, -1), q.expand(4000, -1), torch.tensor([[1, 1]]).expand(4000, -1).contiguous())
    assert bool(((verdict.token == 1) == (verdict.accepted == 0)).all())
    assert bool((verdict.accepted[verdict.token != 1] == -1).all())


def test_subnormal_rest_counts_as_one_hot():
    # The mass off the hub is below float32's smallest normal number: the scheme repeats the hub.
    q = torch.tensor([[1.0, 1e-45, 0.0]], dtype=torch.float32)
    p = torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float32)
    assert bool((SH.draft(q.expand(100, -1), 2) == 0).all())
    assert float(SH.draft_probability(q, torch.tensor([[0, 0]]))) == 1
    assert float(SH.draft_probability(q, torch.tensor([[0, 1]]))) == 0
    torch.testing.assert_close(SH.kernel(p, q, torch.tensor([[0, 0]])), p, rtol=0, atol=1e-6)


def test_near_one_hot_float32_matches_float64():
    # q(a) = 1 - 1e-6: the second draft's law divides by the tiny rest, which must not cancel.
    q64 = torch.tensor([1 - 1e-6, 4e-7, 3e-7, 2e-7, 1e-7], dtype=torch.float64)
    p64 = torch.tensor([0.2, 0.3, 0.1, 0.25, 0.15], dtype=torch.float64)
    tuples, prob, kern64 = md.proofs.enumeration.tuple_kernels(SH, p64, q64, 2)
    n = len(tuples)
    kern32 = SH.kernel(p64.float().expand(n, -1), q64.float().expand(n, -1), tuples)
    torch.testing.assert_close(kern32.double(), kern64, rtol=0, atol=1e-5)
    prob32 = SH.draft_probability(q64.float().expand(n, -1), tuples)
    torch.testing.assert_close(prob32.double(), prob, rtol=1e-5, atol=1e-7)


def test_zero_target_probability_is_never_emitted():
    p = torch.tensor([[0.0, 0.6, 0.0, 0.4]], dtype=torch.float64)  # hub 0 has p = 0
    q = torch.tensor([[0.4, 0.3, 0.2, 0.1]], dtype=torch.float64)
    for tup in ([0, 1], [1, 0], [0, 2], [2, 0], [0, 3], [3, 0]):
        kern = SH.kernel(p, q, torch.tensor([tup]))
        assert float(kern[0, 0]) == 0 and float(kern[0, 2]) == 0
        drafts = torch.tensor([tup]).expand(3000, -1).contiguous()
        token = SH.verify(p.expand(3000, -1), q.expand(3000, -1), drafts).token
        assert not bool(((token == 0) | (token == 2)).any())


def test_equal_and_disjoint_acceptance():
    p, q = CASES["v3-equal"]
    assert md.proofs.acceptance_rate(SH, p, q, 2) == pytest.approx(1, abs=TOL)
    p, q = CASES["v4-disjoint"]
    assert md.proofs.acceptance_rate(SH, p, q, 2) == pytest.approx(0, abs=TOL)


def test_first_draft_gets_ordinary_speculative_sampling():
    # In a tuple (x, a) the first draft x is kept with prob. min(1, p(x) / q(x)), as with one draft.
    p, q = CASES["v6-dirichlet-a"]
    a = int(q.argmax())
    for x in range(6):
        if x == a:
            continue
        kern = SH.kernel(p[None], q[None], torch.tensor([[x, a]]))
        assert float(kern[0, x]) == pytest.approx(min(1.0, float(p[x] / q[x])), abs=TOL)


def test_residual_never_holds_the_hub_or_a_draft():
    for p, q in ALL_CASES[::4]:
        stats = hub_stats(q[None])
        spare = spare_masses(p[None], q[None], stats)
        assert float(spare.residual[0, int(stats.hub)]) == 0
        tuples, _ = md.proofs.enumeration.draft_law(SH, q, 2)
        for tup in tuples.tolist():
            test = draft_test(p[None], q[None], torch.tensor([tup]), stats)
            reject = (1 - test.accept_x) * (1 - hub_acceptance(spare, test.hub_first))
            if float(reject) > 1e-12:  # the residual is reached: it holds neither draft
                assert float(spare.residual[0, tup[0]]) == 0 and float(spare.residual[0, tup[1]]) == 0


def test_batched_kernel_equals_rows():
    gen = torch.Generator().manual_seed(3)
    p = torch.stack([_random_row(gen, 6) for _ in range(64)])
    q = torch.stack([_random_row(gen, 6) for _ in range(64)])
    drafts = SH.draft(q, 2, generator=gen)
    batched = SH.kernel(p, q, drafts)
    for b in range(64):
        torch.testing.assert_close(batched[b : b + 1], SH.kernel(p[b : b + 1], q[b : b + 1], drafts[b : b + 1]))


@pytest.mark.parametrize("k,message", [(1, "spechub needs k >= 2 drafts, got k = 1"), (3, "spechub supports at most 2 drafts, got k = 3")])
def test_k_other_than_two_is_refused(k, message):
    q = CASES["v6-dirichlet-a"][1][None]
    with pytest.raises(ValueError, match=message):
        SH.draft(q, k)
    with pytest.raises(ValueError, match=message):
        SH.kernel(q, q, torch.zeros(1, k, dtype=torch.long) + int(q.argmax()))


def test_drafts_without_the_hub_are_refused():
    p, q = CASES["v6-dirichlet-a"]
    a = int(q.argmax())
    others = [v for v in range(6) if v != a][:2]
    with pytest.raises(ValueError, match=rf"must contain the hub token argmax q; row 0 has drafts \[{others[0]}, {others[1]}\] but its hub is {a}"):
        SH.verify(p[None], q[None], torch.tensor([others]))
    with pytest.raises(ValueError, match=r"repeat the hub only when q is one-hot"):
        SH.kernel(p[None], q[None], torch.tensor([[a, a]]))
    # Such tuples are simply impossible for draft_probability.
    assert float(SH.draft_probability(q[None], torch.tensor([others]))) == 0
    assert float(SH.draft_probability(q[None], torch.tensor([[a, a]]))) == 0


def test_verify_is_vectorized_over_large_vocab():
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(64, 32000, generator=gen)
    p = torch.softmax(logits * 2, dim=-1)
    q = torch.softmax(logits * 2 + torch.randn(64, 32000, generator=gen), dim=-1)
    drafts = SH.draft(q, 2, generator=gen)
    verdict = SH.verify(p, q, drafts, generator=gen)
    assert verdict.token.shape == (64,) and verdict.accepted.shape == (64,)
    assert bool((p.gather(1, verdict.token[:, None]) > 0).all())
    hit = drafts == verdict.token[:, None]
    assert bool((hit.any(dim=1) == (verdict.accepted >= 0)).all())


@pytest.mark.parametrize(
    "row",
    [
        [0.3, 0.1, 0.3, 0.3],  # hub first, tied
        [0.1, 0.2, 0.3, 0.4],  # hub last
        [0.2, 0.4, 0.4, 0.0],  # tied hub in the middle, a zero after it
        [1 - 3e-6, 1e-6, 2e-6, 0.0],  # near one-hot: the second draw divides by a tiny rest
    ],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_draft_frequencies_follow_draft_probability(row, dtype):
    # Not a chi-square (those are budgeted in tests/chisquare.py): every cell within 6 sigma.
    n = 400_000
    q = torch.tensor([row], dtype=torch.float64)
    q = (q / q.sum()).to(dtype)
    drafts = SH.draft(q.expand(n, -1), 2, generator=torch.Generator().manual_seed(5))
    codes = drafts[:, 0] * 4 + drafts[:, 1]
    freq = torch.bincount(codes, minlength=16).double() / n
    tuples = torch.tensor(list(itertools.product(range(4), repeat=2)))
    prob = SH.draft_probability(q.expand(16, -1), tuples).double()
    sigma = (prob * (1 - prob) / n).sqrt()
    assert bool(((freq - prob).abs() <= 6 * sigma + 1e-12).all()), (freq, prob)
    assert bool((freq[prob == 0] == 0).all())


@pytest.mark.parametrize("vocab", [4 * CDF_BLOCK, 4 * CDF_BLOCK + 1, 3000, 32000 + 77])
def test_blocked_hub_search_equals_max(vocab):
    # The blocked hub search must give q.max's answer exactly: the first maximal index, ties
    # too, and R must not cancel when the hub dominates its block.
    gen = torch.Generator().manual_seed(vocab)
    q = torch.rand(64, vocab, generator=gen, dtype=torch.float64)
    q[1] = 1.0  # every token tied: the hub is 0
    q[2, -1] = 5.0  # the maximum in the tail past the last whole block
    q[3, [5, vocab - 1]] = 5.0  # tied between the first block and the tail: the first wins
    q[4, [CDF_BLOCK + 3, 3 * CDF_BLOCK + 1]] = 5.0  # tied between two blocks
    q[5, [CDF_BLOCK - 1, CDF_BLOCK]] = 5.0  # tied across a block boundary
    q[6] = torch.round(q[6] * 3)  # many ties
    q[7] = 0.0
    q[7, [2 * CDF_BLOCK + 9, 2 * CDF_BLOCK + 10]] = torch.tensor([1.0, 1e-12], dtype=torch.float64)
    q[8] = 0.0
    q[8, -1] = 1.0  # one-hot in the tail: R = 0
    values, index = q.max(dim=-1, keepdim=True)
    hub, q_hub, rest = hub_and_rest(q)
    assert torch.equal(hub, index) and torch.equal(q_hub, values)
    expected_rest = q.scatter(1, index, 0.0).sum(dim=-1, keepdim=True)
    torch.testing.assert_close(rest, expected_rest, rtol=1e-13, atol=0)
    assert float(rest[7]) == 1e-12 and float(rest[8]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dense_and_shrinking_paths_agree(dtype):
    # CPU verify skips the later tests for rows that accept early; the accelerator path
    # computes everything.  Given the same uniforms they emit the same tokens.
    gen = torch.Generator().manual_seed(11)
    logits = 3 * torch.randn(512, 700, generator=gen, dtype=dtype)
    p = logits.softmax(-1)
    q = (logits + torch.randn(512, 700, generator=gen, dtype=dtype)).softmax(-1)
    q[:8] = torch.nn.functional.one_hot(q[:8].argmax(-1), 700).to(dtype)  # (a, a) tuples
    p[8:16] = q[8:16]  # every draft accepted
    drafts = SH.draft(q, 2, generator=gen)
    u = torch.rand((512, 3), generator=gen, dtype=dtype)
    dense, shrinking = _verify_dense(p, q, drafts, u), _verify_shrinking(p, q, drafts, u)
    assert torch.equal(dense, shrinking)
    taken = torch.stack([(shrinking == drafts[:, 0]), (shrinking == drafts[:, 1])]).any(0)
    assert 0 < int((~taken).sum()) < 512  # the residual is drawn for some rows, not all
