"""The intents of the intent contrastive term (`loss.intent`): k-means over the last sequence
states of every worker's training windows, refreshed at each epoch's start (ICSRec, ICLRec).

The clustering runs on all workers at once through the distributed seam: the initial centroids
are rank 0's sample, broadcast; each Lloyd iteration all-reduces the per-intent sums and counts,
so every rank ends with the same centroids, fitted to all workers' windows. A worker with more
than MAX_WINDOWS_PER_RANK windows clusters a seeded sample of that many, which bounds the pass
and the [N, H] states it keeps at any data size.
"""

from __future__ import annotations

import numpy as np
import torch

from flm_dist.data.batches import TrainArrays, length_bucketed_batches
from flm_dist.models.losses import nearest_centroid
from flm_dist.train import distributed

KMEANS_ITERATIONS = 20  # ICSRec's faiss k-means runs 20
MAX_WINDOWS_PER_RANK = 1 << 18
SEEDING_SAMPLE_PER_CLUSTER = 32


@torch.no_grad()
def last_states(model, input: torch.Tensor, widths: np.ndarray, batch_size: int, bf16: bool) -> torch.Tensor:
    """[N, H] fp32 last-position sequence state of each window of `input` [N, L] (left-padded,
    `widths` items), in eval mode (no dropout), batched by width as training is."""
    was_training = model.training
    model.eval()
    order, batches = length_bucketed_batches(widths, batch_size, seed=0)
    order = torch.from_numpy(order).to(input.device)
    states = torch.empty(len(input), model.hidden, device=input.device)
    with torch.autocast(device_type=input.device.type, dtype=torch.bfloat16, enabled=bf16):
        for first, last, width in batches:
            rows = order[first:last]
            states[rows] = model.sequence_states(input[rows, -width:], last_only=True)[:, -1].float()
    model.train(was_training)
    return states


def kmeans(points: torch.Tensor, clusters: int, seed: int, iterations: int = KMEANS_ITERATIONS) -> torch.Tensor:
    """[clusters, H] centroids of `points` [N, H] (this rank's rows of the data set) by Lloyd's
    algorithm over every rank's points, from k-means++ seeds drawn from rank 0's points. An intent
    that loses all its points keeps its centroid."""
    generator = torch.Generator().manual_seed(seed)
    # Only rank 0 draws the seeds; the other ranks' buffers just receive them.
    centroids = (kmeans_plus_plus(points, clusters, generator) if distributed.is_main() and len(points)
                 else points.new_zeros(clusters, points.shape[1]))
    distributed.broadcast_(centroids)
    for _ in range(iterations):
        intent = nearest_centroid(points, centroids)
        sums = torch.zeros_like(centroids, dtype=torch.float64).index_add_(0, intent, points.double())
        counts = torch.bincount(intent, minlength=clusters).double()
        sums, counts = distributed.all_reduce_sum(sums), distributed.all_reduce_sum(counts)
        filled = counts > 0
        centroids[filled] = (sums[filled] / counts[filled, None]).float()
    return centroids


def kmeans_plus_plus(points: torch.Tensor, clusters: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeds: each next centroid is a point drawn with probability proportional to its
    squared distance from the nearest one chosen so far (a point may repeat when N < clusters).
    They are drawn from a sample of SEEDING_SAMPLE_PER_CLUSTER points per cluster: seeding is
    sequential, one pass per centroid, and Lloyd's iterations refine the seeds on every point."""
    sample = clusters * SEEDING_SAMPLE_PER_CLUSTER
    if len(points) > sample:
        points = points[torch.randperm(len(points), generator=generator)[:sample].to(points.device)]
    chosen = [int(torch.randint(len(points), (1,), generator=generator))]
    distance = (points - points[chosen[0]]).square().sum(1)
    for _ in range(clusters - 1):
        # The floor keeps the draw defined when every point coincides with a chosen one.
        weights = distance.clamp_min(1e-12).cpu().double()
        chosen.append(int(torch.multinomial(weights, 1, generator=generator)))
        distance = torch.minimum(distance, (points - points[chosen[-1]]).square().sum(1))
    return points[chosen].clone()


def intent_centroids(model, train: TrainArrays, widths: np.ndarray, clusters: int, seed: int,
                     batch_size: int, bf16: bool) -> torch.Tensor:
    """The intents of the coming epoch: k-means centroids [clusters, H] of the last states of all
    workers' training windows under the current model (a sample of MAX_WINDOWS_PER_RANK per
    worker beyond that many)."""
    rows = np.arange(len(train))
    if len(rows) > MAX_WINDOWS_PER_RANK:
        rows = np.sort(np.random.default_rng(seed).choice(len(rows), MAX_WINDOWS_PER_RANK, replace=False))
    input = train.input if len(rows) == len(train) else train.input[torch.from_numpy(rows).to(train.input.device)]
    return kmeans(last_states(model, input, widths[rows], batch_size, bf16), clusters, seed)
