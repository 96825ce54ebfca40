"""Readers of the line-based text formats: CSV/TSV, RecBole `.inter`, MovieLens, sequence text,
pair text and JSON lines. Each yields (events, quarantine) chunks of one file (see events.py).

Decisions: blank lines are skipped and not counted as rows (CSV rows whose values are all empty
are `null_id` rows). Text is decoded strictly in the declared encoding (`encoding`, UTF-8 by
default): a line (or CSV value) that does not decode is quarantined as `bad_encoding`, never
patched with replacement characters, which would merge distinct ids. Row numbers are physical
lines of the file, also after a quoted CSV value with line breaks. An uncompressed file can be
read in byte ranges (`ByteRange`), so that several tasks parse one large file.
"""

from __future__ import annotations

import codecs
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


class _CsvLines:
    """Physical line numbers of the records of a streaming CSV reader.

    pyarrow numbers records (a quoted value may hold line breaks) and skips invalid ones, which it
    reports by record number (to `skipped`, as they are parsed, before their batch is returned).
    The valid rows take the record numbers in between; each record starts as many lines after
    its number as the records before it had line breaks inside values.
    """

    def __init__(self, first_record: int):
        self.next_record = first_record
        self.breaks = 0  # line breaks inside the values of the records placed so far

    def place(self, rows: int, row_breaks: np.ndarray, skipped: dict[int, str]) -> tuple[np.ndarray, np.ndarray]:
        """(line of each of `rows` valid rows, line of each skipped record in sorted order), given
        the line breaks inside each valid row's values and the skipped records' text."""
        numbers = sorted(skipped)
        candidates = np.arange(self.next_record, self.next_record + rows + len(numbers), dtype=np.int64)
        valid = candidates[~np.isin(candidates, numbers)][:rows]
        records = np.concatenate([valid, np.asarray(numbers, dtype=np.int64)])
        breaks = np.concatenate([row_breaks, [skipped[r].count("\n") for r in numbers]]).astype(np.int64)
        order = np.argsort(records, kind="stable")
        before = np.empty(len(records), dtype=np.int64)
        before[order] = self.breaks + np.cumsum(breaks[order]) - breaks[order]
        lines = records + before
        if len(records):
            self.next_record = int(records.max()) + 1
            self.breaks += int(breaks.sum())
        return lines[:rows], lines[rows:]


def _value_breaks(table: pa.Table) -> np.ndarray:
    """Line breaks inside each row's values (all columns: any may hold a quoted line break).
    Counted row by row only in a column whose data bytes hold one at all: almost no value has a
    line break, and counting every row of every batch made reading a CSV a fifth slower."""
    counts = np.zeros(table.num_rows, dtype=np.int64)
    for column in table.columns:
        data = [chunk.buffers()[2] for chunk in column.chunks]
        if any(b is not None and (np.frombuffer(b, dtype=np.uint8) == ord("\n")).any() for b in data):
            counts += np.asarray(pc.count_substring(column, "\n").fill_null(0), dtype=np.int64)
    return counts


def _text_columns(table: pa.Table, mapping: dict[str, str]) -> tuple[dict[str, pa.Array], list]:
    """The mapped columns (read as bytes) as strings, and a `bad_encoding` problem per column
    holding values that are not UTF-8 (pyarrow has transcoded any other declared encoding)."""
    columns, problems = {}, []
    for field, name in mapping.items():
        column = table.column(name).combine_chunks()
        try:
            columns[field] = column.cast(pa.string())
            continue
        except pa.ArrowInvalid:
            pass
        values = column.to_pylist()
        texts = [_decoded(value, "utf-8") for value in values]
        undecodable = np.array([v is not None and t is None for v, t in zip(values, texts)], dtype=bool)
        problems.append((undecodable, field, "bad_encoding"))
        columns[field] = pa.array(texts, pa.string())
    return columns, problems


def _decoded(value: bytes | None, encoding: str) -> str | None:
    try:
        return None if value is None else value.decode(encoding)
    except UnicodeDecodeError:
        return None


