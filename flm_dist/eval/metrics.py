"""Ranking metrics as sums and counts, so ranks can be combined exactly.

Each protocol ranks one target per user among candidates: `full` ranks it against every item
with the user's earlier items removed (mask_history), `full_nomask` against every item, and
`sampledN` against the N negatives fixed on disk by `prepare`. Per-user values are summed in
float64 and divided by the global user count only after the all-reduce, never averaged per rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

DEFAULT_KS = (5, 10, 20, 50)


def target_ranks(scores: torch.Tensor, target_column: torch.Tensor) -> torch.Tensor:
    """0-based rank of each row's target among its candidates (ties count in the target's favour).

    A non-finite score ranks below every finite one. A target whose score is -inf (masked, e.g. a
    repeat of a history item), NaN or +inf (a diverged model) gets rank = number of candidates:
    it is a miss at every cutoff. A NaN or infinite candidate never outranks a finite target.
    """
    target_scores = scores.gather(1, target_column.view(-1, 1))
    finite_scores = scores.nan_to_num(nan=-math.inf, posinf=-math.inf, neginf=-math.inf)
    ranks = (finite_scores > target_scores).sum(dim=1)
    missed = ~target_scores.squeeze(1).isfinite()
    return torch.where(missed, torch.full_like(ranks, scores.shape[1]), ranks)


class RankingAccumulator:
    """Accumulates per-user metric sums per protocol; `compute` all-reduces and divides once."""

    def __init__(self, split: str, ks: Sequence[int] = DEFAULT_KS, device: torch.device | str = "cpu"):
        self.split = split
        self.ks = tuple(ks)
        self.device = torch.device(device)
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def add(self, protocol: str, ranks: torch.Tensor, num_candidates: torch.Tensor | int) -> None:
        """Add a batch of users' target ranks; `num_candidates` counts the target itself."""
        ranks = ranks.to(torch.float64)
        if not torch.is_tensor(num_candidates):
            num_candidates = torch.full_like(ranks, float(num_candidates))
        num_candidates = num_candidates.to(torch.float64)
        values = {"mrr": torch.where(ranks < num_candidates, 1.0 / (ranks + 1.0), torch.zeros_like(ranks)),
                  "auc": ((num_candidates - 1.0 - ranks) / (num_candidates - 1.0).clamp(min=1.0)).clamp(min=0.0)}
        for k in self.ks:
            hit = (ranks < k).to(torch.float64)
            values[f"hr@{k}"] = hit
            # One held-out target per user: recall@k equals hr@k; both names are kept for readers.
            values[f"recall@{k}"] = hit
            values[f"ndcg@{k}"] = hit / torch.log2(ranks + 2.0)
        for metric, value in values.items():
            self.add_mean(metric, protocol, value)
        count = self.counts.setdefault(protocol, torch.zeros((), dtype=torch.float64, device=self.device))
        count += ranks.numel()

    def add_mean(self, metric: str, protocol: str, values: torch.Tensor) -> None:
        """Add per-user values of a plain metric, averaged over the users `add` counts for
        `protocol` (so add the same users to both)."""
        name = f"{self.split}/{metric}/{protocol}"
        total = self.sums.setdefault(name, torch.zeros((), dtype=torch.float64, device=self.device))
        total += values.to(torch.float64).sum()

    def compute(self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> dict[str, float]:
        """Global metrics: every rank must call this (it all-reduces), in the same protocol order."""
        names = sorted(self.sums)
        protocols = sorted(self.counts)
        if not names:
            return {}
        packed = torch.stack([self.sums[n] for n in names] + [self.counts[p] for p in protocols])
        packed = all_reduce_sum(packed)
        totals = dict(zip(names + [f"count/{p}" for p in protocols], packed.tolist()))
        metrics = {}
        for name in names:
            protocol = name.split("/", 2)[2]  # `full`, or a subset of its users such as `full/cold`
            count = totals[f"count/{protocol}"]
            metrics[name] = totals[name] / count if count else float("nan")
        for protocol in protocols:
            metrics[f"{self.split}/users/{protocol}"] = int(totals[f"count/{protocol}"])
        return metrics


# Per-user values and paired tests (numpy): for comparing two models on the same users.


def ndcg_at(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-user NDCG@k of 0-based target ranks (one relevant item per user)."""
    return np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)


def hit_at(ranks: np.ndarray, k: int) -> np.ndarray:
    return (ranks < k).astype(np.float64)


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (0 for a single value) of per-seed values, which are
    kept as `per_seed`."""
    values = [float(v) for v in values]
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "per_seed": values}


def wilcoxon_p_value(x: np.ndarray, y: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired samples; zero differences are dropped
    (1.0 when every pair is tied)."""
    differences = np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64)
    differences = differences[differences != 0]
    if len(differences) == 0:
        return 1.0
    try:
        from scipy.stats import wilcoxon
    except ImportError:
        return wilcoxon_normal_p_value(differences)
    return float(wilcoxon(differences).pvalue)


def wilcoxon_normal_p_value(differences: np.ndarray) -> float:
    """The signed-rank test's normal approximation with tie correction (no continuity
    correction), for nonzero `differences`; what scipy computes with method="approx"."""
    magnitudes = np.abs(differences)
    _, inverse, counts = np.unique(magnitudes, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # mean rank within each tie group
    positive = average_rank[inverse][differences > 0].sum()
    n = len(differences)
    variance = n * (n + 1) * (2 * n + 1) / 24.0 - (counts ** 3 - counts).sum() / 48.0
    z = (positive - n * (n + 1) / 4.0) / math.sqrt(variance)
    return math.erfc(abs(z) / math.sqrt(2.0))
