"""Readers for interaction logs: Parquet, CSV/TSV, JSON lines, sequence text, pair text, RecBole, MovieLens.

Every reader turns one input file into chunks of a normalised table (`EVENTS_SCHEMA`):
`user` and `item` as strings, `timestamp` as int64 seconds (null when the format has none),
optional `event` and `weight`, and the event's origin: `file` (index into the sorted input file
list), `row` (1-based line number in that file; for Parquet the 1-based row index) and `pos`
(position within the line for one-user-per-line text, else 0). Sorting by (timestamp, file, row,
pos) therefore gives time order, and the file order where there is no timestamp.

Rows that cannot be used go to a quarantine table (`QUARANTINE_SCHEMA`) with the file, row,
column and reason instead of stopping the job. Reasons: `malformed` (wrong number of fields,
unparsable JSON), `null_id`, `bad_id` (not an integer where the format declares integer ids:
MovieLens, RecBole `:float` ids, float Parquet columns), `bad_timestamp` (missing or unparsable;
ints, floats (truncated) and ISO-8601 strings are accepted), `bad_weight`.

Decisions: blank lines of the line-based text formats are skipped and not counted as rows (CSV
rows whose values are all empty are `null_id` rows); a file with no data rows is not an error by
default: it is listed in the manifest and in the quarantine with reason `empty_file`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
from fsspec.utils import infer_compression

from flm_dist.config import require
from flm_dist.errors import UserError

FORMATS = ("parquet", "csv", "tsv", "jsonl", "seq-txt", "pairs-txt", "recbole", "movielens")

EVENTS_SCHEMA = pa.schema([
    ("user", pa.string()), ("item", pa.string()), ("timestamp", pa.int64()), ("event", pa.string()),
    ("weight", pa.float64()), ("file", pa.int32()), ("row", pa.int64()), ("pos", pa.int32()),
])
QUARANTINE_SCHEMA = pa.schema([
    ("file", pa.string()), ("row", pa.int64()), ("column", pa.string()), ("reason", pa.string()),
    ("raw", pa.string()),
])
ROW_REASONS = ("malformed", "null_id", "bad_id", "bad_timestamp", "bad_weight")

_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zstd", ".lz4")
_INT_RE = r"^[+-]?\d{1,18}$"
_FLOAT_RE = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"
_MOVIELENS_CSV_HEADER = ["userId", "movieId", "rating", "timestamp"]


@dataclass
class ColumnMap:
    """Names of the input columns for the tabular formats (Parquet, CSV/TSV, JSON lines, RecBole)."""

    user: str = "user_id"
    """Column holding the user id."""
    item: str = "item_id"
    """Column holding the item id."""
    timestamp: str | None = "timestamp"
    """Column holding the event time (int/float seconds or ISO-8601); None: file order is time."""
    event: str | None = None
    """Optional column with the event type (click, buy, ...), kept as a string."""
    weight: str | None = None
    """Optional numeric column (rating, dwell time, ...), kept as float64."""

    def __post_init__(self):
        require(bool(self.user), "user", "must name a column")
        require(bool(self.item), "item", "must name a column")
        names = [n for n in (self.user, self.item, self.timestamp, self.event, self.weight) if n]
        require(len(set(names)) == len(names), "user", f"columns must be distinct, got {names}")

    def mapped(self) -> dict[str, str]:
        """{output field: input column} for the columns that are set."""
        fields = dataclasses.asdict(self)
        return {field: name for field, name in fields.items() if name}


class FileProblem(UserError):
    """A whole input file is unusable (missing column, wrong type, unreadable)."""


# ---------------------------------------------------------------------------------------------
# Listing and format detection


def list_input(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """Sorted data files at `path` (a file, or a directory searched recursively).

    Hidden and `_`-prefixed names (`_SUCCESS`, `_metadata`, `.crc` files) are skipped, as Spark
    and Hive writers expect.
    """
    try:
        if not fs.exists(path):
            raise UserError(f"input not found: {path}")
        if not fs.isdir(path):
            return [path]
        files = fs.find(path)
    except (PermissionError, OSError) as exc:
        raise UserError(f"cannot read input {path}: {exc}") from None
    root = path.rstrip("/")
    kept = [f for f in files if not any(part.startswith(("_", ".")) for part in
                                         posixpath.relpath(f, root).split("/"))]
    if not kept:
        raise UserError(f"no input files under {path}")
    return sorted(kept)


def _extension(path: str) -> str:
    name = posixpath.basename(path).lower()
    for suffix in _COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return posixpath.splitext(name)[1]


def _head_lines(fs: fsspec.AbstractFileSystem, path: str, count: int) -> list[str]:
    with fs.open(path, "rb", compression="infer") as handle:
        data = handle.read(1 << 16)
    lines = data.decode("utf-8", errors="replace").splitlines()
    return [line for line in lines[:count] if line.strip()]


def detect_format(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Guess one file's format from its extension, then from its first lines."""
    ext = _extension(path)
    if ext in (".parquet", ".pq", ".parq"):
        return "parquet"
    if ext in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if ext == ".tsv":
        return "tsv"
    if ext == ".inter":
        return "recbole"
    with fs.open(path, "rb") as handle:
        if handle.read(4) == b"PAR1":
            return "parquet"
    lines = _head_lines(fs, path, 200)
    if not lines:
        raise UserError(f"cannot detect the format of empty file {path}; pass --format")
    if ext == ".csv":
        header = [c.strip() for c in lines[0].split(",")]
        return "movielens" if header == _MOVIELENS_CSV_HEADER else "csv"
    if "::" in lines[0]:
        return "movielens"
    if ext in (".txt", ".dat", ""):
        tokens = [line.split() for line in lines]
        if any(len(t) > 2 for t in tokens):
            return "seq-txt"
        users = [t[0] for t in tokens if t]
        return "pairs-txt" if len(set(users)) < len(users) else "seq-txt"
    raise UserError(f"cannot detect the format of {path}; pass --format (one of {', '.join(FORMATS)})")


