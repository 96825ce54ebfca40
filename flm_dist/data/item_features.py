"""Item side information for `flm prepare`: read an item-features input, join it to the item
vocabulary by ORIGINAL id, build the attribute vocabulary and keep known cold items.

Formats (`item_features.format`; `auto` by extension, then by content):
  item2attributes  S3-Rec's JSON object `{item id: [attribute ids]}`: one field, named
                   `item_features.field`
  recbole          a RecBole atomic `.item` file: tab-separated, header `name:type`; `token`
                   columns are categorical, `token_seq` columns multi-valued (space-separated)
  csv, tsv         a header row; the item column, categorical columns, and multi-valued columns
                   split on `item_features.separator`
  parquet          the item column, categorical columns, multi-valued columns (list columns, or
                   strings split on the separator)
Which columns become fields is `item_features.categorical` and `item_features.multi`; with both
empty every column but the item's is used (RecBole: the token and token_seq ones). Several rows
of one item are merged (a long table `item, attribute` works as well as one row per item).

The features are read on the driver (an item catalogue is small next to the log) with the same
filesystems as the logs (fsspec: local, s3://, gs://, memory://) and the same quarantine rules: a
row that cannot be used is written to DIR/quarantine/ with file, row, column and reason
(`malformed`: wrong number of fields or not a list; `null_id`: no item id; `bad_id`: an item id
that is not an integer where one is required; `bad_value`: an attribute that is not a scalar),
or, with `strict`, stops the run naming its file, row and column. An empty value is not an
error: the item just lacks that attribute.

Output, beside the item vocabulary (so a run directory's copy of vocab/ carries it):
  DIR/vocab/attributes.parquet       index:int32 (1..A; 0 = padding), field:string, value:string,
                                     items:int64 (items having it)
  DIR/vocab/item_attributes.parquet  index:int32, item_id:string, attributes:list<int32> (sorted)
An item keeps its vocabulary index 1..N. An item with features but no kept interaction (never
seen in the log, or filtered out by the k-core) is a known cold item with an index N+1..N+C,
ordered by id: no split, batch or evaluation ever holds an index above N, so training and
evaluation of the interacted items are unchanged, while the model can score cold items from
their features (flm_dist/models/attributes.py). The manifest's `features` section counts all of
this, and `vocab_hash` gains `attributes` and `item_attributes`, so a checkpoint refuses data
whose features differ.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flm_dist.config import require
from flm_dist.data import storage
from flm_dist.data.cold_items import held_out_indices
from flm_dist.data.events import QUARANTINE_SCHEMA, FileProblem, quarantine_rows
from flm_dist.data.readers import list_input
from flm_dist.data.vocabularies import _id_order, table_hash
from flm_dist.errors import UserError

log = logging.getLogger("flm_dist")

FORMATS = ("item2attributes", "recbole", "csv", "tsv", "parquet")
ATTRIBUTES_SCHEMA = pa.schema([("index", pa.int32()), ("field", pa.string()), ("value", pa.string()),
                               ("items", pa.int64())])
ITEM_ATTRIBUTES_SCHEMA = pa.schema([("index", pa.int32()), ("item_id", pa.string()),
                                    ("attributes", pa.list_(pa.int32()))])
PAIRS_SCHEMA = pa.schema([("item_id", pa.string()), ("field", pa.string()), ("value", pa.string())])
FEATURE_REASONS = ("malformed", "null_id", "bad_id", "bad_value")
_RAW_CHARS = 500


@dataclass
class ItemFeaturesConfig:
    """Optional item side information: where it is, its format and which columns are fields."""

    uri: str = ""
    """Item-features file or directory (local path or fsspec URI); empty: no side information."""
    format: Literal["auto", "item2attributes", "recbole", "csv", "tsv", "parquet"] = "auto"
    """auto: .json is item2attributes, .item recbole, .csv/.tsv/.parquet by name, else by content."""
    item: str = "item_id"
    """Item id column of the tabular formats (RecBole: the name before `:token`)."""
    categorical: list[str] = field(default_factory=list)
    """Single-valued columns (each value one attribute of its field). With `multi` also empty,
    every column but the item's is used."""
    multi: list[str] = field(default_factory=list)
    """Multi-valued columns: list columns, or text split on `separator` (RecBole token_seq: on
    spaces)."""
    separator: str = "|"
    """Separator of multi-valued text columns in csv, tsv and Parquet string columns."""
    field: str = "attribute"
    """Field name of the item2attributes format's attribute ids."""

    def __post_init__(self):
        require(bool(self.item), "item", "must name a column")
        require(bool(self.separator), "separator", "must not be empty")
        require(bool(self.field), "field", "must not be empty")
        named = [*self.categorical, *self.multi]
        require(len(set(named)) == len(named), "categorical", f"columns must be named once, got {named}")
        require(self.item not in named, "categorical", f"'{self.item}' is the item column")


