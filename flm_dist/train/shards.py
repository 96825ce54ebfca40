"""Which training users each DDP rank trains on.

Ray Data hands each rank a slice of the training rows in the order the prepared shards hold
them, by user id. Where ids follow sign-up order or the ranking of the source (the S3-Rec sets'
early ids have the longest histories), contiguous slices hold very different numbers of windows,
and since every rank runs the same number of steps, the lighter ranks repeated random batches
to keep up: more time per epoch, and their users weighted above the others'.
`balance_users` re-deals the users by history length before the batch plan is made, so every
rank holds about as many windows of each width, and the same users whatever slices Ray Data
delivered: a resumed run replays its batches.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from flm_dist.data.batches import deal_by_length
from flm_dist.train import distributed


def balance_users(table: pa.Table, device: torch.device) -> pa.Table:
    """This rank's part of every rank's `table` rows (one row per user, with an `items` list),
    dealt by history length (`deal_by_length`); `table` itself in a single process. Each row
    moves at most once, and only the (user, length) pairs go to every rank."""
    if not distributed.is_distributed():
        return table
    users = table.column("user").to_numpy().astype(np.int64)
    lengths = pc.list_value_length(table.column("items")).to_numpy(zero_copy_only=False).astype(np.int64)
    every_user, every_length = distributed.all_gather(torch.from_numpy(users).to(device),
                                                      torch.from_numpy(lengths).to(device))
    every_user, every_length = every_user.cpu().numpy(), every_length.cpu().numpy()
    owner_of = deal_by_length(every_user, every_length, distributed.world_size())
    by_user = np.argsort(every_user)
    owner = owner_of[by_user[np.searchsorted(every_user, users, sorter=by_user)]]
    parts = [table.filter(pa.array(owner == rank)) for rank in range(distributed.world_size())]
    # Every part is a filter of some rank's split, so even an all-empty result keeps the columns.
    return pa.concat_tables(distributed.exchange_objects(parts), promote_options="default")
