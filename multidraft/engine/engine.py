"""Token-tree speculative decoding with any multidraft verifier, exact in distribution.

Who is who: p is always the *target* (the large model whose law the output must follow), q the
*draft* (the small model that proposes tokens).  Both are probability rows after the same
sampling transform (sampling.py).

One round, in pipeline order (each step a free function below):

    1. draft_tree      the draft model extends k sequences by D tokens, level by level
                       (D forwards: the pending tokens, then depths 1 .. D-1); the first level
                       uses the verifier's own draft scheme, deeper ones sample each sequence's
                       next token from q at its node (check_deep_tree_support says
                       which verifiers are exact there)
    2. score_tree      one target forward over the pending tokens and all tree slots
    3. walk_tree       top-down: at each node the verifier picks among the drafts of the
                       sequences passing through it; a draft emitted -> move to that child,
                       else stop; after the last accepted node one more token (the verifier's
                       residual, or p at a leaf)
    4. commit_round    both caches keep the accepted path, drop the rest; tokens are appended

Why the walk is exact, and what it assumes: docs/engine.md.
"""

from __future__ import annotations

import operator
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from ..verifiers import Verifier, get_verifier
from ..verifiers.base import Verdict, first_match, sample_categorical, sample_from_weights
from .cache import KVCache
from .models import _check_vocab, check_positions
from .sampling import SamplingConfig, logits_to_probs
from .tree import (attention_mask, branching_canon, branching_nodes, pending_rows, pending_tokens, prefix_groups,
                   subtree_spans, tree_positions, tree_rows)

__all__ = ["Engine", "GenerationOutput", "GenerationStats", "autoregressive_generate"]


@dataclass
class GenerationStats:
    rounds: int = 0  # speculation rounds (= target forward passes)
    target_passes: int = 0
    draft_passes: int = 0
    draft2_passes: int = 0  # forwards of the second draft model (staged drafting)
    new_tokens: int = 0  # tokens returned, summed over requests
    # tokens emitted per request per target pass (accepted + 1), each round counted whole even
    # where max_new_tokens or eos cuts its last tokens from the output: the scheme's block
    # efficiency; the output's tokens per pass is new_tokens / target_passes
    block_efficiency: float = 0.0
    block_efficiency_per_request: list[float] = field(default_factory=list)  # the same, request by request
    reached_by_depth: list[int] = field(default_factory=list)  # walks that reached depth d's drafts
    accepted_by_depth: list[int] = field(default_factory=list)  # ... and accepted one of them
    acceptance_by_depth: list[float] = field(default_factory=list)  # accepted / reached per depth
    # the same two counts request by request: [B][depth] (the spread of acceptance over requests)
    reached_by_request: list[list[int]] = field(default_factory=list)
    accepted_by_request: list[list[int]] = field(default_factory=list)
    rounds_by_shape: dict = field(default_factory=dict)  # {(k, D): rounds}; (0, 0) a plain decoding step
    seconds: float = 0.0
    tokens_per_second: float = 0.0


@dataclass
class GenerationOutput:
    tokens: Tensor  # [B, n] new tokens, padded with -1 after a request's length
    lengths: Tensor  # [B] new tokens per request (< n only when eos_token_id stopped it)
    stats: GenerationStats


class _GreedyMatch(Verifier):
    """Temperature 0: p is one-hot at the target's argmax, so every exact verifier emits exactly
    that token; this computes it directly (and lets distinct-draft schemes, which cannot draw k
    different tokens from a one-hot q, run greedy)."""

    name = "greedy-match"
    needs_exact_sums = False  # an argmax

    def _verify(self, p, q, drafts, generator):
        token = p.argmax(dim=-1)  # [B]
        return Verdict(token, first_match(drafts, token))


# ---- 1. draft ------------------------------------------------------------------------------


def model_forward(model, cache: KVCache, ids: Tensor, pos: Tensor, rows: Tensor) -> Tensor:
    """One forward of T new tokens [B, T]; rows [B, T, used + T] is the round-local mask."""
    logits = model(ids, pos, attention_mask(rows, cache), cache)  # [B, T, V]
    cache.advance(ids.shape[1])
    return logits


def greedy_roots(logits: Tensor, k: int) -> Tensor:
    """The k highest-scoring tokens [B, k] (best first); past V, the best one again."""
    top = torch.topk(logits, min(k, logits.shape[-1]), dim=-1).indices
    return torch.cat([top, top[:, :1].expand(-1, k - top.shape[1])], dim=1)


def draft_within_support(verifier: Verifier, q: Tensor, width: int, generator) -> Tensor:
    """``verifier.draft(q, width)`` [n, width], except where a distinct-draft scheme meets a row
    with fewer than ``width`` tokens of positive q (after top-k or top-p): that row draws all of
    them -- the scheme with fewer drafts, exact as any draft count is -- and repeats its first
    draft in the spare columns, which ``drafts_within_support`` marks as no draft."""
    if not verifier.distinct_drafts:
        return verifier.draft(q, width, generator)
    count = (q > 0).sum(dim=-1).clamp(max=width)  # [n]
    if bool((count == width).all()):
        return verifier.draft(q, width, generator)
    fewest = int(count.min())
    if fewest < verifier.min_drafts:
        raise ValueError(f"verifier {verifier.name!r} needs >= {verifier.min_drafts} distinct drafts, but a row of q has "
                         f"only {fewest} tokens with positive probability (top-k / top-p leave too few)")
    out = torch.empty(q.shape[0], width, dtype=torch.long, device=q.device)
    for c in torch.unique(count).tolist():
        rows = (count == c).nonzero().squeeze(1)
        drafts = verifier.draft(q[rows], c, generator)  # [r, c]
        out[rows] = torch.cat([drafts, drafts[:, :1].expand(-1, width - c)], dim=1)
    return out


def drafts_within_support(verifier: Verifier, q: Tensor, width: int) -> Tensor:
    """[n, width]: True for the columns of ``draft_within_support`` that are real drafts."""
    if not verifier.distinct_drafts:
        return torch.ones(q.shape[0], width, dtype=torch.bool, device=q.device)
    return torch.arange(width, device=q.device) < (q > 0).sum(dim=-1, keepdim=True)


def draw_children(verifier, sampling, random: RequestRandom, node_logits: Tensor, q_nodes: Tensor,
                  width: int) -> tuple[Tensor, Tensor]:
    """``width`` children for each of n nodes (logits, q [B, n, V]) -> (tokens, real) [B, n * width],
    by the verifier's own scheme.  Greedy decoding verifies by matching the target's argmax, so
    any drafts are exact: the draft's ``width`` most likely tokens give distinct chances."""
    bsz, vocab = q_nodes.shape[0], q_nodes.shape[-1]
    if sampling.greedy:
        tokens = greedy_roots(node_logits.reshape(-1, vocab), width).view(bsz, -1)
        return tokens, torch.ones_like(tokens, dtype=torch.bool)
    every = torch.arange(bsz, device=q_nodes.device)
    tokens = random.draw(lambda q, g: draft_within_support(verifier, q.reshape(-1, vocab), width, g).view(q.shape[0], -1),
                         every, q_nodes)
    return tokens, drafts_within_support(verifier, q_nodes.reshape(-1, vocab), width).view(bsz, -1)


class DraftTree(NamedTuple):
    """A drafted round: what the target pass, the walk and the draft's commit need."""

    x: Tensor  # [B, k, D] the tokens of each path
    q_levels: Tensor  # [B, D, k, V] draft probs at the node of each slot (level 0: the root, in every slot)
    canon: Tensor  # [B, D, k] node of each slot (tree.py)
    paths: Tensor  # [B, k] False for a path that carries no draft (a spare column of draft_within_support)
    valid: Tensor  # [B, P] the draft's pending block
    count: Tensor  # [B]