class FeatureRows(NamedTuple):
    """What the reader kept of the input: one (item_id, field, value) per attribute of a row."""
    pairs: pa.Table
    bad: pa.Table
    rows: int
    files: list[str]
    format: str


# ---- reading -------------------------------------------------------------------------------


def detect_format(fs, path: str) -> str:
    name = posixpath.basename(path).lower()
    for suffix in (".gz", ".bz2", ".zst", ".xz"):
        name = name[: -len(suffix)] if name.endswith(suffix) else name
    ext = posixpath.splitext(name)[1]
    by_extension = {".json": "item2attributes", ".item": "recbole", ".csv": "csv", ".tsv": "tsv",
                    ".parquet": "parquet", ".pq": "parquet"}
    if ext in by_extension:
        return by_extension[ext]
    with fs.open(path, "rb") as handle:
        head = handle.read(1 << 12)
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.lstrip().startswith(b"{"):
        return "item2attributes"
    first = head.split(b"\n", 1)[0].decode("utf-8", errors="replace")
    if ":token" in first:
        return "recbole"
    raise UserError(f"cannot detect the format of item features {path}; set item_features.format "
                    f"(one of {', '.join(FORMATS)})")


class _Rows:
    """Collects kept attributes and quarantined rows of one file."""

    def __init__(self, path: str):
        self.path = path
        self.items: list[str] = []
        self.fields: list[str] = []
        self.values: list[str] = []
        self.bad: list[tuple[int, str, str, str]] = []
        self.rows = 0

    def add(self, item: str, attributes: list[tuple[str, str]]) -> None:
        for name, value in attributes:
            self.items.append(item)
            self.fields.append(name)
            self.values.append(value)

    def quarantine(self, row: int, column: str, reason: str, raw: str) -> None:
        self.bad.append((row, column, reason, raw[:_RAW_CHARS]))

    def tables(self) -> tuple[pa.Table, pa.Table]:
        pairs = pa.table({"item_id": pa.array(self.items, pa.string()), "field": pa.array(self.fields, pa.string()),
                          "value": pa.array(self.values, pa.string())}, schema=PAIRS_SCHEMA)
        rows, columns, reasons, raws = zip(*self.bad) if self.bad else ((), (), (), ())
        return pairs, quarantine_rows(self.path, list(rows), list(columns), list(reasons), list(raws))


def _scalar(value: Any) -> str | None:
    """An attribute value as text; None when it is not a scalar id (a list, a mapping, NaN)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else None
    if isinstance(value, str):
        return value.strip()
    return None


def _item_id(value: Any) -> tuple[str | None, str | None]:
    """(item id text, None) or (None, reason)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, "null_id"
    text = _scalar(value)
    return (text, None) if text else (None, "bad_id")


def _read_item2attributes(fs, path: str, cfg: ItemFeaturesConfig) -> _Rows:
    out = _Rows(path)
    try:
        with fs.open(path, "rb", compression="infer") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FileProblem(f"{path} is not an item2attributes JSON object: {exc}") from None
    if not isinstance(data, dict):
        raise FileProblem(f"{path}: an item2attributes file holds one JSON object {{item: [attribute ids]}}")
    for row, (key, values) in enumerate(data.items(), start=1):
        out.rows += 1
        raw = json.dumps({key: values}, default=str)
        item, reason = _item_id(key)
        if reason:
            out.quarantine(row, "item", reason, raw)
            continue
        if not isinstance(values, list):
            out.quarantine(row, cfg.field, "malformed", raw)
            continue
        texts = [_scalar(v) for v in values]
        if any(t is None for t in texts):
            out.quarantine(row, cfg.field, "bad_value", raw)
            continue
        out.add(item, [(cfg.field, t) for t in texts if t])
    return out


