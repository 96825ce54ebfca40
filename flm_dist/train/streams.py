"""Each process's random stream: what a checkpoint keeps of it, and how DDP ranks get their own.

Every rank builds the model from `train.seed`, so that the weights start identical; then every
rank but rank 0 reseeds, so that the ranks draw their own dropout masks and sampled negatives.
A checkpoint keeps every rank's state, so a resumed DDP run replays each rank.
"""

from __future__ import annotations

from typing import Any

import torch

from flm_dist.train import distributed


def rng_state() -> dict[str, Any]:
    """This process's random state: torch's CPU generator and every visible GPU's."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def give_ranks_their_own_streams(seed: int, step: int) -> None:
    """Reseed the random stream (dropout masks, sampled negatives) of every DDP rank but rank 0
    from (seed, rank, step). The ranks build the model from the same `train.seed`, so they would
    otherwise draw the same masks at every step whose batches have the same shapes (dealt shards
    give most steps the same shapes on every rank). Rank 0, and a run in one process, keep the
    stream of `train.seed`."""
    if distributed.rank() > 0:
        torch.manual_seed(seed * 1_000_003 + distributed.rank() * 10_007 + step)


def restore_rng_state(state: dict[str, Any], seed: int, step: int) -> None:
    """This rank's random stream from a checkpoint: its own where the checkpoint kept every
    rank's (`rng_by_rank`, same number of ranks), else rank 0's, reseeded on the other ranks."""
    by_rank = state.get("rng_by_rank")
    if by_rank is not None and len(by_rank) == distributed.world_size():
        set_rng_state(by_rank[distributed.rank()])
    else:  # written before every rank's stream was kept, or by another number of ranks
        set_rng_state(state["rng"])
        give_ranks_their_own_streams(seed, step)