def _repeated_header(table: pa.Table, mapping: dict[str, str], header: dict[str, str]) -> np.ndarray:
    """Rows whose mapped values are the header's own names (concatenated files)."""
    repeated = np.ones(table.num_rows, dtype=bool)
    for name in mapping.values():
        same = pc.equal(table.column(name), pa.scalar(header[name].encode(), pa.binary()))
        repeated &= bool_mask(same)
    return repeated


def iter_delimited(fs, path, file_index, columns: ColumnMap, chunk_bytes, fmt,
                    part: ByteRange | None, encoding: str = "utf-8") -> Iterator[tuple[pa.Table, pa.Table]]:
    """CSV, TSV, RecBole `.inter` (tab, `name:type` header) and MovieLens `ratings.csv`."""
    delimiter = "\t" if fmt in ("tsv", "recbole") else ","
    with fs.open(path, "rb", compression="infer") as handle:
        first = handle.readline()
    try:
        header_line = first.decode(encoding).rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise FileProblem(f"{path}: the header line is not {encoding} text ({exc.reason} at byte {exc.start}); "
                          f"set encoding=NAME, or check --format") from None
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
    header_names = dict(zip(names, header))
    skipped: dict[int, str] = {}  # record number -> text of the rows pyarrow skipped (wrong field count)

    def on_invalid(row) -> str:
        skipped[row.number] = row.text
        return "skip"

    def malformed(lines: np.ndarray, texts: list[str]) -> pa.Table:
        return quarantine_rows(path, lines, [""] * len(texts), ["malformed"] * len(texts), texts)

    wanted = sorted(set(mapping.values()))
    handle = _open_text(fs, path, part)
    if part is not None and handle.size == 0:  # no line starts in this part
        handle.close()
        return
    header_rows = 0 if part is not None and handle.start > 0 else 1  # the header opens the file, not a part
    lines = _CsvLines(first_record=header_rows + 1)
    quoted = fmt == "csv"
    try:
        reader = pacsv.open_csv(
            handle,
            read_options=pacsv.ReadOptions(use_threads=False, block_size=chunk_bytes, column_names=names,
                                           skip_rows=header_rows, encoding=_arrow_encoding(encoding)),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, ignore_empty_lines=False,
                                             quote_char='"' if quoted else False, newlines_in_values=quoted,
                                             invalid_row_handler=on_invalid),
            # Bytes, so that a value that is not text is one bad row, not an unreadable file; every
            # column, because a line break in any of them moves the line numbers of later rows.
            convert_options=pacsv.ConvertOptions(column_types={n: pa.binary() for n in names}))
        for batch in reader:
            table = pa.Table.from_batches([batch])
            rows, bad_lines = lines.place(table.num_rows, _value_breaks(table) if quoted else
                                          np.zeros(table.num_rows, dtype=np.int64), skipped)
            texts = [skipped[r] for r in sorted(skipped)]
            skipped.clear()
            cols, problems = _text_columns(table, mapping)
            problems.insert(0, (_repeated_header(table, mapping, header_names), "", "header"))
            raw = Raw(cols, rows, np.zeros(len(rows), dtype=np.int32), row_repr(table.select(wanted)), int_ids,
                      mapping, problems)
            events, bad = normalise(raw, file_index, path)
            yield events, pa.concat_tables([malformed(bad_lines, texts), bad])
        if skipped:  # invalid rows after the last batch
            _, bad_lines = lines.place(0, np.zeros(0, dtype=np.int64), skipped)
            yield EVENTS_SCHEMA.empty_table(), malformed(bad_lines, [skipped[r] for r in sorted(skipped)])
    except pa.ArrowInvalid as exc:
        raise FileProblem(f"{path}: cannot parse as {fmt}: {exc}") from None
    finally:
        handle.close()


def _arrow_encoding(encoding: str) -> str:
    """pyarrow reads 'utf8' as is and transcodes any other name, which for UTF-8 itself would
    turn one undecodable value into an unreadable file."""
    return "utf8" if codecs.lookup(encoding).name == "utf-8" else encoding


def _split_header(line: str, delimiter: str) -> list[str]:
    return [h.strip().strip('"') for h in line.split(delimiter)]


