"""DDP ranks train on users dealt by history length, not on the slices Ray Data handed them."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from loopback_ranks import spawn_on_loopback

from flm_dist.data.batches import build_train_arrays, deal_by_length, length_bucketed_batches, window_widths
from flm_dist.train import distributed
from flm_dist.train.shards import balance_users

WORLD = 2


def test_users_are_dealt_longest_first_in_snake_order():
    users = np.array([10, 11, 12, 13, 14, 15])
    lengths = np.array([6, 5, 4, 3, 2, 1])
    assert deal_by_length(users, lengths, 2).tolist() == [0, 1, 1, 0, 0, 1]
    assert deal_by_length(users, lengths, 3).tolist() == [0, 1, 2, 2, 1, 0]
    # Ties by user id; the result follows each user, not the order the users came in.
    ties = deal_by_length(np.array([7, 3, 5, 1]), np.array([2, 2, 2, 2]), 2)
    assert ties.tolist() == [0, 1, 1, 0]  # ids in order 1, 3, 5, 7 get 0, 1, 1, 0
    shuffled = np.random.default_rng(0).permutation(6)
    assert (deal_by_length(users[shuffled], lengths[shuffled], 2) == deal_by_length(users, lengths, 2)[shuffled]).all()


def test_dealing_balances_skewed_histories_where_contiguous_slices_do_not():
    # Early ids with the longest histories, as in the S3-Rec sets: a contiguous half holds most windows.
    lengths = np.repeat(np.arange(40, 0, -1), 25)
    users = np.arange(len(lengths))
    for parts in (2, 4, 8):
        dealt = np.bincount(deal_by_length(users, lengths, parts), weights=lengths, minlength=parts)
        contiguous = np.bincount(users * parts // len(users), weights=lengths, minlength=parts)
        assert dealt.max() - dealt.min() <= lengths.max()
        assert contiguous.max() - contiguous.min() > 10 * lengths.max()


def _table(users: np.ndarray) -> pa.Table:
    """One row per user; user u has 2 + (60 - u) // 3 items, so low ids have the longest histories."""
    items = [list(range(1, 3 + (60 - int(u)) // 3)) for u in users]
    return pa.table({"user": pa.array(users, pa.int32()), "items": pa.array(items, pa.list_(pa.int32())),
                     "timestamps": pa.array([list(range(len(row))) for row in items], pa.list_(pa.int64()))})


USERS = np.arange(60)
SLICES = {"contiguous": lambda rank: USERS[rank * 30:(rank + 1) * 30],
          "interleaved": lambda rank: USERS[rank::WORLD],
          "one rank holds all": lambda rank: USERS if rank == 0 else USERS[:0]}


def _balance_on_rank(rank: int, world: int, init_method: str, slicing: str, directory: str) -> None:
    torch.set_num_threads(1)
    with distributed.process_group(rank, world, init_method):
        balanced = balance_users(_table(SLICES[slicing](rank)), torch.device("cpu")).sort_by("user")
        Path(directory, f"rank{rank}.json").write_text(json.dumps(balanced.to_pydict()))
    distributed.exit_rank_process()


def _batches(rows: dict) -> int:
    widths = window_widths(build_train_arrays(pa.table(rows), max_len=50, windows="prefixes"))
    return len(length_bucketed_batches(widths, batch_size=16, seed=0)[1])


@pytest.mark.parametrize("slicing", list(SLICES))
def test_two_ranks_end_with_the_same_balanced_users_whatever_slices_they_were_handed(slicing, tmp_path):
    spawn_on_loopback(_balance_on_rank, WORLD, slicing, str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD)]
    whole = _table(USERS).to_pydict()
    owner = deal_by_length(USERS, np.array([len(row) for row in whole["items"]]), WORLD)
    for rank, rows in enumerate(ranks):
        assert rows["user"] == USERS[owner == rank].tolist()  # the dealt users, in full
        for user, items, timestamps in zip(rows["user"], rows["items"], rows["timestamps"]):
            assert items == whole["items"][user] and timestamps == whole["timestamps"][user]
    dealt = [_batches(rows) for rows in ranks]
    contiguous = [_batches(_table(SLICES["contiguous"](rank)).to_pydict()) for rank in range(WORLD)]
    assert max(dealt) - min(dealt) <= 1 < max(contiguous) - min(contiguous)


def test_one_process_keeps_its_table_and_its_objects():
    table = _table(USERS[:5])
    assert balance_users(table, torch.device("cpu")) is table
    assert distributed.exchange_objects(["only"]) == ["only"]
