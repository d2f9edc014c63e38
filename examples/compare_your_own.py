"""Which verifier accepts most for *your* target and draft distributions?

Run:  python examples/compare_your_own.py

Give p (target) and q (draft) as rows of probabilities over the same vocabulary — here the
next-token laws of a made-up 8-token vocabulary and a few temperature-shifted variants; paste
your own model's softmax outputs instead.  For every registered verifier and draft count k it
prints the acceptance (the probability that the emitted token is one of the drafts: the
fraction of speculative steps that save a target pass) next to the best any exact verifier can
do with k i.i.d. drafts.
"""

import torch

import multidraft as md

target_logits = torch.tensor([[2.0, 1.5, 0.3, 0.2, -1.0, -1.0, -2.0, -3.0]], dtype=torch.float64)
draft_logits = torch.tensor([[1.6, 1.9, 0.1, -0.5, -0.2, -1.5, -2.0, -2.5]], dtype=torch.float64)

for temperature in (0.6, 1.0):
    p = (target_logits / temperature).softmax(-1)  # [B, V] target
    q = (draft_logits / temperature).softmax(-1)  # [B, V] draft
    print(f"\nT = {temperature}")
    print(f"{'k':>3} {'optimum':>8}  " + " ".join(f"{name:>10}" for name in md.available_verifiers()))
    for k in (1, 2, 3, 4):
        cells = []
        for name in md.available_verifiers():
            verifier = md.get_verifier(name)
            if k < verifier.min_drafts or (verifier.max_drafts is not None and k > verifier.max_drafts):
                cells.append(f"{'-':>10}")
                continue
            # Exact: enumerate every draft tuple (fine for small V; use expected_acceptance,
            # available when verifier.exact_acceptance, for real vocabularies).
            rate = md.proofs.acceptance_rate(verifier, p[0], q[0], k)
            cells.append(f"{float(rate):10.4f}")
        optimum = float(md.proofs.optimal_acceptance(p, q, k)[0])
        print(f"{k:>3} {optimum:8.4f}  " + " ".join(cells))
print("\n(rrs-wor, optimal-wor, greedy and spechub draw distinct or deterministic drafts: another draft law, so they can exceed the i.i.d. optimum)")