def draft_tree(draft, cache, seq, seq_len, verifier, k, depth, sampling, random: RequestRandom, widths=None):
    """Draft the round's tree: k sequences of ``depth`` tokens per request, or, with ``widths``,
    a branching tree (widths[l] children per node at depth l) laid out as its k paths.

    Returns a ``DraftTree``.
    """
    ids, pos, valid, count = pending_tokens(seq, seq_len, cache.lens)  # [B, P]
    logits = model_forward(draft, cache, ids, pos, pending_rows(valid))  # [B, P, V]
    vocab = logits.shape[-1]
    last = (count - 1).view(-1, 1, 1).expand(-1, 1, vocab)
    root_logits = logits.gather(1, last)  # [B, 1, V]
    q_root = logits_to_probs(root_logits, sampling)  # [B, 1, V]
    every = torch.arange(seq.shape[0], device=seq.device)  # [B]
    spans = subtree_spans(widths) if widths else None
    shape_canon = branching_canon(widths, seq.shape[0], seq.device) if widths else None
    first, paths = draw_children(verifier, sampling, random, root_logits, q_root, widths[0] if widths else k)  # [B, widths[0] or k]
    if widths:
        first, paths = first.repeat_interleave(spans[0], dim=1), paths.repeat_interleave(spans[0], dim=1)
    x = [first]  # D tensors [B, k]
    q_levels = [q_root.expand(-1, k, -1)]  # D tensors [B, k, V]
    for level in range(1, depth):
        if widths:  # feed this depth's nodes only (slots 0, span, 2 span, ...), not the padding
            canon = shape_canon[:, :level]  # [B, level, k]
            heads = torch.arange(0, k, spans[level - 1], device=seq.device)  # [n] the nodes' slots
            cols = torch.cat([torch.arange(valid.shape[1], device=seq.device),
                              valid.shape[1] + branching_nodes(widths, level, seq.device)])  # what the draft holds
            rows = tree_rows(valid, canon)[:, (level - 1) * k + heads][:, :, cols]  # [B, n, P + nodes so far]
            pos = tree_positions(seq_len, canon)[:, (level - 1) * k + heads]  # [B, n]
            logits = model_forward(draft, cache, x[-1][:, heads], pos, rows)  # [B, n, V]
            q_nodes = logits_to_probs(logits, sampling)  # [B, n, V]
            q_seq = q_nodes.repeat_interleave(spans[level - 1], dim=1)  # [B, k, V] each path's node
            new, real = draw_children(verifier, sampling, random, logits, q_nodes, widths[level])  # every node draws its own children
            new = new.repeat_interleave(spans[level], dim=1)
            paths = paths & real.repeat_interleave(spans[level], dim=1)  # a spare child's subtree carries no drafts
        else:
            canon = prefix_groups(torch.stack(x, dim=2))  # [B, level, k]
            rows = tree_rows(valid, canon)[:, (level - 1) * k :]  # [B, k, P + level*k]
            pos = tree_positions(seq_len, canon)[:, (level - 1) * k :]  # [B, k]
            logits = model_forward(draft, cache, x[-1], pos, rows)  # [B, k, V]
            q_nodes = logits_to_probs(logits, sampling)  # [B, k, V] (duplicate slots: unused)
            node = canon[:, -1].unsqueeze(-1).expand_as(q_nodes)  # [B, k, V] each slot's node
            q_seq = q_nodes.gather(1, node)  # [B, k, V]
            if sampling.greedy:  # each sequence continues greedily (q is one-hot at the argmax)
                new = q_seq.argmax(dim=-1)
            else:  # each sequence samples its next token from q at its node
                new = random.draw(lambda q, g: sample_categorical(q.reshape(-1, vocab), 1, g).view(-1, k), every, q_seq)
        x.append(new)
        q_levels.append(q_seq)
    x = torch.stack(x, dim=2)  # [B, k, D]
    canon = shape_canon if widths else prefix_groups(x)
    return DraftTree(x, torch.stack(q_levels, dim=1), canon, paths, valid, count)


# ---- 1b. draft, staged: a second draft model speculates for the draft -------------------------


def chain_rows(valid: Tensor, offsets: Tensor, depth_index: Tensor, real: Tensor, used: int) -> Tensor:
    """Round-local mask rows [B, k*T, used + k*T] for T new tokens per sequence.

    valid [B, P] the pending block; offsets [B, k, >= D] the round-local slot of each sequence's
    token at each depth, already set for the new tokens; depth_index [B, k, T] each new token's
    depth; real [B, k, T] False for padding.  A real token sees the valid pending tokens and its
    own sequence's tokens at depths <= its own; padding sees only itself.
    """
    bsz, k, t = depth_index.shape
    width = used + k * t
    levels = torch.arange(offsets.shape[2], device=offsets.device)  # [D]
    on_path = (levels <= depth_index.unsqueeze(-1)) & real.unsqueeze(-1)  # [B, k, T, D]
    slot = torch.where(on_path, offsets.unsqueeze(2), width)  # [B, k, T, D]; width: a spare column
    rows = torch.zeros(bsz, k, t, width + 1, dtype=torch.bool, device=offsets.device)
    rows.scatter_(3, slot, True)
    rows[..., : valid.shape[1]] |= valid.view(bsz, 1, 1, -1) & real.unsqueeze(-1)
    own = used + torch.arange(k * t, device=offsets.device).view(1, k, t)  # padding: itself
    rows.scatter_(3, own.expand(bsz, -1, -1).unsqueeze(-1), True)
    return rows[..., :width].reshape(bsz, k * t, width)


def speculate_chain(q: Tensor, r: Tensor, proposals: Tensor, length: Tensor, generator) -> Tensor:
    """Single-draft speculative sampling along each chain, as in Leviathan et al.: proposal t
    (drawn from r[..., t, :]) is kept with probability min(1, q(y) / r(y)) while every earlier
    one was kept; the first one refused is replaced by a draw from normalize(max(q - r, 0)).

    q, r [n, k, T, V] the draft's and the second draft's laws at each chain position, proposals
    [n, k, T], length [n, k] the chain's real positions.  Returns [n, k, 2]: the number of leading
    proposals kept (<= length), and the replacement token at that position (when < length).
    """
    t = max(int(length.max()), 1)  # only the rows' own positions: a request alone draws the same uniforms
    q, r, proposals = q[:, :, :t], r[:, :, :t], proposals[:, :, :t]
    n, k, _, vocab = q.shape
    q_y = q.gather(3, proposals.unsqueeze(-1)).squeeze(-1)  # [n, k, T]
    r_y = r.gather(3, proposals.unsqueeze(-1)).squeeze(-1)
    u = torch.rand(q_y.shape, generator=generator, device=q.device, dtype=q.dtype)
    ok = (u * r_y < q_y) & (torch.arange(t, device=q.device) < length.unsqueeze(-1))  # u < q/r, no division
    kept = ok.to(torch.long).cumprod(dim=-1).sum(dim=-1)  # [n, k]
    at = kept.clamp(max=t - 1).view(n, k, 1, 1).expand(-1, -1, 1, vocab)
    q_at, r_at = q.gather(2, at).squeeze(2), r.gather(2, at).squeeze(2)  # [n, k, V]
    residual = (q_at - r_at).clamp(min=0)
    # A refusal has probability 0 where the residual is empty (q <= r everywhere means q == r).
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, q_at)
    fix = sample_from_weights(residual.reshape(n * k, vocab), generator).view(n, k)
    return torch.stack([kept, fix], dim=-1)


class StagedRound(NamedTuple):
    """What a staged drafting round leaves for the commit, and its cost."""

    valid2: Tensor  # [B, P2] draft2's pending block
    count2: Tensor  # [B]
    offsets: Tensor  # [B, k, D+1] round-local slot of the draft's K/V for each path's token at each depth (last: spare)
    offsets2: Tensor  # [B, k, D+1] the same for draft2
    levels2: int  # depths whose tokens draft2 holds K/V for on every path (a branching depth's tokens wait for a chain)
    passes: int  # draft forwards
    passes2: int  # draft2 forwards