def resolve_format(fs: fsspec.AbstractFileSystem, files: list[str], fmt: str) -> str:
    """`fmt`, or the format every file agrees on when `fmt` is 'auto'."""
    if fmt != "auto":
        return fmt
    first = detect_format(fs, files[0])
    for path in files[1:]:
        other = detect_format(fs, path)
        if other != first:
            raise UserError(f"input files have different formats: {files[0]} is {first}, {path} is {other}")
    return first


# ---------------------------------------------------------------------------------------------
# Normalisation: raw columns -> EVENTS_SCHEMA plus quarantine rows


@dataclass
class _Raw:
    """Raw columns of one chunk before validation; `raw` gives the text to quarantine a row."""

    columns: dict[str, pa.Array]
    row: np.ndarray
    pos: np.ndarray
    raw: Callable[[np.ndarray], list[str]]
    int_ids: bool = False
    names: dict[str, str] | None = None  # input column name per field, for quarantine and errors


def _as_string(arr: pa.Array) -> pa.Array:
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_large_string(arr.type):
        arr = arr.cast(pa.string())
    return arr


def _np(mask, null: bool = False) -> np.ndarray:
    """A pyarrow boolean array as numpy, nulls read as `null`."""
    return np.asarray(mask.fill_null(null), dtype=bool)


def _matches(arr: pa.Array, pattern: str) -> np.ndarray:
    return _np(pc.match_substring_regex(arr, pattern))


def _ids(arr: pa.Array, int_ids: bool, where: str) -> tuple[pa.Array, list[tuple[np.ndarray, str]]]:
    """Ids as strings; integer-typed and integral float ids print as integers."""
    t = arr.type
    null = _np(arr.is_null())
    if pa.types.is_integer(t):
        return arr.cast(pa.string()), [(null, "null_id")]
    if pa.types.is_floating(t):
        integral = _np(pc.and_(pc.is_finite(arr), pc.equal(pc.trunc(arr), arr)))
        ints = pc.if_else(pa.array(integral), arr, 0).cast(pa.int64())
        return ints.cast(pa.string()), [(null, "null_id"), (~integral & ~null, "bad_id")]
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t)):
        raise FileProblem(f"{where} has type {t}; ids must be integers or strings")
    arr = pc.utf8_trim_whitespace(_as_string(arr))
    null |= _np(pc.equal(pc.utf8_length(arr), 0))
    if not int_ids:
        return arr, [(null, "null_id")]
    bad = ~_matches(arr, _INT_RE) & ~null
    cleaned = pc.if_else(pa.array(bad | null), "0", arr).cast(pa.int64()).cast(pa.string())
    return cleaned, [(null, "null_id"), (bad, "bad_id")]


