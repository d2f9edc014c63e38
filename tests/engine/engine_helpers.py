"""Shared helpers for the engine tests: plain (non-speculative) references and exact laws."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from multidraft.engine import KVCache


def full_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] of a fresh causal forward over ids [B, T]: no cache reuse, no tree."""
    bsz, t = ids.shape
    cache: KVCache = model.new_cache(bsz, t, ids.device)
    pos = torch.arange(t).expand(bsz, t)
    mask = torch.ones(t, t, dtype=torch.bool).tril().expand(bsz, t, t)
    return model(ids, pos, mask, cache)


@torch.no_grad()
def check_tree_round(model, reference, vocab: int, tol: dict) -> None:
    """Two requests with ragged cached lengths: prefill, score a tree, commit a non-contiguous
    path, then continue; every logit must equal ``reference(ids)`` [B, T, V], a fresh causal
    forward of the true sequence (or of a node's own branch)."""
    from multidraft.engine.engine import commit_round, model_forward, tree_slots
    from multidraft.engine.tree import pending_rows, pending_tokens, prefix_groups, tree_positions, tree_rows

    g = torch.Generator().manual_seed(1)
    bsz, total, k, depth = 2, 14, 3, 3
    truth = torch.randint(0, vocab, (bsz, total), generator=g)  # the sequences we will end up with
    full = reference(truth)  # [B, total, V]
    cache = model.new_cache(bsz, 40)
    seq = truth.clone()

    # Prefill: request 0 has 5 tokens, request 1 has 3 (ragged pending block with padding).
    seq_len = torch.tensor([5, 3])
    ids, pos, valid, count = pending_tokens(seq, seq_len, cache.lens)
    logits = model_forward(model, cache, ids, pos, pending_rows(valid))
    for b in range(bsz):
        torch.testing.assert_close(logits[b, : count[b]], full[b, : count[b]], **tol)
    cache.commit(torch.arange(valid.shape[1]).expand(bsz, -1), count)
    assert cache.lens.tolist() == [5, 3]

    # A tree whose sequence 1 is the truth; 0 and 2 share its first token, then diverge, so the
    # true path is the nodes at slots (0, 0), (1, 1), (2, 1): not contiguous in the round's layout.
    seq_len = torch.tensor([6, 4])  # one accepted token each, not yet cached (the pending block)
    x = torch.empty(bsz, k, depth, dtype=torch.long)
    for b in range(bsz):
        nxt = truth[b, seq_len[b] : seq_len[b] + depth]
        x[b, 1] = nxt
        x[b, 0] = torch.stack([nxt[0], (nxt[1] + 1) % vocab, nxt[2]])
        x[b, 2] = torch.stack([nxt[0], (nxt[1] + 2) % vocab, (nxt[2] + 5) % vocab])
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
        torch.testing.assert_close(logits[b, 0], full[b, n - 1], **tol)  # the pending token
        for level in range(depth):
            slot = int(canon[b, level, 1])  # the node of sequence 1 at this depth
            torch.testing.assert_close(logits[b, width + level * k + slot], full[b, n + level], **tol)
        # A node off the true path sees its own branch: compare with that branch's fresh forward.
        branch = torch.cat([truth[b, :n], x[b, 2]]).unsqueeze(0)
        torch.testing.assert_close(logits[b, width + 2 * k + 2], reference(branch)[0, -1], **tol)

    # Accept two tree nodes for request 0 and three for request 1; keep them, drop the rest.
    accepted = torch.tensor([2, 3])
    path = canon[:, :, 1]  # the slot of sequence 1's node at each depth
    commit_round(cache, count, width, tree_slots(width, path, depth, k), accepted, active=torch.tensor([True, True]))
    assert cache.lens.tolist() == [5 + 1 + 2, 3 + 1 + 3]

    # Continue from the committed path: the next pending token must see exactly the truth.
    seq_len = cache.lens + 1
    ids, pos, valid, count = pending_tokens(seq, seq_len, cache.lens)
    logits = model_forward(model, cache, ids, pos, pending_rows(valid))
    for b in range(bsz):
        torch.testing.assert_close(logits[b, 0], full[b, int(seq_len[b]) - 1], **tol)


def plain_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Target-only greedy decoding, recomputing the whole sequence at every step."""
    seq = list(prompt)
    for _ in range(n):
        logits = full_logits(model, torch.tensor([seq]))
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]


def transformed_row(row: np.ndarray, temperature=1.0, top_k=None, top_p=None) -> np.ndarray:
    """The sampling transform applied to a probability row, written independently of the engine."""
    with np.errstate(divide="ignore"):
        logits = np.log(row) / temperature
    if top_k is not None and top_k < len(row):
        kth = np.sort(logits)[::-1][top_k - 1]
        logits = np.where(logits < kth, -np.inf, logits)
    w = np.exp(logits - logits.max())
    w = w / w.sum()
    if top_p is not None and top_p < 1:
        order = np.argsort(-w, kind="stable")
        before = np.cumsum(w[order]) - w[order]
        drop = np.zeros(len(w), dtype=bool)
        drop[order] = before >= top_p
        w = np.where(drop, 0.0, w)
        w = w / w.sum()
    return w


def sequence_law(table, prompt: list[int], n: int, **sampling) -> np.ndarray:
    """Exact probability of every length-n continuation under the (transformed) table model,
    indexed by the base-V number of the tokens (first token most significant)."""
    vocab = table.vocab_size
    law = np.zeros(vocab**n)
    for code, seq in enumerate(itertools.product(range(vocab), repeat=n)):
        prob, ctx = 1.0, list(prompt)
        for tok in seq:
            prob *= transformed_row(table.next_probs(ctx).numpy(), **sampling)[tok]
            ctx.append(tok)
        law[code] = prob
    return law


def encode(tokens: torch.Tensor, vocab: int) -> np.ndarray:
    """Rows of tokens [N, n] -> base-V codes [N] matching sequence_law's indexing."""
    n = tokens.shape[1]
    weights = vocab ** torch.arange(n - 1, -1, -1)
    return (tokens * weights).sum(1).numpy()