def chain_runs(widths, depth: int) -> list[tuple[int, int]]:
    """The depths [start, end) a second draft speeds up: drafted sequences (``widths`` None) are
    one run over depths 1 .. D-1; a branching tree has one run per maximal stretch of width-1
    depths below the root, where every node has a single child, drawn from q at the node."""
    if widths is None:
        return [(1, depth)] if depth > 1 else []
    runs, level = [], 1
    while level < depth:
        if widths[level] == 1:
            end = level
            while end < depth and widths[end] == 1:
                end += 1
            runs.append((level, end))
            level = end
        else:
            level += 1
    return runs


def draft_tree_staged(draft, draft2, cache, cache2, seq, seq_len, verifier, k, depth, sampling, random: RequestRandom,
                      widths=None):
    """``draft_tree``, with the draft's own sampling along chains sped up by a second, smaller
    draft model (Spector & Re 2023, staged speculative decoding).

    A chain is a stretch of depths where each node has one child drawn from q at the node:
    every drafted sequence below its first token, and a branching tree's width-1 depths
    (``chain_runs``).  Along a chain, until it is complete: draft2 proposes the rest token by
    token (its law r), the draft scores the chain's last known token and the proposals in one
    forward, and single-draft speculative sampling keeps a prefix of the proposals and replaces
    the first refused one (``speculate_chain``).  Each chain token then has the draft's
    autoregressive law, with fresh randomness per chain: the same law as ``draft_tree``'s, so
    the walk's argument is unchanged (docs/engine.md).  The root's children and a branching
    depth's children are drawn by the verifier's scheme from q at their node, as without draft2
    (one draft forward per branching depth, over its nodes).

    Each model's K/V for a path's token at depth l sits wherever that token was fed (``offsets``,
    the same slot for every path through the node); the commit keeps the accepted path from
    there, as it does from the fixed layout without draft2.  Returns a ``DraftTree`` and a
    ``StagedRound``.
    """
    bsz, device = seq.shape[0], seq.device
    ids, pos, valid, count = pending_tokens(seq, seq_len, cache.lens)  # [B, P]
    logits = model_forward(draft, cache, ids, pos, pending_rows(valid))  # [B, P, V]
    vocab = logits.shape[-1]
    root_logits = logits.gather(1, (count - 1).view(-1, 1, 1).expand(-1, 1, vocab))  # [B, 1, V]
    q_root = logits_to_probs(root_logits, sampling)  # [B, 1, V]
    ids2, pos2, valid2, count2 = pending_tokens(seq, seq_len, cache2.lens)
    model_forward(draft2, cache2, ids2, pos2, pending_rows(valid2))
    passes, passes2 = 1, 1
    spans = subtree_spans(widths) if widths else [1] * depth  # paths through one node at each depth

    # Per path and depth, with a spare last depth column that absorbs the writes past a chain.
    x = torch.zeros(bsz, k, depth + 1, dtype=torch.long, device=device)  # [B, k, D+1] tokens
    q_paths = torch.zeros(bsz, k, depth + 1, vocab, dtype=q_root.dtype, device=device)  # [B, k, D+1, V] q before each token
    q_paths[:, :, 0] = q_root
    first, paths = draw_children(verifier, sampling, random, root_logits, q_root, widths[0] if widths else k)
    x[:, :, 0], paths = first.repeat_interleave(spans[0], dim=1), paths.repeat_interleave(spans[0], dim=1)
    offsets = torch.zeros(bsz, k, depth + 1, dtype=torch.long, device=device)  # the draft's slot per token
    offsets2 = torch.zeros_like(offsets)  # draft2's

    def feed(model, model_cache, model_offsets, model_valid, span, tokens, depth_index, real):
        """One forward of tokens [B, n, T] of the n nodes' chains (each node the head of ``span``
        paths) at depths depth_index [B, n, T]; logits [B, n, T, V]."""
        n, t = tokens.shape[1:]
        slots = (model_cache.used + torch.arange(n * t, device=device).view(1, n, t)).expand(bsz, -1, -1)  # [B, n, T]
        at = torch.where(real, depth_index, depth)  # padding writes to the spare depth column
        model_offsets.scatter_(2, at.repeat_interleave(span, dim=1), slots.repeat_interleave(span, dim=1))
        rows = chain_rows(model_valid, model_offsets[:, ::span], depth_index, real, model_cache.used)
        pos = torch.where(real, seq_len.view(bsz, 1, 1) + depth_index, 0)
        out = model_forward(model, model_cache, tokens.reshape(bsz, n * t), pos.reshape(bsz, n * t), rows)
        return out.view(bsz, n, t, vocab)

    def chains(start: int, end: int, seen2: int) -> None:
        """Depths [start, end) of the chains under each node at depth ``start``; draft2 holds
        K/V for depths < seen2 and catches up on the rest with its first forward."""
        nonlocal passes, passes2
        span = spans[start - 1]
        n = k // span
        hx, hq = x[:, ::span], q_paths[:, ::span]  # views: one head path per chain
        filled = torch.full((bsz, n), start, dtype=torch.long, device=device)  # [B, n] tokens known
        catch_up = True
        while True:
            need = end - filled  # [B, n] proposals each chain still needs
            own = need.amax(dim=1)  # [B] per request: random draws only for what a request needs
            t = int(own.max())
            if t == 0:
                break
            steps = torch.arange(t, device=device)  # [T]
            depth_index = (filled - 1).unsqueeze(-1) + steps  # [B, n, T]: x_f, then the proposals
            real = steps < need.unsqueeze(-1)  # [B, n, T]
            # draft2 proposes token by token: feed the last known token, then each proposal.
            proposals = torch.zeros(bsz, n, t, dtype=torch.long, device=device)
            r_chain = torch.zeros(bsz, n, t, vocab, dtype=q_root.dtype, device=device)
            last = hx.gather(2, (filled - 1).unsqueeze(-1))  # [B, n, 1]
            for step in range(t):
                if catch_up and start - 1 > seen2:  # with the branching depths' tokens it has not seen
                    behind = torch.arange(seen2, start, device=device).expand(bsz, n, -1)  # [B, n, c]
                    r_logits = feed(draft2, cache2, offsets2, valid2, span, hx[:, :, seen2:start], behind,
                                    torch.ones_like(behind, dtype=torch.bool))[:, :, -1:]
                else:
                    r_logits = feed(draft2, cache2, offsets2, valid2, span, last, depth_index[..., step : step + 1],
                                    real[..., step : step + 1])
                catch_up = False
                r = logits_to_probs(r_logits.squeeze(2), sampling).to(q_root.dtype)  # [B, n, V]
                last = r.argmax(dim=-1, keepdim=True)  # [B, n, 1]; greedy, and a filler where no proposal is needed
                if not sampling.greedy:
                    movers = (own > step).nonzero().squeeze(1)
                    last[movers] = random.draw(lambda r_, g: sample_categorical(r_.reshape(-1, vocab), 1, g).view(-1, n, 1),
                                               movers, r[movers])
                proposals[..., step : step + 1] = last
                r_chain[:, :, step] = r
                passes2 += 1
            # The draft scores the last known token and all proposals but the final one at once.
            chain = torch.cat([hx.gather(2, (filled - 1).unsqueeze(-1)), proposals[..., : t - 1]], dim=2)  # [B, n, T]
            q_chain = logits_to_probs(feed(draft, cache, offsets, valid, span, chain, depth_index, real), sampling)  # [B, n, T, V]
            passes += 1
            movers = (own > 0).nonzero().squeeze(1)
            kept, fix = torch.zeros_like(need), torch.zeros_like(need)  # [B, n]
            kept[movers], fix[movers] = random.draw(speculate_chain, movers, q_chain[movers], r_chain[movers],
                                                    proposals[movers], need[movers]).unbind(-1)
            # Write the kept proposals, the replacement, and q at every position now known.
            new_tokens = torch.where(steps < kept.unsqueeze(-1), proposals, fix.unsqueeze(-1))  # [B, n, T]
            write = steps <= kept.unsqueeze(-1)  # kept proposals and the replacement ...
            write &= real  # ... within the chain (all kept: no replacement)
            at = torch.where(write, filled.unsqueeze(-1) + steps, depth)  # depth: the spare column
            hx.scatter_(2, at, new_tokens)
            hq.scatter_(2, at.unsqueeze(-1).expand(-1, -1, -1, vocab), q_chain)
            filled = filled + torch.minimum(kept + 1, need)
        # every path through a chain's head carries the chain
        x[:, :, start:end] = hx[:, :, start:end].repeat_interleave(span, dim=1)
        q_paths[:, :, start:end] = hq[:, :, start:end].repeat_interleave(span, dim=1)

    runs = dict(chain_runs(widths, depth))
    seen2, level = 0, 1
    while level < depth:
        if level in runs:
            chains(level, runs[level], seen2)
            # a chain's last token is never fed to draft2 (nor to the draft): it waits for the next depth's forward
            seen2, level = runs[level] - 1, runs[level]
            continue
        # A branching depth: the draft scores the nodes at this depth, which draw their children.
        span = spans[level - 1]
        n = k // span
        node_logits = feed(draft, cache, offsets, valid, span, x[:, ::span, level - 1 : level],
                           torch.full((bsz, n, 1), level - 1, device=device), torch.ones(bsz, n, 1, dtype=torch.bool, device=device))
        passes += 1
        q_nodes = logits_to_probs(node_logits.squeeze(2), sampling)  # [B, n, V]
        q_paths[:, :, level] = q_nodes.repeat_interleave(span, dim=1)
        new, real = draw_children(verifier, sampling, random, node_logits.squeeze(2), q_nodes, widths[level])
        x[:, :, level] = new.repeat_interleave(spans[level], dim=1)
        paths = paths & real.repeat_interleave(spans[level], dim=1)  # a spare child's subtree carries no drafts
        level += 1
    x = x[..., :depth]
    canon = branching_canon(widths, bsz, device) if widths else prefix_groups(x)
    tree = DraftTree(x, q_paths[:, :, :depth].transpose(1, 2).contiguous(), canon, paths, valid, count)
    return tree, StagedRound(valid2, count2, offsets, offsets2, seen2, passes, passes2)