def _parse_iso(values: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """Seconds since the epoch for ISO-8601 strings (naive times read as UTC); (values, bad mask)."""
    out = np.zeros(len(values), dtype=np.int64)
    bad = np.zeros(len(values), dtype=bool)
    for i, text in enumerate(values):
        try:
            moment = datetime.datetime.fromisoformat(text)
        except (TypeError, ValueError):
            bad[i] = True
            continue
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.timezone.utc)
        out[i] = math.floor(moment.timestamp())
    return out, bad


def _timestamps(arr: pa.Array, where: str) -> tuple[pa.Array, np.ndarray]:
    """int64 seconds and a bad mask: missing values and unparsable strings are bad."""
    t = arr.type
    null = _np(arr.is_null())
    if pa.types.is_integer(t):
        return arr.cast(pa.int64()), null
    if pa.types.is_floating(t):
        finite = _np(pc.is_finite(arr))
        return pc.if_else(pa.array(finite), pc.trunc(arr), 0).cast(pa.int64()), ~finite
    if pa.types.is_timestamp(t):
        factor = {"s": 1, "ms": 1000, "us": 10**6, "ns": 10**9}[t.unit]
        return pc.divide(arr.cast(pa.int64()), factor), null
    if pa.types.is_date(t):
        return arr.cast(pa.timestamp("s")).cast(pa.int64()), null
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t)):
        raise FileProblem(f"{where} has type {t}; timestamps must be numbers or ISO-8601 strings")
    arr = pc.utf8_trim_whitespace(_as_string(arr))
    is_int = _matches(arr, _INT_RE)
    if is_int.all():
        return arr.cast(pa.int64()), null
    is_float = ~is_int & _matches(arr, _FLOAT_RE)
    result = np.zeros(len(arr), dtype=np.int64)
    if is_int.any():
        result[is_int] = np.asarray(arr.filter(pa.array(is_int)).cast(pa.int64()))
    unrepresentable = np.zeros(len(arr), dtype=bool)
    if is_float.any():
        floats = np.asarray(arr.filter(pa.array(is_float)).cast(pa.float64()))
        # nan, inf and values beyond int64 (e.g. 1e30) are bad timestamps, not wrapped integers
        fits = np.isfinite(floats) & (np.abs(floats) < 2.0**63)
        result[is_float] = np.trunc(np.where(fits, floats, 0.0))
        unrepresentable[np.flatnonzero(is_float)[~fits]] = True
    rest = ~is_int & ~is_float & ~null
    bad = null | unrepresentable
    if rest.any():
        texts = arr.filter(pa.array(rest))
        try:  # the common naive ISO forms parse in one vectorised cast; others go one by one
            seconds = np.asarray(texts.cast(pa.timestamp("s")).cast(pa.int64()))
            failed = np.zeros(len(seconds), dtype=bool)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            seconds, failed = _parse_iso(texts.to_pylist())
        result[rest] = seconds
        bad[np.flatnonzero(rest)[failed]] = True
    return pa.array(result), bad


def _weights(arr: pa.Array, where: str) -> tuple[pa.Array, np.ndarray]:
    t = arr.type
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        return arr.cast(pa.float64()), np.zeros(len(arr), dtype=bool)
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t)):
        raise FileProblem(f"{where} has type {t}; weights must be numbers")
    arr = pc.utf8_trim_whitespace(_as_string(arr))
    number = _matches(arr, _FLOAT_RE)
    empty = _np(pc.equal(pc.utf8_length(arr), 0), null=True)
    return pc.if_else(pa.array(number), arr, None).cast(pa.float64()), ~number & ~empty


