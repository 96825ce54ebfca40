"""Readers for interaction logs: Parquet, CSV/TSV, JSON lines, sequence text, pair text, RecBole, MovieLens.

This module lists the input, detects its format and hands each file to the reader of its format
family (parquet_format.py, text_formats.py), which yields chunks of normalised events and
quarantined rows (events.py). A file with no data rows (a zero-byte file too) is not an error by
default: it is listed in the manifest and in the quarantine with reason `empty_file`, and format
detection passes over it. A file that cannot be read (truncated or corrupt compressed data, a
Parquet file without its footer) is a one-line error naming it.
"""

from __future__ import annotations

import contextlib
import lzma
import posixpath
import zlib
from collections.abc import Iterator

import fsspec
import pyarrow as pa

from flm_dist.data import parquet_format
from flm_dist.data.events import EVENTS_SCHEMA, QUARANTINE_SCHEMA, ColumnMap, FileProblem
from flm_dist.data.text_formats import (
    COMPRESSION_SUFFIXES,
    MOVIELENS_CSV_HEADER,
    RANGE_FORMATS,
    ByteRange,
    iter_delimited,
    iter_jsonl,
    iter_seq_txt,
    iter_split_lines,
    splittable_text,
)
from flm_dist.errors import UserError

FORMATS = ("parquet", "csv", "tsv", "jsonl", "seq-txt", "pairs-txt", "recbole", "movielens")


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
    for suffix in COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return posixpath.splitext(name)[1]


@contextlib.contextmanager
def _reading(path: str):
    """Errors of unreadable input as one line naming the file (FileProblem)."""
    try:
        yield
    except EOFError as exc:
        raise FileProblem(f"cannot read {path}: its compressed data ends early, the file is truncated "
                          f"({exc})") from None
    except (OSError, zlib.error, lzma.LZMAError) as exc:  # also gzip's BadGzipFile, bz2's invalid data
        raise FileProblem(f"cannot read {path}: {exc}") from None


def _head_lines(fs: fsspec.AbstractFileSystem, path: str, count: int) -> list[str]:
    # Only to tell formats apart and compare headers: ids are decoded strictly by the readers.
    with _reading(path), fs.open(path, "rb", compression="infer") as handle:
        data = handle.read(1 << 16)
    lines = data.decode("utf-8", errors="replace").splitlines()
    return [line for line in lines[:count] if line.strip()]


def detect_format(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """Guess one file's format from its extension, then from its first lines; None for a file
    with no data to tell by (empty or blank)."""
    ext = _extension(path)
    if ext in (".parquet", ".pq", ".parq"):
        return "parquet"
    if ext in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if ext == ".tsv":
        return "tsv"
    if ext == ".inter":
        return "recbole"
    with _reading(path), fs.open(path, "rb") as handle:
        if handle.read(4) == b"PAR1":
            return "parquet"
    lines = _head_lines(fs, path, 200)
    if not lines:
        return None
    if ext == ".csv":
        header = [c.strip() for c in lines[0].split(",")]
        return "movielens" if header == MOVIELENS_CSV_HEADER else "csv"
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
    """`fmt`, or the format every file agrees on when `fmt` is 'auto' (empty files have no say)."""
    if fmt != "auto":
        return fmt
    detected = [(path, found) for path in files if (found := detect_format(fs, path)) is not None]
    if not detected:
        what = files[0] if len(files) == 1 else f"any of the {len(files)} input files ({files[0]}, ...)"
        raise UserError(f"cannot detect the format of {what}: no data to tell it by; pass --format")
    first_path, first = detected[0]
    for path, other in detected[1:]:
        if other != first:
            raise UserError(f"input files have different formats: {first_path} is {first}, {path} is {other}")
    return first


def iter_file(fs: fsspec.AbstractFileSystem, path: str, file_index: int, fmt: str, columns: ColumnMap,
              chunk_rows: int = 1 << 18, chunk_bytes: int = 16 << 20, row_groups: tuple[int, int] | None = None,
              byte_range: ByteRange | None = None, encoding: str = "utf-8") -> Iterator[tuple[pa.Table, pa.Table]]:
    """(events, quarantine) chunks of one input file in `fmt`, its text decoded as `encoding`;
    raises FileProblem for unusable files.
    So that one large file can be parsed by several tasks, `row_groups` = (start, stop) reads only
    those row groups of a Parquet file (row numbers still count from the file's first row), and
    `byte_range` only the lines of one part of an uncompressed text file in `RANGE_FORMATS` (row
    numbers count from the part's first line; see `ByteRange`)."""
    if row_groups is not None and fmt != "parquet":
        raise ValueError(f"row_groups applies to Parquet files only, not {fmt!r}")
    if byte_range is not None and not splittable_text(path, fmt):
        raise ValueError(f"byte_range applies to uncompressed {', '.join(RANGE_FORMATS)} files, not {path} ({fmt})")
    with _reading(path):
        if fmt == "parquet":
            yield from parquet_format.iter_parquet(fs, path, file_index, columns, chunk_rows, row_groups)
        elif fmt in ("csv", "tsv", "recbole") or (fmt == "movielens" and _extension(path) == ".csv"):
            yield from iter_delimited(fs, path, file_index, columns, chunk_bytes, fmt, byte_range, encoding)
        elif fmt in ("pairs-txt", "movielens"):
            yield from iter_split_lines(fs, path, file_index, chunk_bytes, fmt, byte_range, encoding)
        elif fmt == "seq-txt":
            yield from iter_seq_txt(fs, path, file_index, chunk_bytes, byte_range, encoding)
        elif fmt == "jsonl":
            yield from iter_jsonl(fs, path, file_index, columns, chunk_bytes, byte_range, encoding)
        else:
            raise UserError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")


def file_schema(fs: fsspec.AbstractFileSystem, path: str, fmt: str) -> str | None:
    """A signature of the file's columns and types, to spot files whose schema differs; None if schemaless."""
    if fmt == "parquet":
        return parquet_format.schema_signature(fs, path)
    if fmt in ("csv", "tsv", "recbole") or (fmt == "movielens" and _extension(path) == ".csv"):
        lines = _head_lines(fs, path, 1)
        return lines[0].strip() if lines else None
    return None


def row_group_rows(fs: fsspec.AbstractFileSystem, path: str, fmt: str) -> list[int] | None:
    """Rows of each row group when the file's metadata says (Parquet footers); None for text formats."""
    return parquet_format.row_group_sizes(fs, path) if fmt == "parquet" else None


def read_file(fs: fsspec.AbstractFileSystem, path: str, fmt: str, columns: ColumnMap | None = None,
              file_index: int = 0, encoding: str = "utf-8") -> tuple[pa.Table, pa.Table]:
    """A whole file as one (events, quarantine) pair: for tests and small inputs."""
    chunks = list(iter_file(fs, path, file_index, fmt, columns or ColumnMap(), encoding=encoding))
    events = pa.concat_tables([EVENTS_SCHEMA.empty_table()] + [c[0] for c in chunks])
    bad = pa.concat_tables([QUARANTINE_SCHEMA.empty_table()] + [c[1] for c in chunks])
    return events, bad
