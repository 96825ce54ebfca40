"""Beyond-accuracy metrics of the top-K lists: what a model recommends, not whether it hits.

- `{split}/coverage@K/{protocol}`: catalogue coverage, the distinct items in the top-K lists of all
  evaluated users divided by the catalogue size N;
- `{split}/pop_percentile@K/{protocol}`: the mean popularity percentile of the recommended items,
  popularity being an item's interactions in the training split and the percentile its rank
  among the N items scaled to [0, 1] (1 = the most popular; tied items share their mean rank, so
  an all-tied catalogue is 0.5).

A model can win NDCG by recommending bestsellers only: its coverage is then low and its
percentile near 1. `protocol` is `full` (the user's history removed from the lists, as `full`
ranks) or `full_nomask` (nothing removed); positions a user has no item left for are skipped.

Across ranks, coverage is the exact union of the ranks' item sets (per item the number of cut-offs
whose lists held it, all-reduced with max), the percentile a global sum over a global count:
never a mean of per-rank values. The lists cost one extra pass over the catalogue per protocol,
so only the final evaluation computes them (eval/evaluate.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from flm_dist.eval.ranking import top_k

Reduce = Callable[[torch.Tensor], torch.Tensor]
PROTOCOLS = ("full", "full_nomask")


def training_item_counts(data_dir: str | Path, num_items: int) -> np.ndarray:
    """int64 [N + 1]: each item's interactions in the training split of prepared data (row 0 is 0)."""
    items = pq.read_table(Path(data_dir) / "train", columns=["items"]).column("items")
    flat = pc.list_flatten(items).to_numpy(zero_copy_only=False).astype(np.int64)
    return np.bincount(flat, minlength=num_items + 1)[:num_items + 1]


def popularity_percentiles(counts: np.ndarray) -> np.ndarray:
    """float64 [N + 1]: the popularity percentile of items 1..N from their counts (row 0 is 0)."""
    real = np.asarray(counts)[1:]
    _, group, group_sizes = np.unique(real, return_inverse=True, return_counts=True)
    mean_rank = np.cumsum(group_sizes) - (group_sizes + 1) / 2.0  # 0-based, ascending popularity
    percentile = mean_rank[group] / (len(real) - 1) if len(real) > 1 else np.full(len(real), 0.5)
    return np.concatenate([[0.0], percentile])


class BeyondAccuracy:
    """Accumulates the top-K lists of a split's users; `compute` reduces over ranks once."""

    def __init__(self, split: str, ks: Sequence[int], percentiles: torch.Tensor):
        self.split = split
        self.ks = tuple(sorted(set(ks)))
        self.percentiles = percentiles.to(torch.float64)
        device = percentiles.device
        num_slots = len(self.ks) * len(PROTOCOLS)
        # Per protocol and item: how many of the cut-offs (ascending) had it in some user's list.
        # Lists are nested, so that count says which cut-offs saw the item, and max unites ranks.
        self.levels = torch.zeros(len(PROTOCOLS), percentiles.shape[0], dtype=torch.uint8, device=device)
        self.percentile_sums = torch.zeros(num_slots, dtype=torch.float64, device=device)
        self.counts = torch.zeros(num_slots, dtype=torch.float64, device=device)

    def add(self, vectors: torch.Tensor, item_table: torch.Tensor, history: tuple[torch.Tensor, torch.Tensor],
            chunk_size: int) -> None:
        """The lists of user vectors [B, H]; `history` = (row, item) pairs removed for `full`."""
        for index, protocol in enumerate(PROTOCOLS):
            scores, items = top_k(vectors, item_table, self.ks[-1], chunk_size,
                                  history if protocol == "full" else None)
            listed = scores > -torch.inf  # a user with fewer items left than K gets -inf at the end
            for slot, k in enumerate(self.ks):
                kept = listed[:, :k]
                chosen = items[:, :k][kept]
                level = torch.full_like(chosen, len(self.ks) - slot, dtype=torch.uint8)
                self.levels[index].scatter_reduce_(0, chosen, level, "amax")
                position = index * len(self.ks) + slot
                self.percentile_sums[position] += self.percentiles[chosen].sum()
                self.counts[position] += kept.sum()

    def compute(self, all_reduce_sum: Reduce = lambda t: t, all_reduce_max: Reduce = lambda t: t) -> dict[str, float]:
        """Every rank must call this (it all-reduces)."""
        levels = all_reduce_max(self.levels.clone())
        sums = all_reduce_sum(torch.cat([self.percentile_sums, self.counts]))
        percentile_sums, counts = sums.split(len(self.counts))
        num_items = levels.shape[1] - 1
        metrics = {}
        for index, protocol in enumerate(PROTOCOLS):
            for slot, k in enumerate(self.ks):
                position = index * len(self.ks) + slot
                covered = (levels[index, 1:] >= len(self.ks) - slot).sum().item()
                count = counts[position].item()
                metrics[f"{self.split}/coverage@{k}/{protocol}"] = covered / num_items
                metrics[f"{self.split}/pop_percentile@{k}/{protocol}"] = (
                    percentile_sums[position].item() / count if count else float("nan"))
        return metrics