def _normalise(raw: _Raw, file_index: int, path: str) -> tuple[pa.Table, pa.Table]:
    """Validate raw columns into (events, quarantine); the first failing column names the row."""
    n = len(raw.row)
    cols = raw.columns
    names = raw.names or {}
    where = {f: f"{path}: column '{names.get(f, f)}'" for f in ("user", "item", "timestamp", "weight")}
    checks: list[tuple[np.ndarray, str, str]] = []
    out: dict[str, pa.Array] = {}
    for field in ("user", "item"):
        out[field], problems = _ids(cols[field], raw.int_ids, where[field])
        checks += [(mask, field, reason) for mask, reason in problems]
    if "timestamp" in cols:
        out["timestamp"], mask = _timestamps(cols["timestamp"], where["timestamp"])
        checks.append((mask, "timestamp", "bad_timestamp"))
    else:
        out["timestamp"] = pa.nulls(n, pa.int64())
    out["event"] = _as_string(cols["event"]).cast(pa.string()) if "event" in cols else pa.nulls(n, pa.string())
    if "weight" in cols:
        out["weight"], mask = _weights(cols["weight"], where["weight"])
        checks.append((mask, "weight", "bad_weight"))
    else:
        out["weight"] = pa.nulls(n, pa.float64())
    out["file"] = pa.array(np.full(n, file_index, dtype=np.int32))
    out["row"] = pa.array(raw.row.astype(np.int64, copy=False))
    out["pos"] = pa.array(raw.pos.astype(np.int32, copy=False))
    events = pa.Table.from_arrays([out[f.name] for f in EVENTS_SCHEMA], schema=EVENTS_SCHEMA)

    bad_any = np.zeros(n, dtype=bool)
    column = np.empty(n, dtype=object)
    reason = np.empty(n, dtype=object)
    for mask, name, why in checks:
        new = mask & ~bad_any
        column[new] = names.get(name, name)
        reason[new] = why
        bad_any |= mask
    if not bad_any.any():
        return events, QUARANTINE_SCHEMA.empty_table()
    where = np.flatnonzero(bad_any)
    bad = _quarantine(path, raw.row[where], column[where].tolist(), reason[where].tolist(), raw.raw(where))
    return events.filter(pa.array(~bad_any)), bad


def _quarantine(path: str, rows, columns: list[str], reasons: list[str], raws: list[str]) -> pa.Table:
    n = len(rows)
    return pa.Table.from_arrays([
        pa.array([path] * n, pa.string()), pa.array(np.asarray(rows, dtype=np.int64)),
        pa.array(columns, pa.string()), pa.array(reasons, pa.string()), pa.array(raws, pa.string()),
    ], schema=QUARANTINE_SCHEMA)


def _row_repr(table: pa.Table) -> Callable[[np.ndarray], list[str]]:
    """Quarantine text for tabular rows: the row's mapped values as JSON."""
    def render(where: np.ndarray) -> list[str]:
        rows = table.take(pa.array(where)).to_pylist()
        return [json.dumps(r, default=str, sort_keys=True) for r in rows]
    return render


def _line_repr(lines: pa.Array) -> Callable[[np.ndarray], list[str]]:
    return lambda where: lines.take(pa.array(where)).to_pylist()


# Line-based text formats whose files can be read in byte ranges (`ByteRange`).
RANGE_FORMATS = ("csv", "tsv", "recbole", "movielens", "pairs-txt", "seq-txt", "jsonl")


@dataclass
class ByteRange:
    """Part `number` of an uncompressed line-based text file: the lines that start in bytes
    [start, stop). Parts cut at any offsets tile the file's lines, each line in exactly one part.

    Reading a part numbers its lines from 1 (its first line; the header in part 0) and counts
    them in `lines`, from which the caller turns those numbers into line numbers of the file.
    JSON lines: a mapped column that no line of the whole file has is an error, which no part can
    tell alone, so a part records the keys it saw (`keys_seen`) and the caller checks their union
    with `check_json_keys`.
    """
    number: int
    start: int
    stop: int
    lines: int = 0
    keys_seen: set[str] = dataclasses.field(default_factory=set)


def _line_start(handle, pos: int) -> int:
    """The first line start at or after byte `pos` (the end of the file when there is none)."""
    if pos <= 0:
        return 0
    handle.seek(pos - 1)
    at = pos - 1
    while True:
        block = handle.read(1 << 16)
        if not block:
            return at
        newline = block.find(b"\n")
        if newline >= 0:
            return at + newline + 1
        at += len(block)


