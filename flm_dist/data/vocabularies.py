"""Stages 3 to 5 of prepare: from the bucketed events to the item and user vocabularies.

  3. dedup: per bucket, group users, order each user's events by (timestamp, file, row, pos) and
     drop exact duplicates; return per-item counts (merged on the driver: the item table fits
     there, the log does not) and the bucket's users.
  4. k-core: per-bucket user filtering with the driver summing item counts, until no item drops.
  5. vocab: items by frequency (desc, ties by id), users by id; written by the driver.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flm_dist.data import storage
from flm_dist.data.events import EVENTS_SCHEMA
from flm_dist.data.hashing import string_buffers
from flm_dist.data.stage_runner import StageRunner

log = logging.getLogger("flm_dist")

ITEMS_SCHEMA = pa.schema([("index", pa.int32()), ("item_id", pa.string()), ("count", pa.int64())])
USERS_SCHEMA = pa.schema([("index", pa.int32()), ("user_id", pa.string())])
_LOOKUP_ROWS = 4_000_000  # k-core and build look ids up in the vocabularies this many events at a time


class Counted(NamedTuple):
    """The events after dedup."""
    items: pa.Array
    """Distinct item ids."""
    counts: np.ndarray
    """Events per item of `items`."""
    users: pa.Array
    """Distinct user ids."""
    duplicates: int
    """Events dropped as duplicates."""
    t_min: int | None
    t_max: int | None


def dedup(runner: StageRunner, fs, work: str, bucket_groups: list[list[int]]) -> Counted:
    """Stage 3: each bucket's events in time order and without duplicates, under `work`."""
    deduped = runner.map(_dedup_task, [(fs, work, g) for g in bucket_groups], "dedup")
    item_counts = pa.concat_tables([r["items"] for r in deduped]).group_by("item").aggregate([("count", "sum")])
    return Counted(items=item_counts.column("item").combine_chunks(),
                   counts=item_counts.column("count_sum").to_numpy().astype(np.int64),
                   users=pa.concat_arrays([r["users"] for r in deduped]),
                   duplicates=sum(r["duplicates"] for r in deduped),
                   t_min=_reduce(min, [r["t_min"] for r in deduped]),
                   t_max=_reduce(max, [r["t_max"] for r in deduped]))


class Kept(NamedTuple):
    """What k-core filtering keeps of the `Counted` events."""
    counts: np.ndarray
    """Events kept per item of `Counted.items`."""
    removed: np.ndarray
    """Whether each item of `Counted.items` was filtered out."""
    users: pa.Array
    """User ids kept."""
    iterations: int
    dropped_items: int
    """Events dropped with their item."""
    dropped_users: int
    """Events dropped with their user."""


def kcore(runner: StageRunner, fs, work: str, bucket_groups: list[list[int]], counted: Counted, min_user: int,
          min_item: int) -> Kept:
    """Stage 4: drop items under `min_item` events and users under `min_user`, until none drops."""
    iterations = 0
    counts, users = counted.counts, counted.users
    removed = np.zeros(len(counted.items), dtype=bool)
    if not (min_user or min_item):
        return Kept(counts, removed, users, iterations, 0, 0)
    items_ref = runner.put(counted.items)
    removed = counts < min_item
    while True:
        iterations += 1
        removed_ref = runner.put(removed)
        results = runner.map(_kcore_task, [(fs, work, g, items_ref, removed_ref, min_user) for g in bucket_groups],
                             f"k-core {iterations}")
        counts = sum(r["counts"] for r in results)
        users = pa.concat_arrays([r["users"] for r in results])
        grown = removed | (counts < min_item)
        log.info("prepare: k-core pass %d: %d users, %d items left", iterations, len(users),
                 int((~grown & (counts > 0)).sum()))
        if (grown == removed).all():
            break
        removed = grown
    return Kept(counts, removed, users, iterations, dropped_items=sum(r["kcore_item"] for r in results),
                dropped_users=sum(r["kcore_user"] for r in results))