# ---- 2. score ------------------------------------------------------------------------------


def score_tree(target, cache, seq, seq_len, x, canon, sampling, nodes: Tensor | None = None):
    """One target forward over the pending tokens and the tree slots (canon [B, D, k]): all of
    them, or only ``nodes`` [N] (level-major slot indices l*k + i), the real nodes of a branching
    tree, whose layout is the same for every request, so its padding can be left out.

    Returns p_levels [B, D+1, k, V] (target probs after the root (level 0, slot 0) and after
    each node at depth l (level l, slot i); left-out slots are never read) and the pending block.
    """
    bsz, k, depth = x.shape
    ids, pos, valid, count = pending_tokens(seq, seq_len, cache.lens)  # [B, P]
    width = valid.shape[1] + depth * k
    top = torch.cat([pending_rows(valid), torch.zeros(bsz, valid.shape[1], depth * k, dtype=torch.bool, device=x.device)], dim=2)
    rows = torch.cat([top, tree_rows(valid, canon)], dim=1)  # [B, P + D*k, P + D*k]
    assert rows.shape[1:] == (width, width)
    tree_ids = x.transpose(1, 2).reshape(bsz, depth * k)  # [B, D*k] level-major, as the slots
    tree_pos = tree_positions(seq_len, canon)  # [B, D*k]
    if nodes is not None:  # keep the pending block and the real nodes, in order
        keep = torch.cat([torch.arange(valid.shape[1], device=x.device), valid.shape[1] + nodes])
        rows, tree_ids, tree_pos = rows[:, keep][:, :, keep], tree_ids[:, nodes], tree_pos[:, nodes]
    logits = model_forward(target, cache, torch.cat([ids, tree_ids], 1), torch.cat([pos, tree_pos], 1), rows)
    vocab = logits.shape[-1]
    last = (count - 1).view(-1, 1, 1).expand(-1, 1, vocab)
    p_root = logits_to_probs(logits.gather(1, last).squeeze(1), sampling)  # [B, V]
    p_nodes = logits_to_probs(logits[:, valid.shape[1] :], sampling)  # [B, D*k or N, V]
    if nodes is not None:
        p_nodes = torch.zeros(bsz, depth * k, vocab, dtype=p_nodes.dtype, device=x.device).index_copy_(1, nodes, p_nodes)
    p_levels = torch.cat([p_root.view(bsz, 1, 1, vocab).expand(-1, 1, k, -1), p_nodes.view(bsz, depth, k, vocab)], dim=1)
    return p_levels, valid, count


# ---- 3. verify -----------------------------------------------------------------------------


def walk_tree(verifier, p_levels, q_levels, x, canon, paths, active, random: RequestRandom, spans=None):
    """Walk each active request's tree from the root; return (emitted [B, D+1], accepted [B],
    path [B, D]): the first accepted[b] + 1 entries of emitted[b] are the round's new tokens,
    path[b, l] the slot of the accepted node at depth l + 1.

    Drafts at a node of depth l: for drafted sequences (``spans`` None), the level-l tokens of
    the sequences still alive (those whose tokens equal every emitted token so far), m of them,
    in sequence order; rows with the same m share one verifier call.  For a branching tree
    (``spans`` from tree.subtree_spans), the node's own children: the first path of each.
    Either way the child taken is the node of the first draft equal to the emitted token, and
    the paths through it stay alive.
    """
    bsz, k, depth = x.shape
    device = x.device
    slot = torch.arange(k, device=device)  # [k]
    accepted = torch.zeros(bsz, dtype=torch.long, device=device)
    emitted = torch.zeros(bsz, depth + 1, dtype=torch.long, device=device)
    path = torch.zeros(bsz, depth, dtype=torch.long, device=device)
    # The requests still walking, compacted (a request leaves at its first rejection): their
    # batch rows, the sequences through their current node that carry drafts, and that node's
    # slot at its level.  Each level then indexes only these, once.
    rows = active.nonzero().squeeze(1)  # [n]
    alive = paths[rows]  # [n, k]
    node = torch.zeros_like(rows)  # [n]

    def verdict(p_, q_, drafts_, generator):
        return verifier.verify(p_, q_, drafts_, generator).token

    for level in range(depth):
        n = rows.numel()
        if n == 0:
            break
        p = p_levels[rows, level, node]  # [n, V] target at the node
        q = q_levels[rows, level, node]  # [n, V] draft at the node
        if p.dtype != q.dtype:  # one model in float64, one not: meet at float32
            p, q = p.float(), q.float()
        live = alive if spans is None else alive & (slot % spans[level] == 0)  # [n, k]; one path per child
        tokens = x[rows, :, level]  # [n, k]
        # Live slots first, each group in slot order (a stable sort).
        order = torch.sort((~live).to(torch.uint8), dim=1, stable=True).indices
        drafts = tokens.gather(1, order)  # [n, k]
        m = live.sum(dim=1)  # [n]
        counts = torch.unique(m).tolist()
        if len(counts) == 1:  # every row has as many drafts: one call
            token = random.draw(verdict, rows, p, q, drafts[:, : counts[0]].contiguous())
        else:  # rows with the same m share one call
            token = torch.empty_like(m)
            for count in counts:
                sel = (m == count).nonzero().squeeze(1)
                token[sel] = random.draw(verdict, rows[sel], p[sel], q[sel], drafts[sel, :count].contiguous())
        match = live & (tokens == token.unsqueeze(1))  # [n, k]
        hit = match.any(dim=1)  # [n] the emitted token has a child in the tree
        first = torch.where(match, slot, k).amin(dim=1, keepdim=True).clamp(max=k - 1)
        level_canon = canon[rows, level]  # [n, k]
        child = level_canon.gather(1, first).squeeze(1)  # [n]
        emitted[rows, level] = token
        path[rows, level] = child
        hits = int(hit.sum())
        # The paths through the child: those of the node's that share its token at this level.
        alive = alive & (level_canon == child.unsqueeze(1))
        node = child
        if hits < n:
            keep = hit.nonzero().squeeze(1)
            rows, alive, node = rows[keep], alive[keep], node[keep]
        accepted[rows] += 1
    if rows.numel():
        # Every draft accepted: the bonus token comes from p after the leaf.
        emitted[rows, depth] = random.draw(sample_from_weights, rows, p_levels[rows, depth, node])
    return emitted, accepted, path


