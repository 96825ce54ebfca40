"""How evenly DDP ranks share an epoch's batches: slices of equal row counts in user-id order
(Ray Data's `streaming_split(equal=True)` over one block, what training used before) against the
users dealt by history length (`flm_dist.train.shards`).

    python3 results/shard_balance.py .data/toys_attributes .data/beauty_attributes .data/sports_attributes

Prefix windows at max_len 50 and 256 windows a step over all ranks (batch 256 / ranks each).
Every rank runs the busiest rank's batch count, the others repeating random batches: `repeats`
is the share of an epoch's windows those repeats add. Prints markdown rows:
set | ranks | windows per rank (min-max), slices | steps (min-max), slices | repeats, slices |
windows per rank, dealt | steps, dealt | repeats, dealt.
"""

import sys
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flm_dist.data.batches import build_train_arrays, deal_by_length, length_bucketed_batches, window_widths

MAX_LEN, STEP_WINDOWS = 50, 256


def _windows_and_steps(table, owner: np.ndarray, ranks: int) -> tuple[list[int], list[int]]:
    windows, steps = [], []
    for rank in range(ranks):
        widths = window_widths(build_train_arrays(table.filter(owner == rank), MAX_LEN, "prefixes"))
        windows.append(len(widths))
        steps.append(len(length_bucketed_batches(widths, STEP_WINDOWS // ranks, seed=0)[1]))
    return windows, steps


def _cells(windows: list[int], steps: list[int], ranks: int) -> str:
    repeats = sum(max(steps) - s for s in steps) * (STEP_WINDOWS // ranks) / sum(windows)
    return f"{min(windows):,}-{max(windows):,} | {min(steps)}-{max(steps)} | {100 * repeats:.1f}%"


def main(directories: list[str]) -> None:
    for directory in directories:
        table = pq.read_table(Path(directory) / "train").sort_by("user")
        users = table.column("user").to_numpy()
        lengths = pc.list_value_length(table.column("items")).to_numpy()
        for ranks in (2, 4, 8):
            sliced = np.arange(len(users)) * ranks // len(users)
            dealt = deal_by_length(users, lengths, ranks)
            print(f"| {Path(directory).name} | {ranks} | {_cells(*_windows_and_steps(table, sliced, ranks), ranks)} "
                  f"| {_cells(*_windows_and_steps(table, dealt, ranks), ranks)} |")


if __name__ == "__main__":
    main(sys.argv[1:])
