"""Stages 1 and 2 of prepare: check the input files, then read, validate and bucket their events.

  1. schemas: read each file's header or footer, so mismatched files fail before any parsing.
  2. parse: files (whole, runs of Parquet row groups, or byte ranges of a large text file) ->
     normalised events (readers.py), bad rows -> quarantine; rows are hash-bucketed by user into
     B buckets, so every user lives in exactly one bucket. Each task writes Parquet pieces per
     bucket under the work directory.
At the end of the run `merge_quarantine` turns the tasks' quarantine pieces into the output's
quarantine/ parts, rows read from byte ranges renumbered as lines of their file.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flm_dist.data import storage
from flm_dist.data.events import QUARANTINE_SCHEMA, ColumnMap, FileProblem
from flm_dist.data.hashing import bucket_of
from flm_dist.data.pseudonyms import Pseudonymizer
from flm_dist.data.readers import file_schema, iter_file, row_group_rows
from flm_dist.data.stage_runner import StageRunner, balanced, groups
from flm_dist.data.text_formats import ByteRange, check_json_keys, splittable_text
from flm_dist.errors import UserError

_ROWS_PER_BUCKET = 500_000      # auto buckets: a bucket's sort and sequences stay ~100 MB
_FLUSH_ROWS = 1_000_000         # parse tasks buffer this many rows before writing bucket pieces
_QUARANTINE_PART_ROWS = 5_000_000
# A text file is cut into byte ranges of at least this size: smaller ones would cost more in task
# overhead than they gain.
MIN_RANGE_BYTES = 64 << 20
# Rows read from part n of a text file are numbered n << PART_SHIFT + (line within the part) until
# the line counts of the parts before it are known; the order within the file stays the same.
PART_SHIFT = 40


def read_schemas(runner: StageRunner, fs_in, files: list[str], fmt: str) -> dict[int, list[int] | None]:
    """Stage 1: fail unless every file has the same columns; returns the rows of each row group
    per file (None for text files)."""
    indexed = list(enumerate(files))
    file_groups = [[indexed[i] for i in g] for g in groups(len(files), runner.workers * 4)]
    signatures: dict[int, str | None] = {}
    row_groups: dict[int, list[int] | None] = {}
    for result in _raise_first_error(runner.map(_schemas_task, [(fs_in, g, fmt) for g in file_groups], "schemas")):
        signatures.update(result["schemas"])
        row_groups.update(result["row_groups"])
    known = [(i, s) for i, s in sorted(signatures.items()) if s is not None]
    for i, sig in known[1:]:
        if sig != known[0][1]:
            raise UserError(f"schema of {files[i]} differs from {files[known[0][0]]}: [{sig}] vs [{known[0][1]}]")
    return row_groups


def auto_buckets(row_groups: dict[int, list[int] | None], sizes: list[int]) -> int:
    """Buckets for ~_ROWS_PER_BUCKET events each: exact Parquet row counts, else ~12 bytes per text row."""
    row_counts = {i: None if groups is None else sum(groups) for i, groups in row_groups.items()}
    rows = sum(row_counts[i] if row_counts.get(i) is not None else sizes[i] // 12 for i in range(len(sizes)))
    return int(min(10_000, max(1, math.ceil(rows / _ROWS_PER_BUCKET))))


class Parsed(NamedTuple):
    """What stage 2 read."""
    rows: int
    """Rows read, quarantined ones included."""
    reasons: Counter
    """Quarantined rows by reason."""
    empty_files: list[str]
    line_numbers: LineNumbers


def parse(runner: StageRunner, fs_in, files: list[str], sizes: list[int], row_groups: dict[int, list[int] | None],
          fmt: str, columns: ColumnMap, strict: bool, fs, work: str, buckets: int, encoding: str = "utf-8",
          pseudonyms: Pseudonymizer | None = None) -> Parsed:
    """Stage 2: every file's events into per-bucket pieces under `work`, bad rows into quarantine
    pieces (or, with `strict`, the first bad row as a UserError); text is decoded as `encoding`.
    With `pseudonyms` every user id is replaced by its pseudonym before anything is written, and
    quarantined rows lose their raw text (data/pseudonyms.py)."""
    units, unit_sizes = _parse_units(files, sizes, row_groups, fmt, runner.workers * 4)
    parse_groups = balanced(unit_sizes, runner.workers * 4)
    parsed = _raise_first_error(runner.map(_parse_task, [(fs_in, [units[i] for i in g], fmt, columns, buckets, fs,
                                                          work, t, strict, encoding, pseudonyms)
                                                         for t, g in enumerate(parse_groups)], "parse"))
    reasons = Counter()
    for r in parsed:
        reasons.update(r["reasons"])
    json_keys: dict[int, set[str]] = {}
    for r in parsed:
        for index, keys in r["json_keys"].items():
            json_keys.setdefault(index, set()).update(keys)
    for index in sorted(json_keys):  # a mapped column that no line of a file has (see ByteRange)
        check_json_keys(files[index], columns, json_keys[index])
    return Parsed(rows=sum(r["rows"] for r in parsed), reasons=reasons,
                  empty_files=sorted(p for r in parsed for p in r["empty"]),
                  line_numbers=LineNumbers({k: v for r in parsed for k, v in r["part_lines"].items()}))


class LineNumbers:
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
    line = LineNumbers({k: v for r in results for k, v in r.get("part_lines", {}).items()})
    raise UserError(f"{head}, row {int(line(index, np.array([row]))[0])}{detail}")


def merge_quarantine(fs, work: str, tmp: str, files: list[str], line_numbers: LineNumbers) -> None:
    """The tasks' quarantine pieces as sorted, deterministic parts (only when something was
    quarantined), with rows read from byte ranges numbered as lines of their file."""
    directory = storage.join(work, "quarantine")
    pieces = sorted(fs.find(directory)) if fs.exists(directory) else []
    if not pieces:
        return
    table = pa.concat_tables([storage.read_parquet(fs, p) for p in pieces])
    if line_numbers.split_files():
        rows = table.column("row").to_numpy().copy()
        paths = table.column("file").to_numpy(zero_copy_only=False)
        for index in line_numbers.split_files():
            mine = paths == files[index]
            rows[mine] = line_numbers(index, rows[mine])
        table = table.set_column(table.schema.get_field_index("row"), "row", pa.array(rows))
    table = table.sort_by([(c, "ascending") for c in ("file", "row", "column", "reason", "raw")])
    for part, start in enumerate(range(0, table.num_rows, _QUARANTINE_PART_ROWS)):
        storage.write_parquet(fs, storage.join(tmp, "quarantine", f"part-{part:05d}.parquet"),
                              table.slice(start, _QUARANTINE_PART_ROWS))


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
                work: str, task: int, strict: bool, encoding: str,
                pseudonyms: Pseudonymizer | None = None) -> dict[str, Any]:
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
                storage.write_parquet(fs_work, path, pa.concat_tables(parts), work=True)
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
            for events, bad in iter_file(fs_in, path, index, fmt, columns, row_groups=row_groups, byte_range=part,
                                         encoding=encoding):
                events, bad = _shift_rows(events, row_base), _shift_rows(bad, row_base)
                if pseudonyms is not None:
                    events, bad = pseudonyms.events(events), pseudonyms.quarantine(bad)
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
        storage.write_parquet(fs_work, storage.join(work, "quarantine", f"task-{task:05d}.parquet"),
                              pa.concat_tables(bad_parts), work=True)
    stats["reasons"] = dict(reasons)
    stats["part_lines"], stats["json_keys"] = part_lines, json_keys
    return stats