# ---- 4. commit -----------------------------------------------------------------------------


def tree_slots(pending_width: int, path: Tensor, levels: int, k: int) -> Tensor:
    """Round-local offsets [B, levels] of the accepted nodes in the fixed tree layout
    (slot (l, i) at P + l*k + i), for a model that ran ``levels`` tree depths."""
    depth_offset = pending_width + k * torch.arange(levels, device=path.device)  # [levels]
    return depth_offset + path[:, :levels]


def fed_slots(pending_width: int, path: Tensor, levels: int, k: int, nodes: Tensor | None) -> Tensor:
    """``tree_slots``, for a model that was fed only the slots ``nodes`` (level-major, in order)
    after its pending block: each accepted node's offset is where it sat among those."""
    slots = tree_slots(pending_width, path, levels, k)  # [B, levels]
    if nodes is None:
        return slots
    rank = torch.zeros(int(nodes.max()) + 1, dtype=torch.long, device=path.device)
    rank[nodes] = torch.arange(nodes.numel(), device=path.device)
    return pending_width + rank[slots - pending_width]


def commit_round(cache, pending_count, pending_width, node_slots, accepted, active):
    """Keep the pending tokens and the accepted nodes a model has K/V for; drop the rest.

    node_slots [B, L]: the round-local offset of the accepted node at each depth this model
    cached (L = D for the target, D - 1 for the draft); the first min(accepted, L) are kept.
    Requests that are done keep nothing: their pending tokens are fed again, unchanged.
    """
    levels_cached = node_slots.shape[1]
    kept_path = accepted.clamp(max=levels_cached)  # [B]
    width = pending_width + levels_cached
    col = torch.arange(width, device=node_slots.device).unsqueeze(0)  # [1, W]
    rel = col - pending_count.unsqueeze(1)  # [B, W] index into the path, < 0 inside the pending block
    if levels_cached > 0:
        node_offset = node_slots.gather(1, rel.clamp(0, levels_cached - 1))  # [B, W]
        keep = torch.where(rel < 0, col.expand_as(rel), node_offset)
    else:
        keep = col.expand_as(rel)
    num_keep = torch.where(active, pending_count + kept_path, torch.zeros_like(kept_path))
    cache.commit(keep, num_keep)


def plain_step(model, cache, seq, seq_len, sampling, random: RequestRandom, active) -> Tensor:
    """One plain decoding step: a forward over the pending tokens, one token [B] sampled from p
    after the last (greedy: its argmax), the pending tokens committed for active requests."""
    ids, pos, valid, count = pending_tokens(seq, seq_len, cache.lens)  # [B, P]
    logits = model_forward(model, cache, ids, pos, pending_rows(valid))  # [B, P, V]
    last = (count - 1).view(-1, 1, 1).expand(-1, 1, logits.shape[-1])
    probs = logits_to_probs(logits.gather(1, last).squeeze(1), sampling)  # [B, V]
    every = torch.arange(seq.shape[0], device=seq.device)
    token = random.draw(sample_from_weights, every, probs)  # greedy: p is one-hot at the argmax
    cache.commit(torch.arange(valid.shape[1], device=seq.device).expand(seq.shape[0], -1),
                 torch.where(active, count, torch.zeros_like(count)))
    return token


def append_tokens(seq, seq_len, emitted, accepted, active):
    """Write the round's accepted[b] + 1 tokens after seq_len[b] (active requests only)."""
    bsz, width = emitted.shape
    j = torch.arange(width, device=seq.device).unsqueeze(0)  # [1, D+1]
    valid = active.unsqueeze(1) & (j <= accepted.unsqueeze(1))  # [B, D+1]
    trash = seq.shape[1] - 1  # a spare last column absorbs the writes we do not want
    index = torch.where(valid, seq_len.unsqueeze(1) + j, torch.full_like(j.expand(bsz, -1), trash))
    seq.scatter_(1, index, torch.where(valid, emitted, seq.gather(1, index)))
    seq_len += torch.where(active, accepted + 1, torch.zeros_like(accepted))
    return valid


# ---- the engine ----------------------------------------------------------------------------


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _token_id(t) -> int:
    """An int token id: Python and numpy ints, 0-d integer tensors; not floats (1.7 would be
    truncated) and not bools."""
    if isinstance(t, bool):
        raise TypeError(f"a bool ({t}) is not a token id")
    return operator.index(t)


def prepare_prompts(prompt_ids, vocab: int, device) -> tuple[Tensor, Tensor]:
    """Prompts -> (ids [B, Tmax] right-padded with 0, lengths [B]).  Accepts a LongTensor [B, T],
    a LongTensor [T] (one request), or a list of lists of ints (ragged)."""
    if isinstance(prompt_ids, Tensor):
        if prompt_ids.dtype.is_floating_point or prompt_ids.dtype == torch.bool or prompt_ids.is_complex():
            raise ValueError(f"prompt_ids must hold integer token ids, got dtype {prompt_ids.dtype}")
        if prompt_ids.dim() == 1:
            prompt_ids = prompt_ids.unsqueeze(0)
        if prompt_ids.dim() != 2:
            raise ValueError(f"prompt_ids must be [B, T] or [T], got shape {tuple(prompt_ids.shape)}")
        if prompt_ids.shape[0] == 0:
            raise ValueError("prompt_ids is empty: need at least one request")
        if prompt_ids.shape[1] == 0:
            raise ValueError("prompts are empty (T = 0): every request needs at least one token to condition on")
        ids = prompt_ids.to(device=device, dtype=torch.long)
        lens = torch.full((ids.shape[0],), ids.shape[1], dtype=torch.long, device=device)
    else:
        try:
            rows = [[_token_id(t) for t in r] for r in prompt_ids]
        except (TypeError, ValueError) as err:
            raise ValueError(f"prompt_ids must be a LongTensor or a list of lists of ints: {err}") from None
        if not rows:
            raise ValueError("prompt_ids is empty: need at least one request")
        lengths = [len(r) for r in rows]
        for b, n in enumerate(lengths):
            if n == 0:
                raise ValueError(f"prompt {b} is empty: every request needs at least one token to condition on")
        width = max(lengths)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
        lens = torch.tensor(lengths, dtype=torch.long, device=device)
    bad = ((ids < 0) | (ids >= vocab)) & (torch.arange(ids.shape[1], device=device) < lens.unsqueeze(1))
    if bool(bad.any()):
        b, t = bad.nonzero()[0].tolist()
        raise ValueError(f"prompt {b} token {t} has id {int(ids[b, t])}, out of range for V = {vocab} (ids must be in 0..{vocab - 1})")
    return ids, lens


def check_eos(eos_token_id, vocab: int) -> None:
    if eos_token_id is None:
        return
    if isinstance(eos_token_id, bool) or not isinstance(eos_token_id, int):
        raise ValueError(f"eos_token_id must be None or an int token id, got {eos_token_id!r}")
    if not 0 <= eos_token_id < vocab:
        raise ValueError(f"eos_token_id = {eos_token_id} is out of range for V = {vocab} (ids must be in 0..{vocab - 1})")


def one_draft_is_a_plain_draw(verifier: Verifier) -> bool:
    """True when the verifier's scheme with k = 1 draws one token from q: probed on a random q."""
    if verifier.min_drafts > 1:
        return False
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0]], dtype=torch.float64)
    tuples = torch.arange(5).view(5, 1)
    probs = verifier.draft_probability(q.expand(5, -1), tuples)  # [5]
    return bool(torch.allclose(probs, q[0], atol=1e-12))


