"""KV cache and tree attention: logits through the cached tree path equal a fresh full forward."""

from __future__ import annotations

import pytest
import torch

from engine_helpers import check_tree_round, full_logits
from multidraft.engine import GPT, GPTConfig, KVCache, TableModel

TOL = dict(rtol=1e-9, atol=1e-9)  # float64 models: only summation order differs


def gpt(seed, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{"vocab_size": 32, "n_layer": 2, "n_head": 4, "dim": 32, **overrides})).double().eval()


@pytest.mark.parametrize("overrides", [{}, {"n_kv_head": 2}])
def test_tree_round_and_commit_match_full_forward(overrides):
    """Ragged prefill, a tree, a non-contiguous commit, one more step (engine_helpers): every
    logit matches a fresh causal forward of the true sequence."""
    model = gpt(0, **overrides)
    check_tree_round(model, lambda ids: full_logits(model, ids), 32, TOL)


def test_commit_moves_only_kept_slots():
    cache = KVCache(1, 2, 1, 10, 1, dtype=torch.float64)
    cache.k[0, :, 0, :, 0] = torch.arange(10, dtype=torch.float64)
    cache.lens[:] = torch.tensor([2, 4])
    cache.max_committed = 4
    cache.advance(5)
    cache.commit(torch.tensor([[0, 3, 4], [1, 2, 0]]), torch.tensor([3, 1]))
    assert cache.lens.tolist() == [5, 5]
    assert cache.k[0, 0, 0, :5, 0].tolist() == [0, 1, 2, 5, 6]
    assert cache.k[0, 1, 0, :5, 0].tolist() == [0, 1, 2, 3, 5]


def test_keep_rows_drops_finished_requests():
    cache = KVCache(1, 3, 1, 6, 1, dtype=torch.float64)
    cache.k[0, :, 0, :, 0] = torch.arange(3, dtype=torch.float64).view(3, 1) * 10 + torch.arange(6)
    cache.lens[:] = torch.tensor([2, 5, 3])
    cache.max_committed = 5
    cache.keep_rows(torch.tensor([2, 0]))
    assert cache.batch_size == 2 and cache.lens.tolist() == [3, 2] and cache.max_committed == 3
    assert cache.k[0, :, 0, :3, 0].tolist() == [[20, 21, 22], [0, 1, 2]]
    cache.advance(1)
    with pytest.raises(ValueError, match="keep_rows between rounds only: 1 slots of this round are not committed"):
        cache.keep_rows(torch.tensor([0]))


def test_cache_overflow_and_bad_commit_are_errors():
    cache = KVCache(1, 1, 1, 4, 1)
    with pytest.raises(ValueError, match="KV cache overflow: 0 committed \\+ 0 pending \\+ 5 new slots = 5 > max_len = 4"):
        cache.slots(5)
    cache.advance(2)
    with pytest.raises(ValueError, match="commit offsets must lie in \\[0, 2\\)"):
        cache.commit(torch.tensor([[0, 2]]), torch.tensor([2]))


def test_table_model_rejects_a_mask_that_hides_an_ancestor():
    model = TableModel.random(4, 3, seed=0)
    cache = model.new_cache(1, 8)
    ids, pos = torch.tensor([[1, 2, 3]]), torch.arange(3).unsqueeze(0)
    mask = torch.eye(3, dtype=torch.bool).unsqueeze(0)  # each token sees only itself
    with pytest.raises(ValueError, match="sees 0 slots at position 0; a well-formed mask shows exactly one"):
        model(ids, pos, mask, cache)


def test_table_model_full_forward_is_the_table():
    model = TableModel.random(4, 3, seed=0)
    ids = torch.tensor([[1, 2, 3, 0]])
    probs = full_logits(model, ids).exp()[0]
    for t in range(4):
        torch.testing.assert_close(probs[t], model.next_probs(ids[0, : t + 1].tolist()))


def test_a_write_of_another_kv_layout_is_refused():
    """K/V with fewer heads (or another head size) than the cache holds would fill part of it
    and leave zeros that attention reads silently."""
    cache = KVCache(n_layers=1, batch_size=2, n_heads=4, max_len=8, head_dim=16)
    with pytest.raises(ValueError, match=r"wrote K/V of shape \(2, 1, 3, 16\).*4 heads of size 16"):
        cache.write(0, torch.zeros(2, 1, 3, 16), torch.zeros(2, 1, 3, 16))
    with pytest.raises(ValueError, match="4 heads of size 16"):
        cache.write(0, torch.zeros(2, 4, 3, 8), torch.zeros(2, 4, 3, 8))
