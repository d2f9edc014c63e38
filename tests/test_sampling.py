"""The shared samplers in verifiers/base.py: every verifier draws drafts and residual tokens
through ``inverse_cdf``, which searches in two levels (blocks, then one block) for a large V.

- for any uniform it returns the token a plain one-level inverse CDF returns (away from
  rounding ties at the cdf's steps), the excluded column too;
- it never returns a token of weight 0, also for uniforms at 0 and just below 1;
- its draws follow the law, by the suite's planned chi-square test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chisquare import SAMPLES, assert_law
from multidraft.verifiers.base import CDF_BLOCK, inverse_cdf, sample_categorical


def _weights(batch: int, vocab: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(batch, vocab, generator=gen, dtype=torch.float64) ** 4
    w[torch.rand(batch, vocab, generator=gen) < 0.5] = 0  # many zeros
    w[0, CDF_BLOCK:] = 0  # all mass in the first block
    w[0, 0] = 1
    w[1, :-1] = 0  # all mass on the last token (in the partial block, when there is one)
    w[1, -1] = 1
    w[2, min(3 * CDF_BLOCK, vocab) - 1] = 1e3  # one dominant token at a block's end
    w[3, CDF_BLOCK : 2 * CDF_BLOCK] = 0  # an empty block
    return w


def _reference(weights: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One-level inverse CDF and, per draw, the distance of the target from the nearest cdf step."""
    cdf = weights.cumsum(dim=-1)
    target = u * cdf[:, -1:]
    index = torch.searchsorted(cdf, target, right=True)
    step_gap = (cdf.unsqueeze(1) - target.unsqueeze(-1)).abs().amin(dim=-1)
    return index, step_gap


@pytest.mark.parametrize("vocab", [4 * CDF_BLOCK, 1000, 32000 + 77])
def test_two_level_search_equals_one_level(vocab):
    weights = _weights(16, vocab, seed=vocab)
    u = torch.rand(16, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reference, gap = _reference(weights, u)
    clear = gap > 1e-12 * weights.sum(dim=-1, keepdim=True)  # not a rounding tie
    drawn = inverse_cdf(weights, u)
    assert drawn.shape == (16, 64)
    assert torch.equal(drawn[clear], reference[clear])
    assert float(clear.float().mean()) > 0.99


@pytest.mark.parametrize("vocab", [100, 4 * CDF_BLOCK + 5, 32000 + 77])
def test_excluded_column_is_never_drawn_and_the_rest_keeps_its_law(vocab):
    weights = _weights(16, vocab, seed=vocab + 1)
    weights[:, 7] = 5.0  # a column to exclude that dominates its block
    exclude = torch.full((16, 1), 7)
    exclude[4] = vocab - 1
    u = torch.rand(16, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    without = weights.scatter(1, exclude, 0.0)
    reference, gap = _reference(without, u)
    clear = gap > 1e-12 * without.sum(dim=-1, keepdim=True)
    drawn = inverse_cdf(weights, u, exclude=exclude)
    assert not bool((drawn == exclude).any())
    assert torch.equal(drawn[clear], reference[clear])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("vocab", [50, 32000 + 77])
def test_zero_weight_tokens_are_never_drawn(dtype, vocab):
    weights = _weights(16, vocab, seed=3).to(dtype)
    edge = torch.tensor([0.0, 1e-300, 0.5, 1 - 1e-16, float(np.nextafter(1.0, 0.0, dtype=np.float32))], dtype=torch.float64)
    u = torch.cat([edge, torch.rand(59, generator=torch.Generator().manual_seed(4), dtype=torch.float64)]).to(dtype)
    u = u.clamp(max=float(torch.nextafter(torch.tensor(1.0, dtype=dtype), torch.tensor(0.0, dtype=dtype))))
    drawn = inverse_cdf(weights, u.expand(16, -1))
    assert bool((weights.gather(1, drawn) > 0).all())


def test_two_level_draws_follow_the_law():
    # 40 tokens of positive weight spread over blocks (some sharing one, one in the partial
    # last block); SAMPLES draws of one row, counted against the weights.
    vocab = 20 * CDF_BLOCK + 33
    gen = torch.Generator().manual_seed(5)
    support = torch.cat([torch.randperm(vocab - 1, generator=gen)[:39], torch.tensor([vocab - 1])])
    q = torch.zeros(1, vocab, dtype=torch.float64)
    q[0, support] = torch.rand(40, generator=gen, dtype=torch.float64) + 0.2
    q /= q.sum()
    draws = sample_categorical(q.expand(SAMPLES // 100, -1), 100, generator=gen).flatten()
    counts = torch.bincount(draws, minlength=vocab)
    assert_law(counts.numpy(), q[0].numpy(), "two-level inverse CDF")


@pytest.mark.parametrize("name", ["rrs-wor", "optimal-wor"])
@pytest.mark.parametrize(
    "q",
    [
        torch.tensor([1.0, 1e-40, 0.0, 0.0], dtype=torch.float32),  # subnormal in float32
        torch.tensor([1.0, 3e-40, 2e-40, 0.0], dtype=torch.float32),
        torch.tensor([1.0, 1e-310, 0.0, 0.0], dtype=torch.float64),  # subnormal in float64
    ],
    ids=["f32-one", "f32-two", "f64-one"],
)
def test_without_replacement_drafts_handle_subnormal_q(name, q):
    """A subnormal q: the remaining mass once the big token is drawn is subnormal too.  The
    draft law summed to 0.0085 where that mass was clamped up to the dtype's tiny, and a race
    clock E / q overflowed to inf for q = 1e-310, tying with the q = 0 tokens, which were then
    drafted (98 % of rows)."""
    import multidraft as md
    from multidraft.proofs.enumeration import all_tuples

    verifier = md.get_verifier(name)
    tuples = all_tuples(4, 2)
    law = verifier.draft_probability(q.expand(tuples.shape[0], -1), tuples)
    assert abs(float(law.sum()) - 1.0) < 1e-6
    drafts = verifier.draft(q.expand(4000, -1), 2, torch.Generator().manual_seed(0))
    assert bool((q[drafts] > 0).all()), "a token with q = 0 was drafted"
    # the drafts follow draft_probability (here: which of the small tokens comes second)
    seen = torch.bincount(drafts[:, 0] * 4 + drafts[:, 1], minlength=16).double() / 4000
    expected = torch.zeros(16, dtype=torch.float64)
    expected[tuples[:, 0] * 4 + tuples[:, 1]] = law.double()
    assert float((seen - expected).abs().max()) < 0.05
