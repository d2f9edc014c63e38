"""Token trees from k draft sequences: node ids, position ids and attention masks, vectorized.

A round drafts k sequences of length D per request: X [B, k, D], X[b, i, l] the token of
sequence i at depth l + 1.  The tree's nodes are the distinct prefixes: sequences that agree on
their first l + 1 tokens share the node at depth l + 1, and a node's children are the distinct
next tokens of the sequences passing through it.

Fixed layout.  Every depth has k *slots*, one per sequence; slot (l, i) is a real node when
sequence i is the first (smallest index) of its prefix group, ``canon[b, l, i] == i``, and a
duplicate otherwise.  Duplicates are fed to the models as padding: they attend only to
themselves, and nothing reads their outputs or keeps their K/V.  Fixed shapes keep every step a
plain tensor op; compacting the real nodes (fewer tokens in the target pass when sequences
share prefixes) is a later optimization.

Round-local offsets.  Within a round a model sees a block of pending tokens (the accepted
tokens it has not cached yet: the whole prompt in the first round, then one or two) followed
by the tree slots, level by level:

    offset:  0 .. P-1        | P + l*k + i
             pending tokens  | tree slot (depth l + 1, sequence i)

``rows`` masks are over these offsets; ``attention_mask`` places them after each request's
committed cache slots.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .cache import KVCache


def pending_tokens(seq: Tensor, seq_len: Tensor, cache_len: Tensor):
    """The tokens a model has not cached yet: seq[b, cache_len[b] : seq_len[b]], left-aligned.

    Returns ids [B, P], pos [B, P], valid [B, P], count [B] with P = max count; padding has
    id 0 and position 0.
    """
    count = seq_len - cache_len  # [B]
    width = int(count.max())
    offs = torch.arange(width, device=seq.device)  # [P]
    valid = offs < count.unsqueeze(1)  # [B, P]
    pos = torch.where(valid, cache_len.unsqueeze(1) + offs, torch.zeros_like(valid, dtype=torch.long))  # [B, P]
    ids = torch.where(valid, seq.gather(1, pos), torch.zeros_like(pos))  # [B, P]
    return ids, pos, valid, count


def pending_rows(valid: Tensor) -> Tensor:
    """Causal mask among the pending block [B, P, P]; padding sees only itself."""
    width = valid.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=valid.device).tril()  # [P, P]
    eye = torch.eye(width, dtype=torch.bool, device=valid.device)
    return (causal & valid.unsqueeze(2) & valid.unsqueeze(1)) | eye


def prefix_groups(x: Tensor) -> Tensor:
    """canon [B, D, k]: for each depth l and sequence i, the smallest j whose first l + 1 tokens
    equal sequence i's.  x: the drafted tokens [B, k, D]."""
    bsz, k, depth = x.shape
    same = x.unsqueeze(2) == x.unsqueeze(1)  # [B, k(i), k(j), D]: token l of i equals token l of j
    same_prefix = same.cummin(dim=-1).values  # [B, k(i), k(j), D]: tokens 0..l all equal
    first = torch.full((bsz, k, depth), k, dtype=torch.long, device=x.device)  # [B, k(i), D]
    for j in reversed(range(k)):  # k is small; a loop beats a strided reduction over dim 2
        first = torch.where(same_prefix[:, :, j], j, first)  # ends at the smallest match (j = i always matches)
    return first.transpose(1, 2)  # [B, D, k]


def is_node(canon: Tensor) -> Tensor:
    """[B, D, k]: True where slot (l, i) is a real node (first sequence of its prefix group)."""
    return canon == torch.arange(canon.shape[2], device=canon.device)