def write_vocabularies(fs, out: str, items_by_id: pa.Array, kept: Kept) -> tuple[pa.Table, pa.Table]:
    """Stage 5: the kept items by frequency (desc, ties by id) and users by id, written under
    `out`/vocab/; returns the (items, users) tables."""
    keep = (kept.counts > 0) & ~kept.removed
    kept_ids, kept_counts = items_by_id.filter(pa.array(keep)), kept.counts[keep]
    tie = np.empty(len(kept_ids), dtype=np.int64)
    tie[_id_order(kept_ids)] = np.arange(len(kept_ids))
    order = np.lexsort((tie, -kept_counts))
    items = pa.Table.from_arrays([pa.array(np.arange(1, len(order) + 1, dtype=np.int32)),
                                  kept_ids.take(pa.array(order)), pa.array(kept_counts[order])], schema=ITEMS_SCHEMA)
    user_ids = kept.users.take(pa.array(_id_order(kept.users)))
    users = pa.Table.from_arrays([pa.array(np.arange(len(user_ids), dtype=np.int32)), user_ids], schema=USERS_SCHEMA)
    storage.write_parquet(fs, storage.join(out, "vocab", "items.parquet"), items)
    storage.write_parquet(fs, storage.join(out, "vocab", "users.parquet"), users)
    return items, users


def _id_order(ids: pa.Array) -> np.ndarray:
    """Indices sorting ids: numerically when every id is an integer, else by string."""
    if len(ids) and pc.all(pc.match_substring_regex(ids, r"^-?\d{1,18}$")).as_py():
        return np.argsort(ids.cast(pa.int64()).to_numpy(), kind="stable")
    return pc.sort_indices(ids).to_numpy()


def table_hash(table: pa.Table) -> str:
    """sha256 of a table's column values (not of the file bytes)."""
    digest = hashlib.sha256()
    for column in table.columns:
        array = column.combine_chunks()
        if pa.types.is_string(array.type):
            offsets, data = string_buffers(array)
            digest.update((offsets - offsets[0]).astype(np.int64).tobytes())
            digest.update(data.tobytes())
        else:
            digest.update(array.to_numpy().astype(np.int64).tobytes())
    return digest.hexdigest()


def _sorted_path(work: str, bucket: int) -> str:
    return storage.join(work, "sorted", f"{bucket:05d}.parquet")


def _dedup_task(fs, work: str, buckets: list[int]) -> dict[str, Any]:
    """Per bucket: chronological order, exact duplicates out; returns item counts and users."""
    duplicates = rows = 0
    counts, users = [], []
    t_min, t_max = None, None
    for b in buckets:
        directory = storage.join(work, "buckets", f"{b:05d}")
        pieces = sorted(fs.find(directory)) if fs.exists(directory) else []
        table = pa.concat_tables([EVENTS_SCHEMA.empty_table()] + [storage.read_parquet(fs, p) for p in pieces])
        table = table.take(pa.array(_chronological(table)))
        table, dropped = _drop_duplicates(table)
        duplicates += dropped
        if table.num_rows:
            t_min = _opt(min, t_min, pc.min(table.column("timestamp")).as_py())
            t_max = _opt(max, t_max, pc.max(table.column("timestamp")).as_py())
        table = table.select(["user", "item", "timestamp"])
        storage.write_parquet(fs, _sorted_path(work, b), table, work=True)
        rows += table.num_rows
        counts.append(table.group_by("item", use_threads=False).aggregate([("item", "count")]))
        users.append(pc.unique(table.column("user")))
    merged = pa.concat_tables(counts).group_by("item", use_threads=False).aggregate([("item_count", "sum")])
    return {"duplicates": duplicates, "rows": rows, "items": merged.rename_columns(["item", "count"]),
            "users": pa.concat_arrays([u.cast(pa.string()) for u in users]) if users else pa.array([], pa.string()),
            "t_min": t_min, "t_max": t_max}


def _chronological(table: pa.Table) -> np.ndarray:
    """Row order grouping users (in order of first appearance) and, within a user, by time.

    Sorting dictionary codes instead of the user strings: users only need to be grouped here
    (the build stage orders them by vocabulary index), and int keys sort several times faster.
    """
    user = pc.dictionary_encode(table.column("user").combine_chunks()).indices.to_numpy()
    keys = [table.column(c).combine_chunks() for c in ("pos", "row", "file", "timestamp")]
    keys[-1] = keys[-1].fill_null(0)  # all null (no timestamps) or none null
    return np.lexsort([k.to_numpy() for k in keys] + [user])


