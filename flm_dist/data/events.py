"""The normalised event table every reader produces, and the validation that fills it.

A reader turns one input file into chunks of `EVENTS_SCHEMA`: `user` and `item` as strings,
`timestamp` as int64 seconds (null when the format has none), optional `event` and `weight`, and
the event's origin: `file` (index into the sorted input file list), `row` (1-based line number in
that file; for Parquet the 1-based row index) and `pos` (position within the line for
one-user-per-line text, else 0). Sorting by (timestamp, file, row, pos) therefore gives time
order, and the file order where there is no timestamp.

Rows that cannot be used go to a quarantine table (`QUARANTINE_SCHEMA`) with the file, row,
column and reason instead of stopping the job. Reasons: `malformed` (wrong number of fields,
unparsable JSON), `bad_encoding` (bytes that are not text in the file's encoding, `encoding`,
UTF-8 by default: decoding never guesses, which would merge ids), `header` (a repeated header
line, as concatenated CSV files have), `null_id`, `bad_id` (not an integer where the format
declares integer ids: MovieLens, RecBole `:float` ids, float Parquet columns; or a numeric id that
float64 cannot hold exactly, beyond 2**53, such as JSON numbers of 2**63 or 1e20), `bad_timestamp`
(missing or unparsable; ints, floats (truncated) and ISO-8601 strings are accepted), `bad_weight`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flm_dist.config import require
from flm_dist.errors import UserError

EVENTS_SCHEMA = pa.schema([
    ("user", pa.string()), ("item", pa.string()), ("timestamp", pa.int64()), ("event", pa.string()),
    ("weight", pa.float64()), ("file", pa.int32()), ("row", pa.int64()), ("pos", pa.int32()),
])
QUARANTINE_SCHEMA = pa.schema([
    ("file", pa.string()), ("row", pa.int64()), ("column", pa.string()), ("reason", pa.string()),
    ("raw", pa.string()),
])
ROW_REASONS = ("malformed", "bad_encoding", "header", "null_id", "bad_id", "bad_timestamp", "bad_weight")
# Integers up to this magnitude are exact in float64; beyond it distinct ids share one float.
_EXACT_FLOAT_INT = 2.0**53

_INT_RE = r"^[+-]?\d{1,18}$"
_FLOAT_RE = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"


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


def missing_column(path: str, column: str, available: list[str]) -> FileProblem:
    return FileProblem(f"{path}: column '{column}' not found (available columns: {', '.join(available)}); "
                       f"set columns.<field>=NAME to map it")


@dataclass
class Raw:
    """Raw columns of one chunk before validation; `raw` gives the text to quarantine a row."""

    columns: dict[str, pa.Array]
    row: np.ndarray
    pos: np.ndarray
    raw: Callable[[np.ndarray], list[str]]
    int_ids: bool = False
    names: dict[str, str] | None = None  # input column name per field, for quarantine and errors
    problems: list[tuple[np.ndarray, str, str]] = dataclasses.field(default_factory=list)
    """(row mask, field or "", reason) found while reading, before the values are checked."""


def _as_string(arr: pa.Array) -> pa.Array:
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_large_string(arr.type):
        arr = arr.cast(pa.string())
    return arr


def bool_mask(mask, null: bool = False) -> np.ndarray:
    """A pyarrow boolean array as numpy, nulls read as `null`."""
    return np.asarray(mask.fill_null(null), dtype=bool)


def _matches(arr: pa.Array, pattern: str) -> np.ndarray:
    return bool_mask(pc.match_substring_regex(arr, pattern))


def _ids(arr: pa.Array, int_ids: bool, where: str) -> tuple[pa.Array, list[tuple[np.ndarray, str]]]:
    """Ids as strings; integer-typed and integral float ids print as integers."""
    t = arr.type
    null = bool_mask(arr.is_null())
    if pa.types.is_integer(t):
        return arr.cast(pa.string()), [(null, "null_id")]
    if pa.types.is_floating(t):
        exact = pc.less_equal(pc.abs(arr), _EXACT_FLOAT_INT)
        integral = bool_mask(pc.and_(exact, pc.equal(pc.trunc(arr), arr)))
        ints = pc.if_else(pa.array(integral), arr, 0).cast(pa.int64())
        return ints.cast(pa.string()), [(null, "null_id"), (~integral & ~null, "bad_id")]
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t)):
        raise FileProblem(f"{where} has type {t}; ids must be integers or strings")
    arr = pc.utf8_trim_whitespace(_as_string(arr))
    null |= bool_mask(pc.equal(pc.utf8_length(arr), 0))
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
    null = bool_mask(arr.is_null())
    if pa.types.is_integer(t):
        return arr.cast(pa.int64()), null
    if pa.types.is_floating(t):
        finite = bool_mask(pc.is_finite(arr))
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
    empty = bool_mask(pc.equal(pc.utf8_length(arr), 0), null=True)
    return pc.if_else(pa.array(number), arr, None).cast(pa.float64()), ~number & ~empty


def normalise(raw: Raw, file_index: int, path: str) -> tuple[pa.Table, pa.Table]:
    """Validate raw columns into (events, quarantine); the first failing column names the row."""
    n = len(raw.row)
    cols = raw.columns
    names = raw.names or {}
    where = {f: f"{path}: column '{names.get(f, f)}'" for f in ("user", "item", "timestamp", "weight")}
    checks: list[tuple[np.ndarray, str, str]] = list(raw.problems)
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
    bad = quarantine_rows(path, raw.row[where], column[where].tolist(), reason[where].tolist(), raw.raw(where))
    return events.filter(pa.array(~bad_any)), bad


def quarantine_rows(path: str, rows, columns: list[str], reasons: list[str], raws: list[str]) -> pa.Table:
    n = len(rows)
    return pa.Table.from_arrays([
        pa.array([path] * n, pa.string()), pa.array(np.asarray(rows, dtype=np.int64)),
        pa.array(columns, pa.string()), pa.array(reasons, pa.string()), pa.array(raws, pa.string()),
    ], schema=QUARANTINE_SCHEMA)


def row_repr(table: pa.Table) -> Callable[[np.ndarray], list[str]]:
    """Quarantine text for tabular rows: the row's mapped values as JSON."""
    def render(where: np.ndarray) -> list[str]:
        rows = table.take(pa.array(where)).to_pylist()
        return [json.dumps(r, default=_json_text, sort_keys=True) for r in rows]
    return render


def _json_text(value) -> str:
    """Values JSON cannot hold as they are: bytes (a CSV value that is not text) show their
    undecodable bytes escaped, as in "caf\\xe9"."""
    return value.decode("utf-8", errors="backslashreplace") if isinstance(value, bytes) else str(value)


def line_repr(lines: pa.Array) -> Callable[[np.ndarray], list[str]]:
    return lambda where: lines.take(pa.array(where)).to_pylist()
