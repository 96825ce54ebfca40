"""The intents of the intent contrastive term: k-means over the training windows' last states."""

import numpy as np
import torch
from loopback_ranks import metrics_on_two_ranks

from flm_dist.data.batches import TrainArrays
from flm_dist.train import distributed
from flm_dist.train.intents import intent_centroids, kmeans, last_states


def _clustered_points():
    generator = torch.Generator().manual_seed(0)
    centers = 10 * torch.randn(4, 8, generator=generator)
    return centers, torch.cat([center + torch.randn(50, 8, generator=generator) for center in centers])


def test_kmeans_finds_separated_clusters_and_is_seeded():
    centers, points = _clustered_points()
    found = kmeans(points, 4, seed=1)
    cluster = torch.cdist(found, centers).argmin(1)
    assert sorted(cluster.tolist()) == [0, 1, 2, 3]  # one centroid per cluster, at its points' mean
    torch.testing.assert_close(found, points.view(4, 50, 8).mean(1)[cluster])
    torch.testing.assert_close(kmeans(points, 4, seed=1), found)


def _kmeans_of_rank(rank):
    _, points = _clustered_points()
    centroids = kmeans(points[rank::2], 4, seed=1)  # each rank holds every other point
    ranks_disagree = (distributed.all_reduce_sum(centroids.clone()) - 2 * centroids).abs().max()
    return {"centroids": centroids.tolist(), "ranks_disagree": float(ranks_disagree)}


def test_kmeans_over_two_ranks_clusters_all_their_points_and_every_rank_holds_the_same_centroids(tmp_path):
    centers, points = _clustered_points()
    result = metrics_on_two_ranks(_kmeans_of_rank, tmp_path)
    assert result["ranks_disagree"] == 0
    found = torch.tensor(result["centroids"])
    cluster = torch.cdist(found, centers).argmin(1)
    torch.testing.assert_close(found, points.view(4, 50, 8).mean(1)[cluster])


def test_kmeans_with_fewer_points_than_clusters_keeps_every_centroid_finite():
    points = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    centroids = kmeans(points, 5, seed=0)
    assert centroids.shape == (5, 2) and torch.isfinite(centroids).all()
    assert {tuple(row) for row in centroids.tolist()} <= {(0.0, 1.0), (2.0, 3.0)}


class _LastItem(torch.nn.Module):
    """A stand-in encoder whose state at each position is the item id, repeated."""

    hidden = 2

    def sequence_states(self, input, last_only=False):
        states = input.float()[..., None].expand(*input.shape, self.hidden)
        return states[:, -1:] if last_only else states


def test_last_states_follow_the_rows_whatever_the_width_batches_and_restore_training_mode():
    input = torch.tensor([[0, 0, 1], [0, 5, 10], [4, 7, 2], [0, 0, 11]])
    widths = np.array([1, 2, 3, 1])
    model = _LastItem().train()
    states = last_states(model, input, widths, batch_size=1, bf16=False)
    torch.testing.assert_close(states[:, 0], torch.tensor([1.0, 10.0, 2.0, 11.0]))
    assert model.training
    train = TrainArrays(torch.arange(4), input, input)
    centroids = intent_centroids(model, train, widths, clusters=2, seed=0, batch_size=2, bf16=False)
    assert sorted(centroids[:, 0].tolist()) == [1.5, 10.5]  # {1, 2} and {10, 11}
