"""The transport LP behind every optimal-acceptance claim, solved directly (scipy, small V only).

For a draft law D over ordered tuples and a target p, the best acceptance of any exact verifier is

    max sum_{t, y in t} pi[t, y]   over couplings pi >= 0 with row sums D(t) and column sums p(y),

an LP with one variable per (tuple, token).  Tests compare closed forms and fast algorithms with it.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linprog

import multidraft as md


def transport_lp_optimum(verifier, p: torch.Tensor, q: torch.Tensor, k: int) -> float:
    """max P(emitted token is a draft) over all couplings of ``verifier``'s draft law with p."""
    tuples, prob = md.proofs.enumeration.draft_law(verifier, q, k)
    n, vocab = len(tuples), p.shape[0]
    reward = np.zeros((n, vocab))  # variable pi[t, y]: draft tuple t, emit y
    for t, tup in enumerate(tuples.tolist()):
        reward[t, sorted(set(tup))] = 1.0
    rows_equal = np.zeros((n, n * vocab))  # sum_y pi[t, y] = D(t)
    for t in range(n):
        rows_equal[t, t * vocab : (t + 1) * vocab] = 1
    cols_equal = np.zeros((vocab, n * vocab))  # sum_t pi[t, y] = p(y)
    for y in range(vocab):
        cols_equal[y, y::vocab] = 1
    res = linprog(
        -reward.ravel(),
        A_eq=np.vstack([rows_equal, cols_equal]),
        b_eq=np.concatenate([prob.numpy(), p.numpy()]),
        bounds=(0, None),
        method="highs",
    )
    assert res.status == 0, res.message
    return -res.fun
