"""The Parquet reader: column mapping, Hive partition columns, runs of row groups. A zero-byte
file (as some writers leave for an empty partition) has no rows and no schema, instead of being
unreadable."""

from __future__ import annotations

from collections.abc import Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flm_dist.data.events import ColumnMap, FileProblem, Raw, missing_column, normalise, row_repr


def _hive_values(path: str) -> dict[str, str]:
    """Partition columns encoded in a Hive-style path (`.../country=fr/part.parquet`)."""
    parts = [p.split("=", 1) for p in path.split("/")[:-1] if "=" in p]
    return {k: v for k, v in parts}


def iter_parquet(fs, path, file_index, columns: ColumnMap, chunk_rows,
                  row_groups: tuple[int, int] | None) -> Iterator[tuple[pa.Table, pa.Table]]:
    with fs.open(path, "rb") as handle:
        if _zero_bytes(handle):
            return
        try:
            pfile = pq.ParquetFile(handle)
        except (pa.ArrowInvalid, OSError) as exc:
            raise FileProblem(f"{path}: not a readable Parquet file ({exc})") from None
        names = pfile.schema_arrow.names
        hive = _hive_values(path)
        mapping = columns.mapped()
        for name in mapping.values():
            if name not in names and name not in hive:
                raise missing_column(path, name, names + sorted(hive))
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
            raw = Raw(cols, rows, np.zeros(n, dtype=np.int32), row_repr(table), names=mapping)
            yield normalise(raw, file_index, path)


def _zero_bytes(handle) -> bool:
    return getattr(handle, "size", None) == 0


def schema_signature(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """The file's columns and types, from its footer; None for a zero-byte file."""
    with fs.open(path, "rb") as handle:
        if _zero_bytes(handle):
            return None
        try:
            schema = pq.read_schema(handle)
        except (pa.ArrowInvalid, OSError) as exc:
            raise FileProblem(f"{path}: not a readable Parquet file ({exc})") from None
    return ", ".join(f"{f.name}: {f.type}" for f in schema)


def row_group_sizes(fs: fsspec.AbstractFileSystem, path: str) -> list[int]:
    """Rows of each row group, from the file's footer."""
    with fs.open(path, "rb") as handle:
        if _zero_bytes(handle):
            return []
        try:
            metadata = pq.read_metadata(handle)
        except (pa.ArrowInvalid, OSError) as exc:
            raise FileProblem(f"{path}: not a readable Parquet file ({exc})") from None
    return [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
