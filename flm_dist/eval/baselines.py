"""Non-personalised baselines, evaluated exactly as a checkpoint is (`flm evaluate --baseline KIND`):
the same users, protocols and metric names, `/cold` subsets included (eval/evaluate.py). They are
what cold items are compared with: an id-only model has no trained row for a held-out item, so
its cold metrics are ~0.

  popularity            an item's interactions in the training split. Held-out cold items have
                        none, so it cannot rank them either: the floor of a cold-start method.
  attribute_popularity  the mean, over an item's attributes, of the attribute's popularity (the
                        training interactions of the items carrying it, per item carrying it);
                        0 for an item without features. A content-only ranking that can rank
                        cold items; needs data prepared with item features.

Every user gets the same scores; ties count in the target's favour, as for models. Runs in this
process (one score per item: nothing to distribute).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import nn

from flm_dist.data.item_features import load_item_attributes
from flm_dist.errors import UserError
from flm_dist.eval.beyond import training_item_counts
from flm_dist.runs import read_manifest

BaselineKind = Literal["popularity", "attribute_popularity"]


class _ItemScores(nn.Module):
    """What `evaluate_split` (eval/evaluate.py) asks of a model, for one score per item shared by
    every user: the item table is the scores as [N + 1, 1] and every user vector is 1."""

    def __init__(self, scores: np.ndarray):
        super().__init__()
        self.register_buffer("scores", torch.from_numpy(scores).float().view(-1, 1))

    def item_table(self) -> torch.Tensor:
        return self.scores

    def user_representation(self, user: torch.Tensor, input: torch.Tensor, source: str = "fused") -> torch.Tensor:
        return self.scores.new_ones(user.shape[0], 1)


def item_scores(kind: BaselineKind, data_dir: str) -> np.ndarray:
    """float64 [N + 1] score of every item of prepared data `data_dir` (row 0, padding, is 0)."""
    n_items = read_manifest(data_dir)["items"]
    counts = training_item_counts(data_dir, n_items).astype(np.float64)
    if kind == "popularity":
        return counts
    features = load_item_attributes(data_dir, n_items)
    if features is None:
        raise UserError(f"baseline=attribute_popularity needs item features, but {data_dir} was prepared without "
                        f"them (flm prepare --item-features URI)")
    bags = features.matrix[:n_items + 1]
    present = bags != 0
    carried = np.bincount(bags[present], weights=np.broadcast_to(counts[:, None], bags.shape)[present],
                          minlength=features.num_attributes + 1)
    carriers = np.bincount(bags[present], minlength=features.num_attributes + 1)
    popularity = carried / np.maximum(carriers, 1)
    return (popularity[bags] * present).sum(1) / np.maximum(present.sum(1), 1)


def baseline_model(kind: BaselineKind, data_dir: str) -> nn.Module:
    """Baseline `kind` of prepared data `data_dir` as a model `evaluate_split` can rank with."""
    return _ItemScores(item_scores(kind, data_dir))