def _drop_duplicates(table: pa.Table) -> tuple[pa.Table, int]:
    """Keep the first of each (user, item, timestamp, event, weight) in a `_chronological` table.

    Duplicates share (user, timestamp), so only runs of equal (user, timestamp) go through the
    (costly) group-by. A null timestamp never equals anything: untimed rows are never duplicates.
    """
    n = table.num_rows
    if n < 2:
        return table, 0
    user, ts = table.column("user").combine_chunks(), table.column("timestamp").combine_chunks()
    same = np.zeros(n, dtype=bool)
    same[1:] = np.asarray(pc.and_(pc.equal(user.slice(1), user.slice(0, n - 1)),
                                  pc.equal(ts.slice(1), ts.slice(0, n - 1))).fill_null(False))
    in_run = same | np.r_[same[1:], False]
    if not in_run.any():
        return table, 0
    candidates = np.flatnonzero(in_run)
    keys = ["user", "item", "timestamp", "event", "weight"]
    keyed = table.select(keys).take(pa.array(candidates)).append_column("order", pa.array(candidates))
    first = keyed.group_by(keys, use_threads=False).aggregate([("order", "min")])
    keep = ~in_run
    keep[first.column("order_min").to_numpy()] = True
    return table.filter(pa.array(keep)), int((~keep).sum())


def _opt(fn, a, b):
    return b if a is None else (a if b is None else fn(a, b))


def _kcore_task(fs, work: str, buckets: list[int], items_by_id: pa.Array, removed: np.ndarray,
                min_user: int) -> dict[str, Any]:
    """With `removed` items gone, drop users under `min_user`; count the remaining events per item."""
    counts = np.zeros(len(items_by_id), dtype=np.int64)
    kept_users = []
    drop_item = drop_user = 0
    for _, table, (item,) in looked_up_buckets(fs, work, buckets, ["user", "item"], {"item": items_by_id}):
        code = item.to_numpy()
        live = ~removed[code]
        encoded = pc.dictionary_encode(table.column("user").combine_chunks())
        user_code = encoded.indices.to_numpy()
        per_user = np.bincount(user_code[live], minlength=len(encoded.dictionary))
        user_ok = per_user >= max(min_user, 1)
        row_ok = live & user_ok[user_code]
        counts += np.bincount(code[row_ok], minlength=len(items_by_id))
        kept_users.append(encoded.dictionary.filter(pa.array(user_ok)))
        drop_item += int((~live).sum())
        drop_user += int((live & ~row_ok).sum())
    users = pa.concat_arrays(kept_users) if kept_users else pa.array([], pa.string())
    return {"counts": counts, "users": users, "kcore_item": drop_item, "kcore_user": drop_user}


def looked_up_buckets(fs, work: str, buckets: list[int], columns: list[str] | None,
                      vocabularies: dict[str, pa.Array]):
    """Each bucket as (bucket, table, the positions of its `vocabularies` columns' values in those
    vocabularies, null where absent).

    `index_in` hashes the whole vocabulary on every call (4.5 s for 6M items), so the ids of
    buckets totalling about `_LOOKUP_ROWS` events are looked up in one call, not per bucket.
    """
    group: list[tuple[int, pa.Table]] = []
    rows = 0
    for position, b in enumerate(buckets):
        group.append((b, storage.read_parquet(fs, _sorted_path(work, b), columns)))
        rows += group[-1][1].num_rows
        if rows < _LOOKUP_ROWS and position < len(buckets) - 1:
            continue
        together = pa.concat_tables([table.select(list(vocabularies)) for _, table in group])
        found = [pc.index_in(together.column(name), value_set=vocab) for name, vocab in vocabularies.items()]
        start = 0
        for bucket, table in group:
            yield bucket, table, [codes.slice(start, table.num_rows) for codes in found]
            start += table.num_rows
        group, rows = [], 0


def _reduce(fn, values):
    values = [v for v in values if v is not None]
    return fn(values) if values else None
