"""Full ranking over the item table in chunks, so a [users x items] score matrix never lives whole.

At 1,024 users and 10M items that matrix would be 41 GB in fp32. These functions score the
items `chunk_size` table rows at a time and keep only what their callers need: a running top-K
with the user's history removed chunk by chunk (export, `flm bench topk`), or each user's target
rank as the count of items scoring higher than the target, with and without the history
(evaluation). Both equal what the whole matrix gives, ties included (a tie counts in the
target's favour).

A non-finite score (NaN or infinity: a diverged model) ranks below every finite one, so it can
never look like a hit. Healthy scores pay nothing for it but one check per call: a call that
meets one is computed again with every NaN and +inf score set to -inf.

Plain PyTorch. Item ids are table rows: row 0 is padding and is never scored.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import torch


CPU_RANK_BLOCK_ELEMENTS = 1 << 20
"""On a CPU, `rank_targets` is given at most this many scores (4 MB in fp32) at a time, however
much memory `max_score_elements` allows: its passes over a block (comparisons, maxima, the
history's scores) then read it from cache. Toys' validation took 1.54 s this way against
1.68 s with one 47 MB block per 1,024 users (docs/benchmarks.md); the counts are the same."""


def item_chunk_size(users: int, num_items: int, max_elements: int) -> int:
    """Items per chunk so that a [users x chunk] block holds at most `max_elements` scores (at
    least one item; every item when they fit, which keeps small catalogs to a single chunk)."""
    return max(1, min(num_items, max_elements // max(1, users)))


def rank_chunk_size(users: int, num_items: int, max_elements: int, device: torch.device) -> int:
    """`item_chunk_size` for `rank_targets` on `device` (cache-sized blocks on a CPU)."""
    if device.type == "cpu":
        max_elements = min(max_elements, CPU_RANK_BLOCK_ELEMENTS)
    return item_chunk_size(users, num_items, max_elements)


def _item_chunks(vectors: torch.Tensor, item_table: torch.Tensor, chunk_size: int,
                 finite_only: bool = False) -> Iterator[tuple[int, torch.Tensor]]:
    """(id of the chunk's first item, fp32 scores [B, chunk]) over items 1..N; with `finite_only`,
    NaN and +inf scores are -inf.

    Every chunk is written into the same buffer (on a CPU a fresh block per chunk costs page
    faults that took as long as the matmul), so a chunk's scores are only valid until the next.
    """
    vectors = vectors.float()
    users = vectors.shape[0]
    buffer = vectors.new_empty(users * min(chunk_size, item_table.shape[0] - 1))
    for first in range(1, item_table.shape[0], chunk_size):
        block = item_table[first:first + chunk_size].float()
        scores = torch.matmul(vectors, block.T, out=buffer[:users * block.shape[0]].view(users, block.shape[0]))
        if finite_only:
            scores.nan_to_num_(nan=-math.inf, posinf=-math.inf, neginf=-math.inf)
        yield first, scores


def _mask_history_(scores: torch.Tensor, first: int, rows: torch.Tensor, items: torch.Tensor) -> None:
    """Set the (row, item) history pairs that fall in this chunk to -inf, in place.

    Boolean indexing would sync with the host on every chunk. Instead every pair adds a penalty
    to a clamped column: -inf inside the chunk, 0 (no change) outside. Accumulating also makes
    repeated pairs (an item bought twice) harmless.
    """
    columns = items - first
    inside = (columns >= 0) & (columns < scores.shape[1])
    penalty = torch.zeros(columns.shape, dtype=scores.dtype, device=scores.device)
    penalty.masked_fill_(inside, -math.inf)
    scores.index_put_((rows, columns.clamp(0, scores.shape[1] - 1)), penalty, accumulate=True)


@torch.no_grad()
def top_k(vectors: torch.Tensor, item_table: torch.Tensor, k: int, chunk_size: int,
          history: tuple[torch.Tensor, torch.Tensor] | None = None,
          finite_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` best items of each user vector [B, H] against `item_table` [N + 1, H].

    Returns (scores [B, k'], item ids [B, k']), best first, with k' = min(k, N). `history` =
    (row, item) pairs to exclude; they score -inf, so a user who has seen all but a few items
    gets -inf entries at the end, as do NaN and +inf scores. Among tied scores the item chosen may
    differ from a single `topk` over all items; the scores do not. `finite_only` is the second
    pass over scores that are not all finite.
    """
    best_scores = vectors.new_empty((vectors.shape[0], 0), dtype=torch.float32)
    best_items = torch.empty((vectors.shape[0], 0), dtype=torch.long, device=vectors.device)
    for first, scores in _item_chunks(vectors, item_table, chunk_size, finite_only):
        if history is not None:
            _mask_history_(scores, first, *history)
        scores, columns = scores.topk(min(k, scores.shape[1]), dim=1)
        best_scores = torch.cat([best_scores, scores], dim=1)
        best_items = torch.cat([best_items, columns + first], dim=1)
        best_scores, order = best_scores.topk(min(k, best_scores.shape[1]), dim=1)
        best_items = best_items.gather(1, order)
    # topk puts NaN above everything, so a NaN or +inf score anywhere is among the best ones.
    if not finite_only and bool((best_scores.isnan() | best_scores.isposinf()).any()):
        return top_k(vectors, item_table, k, chunk_size, history, finite_only=True)
    return best_scores, best_items


@dataclasses.dataclass
class TargetRanks:
    """0-based ranks of each user's target under full ranking (ties in the target's favour)."""

    unmasked: torch.Tensor
    """Rank among every item: the number of items scoring higher than the target; N (a miss at
    every cut-off) when the target's score is not finite."""
    masked: torch.Tensor
    """Rank with the user's history removed; N + 1 (a miss at every cut-off) when the target is
    itself a history item, which is never treated specially, or its score is not finite."""
    candidates: torch.Tensor
    """Items left after removing the history (the target included): N minus distinct history items."""
    zeroed: torch.Tensor
    """Rank among every item with the history's scores set to 0 instead of removed, as the S3-Rec
    code base masks (`rating_pred[train_matrix > 0] = 0`): the masked rank plus every history item
    when the target's score is below 0; N + 1 where `masked` is."""
    top_in_history: torch.Tensor
    """Whether the best-scoring item of the unmasked ranking is one of the user's own history
    items (ties count as history)."""


def _items_above(scores: torch.Tensor, first: int, target: torch.Tensor,
                 target_score: torch.Tensor) -> torch.Tensor:
    """Per row, the items of this chunk other than the target that score above `target_score`.

    The target's own column is left out explicitly: the matmul may round its score an ulp
    away from `target_score` (computed by another kernel), and it must never outrank itself.
    """
    # int32 counts: summing a bool block into int64 took twice as long on a CPU.
    above = (scores > target_score[:, None]).sum(dim=1, dtype=torch.int32)
    own = target - first
    in_chunk = (own >= 0) & (own < scores.shape[1])
    own_score = scores.gather(1, own.clamp(0, scores.shape[1] - 1)[:, None]).squeeze(1)
    return above - (in_chunk & (own_score > target_score)).int()


@torch.no_grad()
def rank_targets(vectors: torch.Tensor, item_table: torch.Tensor, target: torch.Tensor,
                 history: tuple[torch.Tensor, torch.Tensor], chunk_size: int,
                 finite_only: bool = False) -> TargetRanks:
    """Full-ranking ranks of `target` [B] for user vectors [B, H], without and with `history`
    ((row, item) pairs, repeats allowed) removed, computed `chunk_size` items at a time.

    Removing history never touches the score blocks: the masked rank is the unmasked one minus
    the distinct history items that score above the target (a target that is itself a history
    item is a miss whatever the count). A target whose score is not finite is a miss in both;
    `finite_only` is the second pass over scores that are not all finite.
    """
    num_items = item_table.shape[0] - 1
    keys = torch.unique(history[0] * (num_items + 1) + history[1])
    rows, items = keys // (num_items + 1), keys % (num_items + 1)
    target_score = (vectors.float() * item_table[target].float()).sum(dim=1)
    target_seen = torch.zeros_like(target).index_add_(0, rows, (items == target[rows]).long()) > 0
    removed = torch.bincount(rows, minlength=target.shape[0])
    unmasked = torch.zeros_like(target)
    history_above = torch.zeros_like(target)
    best = torch.full(target.shape, -math.inf, device=vectors.device)
    best_history = best.clone()
    for first, scores in _item_chunks(vectors, item_table, chunk_size, finite_only):
        unmasked += _items_above(scores, first, target, target_score)
        columns = items - first
        inside = (columns >= 0) & (columns < scores.shape[1])
        pair_scores = scores[rows, columns.clamp(0, scores.shape[1] - 1)]
        history_above.index_add_(0, rows, (inside & (pair_scores > target_score[rows])).long())
        best = torch.maximum(best, scores.amax(dim=1))
        best_history.scatter_reduce_(0, rows, torch.where(inside, pair_scores, -math.inf), "amax")
    # amax propagates NaN: a NaN or +inf score anywhere leaves `best` non-finite. Those items
    # were counted above a finite target (+inf) or never (NaN): count again without them.
    if not finite_only and not bool(best.isfinite().all()):
        return rank_targets(vectors, item_table, target, history, chunk_size, finite_only=True)
    missed = ~target_score.isfinite()
    unmasked = torch.where(missed, torch.full_like(target, num_items), unmasked)
    miss = torch.full_like(target, num_items + 1)
    masked = torch.where(target_seen | missed, miss, unmasked - history_above)
    zeroed = torch.where(target_seen | missed, miss, masked + removed * (target_score < 0))
    return TargetRanks(unmasked=unmasked, masked=masked, candidates=num_items - removed, zeroed=zeroed,
                       top_in_history=best_history >= best)


def candidate_scores(vectors: torch.Tensor, item_table: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """fp32 scores [B, C] of each user's own candidate items [B, C]; item 0 (padding) is -inf."""
    scores = torch.einsum("bh,bch->bc", vectors.float(), item_table[candidates].float())
    return scores.masked_fill(candidates == 0, -math.inf)
