"""KV cache and tree attention: logits through the cached tree path equal a fresh full forward."""

from __future__ import annotations

import pytest
import torch

from engine_helpers import full_logits
from multidraft.engine import GPT, GPTConfig, KVCache, TableModel
from multidraft.engine.engine import commit_round, model_forward
from multidraft.engine.tree import pending_rows, pending_tokens, prefix_groups, tree_positions, tree_rows

TOL = dict(rtol=1e-9, atol=1e-9)  # float64 models: only summation order differs


def gpt(seed, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{"vocab_size": 32, "n_layer": 2, "n_head": 4, "dim": 32, **overrides})).double().eval()


@pytest.mark.parametrize("overrides", [{}, {"n_kv_head": 2}])
@torch.no_grad()
def test_tree_round_and_commit_match_full_forward(overrides):
    """Two requests with ragged cached lengths: prefill, score a tree, commit a non-contiguous
    path, then continue; every logit matches a fresh causal forward of the true sequence."""
    model = gpt(0, **overrides)
    g = torch.Generator().manual_seed(1)
    bsz, total, k, depth = 2, 14, 3, 3
    truth = torch.randint(0, 32, (bsz, total), generator=g)  # the sequences we will end up with
    full = full_logits(model, truth)  # [B, total, V]
    cache = model.new_cache(bsz, 40)
    seq = truth.clone()

    # Prefill: request 0 has 5 tokens, request 1 has 3 (ragged pending block with padding).
    seq_len = torch.tensor([5, 3])
    ids, pos, valid, count = pending_tokens(seq, seq_len, cache.lens)
    logits = model_forward(model, cache, ids, pos, pending_rows(valid))
    for b in range(bsz):
        torch.testing.assert_close(logits[b, : count[b]], full[b, : count[b]], **TOL)
    cache.commit(torch.arange(valid.shape[1]).expand(bsz, -1), count)
    assert cache.lens.tolist() == [5, 3]

    # A tree whose sequence 1 is the truth; 0 and 2 share its first token, then diverge, so the
    # true path is the nodes at slots (0, 0), (1, 1), (2, 1): not contiguous in the round's layout.
    seq_len = torch.tensor([6, 4])  # one accepted token each, not yet cached (the pending block)
    x = torch.empty(bsz, k, depth, dtype=torch.long)
    for b in range(bsz):
        nxt = truth[b, seq_len[b] : seq_len[b] + depth]
        x[b, 1] = nxt
        x[b, 0] = torch.stack([nxt[0], (nxt[1] + 1) % 32, nxt[2]])
        x[b, 2] = torch.stack([nxt[0], (nxt[1] + 2) % 32, (nxt[2] + 5) % 32])
    canon = prefix_groups(x)
    assert canon[:, :, 1].tolist() == [[0, 1, 1]] * bsz
    ids, pos, valid, count = pending_tokens(seq, seq_len, cache.lens)
    top = torch.cat([pending_rows(valid), torch.zeros(bsz, valid.shape[1], depth * k, dtype=torch.bool)], 2)
    rows = torch.cat([top, tree_rows(valid, canon)], 1)
    tree_ids = x.transpose(1, 2).reshape(bsz, depth * k)
    logits = model_forward(model, cache, torch.cat([ids, tree_ids], 1), torch.cat([pos, tree_positions(seq_len, canon)], 1), rows)
    width = valid.shape[1]
    for b in range(bsz):
        n = int(seq_len[b])
        torch.testing.assert_close(logits[b, 0], full[b, n - 1], **TOL)  # the pending token
        for level in range(depth):
            slot = int(canon[b, level, 1])  # the node of sequence 1 at this depth
            torch.testing.assert_close(logits[b, width + level * k + slot], full[b, n + level], **TOL)
        # A node off the true path sees its own branch: compare with that branch's fresh forward.
        branch = torch.cat([truth[b, :n], x[b, 2]]).unsqueeze(0)
        torch.testing.assert_close(logits[b, width + 2 * k + 2], full_logits(model, branch)[0, -1], **TOL)

    # Accept two tree nodes for request 0 and three for request 1; keep them, drop the rest.
    accepted = torch.tensor([2, 3])
    path = canon[:, :, 1]  # the slot of sequence 1's node at each depth
    commit_round(cache, count, width, path, accepted, depth, k, active=torch.tensor([True, True]))
    assert cache.lens.tolist() == [5 + 1 + 2, 3 + 1 + 3]

    # Continue from the committed path: the next pending token must see exactly the truth.
    seq_len = cache.lens + 1
    ids, pos, valid, count = pending_tokens(seq, seq_len, cache.lens)
    logits = model_forward(model, cache, ids, pos, pending_rows(valid))
    for b in range(bsz):
        torch.testing.assert_close(logits[b, 0], full[b, int(seq_len[b]) - 1], **TOL)


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
