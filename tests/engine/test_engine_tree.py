"""Tree construction and the sampling transform, on hand-checked examples."""

from __future__ import annotations

import numpy as np
import torch

from engine_helpers import transformed_row
from multidraft.engine import SamplingConfig, logits_to_probs
from multidraft.engine.tree import (branching_canon, is_node, pending_rows, pending_tokens, prefix_groups, subtree_spans,
                                   tree_positions, tree_rows)


def test_prefix_groups_and_nodes():
    # 4 sequences of depth 3: 0 and 3 identical, 1 branches from 0 at depth 3, 2 at depth 2.
    x = torch.tensor([[[1, 2, 3], [1, 2, 0], [1, 0, 3], [1, 2, 3]]])
    canon = prefix_groups(x)
    assert canon[0].tolist() == [[0, 0, 0, 0], [0, 0, 2, 0], [0, 1, 2, 0]]
    assert is_node(canon)[0].tolist() == [[True, False, False, False], [True, False, True, False], [True, True, True, False]]


def test_branching_layout():
    # widths (2, 3): the root has 2 children, each of them 3: 6 paths, nodes at slots 0 and 3, then all.
    assert subtree_spans((2, 3)) == [3, 1]
    assert subtree_spans((4, 2, 1)) == [2, 1, 1]
    canon = branching_canon((2, 3), batch=2, device="cpu")
    assert canon.shape == (2, 2, 6)
    assert canon[1].tolist() == [[0, 0, 0, 3, 3, 3], [0, 1, 2, 3, 4, 5]]
    # Node (depth 2, path 4) sees its parent at slot (depth 1, path 3), itself, and not path 0's nodes.
    rows = tree_rows(torch.tensor([[True], [True]]), canon)[0].int()  # [D*k, P + D*k]
    assert rows[6 + 4].tolist() == [1] + [0, 0, 0, 1, 0, 0] + [0, 0, 0, 0, 1, 0]
    assert tree_positions(torch.tensor([5, 7]), canon)[1].tolist() == [7, 0, 0, 7, 0, 0] + [8] * 6


def test_tree_rows_positions_and_pending():
    x = torch.tensor([[[1, 2], [1, 3]]])  # k = 2, D = 2: root -> 1 -> {2, 3}
    canon = prefix_groups(x)
    valid = torch.tensor([[True, True, False]])  # 2 pending tokens and one pad
    rows = tree_rows(valid, canon)[0].int().tolist()
    # columns: 3 pending offsets | slots (1,0) (1,1) (2,0) (2,1)
    assert rows == [
        [1, 1, 0, 1, 0, 0, 0],  # node "1": pending + itself
        [0, 0, 0, 0, 1, 0, 0],  # duplicate of "1": only itself
        [1, 1, 0, 1, 0, 1, 0],  # node "1,2": pending + "1" + itself
        [1, 1, 0, 1, 0, 0, 1],  # node "1,3": pending + "1" + itself
    ]
    seq_len = torch.tensor([7])
    assert tree_positions(seq_len, canon)[0].tolist() == [7, 0, 8, 8]
    assert pending_rows(valid)[0].int().tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    seq = torch.arange(10).unsqueeze(0)
    ids, pos, valid, count = pending_tokens(seq, torch.tensor([6]), torch.tensor([4]))
    assert ids.tolist() == [[4, 5]] and pos.tolist() == [[4, 5]] and count.tolist() == [2]


def test_sampling_transform_matches_an_independent_implementation():
    torch.manual_seed(0)
    probs = torch.distributions.Dirichlet(torch.ones(7, dtype=torch.float64)).sample((5,))
    logits = probs.log()
    for cfg in [SamplingConfig(), SamplingConfig(0.7, 3, None), SamplingConfig(1.3, None, 0.8), SamplingConfig(0.9, 5, 0.6)]:
        got = logits_to_probs(logits, cfg).numpy()
        want = np.stack([transformed_row(r.numpy(), cfg.temperature, cfg.top_k, cfg.top_p) for r in probs])
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    greedy = logits_to_probs(logits, SamplingConfig(0.0))
    assert torch.equal(greedy.argmax(-1), logits.argmax(-1)) and torch.equal(greedy.sum(-1), torch.ones(5, dtype=torch.float64))
    assert logits_to_probs(logits.half(), SamplingConfig()).dtype == torch.float32
