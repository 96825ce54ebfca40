"""`flm prepare`: interaction log -> vocabularies, per-user sequences, train/valid/test splits.

Pipeline (each stage one Ray Data execution mapping a function over groups of files or buckets;
data moves between stages as Parquet under a temporary work directory, never through the driver):

  1. schemas: read each file's header/footer, so mismatched files fail before any parsing.
  2. parse: files -> normalised events (readers.py), bad rows -> quarantine; rows are hash-bucketed
     by user into B buckets, so every user lives in exactly one bucket.
  3. dedup: per bucket, group users, order each user's events by (timestamp, file, row, pos) and
     drop exact duplicates; return per-item counts (merged on the driver: the item table fits
     there, the log does not) and the bucket's users.
  4. k-core: per-bucket user filtering with the driver summing item counts, until no item drops.
  5. vocab: items by frequency (desc, ties by id), users by id; written by the driver.
  6. build: per bucket, chronological sequences -> split -> fixed sampled negatives -> shards.

Why Ray Data maps over groups rather than over rows: every stage is "run a function per group of
files or buckets with pyarrow, write Parquet, return small statistics" (counts, vocab pieces), and
the k-core loop runs one such pass per iteration. Per-user work on Ray Data rows (groupby,
map_groups) measured 6-25x slower than hash buckets handled by pyarrow (RAY_NOTES.md). Ray Data
schedules the calls, bounds how many run at once and streams their results back. Where the
filesystem is process-local (memory://) the same functions run in-process.

Output contract (read by training and evaluation; keep names and dtypes):
  DIR/manifest.json                 written last; its presence means the directory is complete
  DIR/vocab/items.parquet           index:int32 (1..N, 0 = padding), item_id:string, count:int64
  DIR/vocab/users.parquet           index:int32 (0..U-1), user_id:string
  DIR/train/part-NNNNN.parquet      user:int32, items:list<int32>, timestamps:list<int64>
  DIR/valid/part-NNNNN.parquet      user:int32, history:list<int32>, target:int32, negatives:list<int32>
  DIR/test/part-NNNNN.parquet       same as valid
  DIR/quarantine/part-NNNNN.parquet file, row, column, reason, raw (only when rows were quarantined)
One train/valid/test shard per user bucket, rows sorted by user. Everything is written under a
sibling DIR.tmp-<random> (work files under its _work/, so on a cluster the output must be storage
every node can reach) and published by storage.publish; a failed run removes it and leaves DIR as
it was (a killed one may leave the DIR.tmp-* sibling behind, never a DIR/manifest.json).

Splits. Leave-one-out: a user with n >= 3 events trains on items[:n-2], validates on item n-2 and
tests on item n-1 (history = everything before the target); users with n < 3 keep all their
events in train and get no valid/test row (as in SASRec), counted in the manifest. Temporal: train
= events before `valid_cutoff`, the valid target is the user's first event in [valid_cutoff,
test_cutoff), the test target the first event >= test_cutoff, history = all the user's events before
the target; rows with an empty history are skipped and counted. Cutoffs in (0, 1) are quantiles of
the filtered events' timestamps (the timestamp at rank floor(q * n)); other values are timestamps.
Negatives: `num_negatives` per valid/test row, fewer only for a user who has seen all but fewer
items of the catalogue (counted as `short_negatives`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import logging
import math
import posixpath
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, NamedTuple

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from flm_dist import __version__
from flm_dist.config import require, to_dict
from flm_dist.data import storage
from flm_dist.data.readers import (
    EVENTS_SCHEMA,
    QUARANTINE_SCHEMA,
    ROW_REASONS,
    ByteRange,
    ColumnMap,
    FileProblem,
    check_json_keys,
    file_schema,
    iter_file,
    list_input,
    resolve_format,
    row_group_rows,
    splittable_text,
)
from flm_dist.errors import UserError

log = logging.getLogger("flm_dist")

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
DROP_REASONS = ROW_REASONS + ("duplicate", "kcore_user", "kcore_item")
TRAIN_SCHEMA = pa.schema([("user", pa.int32()), ("items", pa.list_(pa.int32())),
                          ("timestamps", pa.list_(pa.int64()))])
EVAL_SCHEMA = pa.schema([("user", pa.int32()), ("history", pa.list_(pa.int32())), ("target", pa.int32()),
                         ("negatives", pa.list_(pa.int32()))])
ITEMS_SCHEMA = pa.schema([("index", pa.int32()), ("item_id", pa.string()), ("count", pa.int64())])
USERS_SCHEMA = pa.schema([("index", pa.int32()), ("user_id", pa.string())])
_SPLIT_IDS = {"valid": 1, "test": 2}
_ROWS_PER_BUCKET = 500_000      # auto buckets: a bucket's sort and sequences stay ~100 MB
_BITMAP_MAX_ITEMS = 1 << 16  # larger catalogs test negatives by sorted keys, not a bitmap
_LOOKUP_ROWS = 4_000_000  # k-core and build look ids up in the vocabularies this many events at a time
_FLUSH_ROWS = 1_000_000         # parse tasks buffer this many rows before writing bucket pieces
_TASK_RETRIES = 2               # a task lost twice more (a dead worker, a memory kill) fails the run
# Intermediate files are written once and read a few times: measured on 500k events, snappy
# without dictionaries wrote 3-7x faster than lz4/zstd with them, for ~15% more bytes.
_WORK_OPTIONS = {"compression": "snappy", "use_dictionary": False}
_QUARANTINE_PART_ROWS = 5_000_000


@dataclass
class PrepareConfig:
    """What to read, how to filter and split it, and where to write the prepared dataset."""

    input: str = ""
    """Interaction log: a file or directory, local path or fsspec URI (s3://, gs://, memory://)."""
    output: str = ""
    """Output directory (local path or fsspec URI); appears atomically, manifest.json last."""
    format: Literal["auto", "parquet", "csv", "tsv", "jsonl", "seq-txt", "pairs-txt", "recbole", "movielens"] = "auto"
    """Input format; auto detects by extension, then by content."""
    columns: ColumnMap = field(default_factory=ColumnMap)
    """Input column names for the tabular formats (Parquet, CSV/TSV, JSON lines, RecBole)."""
    min_user_interactions: int | None = None
    """k-core: users need this many events; 0 = off; None = 5 for raw logs, 0 for seq-txt sets."""
    min_item_interactions: int | None = None
    """k-core: items need this many events; 0 = off; None = 5 for raw logs, 0 for seq-txt sets."""
    split: Literal["loo", "temporal"] = "loo"
    """loo: last event test, second-to-last valid; temporal: global time cut-offs."""
    valid_cutoff: float | None = None
    """Temporal split: start of the validation period; in (0, 1) a quantile of timestamps."""
    test_cutoff: float | None = None
    """Temporal split: start of the test period; in (0, 1) a quantile of timestamps."""
    num_negatives: int = 99
    """Sampled negatives stored per valid/test row, uniformly from items the user never touched."""
    seed: int = 0
    """Seed of the negatives, combined with (user index, split) so sharding cannot change them."""
    buckets: int = 0
    """Hash buckets of users (= output shards); 0 = from the input size (~500k events per bucket)."""
    strict: bool = False
    """Stop at the first bad row (naming file, row and column) instead of quarantining it."""
    workers: int = 0
    """Concurrent Ray Data calls per stage; 0 = the cluster's CPU count. Does not change the output."""

    def __post_init__(self):
        require(bool(self.input), "input", "is required (a file, directory or URI)")
        require(bool(self.output), "output", "is required (a directory or URI)")
        for key in ("min_user_interactions", "min_item_interactions"):
            value = getattr(self, key)
            require(value is None or value >= 0, key, "must be >= 0 (0 turns the filter off)")
        require(self.num_negatives >= 0, "num_negatives", "must be >= 0")
        require(self.buckets >= 0, "buckets", "must be >= 0 (0 = auto)")
        require(self.workers >= 0, "workers", "must be >= 0 (0 = auto)")
        if self.split == "temporal":
            require(self.valid_cutoff is not None, "valid_cutoff", "is required for split=temporal")
            require(self.test_cutoff is not None, "test_cutoff", "is required for split=temporal")
            if _is_quantile(self.valid_cutoff) == _is_quantile(self.test_cutoff):
                require(self.valid_cutoff <= self.test_cutoff, "valid_cutoff", "must not be after test_cutoff")


def _is_quantile(value: float) -> bool:
    return 0.0 < value < 1.0


def resolve(config: PrepareConfig, fmt: str) -> PrepareConfig:
    """`config` with the detected format and the k-core defaults filled in (stored in the manifest)."""
    default_k = 0 if fmt == "seq-txt" else 5
    return dataclasses.replace(
        config, format=fmt,
        min_user_interactions=default_k if config.min_user_interactions is None else config.min_user_interactions,
        min_item_interactions=default_k if config.min_item_interactions is None else config.min_item_interactions)


# ---------------------------------------------------------------------------------------------
# Running stages: Ray Data, or in-process when the filesystem is process-local


class _Runner:
    """Maps a function over argument tuples with Ray Data (bounded concurrency) or in this process."""

    def __init__(self, local: bool, workers: int):
        self.local = local
        self.workers = max(1, workers)
        if not local:
            import ray

            from flm_dist.ray_seam import ensure_ray

            ensure_ray()
            self.ray = ray
            self.workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))

    def put(self, obj: Any) -> Any:
        """Share a large read-only object with every task once (object store), not per task."""
        return obj if self.local else self.ray.put(compact_arrow(obj))

    def map(self, fn: Callable, calls: list[tuple], desc: str) -> list[Any]:
        """Results of fn(*args) for each args in `calls`, in order."""
        results: list[Any] = [None] * len(calls)
        busy = 0.0
        started = time.perf_counter()
        bar = tqdm(total=len(calls), desc=desc, unit="task", leave=False)
        for index, (result, seconds) in self._completed(fn, calls):
            results[index] = result
            busy += seconds
            bar.update()
        bar.close()
        log.debug("prepare: %s: %d task(s), %.2f s in tasks, %.2f s wall", desc, len(calls), busy,
                  time.perf_counter() - started)
        return results

    def _completed(self, fn: Callable, calls: list[tuple]):
        """(index, (result, seconds)) as calls finish, streamed out of one Ray Data execution.

        Each call is one block of a `from_items` dataset mapped by `fn` (Ray Data schedules and
        back-pressures them, `workers` at a time); results travel back pickled in a binary column.
        A user mistake inside a call comes back as data and is raised here as the same one-line
        error, instead of as Ray Data's wrapped exception.
        """
        if self.local:
            for index, args in enumerate(calls):
                yield index, _timed(fn, *args)
            return
        import pickle

        def run_call(row: dict[str, Any]) -> dict[str, Any]:
            import ray as ray_in_worker

            args = tuple(ray_in_worker.get(a) if isinstance(a, ray_in_worker.ObjectRef) else a
                         for a in calls[row["index"]])
            try:
                outcome = ("ok", _timed(fn, *args))
            except UserError as exc:
                outcome = ("user_error", exc)
            return {"index": row["index"], "outcome": pickle.dumps(compact_arrow(outcome))}

        dataset = self.ray.data.from_items([{"index": i} for i in range(len(calls))],
                                           override_num_blocks=max(1, len(calls)))
        concurrency = max(1, min(self.workers, len(calls)))
        # Ray Data retries map tasks without limit, and a task killed for memory would then be
        # rerun (and killed) forever; a few retries cover a lost worker, then the run fails.
        mapped = dataset.map(run_call, num_cpus=1, compute=self.ray.data.TaskPoolStrategy(size=concurrency),
                             max_retries=_TASK_RETRIES)
        for row in mapped.iter_rows():
            status, value = pickle.loads(row["outcome"])
            if status == "user_error":
                raise value
            yield row["index"], value


