"""Beyond-accuracy metrics (eval/beyond.py): coverage and popularity percentile of the top-K lists,
by hand, through evaluate_split, and on two gloo ranks against one."""

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from loopback_ranks import metrics_on_two_ranks

from flm_dist.config import EvalConfig
from flm_dist.data.batches import build_eval_arrays
from flm_dist.eval.beyond import BeyondAccuracy, popularity_percentiles, training_item_counts
from flm_dist.eval.evaluate import evaluate_split

# Items 1..4 as 2-d rows; user 0 = [1, 0] ranks 4, 1, 2, 3; user 1 = [0, 1] ranks 4, 3, 2, 1.
ITEM_TABLE = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [2.0, 2.0]])
USERS = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
COUNTS = np.array([0, 5, 1, 1, 9])  # training interactions of items 1..4
HISTORY = (torch.tensor([0]), torch.tensor([4]))  # user 0 has seen item 4


def test_popularity_percentile_is_the_mean_rank_scaled_to_one():
    # Ascending popularity: items 2 and 3 (tied, ranks 0 and 1), item 1, item 4.
    np.testing.assert_allclose(popularity_percentiles(COUNTS), [0.0, 2 / 3, 0.5 / 3, 0.5 / 3, 1.0])
    np.testing.assert_allclose(popularity_percentiles(np.array([0, 7, 7, 7])), [0.0, 0.5, 0.5, 0.5])


def test_coverage_and_percentile_by_hand():
    beyond = BeyondAccuracy("test", (2, 1), torch.from_numpy(popularity_percentiles(COUNTS)))
    beyond.add(USERS, ITEM_TABLE, HISTORY, chunk_size=3)
    metrics = beyond.compute()
    third = 1 / 6
    # Nothing removed: top-1 lists {4}, {4}; top-2 {4, 1}, {4, 3}.
    assert metrics["test/coverage@1/full_nomask"] == 1 / 4
    assert metrics["test/pop_percentile@1/full_nomask"] == 1.0
    assert metrics["test/coverage@2/full_nomask"] == 3 / 4
    assert math.isclose(metrics["test/pop_percentile@2/full_nomask"], (1 + 2 / 3 + 1 + third) / 4)
    # History removed: user 0 loses item 4, so top-1 {1}, {4}; top-2 {1, 2}, {4, 3}.
    assert metrics["test/coverage@1/full"] == 2 / 4
    assert math.isclose(metrics["test/pop_percentile@1/full"], (2 / 3 + 1) / 2)
    assert metrics["test/coverage@2/full"] == 1.0
    assert math.isclose(metrics["test/pop_percentile@2/full"], (2 / 3 + third + 1 + third) / 4)


def test_users_without_enough_items_left_and_cutoffs_beyond_the_catalogue():
    beyond = BeyondAccuracy("valid", (10,), torch.from_numpy(popularity_percentiles(COUNTS)))
    seen_all_but_one = (torch.tensor([0, 0, 0]), torch.tensor([1, 2, 4]))
    beyond.add(USERS[:1], ITEM_TABLE, seen_all_but_one, chunk_size=4)
    metrics = beyond.compute()
    assert metrics["valid/coverage@10/full"] == 1 / 4  # item 3 only
    assert math.isclose(metrics["valid/pop_percentile@10/full"], 1 / 6)
    assert metrics["valid/coverage@10/full_nomask"] == 1.0


class RandomDot(torch.nn.Module):
    """30 users and 40 items with fixed random vectors: every user gets another list."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.table = torch.randn(41, 4, generator=generator)
        self.users = torch.randn(30, 4, generator=generator)

    def item_table(self):
        return self.table

    def user_representation(self, user, input, source="fused"):
        return self.users[user]


def random_users(users: list[int]) -> pa.Table:
    rng = np.random.default_rng(0)
    histories = [rng.integers(1, 41, rng.integers(0, 8)).tolist() for _ in range(30)]
    return pa.table({"user": pa.array(users, pa.int32()),
                     "history": pa.array([histories[u] for u in users], pa.list_(pa.int32())),
                     "target": pa.array([1 + u for u in users], pa.int32()),
                     "negatives": pa.array([[2] for _ in users], pa.list_(pa.int32()))})


def two_rank_metrics(users: list[int]) -> dict[str, float]:
    config = EvalConfig(ks=(1, 5, 10), batch_size=4)  # several batches
    percentiles = torch.from_numpy(popularity_percentiles(np.arange(41) % 7))
    return evaluate_split(RandomDot(), build_eval_arrays(random_users(users), 8), "test", config, 1, percentiles)


def _metrics_of_rank(rank: int) -> dict[str, float]:
    return two_rank_metrics(list(range(11)) if rank == 0 else list(range(11, 30)))  # uneven shares


def test_two_ranks_give_the_one_rank_result(tmp_path):
    two_ranks = metrics_on_two_ranks(_metrics_of_rank, tmp_path)
    one = two_rank_metrics(list(range(30)))
    assert one["test/coverage@1/full_nomask"] < one["test/coverage@10/full_nomask"] < 1
    assert two_ranks.keys() == one.keys()
    for name, value in one.items():
        assert two_ranks[name] == pytest.approx(value, rel=1e-12, abs=0), name


def test_training_counts_come_from_the_train_split(tmp_path):
    (tmp_path / "train").mkdir()
    pq.write_table(pa.table({"user": pa.array([0, 1], pa.int32()),
                             "items": pa.array([[1, 4, 4], [4, 2]], pa.list_(pa.int32()))}),
                   tmp_path / "train" / "part-0.parquet")
    np.testing.assert_array_equal(training_item_counts(tmp_path, 5), [0, 1, 1, 0, 3, 0])


class DotModel(torch.nn.Module):
    def item_table(self):
        return ITEM_TABLE

    def user_representation(self, user, input, source="fused"):
        return USERS[user]


@pytest.mark.parametrize("with_percentiles", [False, True])
def test_evaluate_split_adds_them_only_when_asked(with_percentiles):
    table = pa.table({"user": pa.array([0, 1], pa.int32()), "history": pa.array([[4], [1]], pa.list_(pa.int32())),
                      "target": pa.array([1, 3], pa.int32()), "negatives": pa.array([[2], [2]], pa.list_(pa.int32()))})
    percentiles = torch.from_numpy(popularity_percentiles(COUNTS)) if with_percentiles else None
    metrics = evaluate_split(DotModel(), build_eval_arrays(table, max_len=3), "test", EvalConfig(ks=(1, 2)), 1,
                             percentiles)
    assert ("test/coverage@1/full" in metrics) == with_percentiles
    if with_percentiles:
        # User 1's history (item 1) is not a top-2 item of theirs; user 0's (item 4) is: as above.
        assert metrics["test/coverage@2/full"] == 1.0 and metrics["test/coverage@1/full_nomask"] == 1 / 4
        assert math.isclose(metrics["test/pop_percentile@1/full"], (2 / 3 + 1) / 2)