def check_deep_tree_support(verifier: Verifier, depth: int) -> None:
    """Below the root a node's drafts are its survivors' next tokens: m i.i.d. draws from q at
    the node (docs/engine.md).  The verifier must be exact for that, for every m that can occur:
    i.i.d. schemes are, for any m >= min_drafts; distinct-token schemes leave exactly one survivor
    per child (the root's drafts differ), so m = 1 and their one-draft scheme must be a plain
    draw from q.  Anything else raises."""
    if verifier.iid_drafts:
        if verifier.min_drafts > 1:
            raise ValueError(
                f"verifier {verifier.name!r} needs >= {verifier.min_drafts} drafts at every node, but below the "
                f"root a node can have a single survivor; use depth = 1 (got depth = {depth}), or a branching tree "
                f"(widths=...), where every node draws its own drafts"
            )
        return
    if verifier.distinct_drafts and one_draft_is_a_plain_draw(verifier):
        return
    raise ValueError(
        f"verifier {verifier.name!r} drafts by its own non-i.i.d. scheme, which this engine supports only at "
        f"depth = 1 (got depth = {depth}): below the root a node's drafts are its surviving sequences' next "
        f"tokens, i.i.d. draws from q, and this verifier is not exact for those; a branching tree (widths=...) "
        f"draws every node's drafts by the verifier's own scheme and takes it at any depth"
    )


def check_staged_shape(verifier: Verifier, widths: tuple[int, ...] | None, depth: int) -> None:
    """Staged drafting speeds up a tree's chains (``chain_runs``) by drawing each chain token
    from q through draft2's proposals.  Raise unless the shape has a chain; on a branching tree,
    also unless the verifier's one-draft scheme is a plain draw from q (its width-1 depths are
    drawn by that scheme without draft2; a drafted sequence's later tokens always are draws)."""
    if not chain_runs(widths, depth):
        if widths is None:
            raise ValueError("draft2 (staged drafting) speeds up each drafted sequence's tokens after its first; "
                             f"depth = {depth} has none, so draft2 would never run")
        raise ValueError(f"draft2 (staged drafting) speeds up the chains of a tree, its depths of width 1 below the root; "
                         f"widths {widths} have none, so draft2 would never run")
    if widths is not None and not (verifier.iid_drafts or one_draft_is_a_plain_draw(verifier)):
        raise ValueError(f"draft2 draws a chain's tokens from q, but verifier {verifier.name!r} does not draft one token "
                         f"as a plain draw from q, so its width-1 depths cannot be staged")


# Paths (root-to-leaf) a branching tree may have, and draft sequences: every depth holds that
# many slots.  Trees this large or deeper than MAX_DEPTH are far past any useful shape, and the
# caches they would allocate (k * D slots per request) could exhaust memory without an error.
MAX_TREE_PATHS = 4096
MAX_DEPTH = 256


def takes_drafts(verifier: Verifier, width: int) -> bool:
    """Whether the verifier takes ``width`` drafts at a node."""
    return width >= verifier.min_drafts and (verifier.max_drafts is None or width <= verifier.max_drafts)


def draft_limits(verifier: Verifier) -> str:
    """The draft counts a verifier takes, for error messages: "1..4" or ">= 1"."""
    v = verifier
    return f"{v.min_drafts}..{v.max_drafts}" if v.max_drafts is not None else f">= {v.min_drafts}"


def check_width(verifier: Verifier, name: str, width) -> None:
    """Raise unless the verifier takes ``width`` drafts at a node."""
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"{name} must be an int >= 1, got {width!r}")
    if not takes_drafts(verifier, width):
        raise ValueError(f"verifier {verifier.name!r} takes {draft_limits(verifier)} drafts per node, got {name} = {width}")


def check_widths(verifier: Verifier, widths) -> tuple[int, ...]:
    """A branching tree's widths as a tuple, each one a draft count the verifier takes.  Every
    node draws its children by the verifier's own scheme, so any verifier is exact at any depth."""
    try:
        widths = tuple(widths)
    except TypeError:
        raise ValueError(f"widths must be a sequence of ints (children per node at each depth), got {widths!r}") from None
    if not widths:
        raise ValueError("widths is empty: a branching tree needs at least one depth")
    if len(widths) > MAX_DEPTH:
        raise ValueError(f"widths has {len(widths)} depths, above the limit {MAX_DEPTH}")
    for level, width in enumerate(widths):
        check_width(verifier, f"widths[{level}]", width)
    paths = subtree_spans(widths)[0] * widths[0]
    if paths > MAX_TREE_PATHS:
        raise ValueError(f"widths {widths} make a tree with {paths} root-to-leaf paths, above the limit {MAX_TREE_PATHS}")
    return widths


SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


def seeded_generator(device, seed: int | None) -> torch.Generator:
    """A generator on ``device``: seeded for reproducible runs, from OS entropy when seed is None."""
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ValueError(f"seed {seed} is out of range for a torch generator ({SEED_RANGE[0]}..{SEED_RANGE[1]})")
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


class RequestRandom:
    """Where a generate call's random numbers come from.

    ``seed`` an int (or None): one generator for the whole batch, so a request's tokens depend on
    its place in the batch.  ``seed`` a list with one int per request: one generator per request,
    and every random draw is made request by request (the model passes stay batched), so each
    request gets exactly the tokens it gets when decoded alone with its seed, at the price of
    one sampler or verifier call per request instead of one per batch.
    """

    def __init__(self, device, seed, batch: int):
        if isinstance(seed, (list, tuple)):
            if len(seed) != batch or not all(isinstance(s, int) and not isinstance(s, bool) for s in seed):
                raise ValueError(f"seed as a list needs one int per request ({batch}), got {seed!r}")
            self.shared, self.per_request = None, [seeded_generator(device, s) for s in seed]
        elif seed is None or (isinstance(seed, int) and not isinstance(seed, bool)):
            self.shared, self.per_request = seeded_generator(device, seed), None
        else:
            raise ValueError(f"seed must be None, an int or a list of ints (one per request), got {seed!r}")

    def keep(self, index: Tensor) -> None:
        """Follow the batch when only the requests ``index`` stay in it."""
        if self.per_request is not None:
            self.per_request = [self.per_request[i] for i in index.tolist()]

    def draw(self, fn, requests: Tensor, *rows: Tensor) -> Tensor:
        """``fn(*rows, generator)`` for the requests ``requests`` [n], whose data are ``rows``
        (each [n, ...]); the result is [n, ...]."""
        if self.per_request is None:
            return fn(*rows, self.shared)
        return torch.cat([fn(*(r[i : i + 1] for r in rows), self.per_request[b]) for i, b in enumerate(requests.tolist())])