class _RangeFile:
    """A read-only file over the lines of a `ByteRange`, counting the newlines it hands out."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, part: ByteRange):
        self._handle = fs.open(path, "rb")
        self.start = _line_start(self._handle, part.start)
        self.size = _line_start(self._handle, part.stop) - self.start
        self._left = self.size
        self._handle.seek(self.start)
        self._part = part
        self.closed = False

    def read(self, size: int = -1) -> bytes:
        size = self._left if size is None or size < 0 else min(size, self._left)
        data = self._handle.read(size)
        self._left -= len(data)
        self._part.lines += data.count(b"\n")
        return data

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._handle.close()
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _open_text(fs: fsspec.AbstractFileSystem, path: str, part: ByteRange | None):
    return fs.open(path, "rb", compression="infer") if part is None else _RangeFile(fs, path, part)


# ---------------------------------------------------------------------------------------------
# Format readers: each yields (events, quarantine) chunks for one file


def _missing(path: str, column: str, available: list[str]) -> FileProblem:
    return FileProblem(f"{path}: column '{column}' not found (available columns: {', '.join(available)}); "
                       f"set columns.<field>=NAME to map it")


def _hive_values(path: str) -> dict[str, str]:
    """Partition columns encoded in a Hive-style path (`.../country=fr/part.parquet`)."""
    parts = [p.split("=", 1) for p in path.split("/")[:-1] if "=" in p]
    return {k: v for k, v in parts}


def _iter_parquet(fs, path, file_index, columns: ColumnMap, chunk_rows,
                  row_groups: tuple[int, int] | None) -> Iterator[tuple[pa.Table, pa.Table]]:
    with fs.open(path, "rb") as handle:
        try:
            pfile = pq.ParquetFile(handle)
        except (pa.ArrowInvalid, OSError) as exc:
            raise FileProblem(f"{path}: not a readable Parquet file ({exc})") from None
        names = pfile.schema_arrow.names
        hive = _hive_values(path)
        mapping = columns.mapped()
        for name in mapping.values():
            if name not in names and name not in hive:
                raise _missing(path, name, names + sorted(hive))
        read = sorted({name for name in mapping.values() if name in names})
        start, stop = row_groups or (0, pfile.num_row_groups)
        offset = sum(pfile.metadata.row_group(g).num_rows for g in range(start))  # rows count from the file's start
        for batch in pfile.iter_batches(batch_size=chunk_rows, columns=read, row_groups=range(start, stop)):
            n = batch.num_rows
            table = pa.Table.from_batches([batch])
            cols = {}
            for field, name in mapping.items():
                cols[field] = (table.column(name).combine_chunks() if name in names
                               else pa.array([hive[name]] * n, pa.string()))
            rows = np.arange(offset + 1, offset + n + 1, dtype=np.int64)
            offset += n
            raw = _Raw(cols, rows, np.zeros(n, dtype=np.int32), _row_repr(table), names=mapping)
            yield _normalise(raw, file_index, path)


def _csv_rows(reader, invalid: list[int], first_line: int) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """Batches of a streaming CSV reader with the file line number of each row.

    The reader skips invalid rows (reported to `invalid` as they are parsed, before their batch is
    returned); the valid rows fill the line numbers in between.
    """
    next_line = first_line
    for batch in reader:
        n = batch.num_rows
        skipped = [r for r in invalid if r >= next_line]
        candidates = np.arange(next_line, next_line + n + len(skipped), dtype=np.int64)
        lines = candidates[~np.isin(candidates, skipped)][:n]
        if n:
            next_line = int(lines[-1]) + 1
        yield pa.Table.from_batches([batch]), lines


def _iter_delimited(fs, path, file_index, columns: ColumnMap, chunk_bytes, fmt,
                    part: ByteRange | None) -> Iterator[tuple[pa.Table, pa.Table]]:
    """CSV, TSV, RecBole `.inter` (tab, `name:type` header) and MovieLens `ratings.csv`."""
    delimiter = "\t" if fmt in ("tsv", "recbole") else ","
    with fs.open(path, "rb", compression="infer") as handle:
        header_line = handle.readline().decode("utf-8", errors="replace").rstrip("\r\n")
    if not header_line.strip():
        return
    header = _split_header(header_line, delimiter)
    int_ids = False
    mapping = columns.mapped()
    if fmt == "recbole":
        names = [h.split(":", 1)[0] for h in header]
        types = dict(h.split(":", 1) if ":" in h else (h, "token") for h in header)
        int_ids = any(types.get(mapping[f], "token") != "token" for f in ("user", "item") if f in mapping)
    elif fmt == "movielens":
        names = header
        mapping = dict(zip(("user", "item", "weight", "timestamp"), _MOVIELENS_CSV_HEADER))
        int_ids = True
    else:
        names = header
    for name in mapping.values():
        if name not in names:
            raise _missing(path, name, names)
    invalid: list[int] = []
    bad_rows: list[tuple[int, str]] = []

    def on_invalid(row) -> str:
        invalid.append(row.number)
        bad_rows.append((row.number, row.text))
        return "skip"

    wanted = sorted(set(mapping.values()))
    handle = _open_text(fs, path, part)
    if part is not None and handle.size == 0:  # no line starts in this part
        handle.close()
        return
    header_rows = 0 if part is not None and handle.start > 0 else 1  # the header opens the file, not a part
    try:
        reader = pacsv.open_csv(
            handle,
            read_options=pacsv.ReadOptions(use_threads=False, block_size=chunk_bytes, column_names=names,
                                           skip_rows=header_rows),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, ignore_empty_lines=False,
                                             quote_char='"' if fmt == "csv" else False,
                                             invalid_row_handler=on_invalid),
            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                 include_columns=wanted))
        for table, lines in _csv_rows(reader, invalid, first_line=header_rows + 1):
            cols = {field: table.column(name).combine_chunks() for field, name in mapping.items()}
            raw = _Raw(cols, lines, np.zeros(len(lines), dtype=np.int32), _row_repr(table), int_ids, mapping)
            events, bad = _normalise(raw, file_index, path)
            if bad_rows:
                rows = [r for r, _ in bad_rows]
                malformed = _quarantine(path, rows, [""] * len(rows), ["malformed"] * len(rows),
                                        [t for _, t in bad_rows])
                bad = pa.concat_tables([malformed, bad])
                bad_rows.clear()
            yield events, bad
        if bad_rows:  # invalid rows after the last batch
            rows = [r for r, _ in bad_rows]
            yield EVENTS_SCHEMA.empty_table(), _quarantine(path, rows, [""] * len(rows),
                                                           ["malformed"] * len(rows), [t for _, t in bad_rows])
    except pa.ArrowInvalid as exc:
        raise FileProblem(f"{path}: cannot parse as {fmt}: {exc}") from None
    finally:
        handle.close()


def _split_header(line: str, delimiter: str) -> list[str]:
    return [h.strip().strip('"') for h in line.split(delimiter)]


def _iter_lines(fs, path, chunk_bytes, part: ByteRange | None) -> Iterator[tuple[pa.Array, np.ndarray]]:
    """Non-blank lines of a text file (or part) in chunks, with their 1-based line numbers."""
    line_no = 1
    rest = b""
    with _open_text(fs, path, part) as handle:
        while True:
            data = handle.read(chunk_bytes)
            if data:
                data = rest + data
                cut = data.rfind(b"\n") + 1
                if cut == 0:  # no line end yet: a line longer than the chunk
                    rest = data
                    continue
                block, rest = data[:cut], data[cut:]
            elif rest:  # last line without a newline
                block, rest = rest + b"\n", b""
            else:
                break
            lines = pc.list_flatten(pc.split_pattern(pa.array([block.decode("utf-8", errors="replace")]), "\n"))
            lines = pc.utf8_rtrim(lines.slice(0, len(lines) - 1), characters="\r")
            numbers = np.arange(line_no, line_no + len(lines), dtype=np.int64)
            line_no += len(lines)
            keep = _np(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(lines)), 0))
            yield lines.filter(pa.array(keep)), numbers[keep]


def _malformed(path, lines: pa.Array, numbers: np.ndarray, mask: np.ndarray) -> pa.Table:
    where = np.flatnonzero(mask)
    n = len(where)
    return _quarantine(path, numbers[where], [""] * n, ["malformed"] * n, lines.take(pa.array(where)).to_pylist())


def _iter_seq_txt(fs, path, file_index, chunk_bytes, part: ByteRange | None) -> Iterator[tuple[pa.Table, pa.Table]]:
    """`user item1 item2 ...` per line; the order of items on the line is their time order."""
    for lines, numbers in _iter_lines(fs, path, chunk_bytes, part):
        tokens = pc.utf8_split_whitespace(lines)
        count = np.asarray(pc.list_value_length(tokens))
        short = count < 2
        malformed = _malformed(path, lines, numbers, short)
        if short.any():
            keep = pa.array(~short)
            tokens, lines, numbers = tokens.filter(keep), lines.filter(keep), numbers[~short]
        items = pc.list_slice(tokens, 1)
        parent = np.asarray(pc.list_parent_indices(items))
        offsets = np.asarray(items.offsets)
        pos = np.arange(len(parent), dtype=np.int64) - (offsets[parent] - offsets[0])
        users = pc.list_element(tokens, 0).take(pa.array(parent))
        raw = _Raw({"user": users, "item": pc.list_flatten(items)}, numbers[parent], pos,
                   _line_repr(lines.take(pa.array(parent))))
        events, bad = _normalise(raw, file_index, path)
        yield events, pa.concat_tables([malformed, bad])


def _iter_split_lines(fs, path, file_index, chunk_bytes, fmt,
                      part: ByteRange | None) -> Iterator[tuple[pa.Table, pa.Table]]:
    """`user item` pair text (file order is time) and MovieLens `ratings.dat` (`u::i::rating::ts`)."""
    fields, splitter = (2, None) if fmt == "pairs-txt" else (4, "::")
    for lines, numbers in _iter_lines(fs, path, chunk_bytes, part):
        tokens = (pc.utf8_split_whitespace(lines) if splitter is None
                  else pc.split_pattern(pc.utf8_trim_whitespace(lines), splitter))
        wrong = np.asarray(pc.list_value_length(tokens)) != fields
        malformed = _malformed(path, lines, numbers, wrong)
        if wrong.any():
            keep = pa.array(~wrong)
            tokens, lines, numbers = tokens.filter(keep), lines.filter(keep), numbers[~wrong]
        cols = {"user": pc.list_element(tokens, 0), "item": pc.list_element(tokens, 1)}
        if fmt == "movielens":
            cols["weight"] = pc.list_element(tokens, 2)
            cols["timestamp"] = pc.list_element(tokens, 3)
        raw = _Raw(cols, numbers, np.zeros(len(numbers), dtype=np.int32), _line_repr(lines), fmt == "movielens")
        events, bad = _normalise(raw, file_index, path)
        yield events, pa.concat_tables([malformed, bad])


def _json_value(value) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool) or isinstance(value, (dict, list)):
        return json.dumps(value)
    return repr(value) if isinstance(value, float) else str(value)


def _iter_jsonl(fs, path, file_index, columns: ColumnMap, chunk_bytes,
                part: ByteRange | None) -> Iterator[tuple[pa.Table, pa.Table]]:
    """One JSON object per line; pyarrow parses clean chunks, Python finds the bad lines otherwise."""
    mapping = columns.mapped()
    seen: set[str] = set()
    for lines, numbers in _iter_lines(fs, path, chunk_bytes, part):
        malformed = QUARANTINE_SCHEMA.empty_table()
        try:
            table = pajson.read_json(pa.py_buffer(("\n".join(lines.to_pylist()) + "\n").encode()),
                                     parse_options=pajson.ParseOptions(newlines_in_values=False))
            if table.num_rows != len(lines):
                raise pa.ArrowInvalid("row count mismatch")
            seen.update(table.column_names)
            cols = {f: table.column(n).combine_chunks() for f, n in mapping.items() if n in table.column_names}
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            # Mixed types or broken lines: parse line by line, keep values as strings.
            objects, bad = [], np.zeros(len(lines), dtype=bool)
            for i, text in enumerate(lines.to_pylist()):
                try:
                    obj = json.loads(text)
                except ValueError:
                    obj = None
                if not isinstance(obj, dict):
                    bad[i] = True
                    continue
                seen.update(obj)
                objects.append(obj)
            malformed = _malformed(path, lines, numbers, bad)
            lines, numbers = lines.filter(pa.array(~bad)), numbers[~bad]
            cols = {f: pa.array([_json_value(o.get(n)) for o in objects], pa.string())
                    for f, n in mapping.items() if any(n in o for o in objects)}
        for field, name in mapping.items():
            if field not in cols:
                cols[field] = pa.nulls(len(numbers), pa.string())
        raw = _Raw(cols, numbers, np.zeros(len(numbers), dtype=np.int32), _line_repr(lines), names=mapping)
        events, bad_rows = _normalise(raw, file_index, path)
        yield events, pa.concat_tables([malformed, bad_rows])
    if part is None:
        check_json_keys(path, columns, seen)
    else:
        part.keys_seen |= seen


def check_json_keys(path: str, columns: ColumnMap, seen: set[str]) -> None:
    """Raise FileProblem when the lines of a JSON-lines file had keys but never a mapped column."""
    for name in columns.mapped().values():
        if seen and name not in seen:
            raise _missing(path, name, sorted(seen))


def iter_file(fs: fsspec.AbstractFileSystem, path: str, file_index: int, fmt: str, columns: ColumnMap,
              chunk_rows: int = 1 << 18, chunk_bytes: int = 16 << 20, row_groups: tuple[int, int] | None = None,
              byte_range: ByteRange | None = None) -> Iterator[tuple[pa.Table, pa.Table]]:
    """(events, quarantine) chunks of one input file in `fmt`; raises FileProblem for unusable files.
    So that one large file can be parsed by several tasks, `row_groups` = (start, stop) reads only
    those row groups of a Parquet file (row numbers still count from the file's first row), and
    `byte_range` only the lines of one part of an uncompressed text file in `RANGE_FORMATS` (row
    numbers count from the part's first line; see `ByteRange`)."""
    if row_groups is not None and fmt != "parquet":
        raise ValueError(f"row_groups applies to Parquet files only, not {fmt!r}")
    if byte_range is not None and not splittable_text(path, fmt):
        raise ValueError(f"byte_range applies to uncompressed {', '.join(RANGE_FORMATS)} files, not {path} ({fmt})")
    try:
        if fmt == "parquet":
            yield from _iter_parquet(fs, path, file_index, columns, chunk_rows, row_groups)
        elif fmt in ("csv", "tsv", "recbole") or (fmt == "movielens" and _extension(path) == ".csv"):
            yield from _iter_delimited(fs, path, file_index, columns, chunk_bytes, fmt, byte_range)
        elif fmt in ("pairs-txt", "movielens"):
            yield from _iter_split_lines(fs, path, file_index, chunk_bytes, fmt, byte_range)
        elif fmt == "seq-txt":
            yield from _iter_seq_txt(fs, path, file_index, chunk_bytes, byte_range)
        elif fmt == "jsonl":
            yield from _iter_jsonl(fs, path, file_index, columns, chunk_bytes, byte_range)
        else:
            raise UserError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        raise FileProblem(f"cannot read {path}: {exc}") from None


def splittable_text(path: str, fmt: str) -> bool:
    """Whether `path` can be read in byte ranges: a line-based text format, not compressed."""
    return (fmt in RANGE_FORMATS and infer_compression(path) is None
            and not path.lower().endswith(_COMPRESSION_SUFFIXES))


def file_schema(fs: fsspec.AbstractFileSystem, path: str, fmt: str) -> str | None:
    """A signature of the file's columns and types, to spot files whose schema differs; None if schemaless."""
    if fmt == "parquet":
        with fs.open(path, "rb") as handle:
            try:
                schema = pq.read_schema(handle)
            except (pa.ArrowInvalid, OSError) as exc:
                raise FileProblem(f"{path}: not a readable Parquet file ({exc})") from None
        return ", ".join(f"{f.name}: {f.type}" for f in schema)
    if fmt in ("csv", "tsv", "recbole") or (fmt == "movielens" and _extension(path) == ".csv"):
        lines = _head_lines(fs, path, 1)
        return lines[0].strip() if lines else None
    return None


def row_group_rows(fs: fsspec.AbstractFileSystem, path: str, fmt: str) -> list[int] | None:
    """Rows of each row group when the file's metadata says (Parquet footers); None for text formats."""
    if fmt != "parquet":
        return None
    with fs.open(path, "rb") as handle:
        try:
            metadata = pq.read_metadata(handle)
        except (pa.ArrowInvalid, OSError) as exc:
            raise FileProblem(f"{path}: not a readable Parquet file ({exc})") from None
    return [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]


def read_file(fs: fsspec.AbstractFileSystem, path: str, fmt: str, columns: ColumnMap | None = None,
              file_index: int = 0) -> tuple[pa.Table, pa.Table]:
    """A whole file as one (events, quarantine) pair: for tests and small inputs."""
    chunks = list(iter_file(fs, path, file_index, fmt, columns or ColumnMap()))
    events = pa.concat_tables([EVENTS_SCHEMA.empty_table()] + [c[0] for c in chunks])
    bad = pa.concat_tables([QUARANTINE_SCHEMA.empty_table()] + [c[1] for c in chunks])
    return events, bad
