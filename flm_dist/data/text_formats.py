"""Readers of the line-based text formats: CSV/TSV, RecBole `.inter`, MovieLens, sequence text,
pair text and JSON lines. Each yields (events, quarantine) chunks of one file (see events.py).

Decisions: blank lines are skipped and not counted as rows (CSV rows whose values are all empty
are `null_id` rows). An uncompressed file can be read in byte ranges (`ByteRange`), so that
several tasks parse one large file.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
from fsspec.utils import infer_compression

from flm_dist.data.events import (
    EVENTS_SCHEMA,
    QUARANTINE_SCHEMA,
    ColumnMap,
    FileProblem,
    Raw,
    bool_mask,
    line_repr,
    missing_column,
    normalise,
    quarantine_rows,
    row_repr,
)

COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zstd", ".lz4")
MOVIELENS_CSV_HEADER = ["userId", "movieId", "rating", "timestamp"]

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


def splittable_text(path: str, fmt: str) -> bool:
    """Whether `path` can be read in byte ranges: a line-based text format, not compressed."""
    return (fmt in RANGE_FORMATS and infer_compression(path) is None
            and not path.lower().endswith(COMPRESSION_SUFFIXES))


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


def iter_delimited(fs, path, file_index, columns: ColumnMap, chunk_bytes, fmt,
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
        mapping = dict(zip(("user", "item", "weight", "timestamp"), MOVIELENS_CSV_HEADER))
        int_ids = True
    else:
        names = header
    for name in mapping.values():
        if name not in names:
            raise missing_column(path, name, names)
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
            raw = Raw(cols, lines, np.zeros(len(lines), dtype=np.int32), row_repr(table), int_ids, mapping)
            events, bad = normalise(raw, file_index, path)
            if bad_rows:
                rows = [r for r, _ in bad_rows]
                malformed = quarantine_rows(path, rows, [""] * len(rows), ["malformed"] * len(rows),
                                        [t for _, t in bad_rows])
                bad = pa.concat_tables([malformed, bad])
                bad_rows.clear()
            yield events, bad
        if bad_rows:  # invalid rows after the last batch
            rows = [r for r, _ in bad_rows]
            yield EVENTS_SCHEMA.empty_table(), quarantine_rows(path, rows, [""] * len(rows),
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
            keep = bool_mask(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(lines)), 0))
            yield lines.filter(pa.array(keep)), numbers[keep]


def _malformed(path, lines: pa.Array, numbers: np.ndarray, mask: np.ndarray) -> pa.Table:
    where = np.flatnonzero(mask)
    n = len(where)
    return quarantine_rows(path, numbers[where], [""] * n, ["malformed"] * n, lines.take(pa.array(where)).to_pylist())


def iter_seq_txt(fs, path, file_index, chunk_bytes, part: ByteRange | None) -> Iterator[tuple[pa.Table, pa.Table]]:
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
        raw = Raw({"user": users, "item": pc.list_flatten(items)}, numbers[parent], pos,
                   line_repr(lines.take(pa.array(parent))))
        events, bad = normalise(raw, file_index, path)
        yield events, pa.concat_tables([malformed, bad])


def iter_split_lines(fs, path, file_index, chunk_bytes, fmt,
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
        raw = Raw(cols, numbers, np.zeros(len(numbers), dtype=np.int32), line_repr(lines), fmt == "movielens")
        events, bad = normalise(raw, file_index, path)
        yield events, pa.concat_tables([malformed, bad])


def _json_value(value) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool) or isinstance(value, (dict, list)):
        return json.dumps(value)
    return repr(value) if isinstance(value, float) else str(value)


def iter_jsonl(fs, path, file_index, columns: ColumnMap, chunk_bytes,
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
        raw = Raw(cols, numbers, np.zeros(len(numbers), dtype=np.int32), line_repr(lines), names=mapping)
        events, bad_rows = normalise(raw, file_index, path)
        yield events, pa.concat_tables([malformed, bad_rows])
    if part is None:
        check_json_keys(path, columns, seen)
    else:
        part.keys_seen |= seen


def check_json_keys(path: str, columns: ColumnMap, seen: set[str]) -> None:
    """Raise FileProblem when the lines of a JSON-lines file had keys but never a mapped column."""
    for name in columns.mapped().values():
        if seen and name not in seen:
            raise missing_column(path, name, sorted(seen))