def compact_arrow(value: Any) -> Any:
    """`value` with every Arrow array copied into buffers of its own length, ready to pickle.

    Pickling an Arrow array writes its whole buffers, however little of them it views. A slice,
    and each 32k-row chunk of a `group_by` result, views buffers shared with the rest, so a
    task's item counts over 1.2M items pickled to 1 GB instead of 24 MB: growing with the
    square of the distinct items per task, this ran a 10M-item prepare out of memory.
    """
    if isinstance(value, pa.Table):
        return pa.table({name: compact_arrow(column) for name, column in zip(value.column_names, value.columns)},
                        schema=value.schema)
    if isinstance(value, pa.ChunkedArray):
        return pa.concat_arrays(value.chunks) if value.num_chunks else pa.array([], value.type)
    if isinstance(value, pa.Array):
        return pa.concat_arrays([value])
    if isinstance(value, dict):
        return {key: compact_arrow(item) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(compact_arrow(item) for item in value)
    return value


def _timed(fn: Callable, *args: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = fn(*args)
    pa.default_memory_pool().release_unused()  # workers are reused: hand freed buffers back to the OS
    return result, time.perf_counter() - started


def _groups(count: int, parts: int) -> list[list[int]]:
    """0..count-1 in `parts` contiguous groups of near-equal size."""
    parts = max(1, min(parts, count))
    return [list(range(count * p // parts, count * (p + 1) // parts)) for p in range(parts)]


# ---------------------------------------------------------------------------------------------
# Hashing: users to buckets, and the counter-based generator of negatives


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 (wrapping arithmetic is intended)."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64, copy=False)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _string_buffers(array: pa.StringArray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, UTF-8 bytes) of a string array without copying; offsets index into the full buffer."""
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int32)[array.offset: array.offset + len(array) + 1]
    data = array.buffers()[2]
    data = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    return offsets, data[offsets[0]: offsets[-1]]


def bucket_of(users: pa.Array, buckets: int) -> np.ndarray:
    """Stable bucket per user id string: a vectorised polynomial hash of the UTF-8 bytes."""
    users = users.cast(pa.string())
    if isinstance(users, pa.ChunkedArray):
        users = users.combine_chunks()
    n = len(users)
    if buckets == 1 or n == 0:
        return np.zeros(n, dtype=np.int64)
    offsets, data = _string_buffers(users)
    starts = (offsets[:-1] - offsets[0]).astype(np.int64)
    lengths = np.diff(offsets).astype(np.int64)
    powers = np.cumprod(np.full(int(lengths.max()) + 1, 1099511628211, dtype=np.uint64))  # wraps mod 2**64
    position = np.arange(len(data), dtype=np.int64) - np.repeat(starts, lengths)
    with np.errstate(over="ignore"):
        terms = data.astype(np.uint64) * powers[position]
        sums = np.add.reduceat(terms, np.minimum(starts, len(data) - 1))  # ids are never empty (null_id)
    return (_mix(sums ^ lengths.astype(np.uint64)) % np.uint64(buckets)).astype(np.int64)


def _row_streams(seed: int, users: np.ndarray, split: int) -> np.ndarray:
    """One 64-bit stream key per (seed, user, split): negatives depend on nothing else."""
    with np.errstate(over="ignore"):
        base = _mix(np.uint64(seed & (2**64 - 1)) * np.uint64(0x9E3779B97F4A7C15) + users.astype(np.uint64))
        return _mix(base ^ np.uint64(split * 0xD1B54A32D192ED03 & (2**64 - 1)))


def _sorted_unique(keys: np.ndarray) -> np.ndarray:
    keys = np.sort(keys)
    return keys[np.r_[True, keys[1:] != keys[:-1]]] if len(keys) else keys


def _draw_streams(rows: np.ndarray, width: int, users, streams, seen, lo, hi, n_items: int, k: int,
                  taken: np.ndarray) -> np.ndarray:
    """The first k fresh candidates among `width` of each row's stream into `taken`; returns rows still short.

    A candidate is fresh if the user never saw it and it is not an earlier candidate of the row.
    """
    short = []
    fresh_among = _fresh_by_bitmap if n_items <= _BITMAP_MAX_ITEMS else _fresh_by_keys
    block = max(1, (1 << 24) // (n_items + 1)) if fresh_among is _fresh_by_bitmap else 1 << 16
    for begin in range(0, len(rows), block):
        chunk = rows[begin: begin + block]
        with np.errstate(over="ignore"):
            draws = _mix(streams[chunk, None] + np.arange(width, dtype=np.uint64)[None, :]
                         * np.uint64(0x9E3779B97F4A7C15))
        cand = (draws % np.uint64(n_items)).astype(np.int64) + 1
        fresh = fresh_among(cand, users[chunk].astype(np.int64), seen, lo[chunk], hi[chunk], n_items)
        rank = np.cumsum(fresh, axis=1)
        pick = fresh & (rank <= k)
        complete = rank[:, -1] >= k
        taken[chunk[complete]] = cand[complete][pick[complete]].reshape(-1, k)
        short.append(chunk[~complete])
    return np.concatenate(short)


def _fresh_by_bitmap(cand, users, seen, lo, hi, n_items: int) -> np.ndarray:
    """A bitmap of (row, item) marks the user's items, then each candidate column in counter order:
    a candidate is fresh if unmarked, and marks itself. 1.7x faster than `_fresh_by_keys` at 5k
    items, but it zeroes rows x items bytes, which rules it out for large catalogs."""
    rows = len(cand)
    mark = np.zeros(rows * (n_items + 1), dtype=bool)  # flat [row, item]
    offsets, flat = _ranges(lo, hi)
    local = np.repeat(np.arange(rows), np.diff(offsets))
    mark[local * (n_items + 1) + seen[flat] - users[local] * (n_items + 1)] = True
    # Column-major flat positions, so that each step of the loop reads one contiguous column.
    where = np.ascontiguousarray((np.arange(rows)[:, None] * (n_items + 1) + cand).T)
    fresh = np.empty(where.shape, dtype=bool)
    for c in range(where.shape[0]):
        fresh[c] = ~mark[where[c]]
        mark[where[c]] = True
    return fresh.T


def _fresh_by_keys(cand, users, seen, lo, hi, n_items: int) -> np.ndarray:
    """The same answer as `_fresh_by_bitmap` from sorted keys: a binary search in `seen`, and a
    stable sort of each row's candidates, so that only the first of equal candidates is fresh."""
    keys = users[:, None] * (n_items + 1) + cand
    at = np.minimum(np.searchsorted(seen, keys), max(len(seen) - 1, 0))
    was_seen = seen[at] == keys if len(seen) else np.zeros(keys.shape, dtype=bool)
    order = np.argsort(cand, axis=1, kind="stable")
    ordered = np.take_along_axis(cand, order, axis=1)
    repeat = np.zeros(cand.shape, dtype=bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    earlier = np.empty_like(repeat)
    np.put_along_axis(earlier, order, repeat, axis=1)
    return ~was_seen & ~earlier


def draw_negatives(users: np.ndarray, split: int, seen: np.ndarray, n_items: int, k: int,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    """For each row's user, `k` item indices (1..n_items) the user never interacted with.

    `seen` is the sorted array of user * (n_items + 1) + item keys of every event of these users.
    Row r's candidates are the counter stream hash(stream(seed, user, split), c) for c = 0, 1, ...;
    the first k that are neither seen nor repeated are taken, i.e. a uniform sample without
    replacement that depends only on (seed, user, split) and the user's items. Users whose unseen
    items number fewer than 4k take the k unseen items of smallest hash instead (the same
    distribution, without rejection loops); fewer than k unseen gives them all.
    Returns (offsets, values) of a list array.
    """
    rows = len(users)
    users = users.astype(np.int64)
    lo = np.searchsorted(seen, users * (n_items + 1))
    hi = np.searchsorted(seen, (users + 1) * (n_items + 1))
    unseen = n_items - (hi - lo)
    streams = _row_streams(seed, users, split)
    taken = np.zeros((rows, k), dtype=np.int32)
    counts = np.where(unseen < k, unseen, k)
    dense = unseen < 4 * k
    sparse_rows = np.flatnonzero(~dense & (k > 0))
    width = k + k // 8 + 8  # duplicates and seen items are rare; short rows retry wider
    while len(sparse_rows):
        sparse_rows = _draw_streams(sparse_rows, width, users, streams, seen, lo, hi, n_items, k, taken)
        width *= 4  # the longer stream starts with the same candidates, so the result is unchanged
    for r in np.flatnonzero(dense & (k > 0)):
        mine = seen[lo[r]: hi[r]] - users[r] * (n_items + 1)
        free = np.setdiff1d(np.arange(1, n_items + 1), mine)
        with np.errstate(over="ignore"):
            order = np.argsort(_mix(streams[r] + free.astype(np.uint64) * np.uint64(0xA24BAED4963EE407)),
                               kind="stable")
        taken[r, : counts[r]] = free[order[:k]]
    offsets = np.r_[0, np.cumsum(counts)].astype(np.int32)
    return offsets, taken[np.arange(k)[None, :] < counts[:, None]]


# ---------------------------------------------------------------------------------------------
# Stage functions (mapped by Ray Data; module level so workers import them from the package)


def _read_parquet(fs: fsspec.AbstractFileSystem, path: str, columns: list[str] | None = None) -> pa.Table:
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle, columns=columns)


def _write_parquet(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table, work: bool = False) -> None:
    """Deterministic Parquet: fixed options, no timestamps or random ids in the file."""
    options = _WORK_OPTIONS if work else {"compression": "zstd"}
    if storage.is_local(fs):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as handle:
        pq.write_table(table, handle, row_group_size=1 << 20, write_statistics=True, store_schema=True, **options)


def _schemas_task(fs, files: list[tuple[int, str]], fmt: str) -> dict[str, Any]:
    schemas, row_groups = {}, {}
    for index, path in files:
        try:
            schemas[index] = file_schema(fs, path, fmt)
            row_groups[index] = row_group_rows(fs, path, fmt)
        except UserError as exc:
            return {"error": (index, 0, str(exc), None)}
    return {"schemas": schemas, "row_groups": row_groups}


class ParseUnit(NamedTuple):
    """What one parse task reads of an input file: all of it, a run of Parquet row groups
    [start, stop), or a byte range (part number, start, stop) of a text file."""
    index: int
    path: str
    row_groups: tuple[int, int] | None = None
    byte_range: tuple[int, int, int] | None = None


# A text file is cut into byte ranges of at least this size: smaller ones would cost more in task
# overhead than they gain.
MIN_RANGE_BYTES = 64 << 20
# Rows read from part n of a text file are numbered n << PART_SHIFT + (line within the part) until
# the line counts of the parts before it are known; the order within the file stays the same.
PART_SHIFT = 40


def _parse_units(files: list[str], sizes: list[int], row_groups: dict[int, list[int] | None], fmt: str,
                 parts: int) -> tuple[list[ParseUnit], list[int]]:
    """The parse stage's work and the bytes of each piece: whole files, except that a file larger
    than a task's share (total bytes / `parts`) is cut, so that a single large file is parsed by
    several tasks: a Parquet file into runs of whole row groups with similar row counts, an
    uncompressed line-based text file into byte ranges of equal size (at least MIN_RANGE_BYTES)."""
    total = max(1, sum(sizes))
    units: list[ParseUnit] = []
    unit_sizes: list[int] = []
    for index, path in enumerate(files):
        share = -(-sizes[index] * parts // total)
        if splittable_text(path, fmt) and min(share, sizes[index] // MIN_RANGE_BYTES) > 1:
            pieces = min(share, sizes[index] // MIN_RANGE_BYTES)
            cuts = [sizes[index] * k // pieces for k in range(pieces + 1)]
            for number, (start, stop) in enumerate(zip(cuts, cuts[1:])):
                units.append(ParseUnit(index, path, byte_range=(number, start, stop)))
                unit_sizes.append(stop - start)
            continue
        groups = row_groups.get(index) or []
        rows = sum(groups)
        pieces = min(len(groups), share) if rows else 1
        if pieces <= 1:
            units.append(ParseUnit(index, path))
            unit_sizes.append(sizes[index])
            continue
        ends = np.cumsum(groups)
        bounds = [0]
        for k in range(1, pieces):
            # the first cut after k/pieces of the rows, leaving every piece at least one row group
            cut = int(np.searchsorted(ends, rows * k / pieces)) + 1
            bounds.append(min(max(cut, bounds[-1] + 1), len(groups) - (pieces - k)))
        bounds.append(len(groups))
        for start, stop in zip(bounds, bounds[1:]):
            units.append(ParseUnit(index, path, row_groups=(start, stop)))
            unit_sizes.append(sizes[index] * int(ends[stop - 1] - (ends[start - 1] if start else 0)) // rows)
    return units, unit_sizes


def _shift_rows(table: pa.Table, base: int) -> pa.Table:
    if not base or not table.num_rows:
        return table
    column = table.schema.get_field_index("row")
    return table.set_column(column, "row", pc.add(table.column("row"), pa.scalar(base, pa.int64())))


def _parse_task(fs_in, files: list[ParseUnit], fmt: str, columns: ColumnMap, buckets: int, fs_work,
                work: str, task: int, strict: bool) -> dict[str, Any]:
    """Parse files (or row-group runs of them), quarantine bad rows, append events to per-bucket
    Parquet pieces of this task."""
    reasons: Counter = Counter()
    stats: dict[str, Any] = {"rows": 0, "reasons": reasons, "empty": []}
    pending: list[list[pa.Table]] = [[] for _ in range(buckets)]
    buffered = flushes = 0
    bad_parts: list[pa.Table] = []

    def flush():
        # One file per (bucket, flush) rather than an open ParquetWriter per bucket, so that the
        # memory of a task does not grow with the number of buckets (each writer buffers pages).
        nonlocal buffered, flushes
        for b, parts in enumerate(pending):
            if parts:
                path = storage.join(work, "buckets", f"{b:05d}", f"task-{task:05d}-{flushes:04d}.parquet")
                _write_parquet(fs_work, path, pa.concat_tables(parts), work=True)
                parts.clear()
        buffered = 0
        flushes += 1

    part_lines: dict[tuple[int, int], int] = {}  # (file index, part number) -> lines of that byte range
    json_keys: dict[int, set[str]] = {}  # file index -> keys seen in its byte ranges (JSON lines)
    index = files[0].index
    try:
        for index, path, row_groups, byte_range in files:
            rows_in_file = 0
            part = ByteRange(*byte_range) if byte_range else None
            row_base = part.number << PART_SHIFT if part else 0
            for events, bad in iter_file(fs_in, path, index, fmt, columns, row_groups=row_groups, byte_range=part):
                events, bad = _shift_rows(events, row_base), _shift_rows(bad, row_base)
                if bad.num_rows:
                    if strict:
                        first = bad.sort_by("row").slice(0, 1).to_pylist()[0]
                        column = f", column '{first['column']}'" if first["column"] else ""
                        return {"error": (index, first["row"], first["file"],
                                          f"{column}: {first['reason']} (raw: {first['raw']!r}); without "
                                          f"strict=true bad rows are quarantined instead"),
                                "part_lines": part_lines}
                    bad_parts.append(bad)
                    reasons.update(bad.column("reason").to_pylist())
                rows_in_file += events.num_rows + bad.num_rows
                if events.num_rows and buckets == 1:
                    pending[0].append(events)
                    buffered += events.num_rows
                elif events.num_rows:
                    bucket = bucket_of(events.column("user"), buckets)
                    order = np.argsort(bucket, kind="stable")
                    ends = np.cumsum(np.bincount(bucket, minlength=buckets))
                    events = events.take(pa.array(order))
                    for b in np.flatnonzero(np.diff(np.r_[0, ends])):
                        start = ends[b - 1] if b else 0
                        pending[b].append(events.slice(start, ends[b] - start))
                    buffered += events.num_rows
                if buffered >= _FLUSH_ROWS:
                    flush()
            stats["rows"] += rows_in_file
            if part:
                part_lines[index, part.number] = part.lines
                if part.keys_seen:
                    json_keys.setdefault(index, set()).update(part.keys_seen)
            if rows_in_file == 0 and row_groups is None and part is None:  # a piece is never the whole file
                if strict:
                    return {"error": (index, 0, f"{path} is empty (no data rows)", None), "part_lines": part_lines}
                stats["empty"].append(path)
                bad_parts.append(pa.table({"file": [path], "row": [0], "column": [""], "reason": ["empty_file"],
                                           "raw": [""]}, schema=QUARANTINE_SCHEMA))
        flush()
    except FileProblem as exc:
        return {"error": (index, 0, str(exc), None), "part_lines": part_lines}
    if bad_parts:
        _write_parquet(fs_work, storage.join(work, "quarantine", f"task-{task:05d}.parquet"),
                       pa.concat_tables(bad_parts), work=True)
    stats["reasons"] = dict(reasons)
    stats["part_lines"], stats["json_keys"] = part_lines, json_keys
    return stats


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
        table = pa.concat_tables([EVENTS_SCHEMA.empty_table()] + [_read_parquet(fs, p) for p in pieces])
        table = table.take(pa.array(_chronological(table)))
        table, dropped = _drop_duplicates(table)
        duplicates += dropped
        if table.num_rows:
            t_min = _opt(min, t_min, pc.min(table.column("timestamp")).as_py())
            t_max = _opt(max, t_max, pc.max(table.column("timestamp")).as_py())
        table = table.select(["user", "item", "timestamp"])
        _write_parquet(fs, _sorted_path(work, b), table, work=True)
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
    for _, table, (item,) in _looked_up_buckets(fs, work, buckets, ["user", "item"], {"item": items_by_id}):
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


def _looked_up_buckets(fs, work: str, buckets: list[int], columns: list[str] | None,
                       vocabularies: dict[str, pa.Array]):
    """Each bucket as (bucket, table, the positions of its `vocabularies` columns' values in those
    vocabularies, null where absent).

    `index_in` hashes the whole vocabulary on every call (4.5 s for 6M items), so the ids of
    buckets totalling about `_LOOKUP_ROWS` events are looked up in one call, not per bucket.
    """
    group: list[tuple[int, pa.Table]] = []
    rows = 0
    for position, b in enumerate(buckets):
        group.append((b, _read_parquet(fs, _sorted_path(work, b), columns)))
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


def _filtered_buckets(fs, work: str, buckets: list[int], item_vocab: pa.Array, user_vocab: pa.Array):
    """Each bucket's kept events as (bucket, user index, item index, timestamps), grouped by user,
    in time order."""
    for b, table, (item, user) in _looked_up_buckets(fs, work, buckets, None,
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


def _ranges(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(list offsets, flat positions) of the half-open ranges [starts[i], ends[i])."""
    lengths = ends - starts
    offsets = np.r_[0, np.cumsum(lengths)]
    flat = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1] - starts, lengths)
    return offsets, flat


def _eval_rows(user_ids, item, starts, targets, negatives: tuple[np.ndarray, np.ndarray]) -> pa.Table:
    offsets, flat = _ranges(starts, targets)
    return pa.Table.from_arrays([
        pa.array(user_ids.astype(np.int32)), _list_array(offsets, item[flat], pa.int32()),
        pa.array(item[targets]), _list_array(negatives[0], negatives[1], pa.int32()),
    ], schema=EVAL_SCHEMA)


def _build_task(fs, work: str, out: str, buckets: list[int], item_vocab, user_vocab, split: str,
                cutoffs: tuple[int, int] | None, k: int, seed: int) -> dict[str, int]:
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
        has_train = train_end > starts
        offsets, flat = _ranges(starts[has_train], train_end[has_train])
        train = pa.Table.from_arrays([
            pa.array(ids[has_train].astype(np.int32)), _list_array(offsets, item[flat], pa.int32()),
            pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), stamps.take(pa.array(flat)).cast(pa.int64())),
        ], schema=TRAIN_SCHEMA)
        _write_parquet(fs, storage.join(out, "train", f"part-{b:05d}.parquet"), train)
        stats["train_rows"] += train.num_rows
        stats["train_interactions"] += int(offsets[-1])
        stats["users"] += len(starts)
        for name, (has, target) in (("valid", valid), ("test", test)):
            usable = has & (target > starts)
            stats[f"{name}_no_history"] += int((has & ~usable).sum())
            stats[f"users_without_{name}"] += int((~has).sum())
            rows = np.flatnonzero(usable)
            negatives = draw_negatives(ids[rows], _SPLIT_IDS[name], seen, n_items, k, seed)
            stats["short_negatives"] += int((np.diff(negatives[0]) < k).sum())
            table = _eval_rows(ids[rows], item, starts[rows], target[rows], negatives)
            _write_parquet(fs, storage.join(out, name, f"part-{b:05d}.parquet"), table)
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


# ---------------------------------------------------------------------------------------------
# The driver


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
            offsets, data = _string_buffers(array)
            digest.update((offsets - offsets[0]).astype(np.int64).tobytes())
            digest.update(data.tobytes())
        else:
            digest.update(array.to_numpy().astype(np.int64).tobytes())
    return digest.hexdigest()


def _fingerprint(infos: dict[str, dict]) -> tuple[str, list[dict[str, Any]]]:
    """(hash of paths + sizes + modification times, the listing recorded in the manifest)."""
    listing, digest = [], hashlib.sha256()
    for path in sorted(infos):
        info = infos[path]
        mtime = info.get("mtime") or info.get("LastModified") or info.get("updated") or info.get("created")
        digest.update(f"{path}\0{info.get('size')}\0{mtime}\n".encode())
        listing.append({"path": path, "size": info.get("size")})
    return digest.hexdigest(), listing


def _auto_buckets(row_counts: dict[int, int | None], sizes: list[int]) -> int:
    """Buckets for ~_ROWS_PER_BUCKET events each: exact Parquet row counts, else ~12 bytes per text row."""
    rows = sum(row_counts[i] if row_counts.get(i) is not None else sizes[i] // 12 for i in range(len(sizes)))
    return int(min(10_000, max(1, math.ceil(rows / _ROWS_PER_BUCKET))))


def _resolve_cutoffs(runner, calls_for, cfg: PrepareConfig, t_min, t_max, interactions: int) -> tuple[int, int]:
    """Absolute cutoffs; quantiles are exact (histogram pass, then the values of the chosen bins)."""
    wanted = [cfg.valid_cutoff, cfg.test_cutoff]
    if t_min is None:
        raise UserError("split=temporal needs timestamps, but the input has none (set split=loo)")
    if not any(_is_quantile(q) for q in wanted):
        return int(wanted[0]), int(wanted[1])
    bins = 1 << 18
    width = max(1, math.ceil((t_max - t_min + 1) / bins))
    hist = sum(runner.map(_timestamp_task, calls_for(t_min, width, bins, None), "cutoffs"))
    cum = np.cumsum(hist)
    ranks = [min(interactions - 1, int(math.floor(q * interactions))) if _is_quantile(q) else None for q in wanted]
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


def run_prepare(config: PrepareConfig) -> dict[str, Any]:
    """Prepare `config.input` into `config.output` (see the module docstring); returns the manifest."""
    return prepare_timed(config)[0]


def prepare_timed(config: PrepareConfig) -> tuple[dict[str, Any], dict[str, float]]:
    """`run_prepare`, also returning seconds per stage (kept out of the manifest: it must be reproducible)."""
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    started = clock

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = now - clock
        clock = now
        log.info("prepare: %-8s %6.2f s", stage, timings[stage])

    fs_in, in_root = storage.url_to_fs(config.input)
    files = list_input(fs_in, in_root)
    infos = {p: fs_in.info(p) for p in files}
    fmt = resolve_format(fs_in, files, config.format)
    cfg = resolve(config, fmt)
    fingerprint, listing = _fingerprint(infos)
    digest = hashlib.sha256(json.dumps(_stored_config(cfg), sort_keys=True).encode()).hexdigest()[:16]
    fs, out = storage.url_to_fs(cfg.output)
    out = out.rstrip("/")
    existing = storage.read_json(fs, storage.join(out, MANIFEST))
    if existing and (existing.get("config_hash"), existing.get("input", {}).get("fingerprint")) == (digest, fingerprint):
        log.info("prepare: %s is up to date (same input and config)", cfg.output)
        return existing, {"total": time.perf_counter() - started}
    storage.check_replaceable(fs, out, MANIFEST)
    input_bytes = sum(int(i.get("size") or 0) for i in infos.values())
    lap("list")
    local = "memory" in _protocols(fs_in) or "memory" in _protocols(fs)
    runner = _Runner(local, cfg.workers)
    log.info("prepare: %d %s file(s), %.1f MB, %s", len(files), fmt, input_bytes / 1e6,
             "in-process (memory filesystem)" if local else f"Ray Data, {runner.workers} call(s) at once")
    lap("ray")

    tmp = storage.staging_dir(fs, out)
    work = storage.join(tmp, "_work")
    try:
        sizes = [int(infos[p].get("size") or 0) for p in files]
        manifest = _run(cfg, runner, fs_in, files, sizes, fmt, fs, tmp, work, cfg.buckets, lap)
        manifest.update({"config": _stored_config(cfg), "config_hash": digest,
                         "input": {"uri": cfg.input, "fingerprint": fingerprint, "files": listing,
                                   "bytes": input_bytes}})
        storage.remove(fs, work)
        manifest["files"] = sorted(storage.join(*_rel(p, tmp)) for p in fs.find(tmp))
        storage.write_json(fs, storage.join(tmp, MANIFEST), manifest)
        storage.publish(fs, tmp, out, marker=MANIFEST)
        lap("publish")
    except BaseException:
        storage.remove(fs, tmp)
        raise
    timings["total"] = time.perf_counter() - started
    _summary(manifest, timings)
    return manifest, timings


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def _rel(path: str, root: str) -> list[str]:
    return path[len(root.rstrip("/")) + 1:].split("/")


def _stored_config(cfg: PrepareConfig) -> dict[str, Any]:
    """The resolved config as stored: without `output` (the manifest lives there) and `workers`."""
    stored = to_dict(cfg)
    del stored["output"], stored["workers"]
    return stored


class _LineNumbers:
    """Turns the row numbers of the parse stage into line numbers of the file: those read from a
    byte range count from the range's first line (see PART_SHIFT), and the line counts of the
    ranges before it say where that is."""

    def __init__(self, part_lines: dict[tuple[int, int], int]):
        self._offsets: dict[int, list[int]] = {}
        for index, number in sorted(part_lines):
            offsets = self._offsets.setdefault(index, [0])
            if number == len(offsets) - 1:  # only after an unbroken run of counted parts
                offsets.append(offsets[-1] + part_lines[index, number])

    def __call__(self, index: int, rows: np.ndarray) -> np.ndarray:
        offsets = np.asarray(self._offsets.get(index, [0]), dtype=np.int64)
        return offsets[rows >> PART_SHIFT] + (rows & ((1 << PART_SHIFT) - 1))

    def split_files(self) -> list[int]:
        return sorted(self._offsets)


def _raise_first_error(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The results, or the error of the lowest (file, row) that any task met: every task runs to
    its own first error, so the message does not depend on which task finished first."""
    errors = [r["error"] for r in results if "error" in r]
    if not errors:
        return results
    index, row, head, detail = min(errors, key=lambda error: error[:2])
    if detail is None:
        raise UserError(head)
    line = _LineNumbers({k: v for r in results for k, v in r.get("part_lines", {}).items()})
    raise UserError(f"{head}, row {int(line(index, np.array([row]))[0])}{detail}")


def _run(cfg: PrepareConfig, runner: _Runner, fs_in, files: list[str], sizes: list[int], fmt: str, fs, tmp: str,
         work: str, buckets: int, lap: Callable[[str], None]) -> dict[str, Any]:
    indexed = list(enumerate(files))
    file_groups = [[indexed[i] for i in g] for g in _groups(len(files), runner.workers * 4)]

    # 1. schemas
    signatures: dict[int, str | None] = {}
    row_groups: dict[int, list[int] | None] = {}
    for result in _raise_first_error(runner.map(_schemas_task, [(fs_in, g, fmt) for g in file_groups], "schemas")):
        signatures.update(result["schemas"])
        row_groups.update(result["row_groups"])
    row_counts = {i: None if groups is None else sum(groups) for i, groups in row_groups.items()}
    known = [(i, s) for i, s in sorted(signatures.items()) if s is not None]
    for i, sig in known[1:]:
        if sig != known[0][1]:
            raise UserError(f"schema of {files[i]} differs from {files[known[0][0]]}: [{sig}] vs [{known[0][1]}]")
    if not buckets:
        buckets = _auto_buckets(row_counts, sizes)
    log.info("prepare: %d bucket(s) of users", buckets)
    lap("schemas")

    # 2. parse + bucket
    units, unit_sizes = _parse_units(files, sizes, row_groups, fmt, runner.workers * 4)
    parse_groups = _balanced(unit_sizes, runner.workers * 4)
    parsed = _raise_first_error(runner.map(_parse_task, [(fs_in, [units[i] for i in g], fmt, cfg.columns, buckets, fs,
                                                          work, t, cfg.strict) for t, g in enumerate(parse_groups)],
                                           "parse"))
    input_rows = sum(r["rows"] for r in parsed)
    dropped = Counter({reason: 0 for reason in DROP_REASONS})
    for r in parsed:
        dropped.update(r["reasons"])
    empty_files = sorted(p for r in parsed for p in r["empty"])
    line_numbers = _LineNumbers({k: v for r in parsed for k, v in r["part_lines"].items()})
    json_keys: dict[int, set[str]] = {}
    for r in parsed:
        for index, keys in r["json_keys"].items():
            json_keys.setdefault(index, set()).update(keys)
    for index in sorted(json_keys):  # a mapped column that no line of a file has (see ByteRange)
        check_json_keys(files[index], cfg.columns, json_keys[index])
    lap("parse")

    # 3. dedup
    bucket_groups = _groups(buckets, runner.workers * 4)
    deduped = runner.map(_dedup_task, [(fs, work, g) for g in bucket_groups], "dedup")
    dropped["duplicate"] = sum(r["duplicates"] for r in deduped)
    item_counts = pa.concat_tables([r["items"] for r in deduped]).group_by("item").aggregate([("count", "sum")])
    items_by_id = item_counts.column("item").combine_chunks()
    counts = item_counts.column("count_sum").to_numpy().astype(np.int64)
    users = pa.concat_arrays([r["users"] for r in deduped])
    t_min = _reduce(min, [r["t_min"] for r in deduped])
    t_max = _reduce(max, [r["t_max"] for r in deduped])
    lap("dedup")
    if len(items_by_id) == 0:
        raise UserError(f"no usable interactions in {cfg.input}: {input_rows} rows read, "
                        f"dropped: {_nonzero(dropped)}")

    # 4. k-core
    iterations = 0
    removed = np.zeros(len(items_by_id), dtype=bool)
    if cfg.min_user_interactions or cfg.min_item_interactions:
        items_ref = runner.put(items_by_id)
        removed = counts < cfg.min_item_interactions
        while True:
            iterations += 1
            removed_ref = runner.put(removed)
            results = runner.map(_kcore_task, [(fs, work, g, items_ref, removed_ref, cfg.min_user_interactions)
                                               for g in bucket_groups], f"k-core {iterations}")
            counts = sum(r["counts"] for r in results)
            users = pa.concat_arrays([r["users"] for r in results])
            grown = removed | (counts < cfg.min_item_interactions)
            log.info("prepare: k-core pass %d: %d users, %d items left", iterations, len(users),
                     int((~grown & (counts > 0)).sum()))
            if (grown == removed).all():
                break
            removed = grown
        dropped["kcore_item"] = sum(r["kcore_item"] for r in results)
        dropped["kcore_user"] = sum(r["kcore_user"] for r in results)
    lap("k-core")

    # 5. vocabularies
    keep = (counts > 0) & ~removed
    kept_ids, kept_counts = items_by_id.filter(pa.array(keep)), counts[keep]
    tie = np.empty(len(kept_ids), dtype=np.int64)
    tie[_id_order(kept_ids)] = np.arange(len(kept_ids))
    order = np.lexsort((tie, -kept_counts))
    items = pa.Table.from_arrays([pa.array(np.arange(1, len(order) + 1, dtype=np.int32)),
                                  kept_ids.take(pa.array(order)), pa.array(kept_counts[order])], schema=ITEMS_SCHEMA)
    user_ids = users.take(pa.array(_id_order(users)))
    users_table = pa.Table.from_arrays([pa.array(np.arange(len(user_ids), dtype=np.int32)), user_ids],
                                       schema=USERS_SCHEMA)
    _write_parquet(fs, storage.join(tmp, "vocab", "items.parquet"), items)
    _write_parquet(fs, storage.join(tmp, "vocab", "users.parquet"), users_table)
    interactions = int(kept_counts.sum())
    if interactions == 0:
        raise UserError(f"k-core filtering ({cfg.min_user_interactions}/{cfg.min_item_interactions}) "
                        f"left no interactions; lower min_user_interactions/min_item_interactions")
    lap("vocab")

    # 6. sequences, splits, negatives
    item_ref, user_ref = runner.put(items.column("item_id").combine_chunks()), runner.put(user_ids)
    cutoffs = None
    if cfg.split == "temporal":
        cutoffs = _resolve_cutoffs(
            runner, lambda lo, width, bins, exact: [(fs, work, g, item_ref, user_ref, lo, width, bins, exact)
                                                    for g in bucket_groups], cfg, t_min, t_max, interactions)
    built = runner.map(_build_task, [(fs, work, tmp, g, item_ref, user_ref, cfg.split, cutoffs, cfg.num_negatives,
                                      cfg.seed) for g in bucket_groups], "build")
    split_stats = Counter()
    for r in built:
        split_stats.update(r)
    _merge_quarantine(fs, work, tmp, files, line_numbers)
    lap("build")

    if input_rows != interactions + sum(dropped.values()):
        raise RuntimeError(f"row accounting is off: {input_rows} read, {interactions} kept, dropped {dict(dropped)}")
    splits: dict[str, Any] = {
        "method": cfg.split,
        "train": {"rows": split_stats["train_rows"], "interactions": split_stats["train_interactions"]},
        "valid": {"rows": split_stats["valid_rows"], "interactions": split_stats["valid_rows"]},
        "test": {"rows": split_stats["test_rows"], "interactions": split_stats["test_rows"]},
        "users_without_valid": split_stats["users_without_valid"],
        "users_without_test": split_stats["users_without_test"],
        "short_negatives": split_stats["short_negatives"],
    }
    if cutoffs is not None:
        splits.update({"valid_cutoff": cutoffs[0], "test_cutoff": cutoffs[1],
                       "valid_no_history": split_stats["valid_no_history"],
                       "test_no_history": split_stats["test_no_history"]})
    return {
        "schema_version": SCHEMA_VERSION, "created_by": f"flm_dist {__version__}",
        "users": len(user_ids), "items": len(items), "interactions": interactions, "input_rows": input_rows,
        "dropped": dict(sorted(dropped.items())), "empty_files": empty_files, "buckets": buckets,
        "kcore": {"min_user_interactions": cfg.min_user_interactions,
                  "min_item_interactions": cfg.min_item_interactions, "iterations": iterations},
        "splits": splits, "num_negatives": cfg.num_negatives,
        "vocab_hash": {"items": table_hash(items), "users": table_hash(users_table)},
    }


def _balanced(sizes: list[int], parts: int) -> list[list[int]]:
    """Indices of `sizes` in `parts` groups of similar total size (largest first into the lightest group)."""
    parts = max(1, min(parts, len(sizes)))
    heap = [(0, g) for g in range(parts)]
    groups: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, g = heapq.heappop(heap)
        groups[g].append(i)
        heapq.heappush(heap, (load + sizes[i], g))
    return [sorted(g) for g in groups if g]


def _reduce(fn, values):
    values = [v for v in values if v is not None]
    return fn(values) if values else None


def _nonzero(counter: Counter) -> dict[str, int]:
    return {k: v for k, v in sorted(counter.items()) if v}


def _merge_quarantine(fs, work: str, tmp: str, files: list[str], line_numbers: _LineNumbers) -> None:
    """The tasks' quarantine pieces as sorted, deterministic parts (only when something was
    quarantined), with rows read from byte ranges numbered as lines of their file."""
    directory = storage.join(work, "quarantine")
    pieces = sorted(fs.find(directory)) if fs.exists(directory) else []
    if not pieces:
        return
    table = pa.concat_tables([_read_parquet(fs, p) for p in pieces])
    if line_numbers.split_files():
        rows = table.column("row").to_numpy().copy()
        paths = table.column("file").to_numpy(zero_copy_only=False)
        for index in line_numbers.split_files():
            mine = paths == files[index]
            rows[mine] = line_numbers(index, rows[mine])
        table = table.set_column(table.schema.get_field_index("row"), "row", pa.array(rows))
    table = table.sort_by([(c, "ascending") for c in ("file", "row", "column", "reason", "raw")])
    for part, start in enumerate(range(0, table.num_rows, _QUARANTINE_PART_ROWS)):
        _write_parquet(fs, storage.join(tmp, "quarantine", f"part-{part:05d}.parquet"),
                       table.slice(start, _QUARANTINE_PART_ROWS))


def _summary(manifest: dict[str, Any], timings: dict[str, float]) -> None:
    total = timings["total"]
    lines = [
        ("users", f"{manifest['users']:,}"), ("items", f"{manifest['items']:,}"),
        ("interactions", f"{manifest['interactions']:,}"), ("input rows", f"{manifest['input_rows']:,}"),
    ]
    lines += [(f"dropped: {k}", f"{v:,}") for k, v in manifest["dropped"].items() if v]
    splits = manifest["splits"]
    lines += [(f"{s} rows", f"{splits[s]['rows']:,}") for s in ("train", "valid", "test")]
    lines += [("time", f"{total:.1f} s"), ("rows/s", f"{manifest['input_rows'] / max(total, 1e-9):,.0f}")]
    width = max(len(k) for k, _ in lines)
    log.info("prepare summary:\n%s", "\n".join(f"  {k:<{width}}  {v:>14}" for k, v in lines))