def _chosen(cfg: ItemFeaturesConfig, available: list[str], path: str, default: list[str],
            multi_default: set[str]) -> list[tuple[str, bool]]:
    """[(column, multi-valued)] of the fields to read."""
    for name in [cfg.item, *cfg.categorical, *cfg.multi]:
        if name not in available:
            raise FileProblem(f"{path}: column '{name}' not found (available columns: {', '.join(available)}); "
                              f"set item_features.item / categorical / multi")
    if not cfg.categorical and not cfg.multi:
        return [(name, name in multi_default) for name in default]
    return [(name, False) for name in cfg.categorical] + [(name, True) for name in cfg.multi]


def _split(text: str, separator: str) -> list[str]:
    return [part.strip() for part in text.split(separator) if part.strip()]


def _read_delimited(fs, path: str, cfg: ItemFeaturesConfig, fmt: str) -> _Rows:
    """RecBole `.item`, CSV or TSV: a header, then one item per line."""
    out = _Rows(path)
    delimiter = "," if fmt == "csv" else "\t"
    with fs.open(path, "rb", compression="infer") as handle:
        text = io.TextIOWrapper(handle, encoding="utf-8", errors="replace", newline="")
        reader = csv.reader(text, delimiter=delimiter, quoting=csv.QUOTE_NONE if fmt == "recbole" else csv.QUOTE_MINIMAL)
        header = next(reader, None)
        if not header:
            raise FileProblem(f"{path} is empty (no header row)")
        if fmt == "recbole":
            names = [h.split(":", 1)[0].strip() for h in header]
            kinds = {n: (h.split(":", 1)[1].strip() if ":" in h else "token") for n, h in zip(names, header)}
            default = [n for n in names if n != cfg.item and kinds[n] in ("token", "token_seq")]
            multi_default = {n for n in names if kinds[n] == "token_seq"}
        else:
            names = [h.strip() for h in header]
            default = [n for n in names if n != cfg.item]
            multi_default = set()
        chosen = _chosen(cfg, names, path, default, multi_default)
        if fmt == "recbole":
            bad_kinds = [n for n, _ in chosen if kinds[n] not in ("token", "token_seq")]
            if bad_kinds:
                raise FileProblem(f"{path}: column '{bad_kinds[0]}' is {kinds[bad_kinds[0]]}; only token and "
                                  f"token_seq columns can be attributes")
            chosen = [(n, kinds[n] == "token_seq") for n, _ in chosen]
        position = {n: i for i, n in enumerate(names)}
        separator = " " if fmt == "recbole" else cfg.separator
        for row, fields in enumerate(reader, start=2):  # line numbers of the file (header = 1)
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue
            out.rows += 1
            raw = delimiter.join(fields)
            if len(fields) != len(names):
                out.quarantine(row, "", "malformed", raw)
                continue
            item, reason = _item_id(fields[position[cfg.item]])
            if reason:
                out.quarantine(row, cfg.item, reason, raw)
                continue
            attributes = []
            for name, multi in chosen:
                value = fields[position[name]]
                attributes += [(name, v) for v in (_split(value, separator) if multi else [value.strip()]) if v]
            out.add(item, attributes)
    return out


