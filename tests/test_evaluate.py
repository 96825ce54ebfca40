import math

import pyarrow as pa
import torch

from flm_dist.config import EvalConfig
from flm_dist.data import build_eval_arrays
from flm_dist.evaluate import evaluate_split


class FixedScores(torch.nn.Module):
    """Scores item i with `base[i]` for every user: the ranking is known by hand."""

    def __init__(self, base):
        super().__init__()
        self.base = torch.tensor([float("-inf"), *base])

    def score_all(self, user, input, source="fused"):
        return self.base.expand(user.shape[0], -1).clone()


def test_protocols_by_hand():
    # Items 1..6 scored 0.6, 0.5, ..., 0.1: item 1 ranks first.
    model = FixedScores([0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    table = pa.table({
        "user": pa.array([0, 1, 2], pa.int32()),
        "history": pa.array([[1, 2], [5], [3]], pa.list_(pa.int32())),
        "target": pa.array([3, 5, 4], pa.int32()),
        "negatives": pa.array([[6, 4], [6, 4], [6]], pa.list_(pa.int32())),
    })
    arrays = build_eval_arrays(table, max_len=4)
    metrics = evaluate_split(model, arrays, "test", EvalConfig(ks=(1, 3)), num_negatives=2)
    # full_nomask ranks (0-based): item 3 -> 2, item 5 -> 4, item 4 -> 3
    assert metrics["test/hr@3/full_nomask"] == 1 / 3
    assert math.isclose(metrics["test/ndcg@3/full_nomask"], (1 / math.log2(4)) / 3)
    # full: history removed. user 0: items 1,2 gone -> item 3 ranks first; user 1: its target is
    # in its history -> a miss (the target is never treated specially); user 2: item 3 gone -> 2.
    assert metrics["test/hr@1/full"] == 1 / 3
    assert metrics["test/hr@3/full"] == 2 / 3
    assert math.isclose(metrics["test/mrr/full"], (1.0 + 0.0 + 1 / 3) / 3)
    # AUC over unmasked candidates: user 0 beats all 3 others, user 2 beats 2 of 4 (items 5, 6).
    assert math.isclose(metrics["test/auc/full"], (1.0 + 0.0 + 0.5) / 3)
    # sampled2: user 0: 3 vs {6, 4} -> rank 0; user 1: 5 vs {6, 4} -> rank 1; user 2: 4 vs {6} -> 0
    assert metrics["test/hr@1/sampled2"] == 2 / 3
    assert math.isclose(metrics["test/auc/sampled2"], (1.0 + 0.5 + 1.0) / 3)
    assert metrics["test/users/full"] == 3