class Engine:
    """Token-tree speculative decoding: ``Engine(target, draft, verifier="rrs", num_drafts=2, depth=3)``.

    Each round drafts a token tree, scores it in one target pass and emits between 1 and
    depth + 1 tokens per request, distributed exactly as sampling from the target would.  The
    tree is either ``num_drafts`` sequences of ``depth`` tokens (default 2 and 3; sequences that
    share a prefix share its nodes), or, with ``widths=(w_1, ..., w_D)``, a branching tree in
    which every node at depth l - 1 has w_l children drawn by the verifier's own scheme
    (SpecInfer/Sequoia-style trees; docs/engine.md).
    """

    def __init__(self, target, draft, verifier: str | Verifier = "rrs", num_drafts: int | None = None,
                 depth: int | None = None, device: str | torch.device | None = None, *,
                 widths=None, draft2=None, **verifier_options):
        v_target, v_draft = _check_vocab("target", target), _check_vocab("draft", draft)
        if v_target != v_draft:
            raise ValueError(f"target and draft must share a vocabulary, got V = {v_target} (target) and V = {v_draft} (draft)")
        if draft2 is not None:
            v_draft2 = _check_vocab("draft2", draft2)
            if v_draft2 != v_draft:
                raise ValueError(f"draft2 must share the draft's vocabulary, got V = {v_draft2} (draft2) and V = {v_draft} (draft)")
        if widths is not None and (num_drafts is not None or depth is not None):
            raise ValueError(f"give either widths (a branching tree) or num_drafts/depth (drafted sequences), "
                             f"got widths={widths!r}, num_drafts={num_drafts!r}, depth={depth!r}")
        num_drafts = 2 if num_drafts is None else num_drafts
        depth = 3 if depth is None else depth
        for name, value, limit in [("num_drafts", num_drafts, MAX_TREE_PATHS), ("depth", depth, MAX_DEPTH)]:
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
                raise ValueError(f"{name} must be an int in 1..{limit}, got {value!r}")
        if verifier_options and not isinstance(verifier, str):
            raise ValueError(f"options {sorted(verifier_options)} go to a verifier named by its string; "
                             f"verifier={verifier!r} is an instance, configure it when you build it")
        if isinstance(verifier, str):
            # The engine's p and q rows are distributions by construction, and its drafts come
            # from the verifier's own scheme: checking them at every tree level would read values
            # back to the host on each call (~0.5 ms each on a CPU), so a verifier named here
            # runs unchecked unless validate_args=True is passed. An instance is used as given.
            verifier = get_verifier(verifier, **{"validate_args": False, **verifier_options})
        self.verifier = verifier
        if not isinstance(self.verifier, Verifier):
            raise ValueError(f"verifier must be a registered name or a Verifier, got {verifier!r}")
        v = self.verifier
        if widths is not None:
            self.widths = check_widths(v, widths)
            num_drafts, depth = subtree_spans(self.widths)[0] * self.widths[0], len(self.widths)
        else:
            self.widths = None
            check_width(v, "num_drafts", num_drafts)
            if depth > 1:
                check_deep_tree_support(v, depth)
        if draft2 is not None:
            check_staged_shape(v, self.widths, depth)
        self.vocab_size = v_target
        self.num_drafts, self.depth = num_drafts, depth  # k: sequences (paths) per tree; D: its depth
        self.device = torch.device(device if device is not None else default_device())
        self.target, self.draft, self.draft2 = target, draft, draft2
        for model in (target, draft, draft2):
            if isinstance(model, torch.nn.Module):
                model.to(self.device).eval()

    def __repr__(self) -> str:
        shape = f"widths={self.widths}" if self.widths else f"num_drafts={self.num_drafts}, depth={self.depth}"
        staged = f", draft2={type(self.draft2).__name__}" if self.draft2 is not None else ""
        return f"Engine(verifier={self.verifier.name!r}, {shape}{staged}, device={str(self.device)!r})"

    def generate(self, prompt_ids, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | list[int] | None = None, eos_token_id: int | None = None) -> GenerationOutput:
        return self.decode(prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, eos_token_id)

    @torch.no_grad()
    def decode(self, prompt_ids, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | list[int] | None = None, eos_token_id: int | None = None,
               shape_for_batch=None) -> GenerationOutput:
        """``generate``, with the speculation shape re-chosen every round: ``shape_for_batch(rows)``
        gives (k, D) for the number of unfinished requests, with k <= num_drafts and
        D <= depth (the caches are sized for those), or (0, 0) for a plain decoding step
        (AdaptiveEngine: the batch shrinks as requests finish, and a smaller batch may
        speculate deeper).  Each round is exact given everything before it, so the output law
        is the target's whatever the shapes; a request's tokens then depend on the batch it is
        in, not only on its seed.  Drafted sequences only (no widths, no draft2)."""
        if shape_for_batch is not None and (self.widths is not None or self.draft2 is not None):
            raise ValueError("a shape chosen per round needs drafted sequences: no widths, no draft2")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        check_eos(eos_token_id, self.vocab_size)
        sampling = SamplingConfig(temperature, top_k, top_p)
        device, k, depth, n = self.device, self.num_drafts, self.depth, max_new_tokens
        prompts, prompt_len = prepare_prompts(prompt_ids, self.vocab_size, device)  # [B, T], [B]
        bsz = prompts.shape[0]
        stats = GenerationStats(reached_by_depth=[0] * depth, accepted_by_depth=[0] * depth)
        if n == 0:
            return GenerationOutput(torch.zeros(bsz, 0, dtype=torch.long, device=device), torch.zeros(bsz, dtype=torch.long, device=device), stats)
        started = time.perf_counter()
        random = RequestRandom(device, seed, bsz)
        verifier = _GreedyMatch(validate_args=False) if sampling.greedy else self.verifier
        spans = subtree_spans(self.widths) if self.widths else None
        # A branching tree's real nodes sit at the same slots in every request: both models run
        # on those only, and the commits map the accepted nodes to where they were fed.
        nodes = branching_nodes(self.widths, device=device) if self.widths else None

        # Explicit cache setup.  A request below n tokens adds at most depth + 1, so sequences
        # stay within Tmax + n + depth; a forward also needs room for the pending tokens (<= 2
        # after the first round; after plain steps the draft's pending tokens are tokens it has
        # not cached, so its cache still holds at most the sequence) and the depth * k tree
        # slots.  Staged drafting feeds at most k chains per forward; a chain of L depths takes
        # at most L + (L - 1) + ... + 1 slots over its speculation steps, and draft2 catches up on
        # at most depth tokens per chain in a round: within k * depth * (depth + 1) slots.
        t_max = prompts.shape[1]
        # a node at depth l + 1 sits at position seq_len + l, seq_len <= t_max + n - 1
        check_positions({"target": self.target, "draft": self.draft, "draft2": self.draft2}, t_max + n + depth - 1)
        max_len = t_max + n + depth + 2 + depth * k
        staged_len = t_max + n + 2 * depth + 3 + k * depth * (depth + 1)
        target_cache = self.target.new_cache(bsz, max_len, device)
        draft_cache = self.draft.new_cache(bsz, staged_len if self.draft2 is not None else max_len, device)
        draft2_cache = self.draft2.new_cache(bsz, staged_len, device) if self.draft2 is not None else None
        seq = torch.zeros(bsz, t_max + n + depth + 2, dtype=torch.long, device=device)  # last column: trash
        seq[:, :t_max] = prompts
        seq_len = prompt_len.clone()  # [B]
        emitted_per_request = torch.zeros(bsz, dtype=torch.long, device=device)  # [B]
        rounds_per_request = torch.zeros(bsz, dtype=torch.long, device=device)  # [B]
        reached_per_request = torch.zeros(bsz, depth, dtype=torch.long, device=device)  # [B, D]
        accepted_per_request = torch.zeros(bsz, depth, dtype=torch.long, device=device)  # [B, D]
        levels = torch.arange(depth, device=device)  # [D]

        # Batch row -> request.  A request that is done leaves the batch (its tokens go to `result`),
        # so later rounds draft, score and walk for the unfinished requests only.
        request = torch.arange(bsz, device=device)
        result = seq.clone()
        while request.numel():
            active = torch.ones(request.numel(), dtype=torch.bool, device=device)  # the batch holds unfinished requests only
            row_prompt_len = prompt_len[request]  # [rows]
            k, depth = (self.num_drafts, self.depth) if shape_for_batch is None else shape_for_batch(request.numel())
            if shape_for_batch is not None and (k, depth) != (0, 0):
                if not all(isinstance(x, int) and not isinstance(x, bool) for x in (k, depth)):
                    raise ValueError(f"shape_for_batch({request.numel()}) must give two ints (k, D), got ({k!r}, {depth!r})")
                if not (1 <= k <= self.num_drafts and 1 <= depth <= self.depth):
                    raise ValueError(f"shape_for_batch({request.numel()}) gave (k={k}, D={depth}); this engine's caches "
                                     f"hold k <= {self.num_drafts} and D <= {self.depth}, or (0, 0) for a plain step")
                check_width(self.verifier, f"shape_for_batch({request.numel()})'s k", k)
            if depth == 0:  # a plain decoding step; the draft catches up on these tokens when it next runs
                emitted = plain_step(self.target, target_cache, seq, seq_len, sampling, random, active).unsqueeze(1)  # [B, 1]
                accepted = torch.zeros_like(seq_len)
                passes, passes2 = 0, 0
            else:
                emitted, accepted, passes, passes2 = self._speculate(k, depth, seq, seq_len, target_cache, draft_cache, draft2_cache,
                                                                     verifier, sampling, random, active, stats, spans, nodes)
            generated_before = seq_len - row_prompt_len
            new = append_tokens(seq, seq_len, emitted, accepted, active)  # [B, D+1]
            done = seq_len - row_prompt_len >= n
            if eos_token_id is not None:
                within = generated_before.unsqueeze(1) + torch.arange(emitted.shape[1], device=device) < n
                done |= (new & within & (emitted == eos_token_id)).any(dim=1)
            stats.rounds_by_shape[k, depth] = stats.rounds_by_shape.get((k, depth), 0) + 1
            stats.rounds += 1
            stats.target_passes += 1
            stats.draft_passes += passes
            stats.draft2_passes += passes2
            emitted_per_request.index_add_(0, request, torch.where(active, accepted + 1, 0))
            rounds_per_request.index_add_(0, request, active.long())
            # a walk that accepted a drafts reached depths 1 .. a + 1 of this round's tree and accepted 1 .. a
            in_tree = (levels < depth) & active.unsqueeze(1)  # [B, D]
            reached_per_request.index_add_(0, request, ((accepted.unsqueeze(1) >= levels) & in_tree).long())
            accepted_per_request.index_add_(0, request, ((accepted.unsqueeze(1) > levels) & in_tree).long())
            if bool(done.any()):
                result[request[done]] = seq[done]
                stay = (~done).nonzero().squeeze(1)
                request, seq, seq_len = request[stay], seq[stay], seq_len[stay]
                for cache in (target_cache, draft_cache, draft2_cache):
                    if cache is not None:
                        cache.keep_rows(stay)
                random.keep(stay)

        # The first n new tokens of each request; cut after an eos.
        j = torch.arange(n, device=device).unsqueeze(0)  # [1, n]
        tokens = result.gather(1, (prompt_len.unsqueeze(1) + j).clamp(max=result.shape[1] - 1))  # [B, n]
        lengths = torch.full((bsz,), n, dtype=torch.long, device=device)
        if eos_token_id is not None:
            is_eos = tokens == eos_token_id
            first = torch.where(is_eos.any(1), is_eos.to(torch.uint8).argmax(1) + 1, lengths)
            lengths = torch.minimum(lengths, first)
        tokens = torch.where(j < lengths.unsqueeze(1), tokens, torch.full_like(tokens, -1))

        stats.seconds = time.perf_counter() - started
        stats.new_tokens = int(lengths.sum())
        stats.block_efficiency = int(emitted_per_request.sum()) / max(int(rounds_per_request.sum()), 1)
        stats.block_efficiency_per_request = (emitted_per_request / rounds_per_request.clamp(min=1)).tolist()
        stats.reached_by_request, stats.accepted_by_request = reached_per_request.tolist(), accepted_per_request.tolist()
        stats.reached_by_depth, stats.accepted_by_depth = reached_per_request.sum(0).tolist(), accepted_per_request.sum(0).tolist()
        stats.acceptance_by_depth = [a / r if r else float("nan") for a, r in zip(stats.accepted_by_depth, stats.reached_by_depth)]
        stats.tokens_per_second = stats.new_tokens / stats.seconds if stats.seconds > 0 else float("inf")
        return GenerationOutput(tokens, lengths, stats)

    def _speculate(self, k, depth, seq, seq_len, target_cache, draft_cache, draft2_cache, verifier, sampling, random,
                   active, stats, spans, nodes):
        """One speculative round of k sequences of depth D (steps 1-4): (emitted [B, D+1],
        accepted [B], draft forwards, draft2 forwards); the caches are committed."""
        if self.draft2 is None:
            tree = draft_tree(self.draft, draft_cache, seq, seq_len, verifier, k, depth, sampling, random, self.widths)
            passes, passes2 = depth, 0
        else:
            tree, staged = draft_tree_staged(self.draft, self.draft2, draft_cache, draft2_cache, seq, seq_len, verifier, k,
                                             depth, sampling, random, self.widths)
            passes, passes2 = staged.passes, staged.passes2
        x, d_valid, d_count = tree.x, tree.valid, tree.count
        p_levels, t_valid, t_count = score_tree(self.target, target_cache, seq, seq_len, x, tree.canon, sampling, nodes)
        emitted, accepted, path = walk_tree(verifier, p_levels, tree.q_levels, x, tree.canon, tree.paths, active, random, spans)
        commit_round(target_cache, t_count, t_valid.shape[1], fed_slots(t_valid.shape[1], path, depth, k, nodes), accepted, active)
        if self.draft2 is None:
            commit_round(draft_cache, d_count, d_valid.shape[1], fed_slots(d_valid.shape[1], path, depth - 1, k, nodes),
                         accepted, active)
        else:  # the node at depth l + 1 is its first sequence's token at l, wherever that was fed
            on_path = path[:, : depth - 1].unsqueeze(1)  # [B, 1, D-1]
            commit_round(draft_cache, d_count, d_valid.shape[1], staged.offsets.gather(1, on_path).squeeze(1), accepted, active)
            on_path2 = on_path[..., : staged.levels2]  # draft2 was fed these depths' tokens
            commit_round(draft2_cache, staged.count2, staged.valid2.shape[1], staged.offsets2.gather(1, on_path2).squeeze(1),
                         accepted, active)
        return emitted, accepted, passes, passes2