def _read_parquet(fs, path: str, cfg: ItemFeaturesConfig) -> _Rows:
    out = _Rows(path)
    try:
        table = storage.read_parquet(fs, path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise FileProblem(f"cannot read {path} as Parquet: {exc}") from None
    names = table.column_names
    list_columns = {n for n in names if pa.types.is_list(table.schema.field(n).type)
                    or pa.types.is_large_list(table.schema.field(n).type)}
    chosen = _chosen(cfg, names, path, [n for n in names if n != cfg.item], list_columns)
    columns = {name: table.column(name).to_pylist() for name in [cfg.item] + [n for n, _ in chosen]}
    for row in range(table.num_rows):
        out.rows += 1
        item, reason = _item_id(columns[cfg.item][row])
        if reason:
            out.quarantine(row + 1, cfg.item, reason, json.dumps({k: v[row] for k, v in columns.items()}, default=str))
            continue
        attributes, bad = [], None
        for name, multi in chosen:
            value = columns[name][row]
            if value is None:
                continue
            if isinstance(value, list):
                texts = [_scalar(v) for v in value if v is not None]
            elif multi and isinstance(value, str):
                texts = _split(value, cfg.separator)
            else:
                texts = [_scalar(value)]
            if any(t is None for t in texts):
                bad = name
                break
            attributes += [(name, t) for t in texts if t]
        if bad:
            out.quarantine(row + 1, bad, "bad_value", json.dumps({k: v[row] for k, v in columns.items()}, default=str))
            continue
        out.add(item, attributes)
    return out


def read_features(cfg: ItemFeaturesConfig, strict: bool = False) -> FeatureRows:
    """Every attribute of every usable row of the features input, and the quarantined rows (or,
    with `strict`, a UserError naming the first bad row)."""
    fs, root = storage.url_to_fs(cfg.uri)
    files = list_input(fs, root)
    fmt = cfg.format if cfg.format != "auto" else detect_format(fs, files[0])
    pairs, bad, rows = [PAIRS_SCHEMA.empty_table()], [QUARANTINE_SCHEMA.empty_table()], 0
    for path in files:
        try:
            if fmt == "item2attributes":
                read = _read_item2attributes(fs, path, cfg)
            elif fmt == "parquet":
                read = _read_parquet(fs, path, cfg)
            else:
                read = _read_delimited(fs, path, cfg, fmt)
        except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
            raise FileProblem(f"cannot read item features {path}: {exc}") from None
        kept, quarantined = read.tables()
        if strict and quarantined.num_rows:
            first = quarantined.slice(0, 1).to_pylist()[0]
            column = f", column '{first['column']}'" if first["column"] else ""
            raise UserError(f"{path}, row {first['row']}{column}: {first['reason']} (raw: {first['raw']!r}); "
                            f"without strict=true bad rows are quarantined instead")
        pairs.append(kept)
        bad.append(quarantined)
        rows += read.rows
    return FeatureRows(pa.concat_tables(pairs), pa.concat_tables(bad), rows, files, fmt)


# ---- joining -------------------------------------------------------------------------------


def join_features(read: FeatureRows, items: pa.Table, fields: list[str]) -> tuple[pa.Table, pa.Table]:
    """(attributes, item_attributes) tables of the read features against the item vocabulary
    `items` (index 1..N, item_id); see the module docstring."""
    pairs = read.pairs.group_by(["item_id", "field", "value"], use_threads=False).aggregate([])
    vocab = items.sort_by("index")
    vocab_ids = vocab.column("item_id").combine_chunks()
    n_items = len(vocab_ids)
    feature_items = pc.unique(pairs.column("item_id").combine_chunks())
    known = pc.index_in(feature_items, value_set=vocab_ids)
    cold = feature_items.filter(pc.is_null(known))
    cold = cold.take(pa.array(_id_order(cold)))
    all_ids = pa.concat_arrays([vocab_ids, cold])
    position = pc.index_in(pairs.column("item_id"), value_set=all_ids).to_numpy().astype(np.int64)

    # Attributes: fields in the configured order, then by how many items have them, then by value.
    attribute = pairs.select(["field", "value"]).append_column("item", pa.array(position))
    counted = attribute.group_by(["field", "value"], use_threads=False).aggregate([("item", "count")])
    field_rank = pc.index_in(counted.column("field"), value_set=pa.array(fields, pa.string())).fill_null(len(fields))
    values = counted.column("value").combine_chunks()
    value_rank = np.empty(len(values), dtype=np.int64)
    value_rank[_id_order(values)] = np.arange(len(values))
    order = np.lexsort((value_rank, -counted.column("item_count").to_numpy(), field_rank.to_numpy()))
    counted = counted.take(pa.array(order))
    attributes = pa.Table.from_arrays([
        pa.array(np.arange(1, counted.num_rows + 1, dtype=np.int32)), counted.column("field").combine_chunks(),
        counted.column("value").combine_chunks(), counted.column("item_count").cast(pa.int64()).combine_chunks(),
    ], schema=ATTRIBUTES_SCHEMA)

    # Items: the attribute indices of each item with features, by item index.
    keys = pa.table({"field": attributes.column("field"), "value": attributes.column("value"),
                     "attribute": attributes.column("index")})
    joined = attribute.join(keys, ["field", "value"], use_threads=False)
    item = joined.column("item").to_numpy()
    attribute_index = joined.column("attribute").to_numpy()
    order = np.lexsort((attribute_index, item))
    item, attribute_index = item[order], attribute_index[order]
    starts = np.flatnonzero(np.r_[True, item[1:] != item[:-1]]) if len(item) else np.zeros(0, np.int64)
    offsets = np.r_[starts, len(item)].astype(np.int32)
    item_attributes = pa.Table.from_arrays([
        pa.array((item[starts] + 1).astype(np.int32)), all_ids.take(pa.array(item[starts])),
        pa.ListArray.from_arrays(pa.array(offsets), pa.array(attribute_index.astype(np.int32))),
    ], schema=ITEM_ATTRIBUTES_SCHEMA)
    log.info("prepare: item features: %d attributes, %d of %d items with features, %d cold items",
             attributes.num_rows, int((item[starts] < n_items).sum()) if len(starts) else 0, n_items, len(cold))
    return attributes, item_attributes


def features_hash(attributes: pa.Table, item_attributes: pa.Table) -> dict[str, str]:
    """The entries features add to `vocab_hash` (also recomputed from a run's vocab/)."""
    lists = item_attributes.column("attributes").combine_chunks()
    flat = pa.table({"index": item_attributes.column("index"), "item_id": item_attributes.column("item_id"),
                     "length": pc.list_value_length(lists)})
    digest = hashlib.sha256((table_hash(flat) + table_hash(pa.table({"a": lists.flatten()}))).encode())
    return {"attributes": table_hash(attributes), "item_attributes": digest.hexdigest()}


def fingerprint(cfg: ItemFeaturesConfig, log_fingerprint: str) -> str:
    """The input fingerprint of a run: the log's alone without features, else the log's and the
    features files' (paths, sizes, contents, as the log's) together."""
    if not cfg.uri:
        return log_fingerprint
    fs, root = storage.url_to_fs(cfg.uri)
    digest = hashlib.sha256(log_fingerprint.encode())
    for path in list_input(fs, root):
        info = fs.info(path)
        digest.update(f"{path}\0{info.get('size')}\0{storage.content_id(fs, path, info)}\n".encode())
    return digest.hexdigest()


def attach(cfg: ItemFeaturesConfig, strict: bool, fs, tmp: str, work: str, items: pa.Table) -> dict[str, Any] | None:
    """Read the features of `cfg` (None when `cfg.uri` is empty), write vocab/attributes.parquet
    and vocab/item_attributes.parquet under `tmp` and the quarantined rows under `work` (merged
    into DIR/quarantine/ with the log's); returns the manifest's `features` section."""
    if not cfg.uri:
        return None
    read = read_features(cfg, strict)
    fields = list(dict.fromkeys([cfg.field] if read.format == "item2attributes" else
                                [*cfg.categorical, *cfg.multi] or read.pairs.column("field").unique().to_pylist()))
    attributes, item_attributes = join_features(read, items, fields)
    storage.write_parquet(fs, storage.join(tmp, "vocab", "attributes.parquet"), attributes)
    storage.write_parquet(fs, storage.join(tmp, "vocab", "item_attributes.parquet"), item_attributes)
    if read.bad.num_rows:
        storage.write_parquet(fs, storage.join(work, "quarantine", "item-features.parquet"), read.bad, work=True)
    n_items = items.num_rows
    index = item_attributes.column("index").to_numpy()
    lists = item_attributes.column("attributes").combine_chunks()
    per_item = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
    names = attributes.column("field").to_pylist()
    field_names = list(dict.fromkeys(names))
    field_of = np.r_[-1, [field_names.index(n) for n in names]].astype(np.int64)  # by attribute index
    owner = np.repeat(np.arange(len(index)), per_item)
    pairs = np.unique(owner * len(field_names) + field_of[lists.flatten().to_numpy(zero_copy_only=False)])
    items_per_field = np.bincount(pairs % max(1, len(field_names)), minlength=len(field_names))
    attributes_per_field = np.bincount(field_of[1:], minlength=len(field_names))
    reasons = Counter({reason: 0 for reason in FEATURE_REASONS})
    reasons.update(read.bad.column("reason").to_pylist())
    with_features = int((index <= n_items).sum())
    return {
        "uri": cfg.uri, "format": read.format, "files": len(read.files), "input_rows": read.rows,
        "quarantined_rows": read.bad.num_rows, "quarantined": dict(sorted(reasons.items())),
        "attributes": attributes.num_rows,
        "fields": {name: {"attributes": int(attributes_per_field[f]), "items": int(items_per_field[f])}
                   for f, name in enumerate(field_names)},
        "items_with_features": with_features, "items_without_features": n_items - with_features,
        "cold_items": int((index > n_items).sum()),
        "features_per_item": {"mean": round(float(per_item.mean()), 4) if len(per_item) else 0.0,
                              "min": int(per_item.min()) if len(per_item) else 0,
                              "max": int(per_item.max()) if len(per_item) else 0},
        "hash": features_hash(attributes, item_attributes),
    }


def extend_manifest(manifest: dict[str, Any], section: dict[str, Any] | None) -> dict[str, Any]:
    """`manifest` with the `features` section and its vocab hashes (unchanged without features)."""
    if section is not None:
        manifest["features"] = {k: v for k, v in section.items() if k != "hash"}
        manifest["vocab_hash"] = {**manifest["vocab_hash"], **section["hash"]}
    return manifest


# ---- reading the prepared features back ------------------------------------------------------


def has_features(vocab_dir: str | Path) -> bool:
    return (Path(vocab_dir) / "item_attributes.parquet").is_file()


def vocabulary_features_hash(vocab_dir: str | Path) -> dict[str, str]:
    """`features_hash` of a vocab directory; empty when it holds no features."""
    if not has_features(vocab_dir):
        return {}
    return features_hash(pq.read_table(Path(vocab_dir) / "attributes.parquet"),
                         pq.read_table(Path(vocab_dir) / "item_attributes.parquet"))


class ItemAttributeArrays(NamedTuple):
    """A prepared data directory's features as arrays, for the model."""
    matrix: np.ndarray
    """[N + 1 + C, K] int64 attribute indices per item (0 = none), row 0 padding."""
    num_attributes: int
    num_items: int
    """N: items with interactions (indices 1..N)."""
    cold_ids: list[str]
    """Original ids of the cold items N+1..N+C."""
    held_out: np.ndarray = np.zeros(0, dtype=np.int64)
    """Indices (1..N) of the items held out as cold (data/cold_items.py): scored like cold items."""


def load_item_attributes(data_dir: str | Path, num_items: int) -> ItemAttributeArrays | None:
    """The features of `data_dir` (None when it was prepared without), `num_items` = N."""
    vocab = Path(data_dir) / "vocab"
    if not has_features(vocab):
        return None
    table = pq.read_table(vocab / "item_attributes.parquet")
    num_attributes = pq.read_metadata(vocab / "attributes.parquet").num_rows
    index = table.column("index").to_numpy().astype(np.int64)
    lists = table.column("attributes").combine_chunks()
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    cold = index > num_items
    rows = num_items + 1 + int(cold.sum())
    matrix = np.zeros((rows, max(1, int(lengths.max()) if len(lengths) else 1)), dtype=np.int64)
    flat = lists.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    starts = np.r_[0, np.cumsum(lengths)[:-1]] if len(lengths) else lengths
    column = np.arange(len(flat)) - np.repeat(starts, lengths)
    matrix[np.repeat(index, lengths), column] = flat
    cold_ids = [str(v) for v in table.filter(pa.array(cold)).sort_by("index").column("item_id").to_pylist()]
    return ItemAttributeArrays(matrix, int(num_attributes), num_items, cold_ids, held_out_indices(data_dir))


def cold_item_ids(data_dir: str | Path, num_items: int) -> list[str]:
    """Original ids of the known cold items (indices N+1.., in order); empty without features."""
    vocab = Path(data_dir) / "vocab"
    if not has_features(vocab):
        return []
    table = pq.read_table(vocab / "item_attributes.parquet", columns=["index", "item_id"]).sort_by("index")
    index = table.column("index").to_numpy()
    return [str(v) for v in table.column("item_id").to_pylist()[int(np.searchsorted(index, num_items, "right")):]]
