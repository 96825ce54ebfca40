import math

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from flm_dist.config import EvalConfig
from flm_dist.data.batches import build_eval_arrays
from flm_dist.eval.evaluate import evaluate_split
from flm_dist.eval.metrics import RankingAccumulator, target_ranks
from flm_dist.models import FLMModel


class DotModel(torch.nn.Module):
    """Fixed user vectors (by user id) against a fixed item table: the ranking is known by hand."""

    def __init__(self, user_vectors, item_table):
        super().__init__()
        self.user_vectors = torch.as_tensor(user_vectors, dtype=torch.float32)
        self.table = torch.as_tensor(item_table, dtype=torch.float32)

    def item_table(self):
        return self.table

    def user_representation(self, user, input, source="fused"):
        return self.user_vectors[user]

    def score_all(self, user, input, source="fused"):
        return F.pad(self.user_representation(user, input) @ self.table[1:].T, (1, 0), value=-math.inf)


class FixedScores(DotModel):
    """Scores item i with `base[i]` for every user."""

    def __init__(self, base, users=3):
        super().__init__(torch.ones(users, 1), torch.tensor([[0.0], *([b] for b in base)]))


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
    # the best item, nothing removed, is item 1: in user 0's history only
    assert math.isclose(metrics["test/top1_in_history/full_nomask"], 1 / 3)
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


@torch.no_grad()
def whole_matrix_metrics(model, arrays, split, config, num_negatives):
    """Reference: the evaluation before item chunking, one [users x items] matrix per batch."""
    accumulator = RankingAccumulator(split, config.ks)
    sampled = f"sampled{num_negatives}"
    for protocol in ("full", "full_nomask", "full_zeroed", sampled):
        accumulator.add(protocol, torch.zeros(0, dtype=torch.long), 1)
    accumulator.add_mean("top1_in_history", "full_nomask", torch.zeros(0))
    for start in range(0, len(arrays), config.batch_size):
        stop = min(start + config.batch_size, len(arrays))
        scores = model.score_all(arrays.user[start:stop], arrays.input[start:stop],
                                 source=config.user_source).float()
        target = arrays.target[start:stop]
        num_items = scores.shape[1] - 1
        accumulator.add("full_nomask", target_ranks(scores, target), num_items)
        rows, items = arrays.history_pairs(start, stop)
        in_history = torch.zeros_like(scores, dtype=torch.bool)
        in_history[rows, items] = True
        best = scores.amax(dim=1, keepdim=True)  # ties with a history item count as history
        accumulator.add_mean("top1_in_history", "full_nomask", (in_history & (scores == best)).any(dim=1))
        candidates = torch.cat([target.view(-1, 1), arrays.negatives[start:stop]], dim=1)
        accumulator.add(sampled, target_ranks(scores.gather(1, candidates), torch.zeros_like(target)),
                        1 + (candidates[:, 1:] != 0).sum(dim=1))
        zeroed = scores.clone()  # the S3-Rec code's masking; a target in the history stays a miss
        zeroed[rows, items] = 0.0
        target_seen = in_history.gather(1, target[:, None]).squeeze(1)
        accumulator.add("full_zeroed", torch.where(target_seen, num_items, target_ranks(zeroed, target)), num_items)
        scores[rows, items] = float("-inf")
        unmasked = num_items - torch.isneginf(scores[:, 1:]).sum(dim=1)
        accumulator.add("full", target_ranks(scores, target), unmasked)
    return accumulator.compute()


def random_split(num_users, num_items, seed):
    """Histories of 0..12 items (repeats allowed; some targets repeat a history item) and 0..5
    negatives per user."""
    rng = np.random.default_rng(seed)
    histories = [rng.integers(1, num_items + 1, rng.integers(0, 13)).tolist() for _ in range(num_users)]
    targets = [int(rng.choice(h)) if h and rng.random() < 0.2 else int(rng.integers(1, num_items + 1))
               for h in histories]
    negatives = [rng.integers(1, num_items + 1, rng.integers(0, 6)).tolist() for _ in range(num_users)]
    return pa.table({"user": pa.array(range(num_users), pa.int32()),
                     "history": pa.array(histories, pa.list_(pa.int32())),
                     "target": pa.array(targets, pa.int32()),
                     "negatives": pa.array(negatives, pa.list_(pa.int32()))})


@pytest.mark.parametrize("mask_history", [True, False])
@pytest.mark.parametrize("max_score_elements", [16, 16 * 7, 16 * 1000])
def test_chunked_ranking_equals_the_whole_matrix_with_ties(mask_history, max_score_elements):
    # Entries in {-1, 0, 1}: dot products are small integers, so many items tie with the target.
    generator = torch.Generator().manual_seed(0)
    num_users, num_items = 40, 50
    model = DotModel(torch.randint(-1, 2, (num_users, 3), generator=generator),
                     torch.cat([torch.zeros(1, 3), torch.randint(-1, 2, (num_items, 3), generator=generator)]))
    arrays = build_eval_arrays(random_split(num_users, num_items, seed=1), max_len=4)
    # 16 users per batch: 1 item per chunk, 7 items per chunk, every item in one chunk.
    config = EvalConfig(ks=(1, 5, 10), mask_history=mask_history, batch_size=16,
                        max_score_elements=max_score_elements)
    chunked = evaluate_split(model, arrays, "test", config, num_negatives=5)
    assert chunked == whole_matrix_metrics(model, arrays, "test", config, num_negatives=5)
    assert 0 < chunked["test/hr@5/full"] < 1 and chunked["test/hr@5/full"] != chunked["test/hr@5/full_nomask"]
    assert chunked["test/mrr/full_zeroed"] < chunked["test/mrr/full"]  # some targets score below 0


def test_chunked_ranking_equals_the_whole_matrix_on_a_model():
    torch.manual_seed(0)
    model = FLMModel(num_users=30, num_items=200, hidden=16, max_len=6, layers=1, heads=2, dropout=0.0,
                     flow_layers=1, flow_hidden=8).eval()
    arrays = build_eval_arrays(random_split(30, 200, seed=2), max_len=6)
    for user_source in ("fused", "sequence", "cf"):
        config = EvalConfig(batch_size=8, max_score_elements=8 * 9, user_source=user_source)
        chunked = evaluate_split(model, arrays, "valid", config, num_negatives=5)
        # The same sums, added in another order: evaluation batches users by history length.
        assert chunked == pytest.approx(whole_matrix_metrics(model, arrays, "valid", config, num_negatives=5),
                                        rel=1e-12, abs=1e-15)