# ---- the baseline: plain autoregressive decoding ---------------------------------------------


@torch.no_grad()
def autoregressive_generate(model, prompt_ids, max_new_tokens: int, temperature: float = 1.0,
                            top_k: int | None = None, top_p: float | None = None, seed: int | list[int] | None = None,
                            eos_token_id: int | None = None, device: str | torch.device | None = None) -> GenerationOutput:
    """Target-only decoding, one forward per token, with the engine's own cache, masks and
    sampling transform: the baseline speculative decoding is measured against (same arguments
    and output as ``Engine.generate``, per-request seeds included; ``stats.block_efficiency``
    is 1)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    vocab = _check_vocab("model", model)
    check_eos(eos_token_id, vocab)
    sampling = SamplingConfig(temperature, top_k, top_p)
    device = torch.device(device if device is not None else default_device())
    if isinstance(model, torch.nn.Module):
        model.to(device).eval()
    prompts, prompt_len = prepare_prompts(prompt_ids, vocab, device)
    bsz, t_max, n = prompts.shape[0], prompts.shape[1], max_new_tokens
    check_positions({"target": model}, t_max + n - 1)  # the last new token is never fed
    stats = GenerationStats()
    started = time.perf_counter()
    random = RequestRandom(device, seed, bsz)
    cache = model.new_cache(bsz, t_max + n + 1, device)
    seq = torch.zeros(bsz, t_max + n + 2, dtype=torch.long, device=device)  # last column: trash
    seq[:, :t_max] = prompts
    seq_len = prompt_len.clone()
    done = torch.zeros(bsz, dtype=torch.bool, device=device) | (n == 0)
    no_accept = torch.zeros(bsz, dtype=torch.long, device=device)
    while not bool(done.all()):
        active = ~done
        token = plain_step(model, cache, seq, seq_len, sampling, random, active)  # [B]
        generated_before = seq_len - prompt_len
        append_tokens(seq, seq_len, token.unsqueeze(1), no_accept, active)
        if eos_token_id is not None:
            done |= active & (token == eos_token_id) & (generated_before < n)
        done |= seq_len - prompt_len >= n
        stats.rounds += 1
        stats.target_passes += 1
    j = torch.arange(n, device=device).unsqueeze(0)
    tokens = seq.gather(1, (prompt_len.unsqueeze(1) + j).clamp(max=seq.shape[1] - 1))  # [B, n]
    lengths = torch.full((bsz,), n, dtype=torch.long, device=device)
    if eos_token_id is not None and n:
        is_eos = tokens == eos_token_id
        lengths = torch.where(is_eos.any(1), is_eos.to(torch.uint8).argmax(1) + 1, lengths)
    tokens = torch.where(j < lengths.unsqueeze(1), tokens, torch.full_like(tokens, -1))
    stats.seconds = time.perf_counter() - started
    stats.new_tokens = int(lengths.sum())
    stats.block_efficiency = 1.0
    stats.tokens_per_second = stats.new_tokens / stats.seconds if stats.seconds > 0 else float("inf")
    return GenerationOutput(tokens, lengths, stats)
