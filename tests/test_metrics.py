import math

import torch

from flm_dist.eval.metrics import RankingAccumulator, target_ranks


def test_ranks_hand_computed():
    scores = torch.tensor([[float("-inf"), 0.9, 0.1, 0.5, 0.3],
                           [float("-inf"), 0.2, 0.8, 0.6, float("-inf")]])
    # user 0: target item 3 (0.5) is beaten by item 1 only -> rank 1
    # user 1: target item 4 is masked -> a miss at every cut-off
    ranks = target_ranks(scores, torch.tensor([3, 4]))
    assert ranks.tolist() == [1, 5]


def test_metrics_hand_computed():
    acc = RankingAccumulator("test", ks=(1, 2))
    acc.add("full", torch.tensor([0, 1, 5]), torch.tensor([4, 4, 4]))
    metrics = acc.compute()
    assert metrics["test/hr@1/full"] == 1 / 3
    assert metrics["test/hr@2/full"] == 2 / 3
    assert math.isclose(metrics["test/ndcg@2/full"], (1.0 + 1 / math.log2(3)) / 3)
    assert math.isclose(metrics["test/mrr/full"], (1.0 + 0.5 + 0.0) / 3)
    # AUC: share of the other 3 candidates ranked below the target: 1, 2/3, and 0 for the miss
    assert math.isclose(metrics["test/auc/full"], (1.0 + 2 / 3 + 0.0) / 3)
    assert metrics["test/users/full"] == 3


def test_sums_not_means_across_ranks():
    """Two 'ranks' of unequal size combine to the metric of all users, not the mean of means."""
    whole = RankingAccumulator("v", ks=(1,))
    whole.add("full", torch.tensor([0, 3, 3, 3]), 10)
    part_a, part_b = RankingAccumulator("v", ks=(1,)), RankingAccumulator("v", ks=(1,))
    part_a.add("full", torch.tensor([0]), 10)
    part_b.add("full", torch.tensor([3, 3, 3]), 10)
    other = part_b.sums

    def fake_all_reduce(tensor):  # rank a's packed sums plus rank b's, same order
        return tensor + torch.stack([other[n] for n in sorted(other)] + [part_b.counts["full"]])

    combined = part_a.compute(fake_all_reduce)
    assert combined["v/hr@1/full"] == whole.compute()["v/hr@1/full"] == 0.25
