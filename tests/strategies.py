"""Hypothesis strategies shared by the exactness tests."""

from __future__ import annotations

import torch
from hypothesis import strategies as st


@st.composite
def random_case(draw, max_vocab: int = 5, k_within_q_support: bool = False):
    """(p, q, k): float64 rows over 2..max_vocab tokens with zeros in either, k in 1..3 (at most
    q's support with ``k_within_q_support``, for schemes that draw distinct tokens)."""
    vocab = draw(st.integers(2, max_vocab))
    weights = st.one_of(st.just(0.0), st.floats(0.01, 1.0))
    p = draw(st.lists(weights, min_size=vocab, max_size=vocab).filter(lambda w: sum(w) > 0))
    q = draw(st.lists(weights, min_size=vocab, max_size=vocab).filter(lambda w: sum(w) > 0))
    k = draw(st.integers(1, min(3, sum(w > 0 for w in q)) if k_within_q_support else 3))
    p_t = torch.tensor(p, dtype=torch.float64)
    q_t = torch.tensor(q, dtype=torch.float64)
    return p_t / p_t.sum(), q_t / q_t.sum(), k
