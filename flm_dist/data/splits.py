"""Stage 6 of prepare: per bucket, chronological per-user sequences -> train/valid/test split ->
fixed sampled negatives (negatives.py) -> one Parquet shard per split.

Leave-one-out: a user with n >= 3 events trains on items[:n-2], validates on item n-2 and tests
on item n-1 (history = everything before the target); users with n < 3 keep all their events in
train and get no valid/test row (as in SASRec), counted in the manifest. Temporal: train = events
before `valid_cutoff`, the valid target is the user's first event in [valid_cutoff, test_cutoff),
the test target the first event >= test_cutoff, history = all the user's events before the
target; rows with an empty history are skipped and counted. Cutoffs in (0, 1) are quantiles of
the filtered events' timestamps (the timestamp at rank floor(q * n)); other values are timestamps.
Negatives: `num_negatives` per valid/test row, fewer only for a user who has seen all but fewer
items of the catalogue (counted as `short_negatives`).
With a cold-item hold-out (data/cold_items.py) the held-out items' events leave train and every
history, the targets stay as they are, and valid/test rows carry `cold` (the target is held out).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flm_dist.data import storage
from flm_dist.data.negatives import draw_negatives, ranges
from flm_dist.data.stage_runner import StageRunner
from flm_dist.data.vocabularies import looked_up_buckets
from flm_dist.errors import UserError

TRAIN_SCHEMA = pa.schema([("user", pa.int32()), ("items", pa.list_(pa.int32())),
                          ("timestamps", pa.list_(pa.int64()))])
EVAL_SCHEMA = pa.schema([("user", pa.int32()), ("history", pa.list_(pa.int32())), ("target", pa.int32()),
                         ("negatives", pa.list_(pa.int32()))])
COLD_EVAL_SCHEMA = EVAL_SCHEMA.append(pa.field("cold", pa.bool_()))
_SPLIT_IDS = {"valid": 1, "test": 2}


def is_quantile(value: float) -> bool:
    return 0.0 < value < 1.0


def build(runner: StageRunner, fs, work: str, out: str, bucket_groups: list[list[int]], items: pa.Table,
          users: pa.Table, split: str, cutoffs: tuple[float | None, float | None], num_negatives: int, seed: int,
          t_min: int | None, t_max: int | None, interactions: int,
          held_out: np.ndarray | None = None) -> dict[str, Any]:
    """Stage 6: the train/valid/test shards of every bucket under `out`; returns the manifest's
    "splits" section, with the hold-out's counts under "cold" when `held_out` (bool [N + 1], the
    held-out items) is given."""
    item_ref = runner.put(items.column("item_id").combine_chunks())
    held_out_ref = runner.put(held_out) if held_out is not None else None
    user_ref = runner.put(users.column("user_id").combine_chunks())
    resolved = None
    if split == "temporal":
        resolved = _resolve_cutoffs(
            runner, lambda lo, width, bins, exact: [(fs, work, g, item_ref, user_ref, lo, width, bins, exact)
                                                    for g in bucket_groups], cutoffs, t_min, t_max, interactions)
    built = runner.map(_build_task, [(fs, work, out, g, item_ref, user_ref, split, resolved, num_negatives, seed,
                                      held_out_ref) for g in bucket_groups], "build")
    stats = Counter()
    for r in built:
        stats.update(r)
    section: dict[str, Any] = {
        "method": split,
        "train": {"rows": stats["train_rows"], "interactions": stats["train_interactions"]},
        "valid": {"rows": stats["valid_rows"], "interactions": stats["valid_rows"]},
        "test": {"rows": stats["test_rows"], "interactions": stats["test_rows"]},
        "users_without_valid": stats["users_without_valid"],
        "users_without_test": stats["users_without_test"],
        "short_negatives": stats["short_negatives"],
    }
    if resolved is not None:
        section.update({"valid_cutoff": resolved[0], "test_cutoff": resolved[1],
                        "valid_no_history": stats["valid_no_history"], "test_no_history": stats["test_no_history"]})
    if held_out is not None:
        section["cold"] = {"train_interactions_removed": stats["cold_train_removed"],
                           **{f"{name}_{what}": stats[f"cold_{name}_{what}"]
                              for name in ("valid", "test") for what in ("targets", "history_removed", "no_history")}}
    return section


def _resolve_cutoffs(runner, calls_for, cutoffs: tuple[float | None, float | None], t_min, t_max,
                     interactions: int) -> tuple[int, int]:
    """Absolute cutoffs; quantiles are exact (histogram pass, then the values of the chosen bins)."""
    wanted = list(cutoffs)
    if t_min is None:
        raise UserError("split=temporal needs timestamps, but the input has none (set split=loo)")
    if not any(is_quantile(q) for q in wanted):
        return int(wanted[0]), int(wanted[1])
    bins = 1 << 18
    width = max(1, math.ceil((t_max - t_min + 1) / bins))
    hist = sum(runner.map(_timestamp_task, calls_for(t_min, width, bins, None), "cutoffs"))
    cum = np.cumsum(hist)
    ranks = [min(interactions - 1, int(math.floor(q * interactions))) if is_quantile(q) else None for q in wanted]
    chosen = sorted({int(np.searchsorted(cum, r, side="right")) for r in ranks if r is not None})
    values = np.sort(np.concatenate(runner.map(_timestamp_task, calls_for(t_min, width, bins, chosen), "cutoffs")))
    result = []
    for q, r in zip(wanted, ranks):
        if r is None:
            result.append(int(q))
            continue
        b = int(np.searchsorted(cum, r, side="right"))
        below = int(cum[b - 1]) if b else 0
        in_bin = values[(values - t_min) // width == b]
        result.append(int(in_bin[r - below]))
    if result[0] > result[1]:
        raise UserError(f"valid_cutoff resolves to {result[0]}, after test_cutoff {result[1]}")
    return result[0], result[1]


def _filtered_buckets(fs, work: str, buckets: list[int], item_vocab: pa.Array, user_vocab: pa.Array):
    """Each bucket's kept events as (bucket, user index, item index, timestamps), grouped by user,
    in time order."""
    for b, table, (item, user) in looked_up_buckets(fs, work, buckets, None,
                                                     {"item": item_vocab, "user": user_vocab}):
        keep = pc.and_(item.is_valid(), user.is_valid())
        user = user.filter(keep).to_numpy().astype(np.int64)
        item = item.filter(keep).to_numpy().astype(np.int32) + 1
        stamps = table.column("timestamp").filter(keep).combine_chunks()
        order = np.argsort(user, kind="stable")  # vocab order may be numeric, the bucket's is by string
        yield b, user[order], item[order], stamps.take(pa.array(order))


def _timestamp_task(fs, work: str, buckets: list[int], item_vocab, user_vocab, lo: int, width: int,
                    bins: int, exact: list[int] | None) -> Any:
    """Histogram of kept timestamps over `bins` bins of `width` from `lo`; or the exact values of some bins."""
    hist = np.zeros(bins, dtype=np.int64)
    values = []
    for _, _, _, stamps in _filtered_buckets(fs, work, buckets, item_vocab, user_vocab):
        ts = stamps.to_numpy(zero_copy_only=False).astype(np.int64)
        which = (ts - lo) // width
        if exact is None:
            hist += np.bincount(which, minlength=bins)
        else:
            values.append(ts[np.isin(which, exact)])
    return hist if exact is None else np.concatenate(values or [np.zeros(0, np.int64)])


def _list_array(offsets: np.ndarray, values: pa.Array | np.ndarray, value_type: pa.DataType) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, type=value_type))


def _warm_ranges(starts: np.ndarray, ends: np.ndarray, cold_event: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """`ranges(starts, ends)` without the events of held-out items (`cold_event`; None: keep all)."""
    offsets, flat = ranges(starts, ends)
    if cold_event is None:
        return offsets, flat
    warm = ~cold_event[flat]
    row = np.repeat(np.arange(len(starts)), np.diff(offsets))
    return np.r_[0, np.cumsum(np.bincount(row[warm], minlength=len(starts)))].astype(np.int64), flat[warm]


def _eval_rows(user_ids, item, offsets: np.ndarray, flat: np.ndarray, targets,
               negatives: tuple[np.ndarray, np.ndarray], held_out: np.ndarray | None) -> pa.Table:
    columns = [pa.array(user_ids.astype(np.int32)), _list_array(offsets, item[flat], pa.int32()),
               pa.array(item[targets]), _list_array(negatives[0], negatives[1], pa.int32())]
    if held_out is None:
        return pa.Table.from_arrays(columns, schema=EVAL_SCHEMA)
    return pa.Table.from_arrays(columns + [pa.array(held_out[item[targets]])], schema=COLD_EVAL_SCHEMA)


def _build_task(fs, work: str, out: str, buckets: list[int], item_vocab, user_vocab, split: str,
                cutoffs: tuple[int, int] | None, k: int, seed: int, held_out: np.ndarray | None) -> dict[str, int]:
    """Per bucket: per-user sequences, the split, fixed negatives; writes one shard per split."""
    n_items = len(item_vocab)
    stats = Counter()
    for b, user, item, stamps in _filtered_buckets(fs, work, buckets, item_vocab, user_vocab):
        change = np.flatnonzero(np.r_[True, user[1:] != user[:-1]]) if len(user) else np.zeros(0, np.int64)
        starts = change.astype(np.int64)
        ends = np.r_[change[1:], len(user)].astype(np.int64)
        length = ends - starts
        ids = user[starts]
        if split == "loo":
            has_eval = length >= 3
            train_end = np.where(has_eval, ends - 2, ends)
            valid = (has_eval, ends - 2)
            test = (has_eval, ends - 1)
        else:
            ts = stamps.to_numpy(zero_copy_only=False)
            period = np.searchsorted(np.asarray(cutoffs), ts, side="right")  # 0 train, 1 valid, 2 test
            before_valid = np.add.reduceat((period == 0).astype(np.int64), starts) if len(starts) else starts
            train_end = starts + before_valid
            valid = _first_in_period(period, 1, starts, ends)
            test = _first_in_period(period, 2, starts, ends)
        seen = _sorted_unique(user.astype(np.int64) * (n_items + 1) + item)
        cold_event = held_out[item] if held_out is not None else None
        offsets, flat = _warm_ranges(starts, train_end, cold_event)
        if cold_event is not None:
            stats["cold_train_removed"] += int((train_end - starts).sum()) - len(flat)
        has_train = np.diff(offsets) > 0
        offsets = np.r_[0, np.cumsum(np.diff(offsets)[has_train])].astype(np.int64)
        train = pa.Table.from_arrays([
            pa.array(ids[has_train].astype(np.int32)), _list_array(offsets, item[flat], pa.int32()),
            pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), stamps.take(pa.array(flat)).cast(pa.int64())),
        ], schema=TRAIN_SCHEMA)
        storage.write_parquet(fs, storage.join(out, "train", f"part-{b:05d}.parquet"), train)
        stats["train_rows"] += train.num_rows
        stats["train_interactions"] += int(offsets[-1])
        stats["users"] += len(starts)
        for name, (has, target) in (("valid", valid), ("test", test)):
            usable = has & (target > starts)
            stats[f"{name}_no_history"] += int((has & ~usable).sum())
            stats[f"users_without_{name}"] += int((~has).sum())
            rows = np.flatnonzero(usable)
            history_offsets, history = _warm_ranges(starts[rows], target[rows], cold_event)
            if cold_event is not None:
                lengths = np.diff(history_offsets)
                stats[f"cold_{name}_history_removed"] += int((target[rows] - starts[rows]).sum()) - len(history)
                stats[f"cold_{name}_no_history"] += int((lengths == 0).sum())
                rows = rows[lengths > 0]
                history_offsets = np.r_[0, np.cumsum(lengths[lengths > 0])].astype(np.int64)
                stats[f"cold_{name}_targets"] += int(held_out[item[target[rows]]].sum())
            negatives = draw_negatives(ids[rows], _SPLIT_IDS[name], seen, n_items, k, seed)
            stats["short_negatives"] += int((np.diff(negatives[0]) < k).sum())
            table = _eval_rows(ids[rows], item, history_offsets, history, target[rows], negatives, held_out)
            storage.write_parquet(fs, storage.join(out, name, f"part-{b:05d}.parquet"), table)
            stats[f"{name}_rows"] += table.num_rows
    return dict(stats)


def _first_in_period(period: np.ndarray, which: int, starts: np.ndarray, ends: np.ndarray):
    """(user has an event in `which`, index of the first such event) per user."""
    where = np.flatnonzero(period == which)
    at = np.searchsorted(where, starts)
    found = at < len(where)
    first = np.where(found, where[np.minimum(at, max(len(where) - 1, 0))] if len(where) else 0, 0)
    has = found & (first < ends)
    return has, np.where(has, first, starts)


def _sorted_unique(keys: np.ndarray) -> np.ndarray:
    keys = np.sort(keys)
    return keys[np.r_[True, keys[1:] != keys[:-1]]] if len(keys) else keys