def tree_rows(pending_valid: Tensor, canon: Tensor) -> Tensor:
    """Tree-slot rows of the round-local mask: [B, D*k, P + D*k].

    A node sees the request's valid pending tokens and its ancestors (itself included): at
    every depth l' <= l the node of its own sequence, canon[b, l', i].  A duplicate slot sees
    only itself.
    """
    bsz, depth, k = canon.shape
    levels = torch.arange(depth, device=canon.device)
    on_path = canon.unsqueeze(-1) == torch.arange(k, device=canon.device)  # [B, D(l'), k(i), k(j)]
    on_path = on_path.permute(0, 2, 1, 3).unsqueeze(1)  # [B, 1(l), k(i), D(l'), k(j)]
    above = (levels.view(depth, 1) >= levels.view(1, depth)).view(1, depth, 1, depth, 1)  # l' <= l
    ancestors = (on_path & above).reshape(bsz, depth * k, depth * k)  # [B, D*k, D*k]
    node = is_node(canon).reshape(bsz, depth * k, 1)  # [B, D*k, 1]
    eye = torch.eye(depth * k, dtype=torch.bool, device=canon.device)
    tree_part = torch.where(node, ancestors, eye)  # [B, D*k, D*k]
    pending_part = node & pending_valid.unsqueeze(1)  # [B, D*k, P]
    return torch.cat([pending_part, tree_part], dim=2)


def tree_positions(seq_len: Tensor, canon: Tensor) -> Tensor:
    """Position ids of the tree slots [B, D*k]: a node at depth l + 1 sits at seq_len + l;
    duplicates get 0."""
    bsz, depth, k = canon.shape
    pos = seq_len.view(bsz, 1, 1) + torch.arange(depth, device=canon.device).view(1, depth, 1)  # [B, D, 1]
    return torch.where(is_node(canon), pos, torch.zeros_like(pos)).reshape(bsz, depth * k)


def attention_mask(rows: Tensor, cache: KVCache) -> Tensor:
    """The model's mask [B, T, S] for a forward of T new tokens.

    rows [B, T, U] is the round-local mask of the new tokens over this round's offsets
    0 .. U-1, U = cache.used + T.  Every token also sees its request's committed slots.
    """
    bsz, t, u = rows.shape
    if u != cache.used + t:
        raise ValueError(f"mask rows cover {u} round offsets, expected used + T = {cache.used} + {t}")
    s = cache.span(t)
    slot = torch.arange(s, device=rows.device).view(1, s)  # [1, S]
    lens = cache.lens.view(bsz, 1)  # [B, 1]
    offset = slot - lens  # [B, S] round-local offset of each slot
    in_round = (offset >= 0) & (offset < u)  # [B, S]
    picked = rows.gather(2, offset.clamp(0, u - 1).unsqueeze(1).expand(bsz, t, s))  # [B, T, S]
    return (slot < lens).unsqueeze(1) | (in_round.unsqueeze(1) & picked)


# ---- branching trees: a fixed number of children per node at each depth ----------------------


def subtree_spans(widths: tuple[int, ...]) -> list[int]:
    """span[l]: leaves under one node at depth l + 1 of a tree with ``widths[l]`` children per
    node at depth l (the root is depth 0), i.e. prod(widths[l + 1:])."""
    spans = [1] * len(widths)
    for level in reversed(range(len(widths) - 1)):
        spans[level] = spans[level + 1] * widths[level + 1]
    return spans


def branching_canon(widths: tuple[int, ...], batch: int, device) -> Tensor:
    """canon [B, D, k] of a branching tree laid out as its k = prod(widths) root-to-leaf paths.

    Path i runs through the node at depth l + 1 whose first path is i rounded down to a multiple
    of span[l]; that path's slot holds the node and the others at that depth are padding, as
    duplicates are for drafted sequences.  The layout comes from the shape, not from the
    tokens: two children that happen to draw the same token stay two nodes.
    """
    spans = subtree_spans(widths)
    k = spans[0] * widths[0]
    seq = torch.arange(k, device=device)
    canon = torch.stack([seq - seq % span for span in spans])  # [D, k]
    return canon.unsqueeze(0).expand(batch, -1, -1)


def branching_nodes(widths: tuple[int, ...], levels: int | None = None, device=None) -> Tensor:
    """The real nodes' slots of a branching tree, level-major (l*k + i), over its first
    ``levels`` depths (all by default): the same for every request, so passes can skip padding."""
    nodes = is_node(branching_canon(widths, 1, device))[0]  # [D, k]
    return nodes[:levels].reshape(-1).nonzero().squeeze(1)