def _iter_lines(fs, path, chunk_bytes, part: ByteRange | None,
                encoding: str) -> Iterator[tuple[pa.Array, np.ndarray, pa.Table]]:
    """Non-blank lines of a text file (or part) in chunks, with their 1-based line numbers and
    the lines that do not decode in `encoding` (quarantined as `bad_encoding`)."""
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
            text, undecodable = _decode_block(path, block, line_no, encoding)
            lines = pc.list_flatten(pc.split_pattern(pa.array([text]), "\n"))
            lines = pc.utf8_rtrim(lines.slice(0, len(lines) - 1), characters="\r")
            numbers = np.arange(line_no, line_no + len(lines), dtype=np.int64)
            line_no += len(lines)
            keep = bool_mask(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(lines)), 0))
            yield lines.filter(pa.array(keep)), numbers[keep], undecodable


def _decode_block(path: str, block: bytes, first_line: int, encoding: str) -> tuple[str, pa.Table]:
    """Whole lines of bytes as text, and the quarantine of those that do not decode: they become
    blank lines here, so that they are neither parsed nor renumber the lines after them."""
    try:
        return block.decode(encoding), QUARANTINE_SCHEMA.empty_table()
    except UnicodeDecodeError:
        pass
    texts, rows, raws = [], [], []
    for number, line in enumerate(block.split(b"\n")[:-1], start=first_line):
        text = _decoded(line, encoding)
        if text is None:
            rows.append(number)
            raws.append(line.decode(encoding, errors="backslashreplace"))
        texts.append(text or "")
    undecodable = quarantine_rows(path, rows, [""] * len(rows), ["bad_encoding"] * len(rows), raws)
    return "\n".join(texts) + "\n", undecodable


def _malformed(path, lines: pa.Array, numbers: np.ndarray, mask: np.ndarray) -> pa.Table:
    where = np.flatnonzero(mask)
    n = len(where)
    return quarantine_rows(path, numbers[where], [""] * n, ["malformed"] * n, lines.take(pa.array(where)).to_pylist())


def iter_seq_txt(fs, path, file_index, chunk_bytes, part: ByteRange | None,
                 encoding: str = "utf-8") -> Iterator[tuple[pa.Table, pa.Table]]:
    """`user item1 item2 ...` per line; the order of items on the line is their time order."""
    for lines, numbers, undecodable in _iter_lines(fs, path, chunk_bytes, part, encoding):
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
        yield events, pa.concat_tables([undecodable, malformed, bad])


def iter_split_lines(fs, path, file_index, chunk_bytes, fmt, part: ByteRange | None,
                     encoding: str = "utf-8") -> Iterator[tuple[pa.Table, pa.Table]]:
    """`user item` pair text (file order is time) and MovieLens `ratings.dat` (`u::i::rating::ts`)."""
    fields, splitter = (2, None) if fmt == "pairs-txt" else (4, "::")
    for lines, numbers, undecodable in _iter_lines(fs, path, chunk_bytes, part, encoding):
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
        yield events, pa.concat_tables([undecodable, malformed, bad])


def _json_value(value) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool) or isinstance(value, (dict, list)):
        return json.dumps(value)
    return repr(value) if isinstance(value, float) else str(value)


def iter_jsonl(fs, path, file_index, columns: ColumnMap, chunk_bytes, part: ByteRange | None,
               encoding: str = "utf-8") -> Iterator[tuple[pa.Table, pa.Table]]:
    """One JSON object per line; pyarrow parses clean chunks, Python finds the bad lines otherwise."""
    mapping = columns.mapped()
    seen: set[str] = set()
    for lines, numbers, undecodable in _iter_lines(fs, path, chunk_bytes, part, encoding):
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
        yield events, pa.concat_tables([undecodable, malformed, bad_rows])
    if part is None:
        check_json_keys(path, columns, seen)
    else:
        part.keys_seen |= seen


def check_json_keys(path: str, columns: ColumnMap, seen: set[str]) -> None:
    """Raise FileProblem when the lines of a JSON-lines file had keys but never a mapped column."""
    for name in columns.mapped().values():
        if seen and name not in seen:
            raise missing_column(path, name, sorted(seen))

