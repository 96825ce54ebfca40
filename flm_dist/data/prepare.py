"""`flm prepare`: interaction log -> vocabularies, per-user sequences, train/valid/test splits.

Pipeline (each stage maps a function over groups of files or buckets, stage_runner.py; data moves
between stages as Parquet under a temporary work directory, never through the driver):

  1-2. ingest.py: check the files' schemas, then parse them into events bucketed by user (every
       user lives in exactly one bucket) and quarantine bad rows.
  3-5. vocabularies.py: per-bucket dedup, k-core filtering, item and user vocabularies.
  6.   splits.py: per bucket, chronological sequences -> split -> fixed sampled negatives
       (negatives.py) -> shards.

Why Ray tasks over groups rather than Ray Data over rows: every stage is "run a function per group
of files or buckets with pyarrow, write Parquet, return small statistics" (counts, vocab pieces),
and the k-core loop runs one such pass per iteration. Per-user work on Ray Data rows (groupby,
map_groups) measured 6-25x slower than hash buckets handled by pyarrow (RAY_NOTES.md). Where the
filesystem is process-local (memory://) the same functions run in-process.

Output contract (read by training and evaluation; keep names and dtypes):
  DIR/manifest.json                 written last; its presence means the directory is complete
  DIR/vocab/items.parquet           index:int32 (1..N, 0 = padding), item_id:string, count:int64
  DIR/vocab/users.parquet           index:int32 (0..U-1), user_id:string
  DIR/train/part-NNNNN.parquet      user:int32, items:list<int32>, timestamps:list<int64>
  DIR/valid/part-NNNNN.parquet      user:int32, history:list<int32>, target:int32, negatives:list<int32>
  DIR/test/part-NNNNN.parquet       same as valid
  DIR/quarantine/part-NNNNN.parquet file, row, column, reason, raw (only when rows were quarantined)
  DIR/vocab/attributes.parquet, DIR/vocab/item_attributes.parquet   with `item_features.uri` only:
                                    the attribute vocabulary and each item's attributes, cold
                                    items (features, no interactions) at indices N+1.. (item_features.py)
DIR/vocab/cold_items.parquet      with `cold_items.fraction` only: the items held out as cold, whose
                                    events leave train and every history; valid/test gain a bool
                                    column `cold` (cold_items.py)
One train/valid/test shard per user bucket, rows sorted by user. Everything is written under a
sibling DIR.tmp-<random> (work files under its _work/, so on a cluster the output must be storage
every node can reach) and published by storage.publish; a failed run removes it and leaves DIR as
it was (a killed one may leave the DIR.tmp-* sibling behind, never a DIR/manifest.json).
The split rules (leave-one-out, temporal cut-offs) and the negatives are described in splits.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import fsspec

from flm_dist import __version__
from flm_dist.config import require, to_dict
from flm_dist.data import cold_items, ingest, item_features, splits, storage, vocabularies
from flm_dist.data.cold_items import ColdItemsConfig
from flm_dist.data.events import ROW_REASONS, ColumnMap
from flm_dist.data.item_features import ItemFeaturesConfig
from flm_dist.data.negatives import draw_negatives
from flm_dist.data.pseudonyms import (
    PrivacyConfig,
    Pseudonymizer,
    load_pseudonymizer,
    manifest_section,
    with_key_fingerprint,
)
from flm_dist.data.readers import list_input, resolve_format
from flm_dist.data.stage_runner import StageRunner, groups
from flm_dist.errors import UserError

# What the CLI, the job files (cli/jobs.py) and the prepare benchmark import from this module.
__all__ = ["PrepareConfig", "draw_negatives", "prepare_timed", "run_prepare"]

log = logging.getLogger("flm_dist")

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
DROP_REASONS = ROW_REASONS + ("duplicate", "kcore_user", "kcore_item")


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
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    """Pseudonymous user ids: `privacy.pseudonymize_users=true` with a key from `privacy.key_env`
    or `privacy.key_file` (data/pseudonyms.py, docs/guide/privacy.md)."""
    encoding: str = "utf-8"
    """Text encoding of the text formats (any ASCII-compatible Python codec, e.g. latin-1,
    cp1252). Decoding is strict: a row that does not decode is quarantined as `bad_encoding`."""
    workers: int = 0
    """Ray tasks at once per stage; 0 = the cluster's CPU count. Does not change the output."""
    item_features: ItemFeaturesConfig = field(default_factory=ItemFeaturesConfig)
    """Optional item side information (`item_features.uri`, also `--item-features`), joined to
    the item vocabulary by original id (see data/item_features.py)."""
    cold_items: ColdItemsConfig = field(default_factory=ColdItemsConfig)
    """Hold out a seeded share of the items with features as cold (`cold_items.fraction`,
    `cold_items.seed`): their events leave the training split and every history, they stay
    targets in valid and test (data/cold_items.py). Needs `item_features.uri`."""

    def __post_init__(self):
        require(bool(self.input), "input", "is required (a file, directory or URI)")
        require(bool(self.output), "output", "is required (a directory or URI)")
        for key in ("min_user_interactions", "min_item_interactions"):
            value = getattr(self, key)
            require(value is None or value >= 0, key, "must be >= 0 (0 turns the filter off)")
        require(self.num_negatives >= 0, "num_negatives", "must be >= 0")
        require(self.buckets >= 0, "buckets", "must be >= 0 (0 = auto)")
        require(self.workers >= 0, "workers", "must be >= 0 (0 = auto)")
        require(self.cold_items.fraction == 0 or bool(self.item_features.uri), "cold_items.fraction",
                "needs item features (--item-features URI): only items with features can be held out as cold")
        require(_ascii_compatible(self.encoding), "encoding",
                f"must name an ASCII-compatible text encoding (utf-8, latin-1, cp1252, ...), got {self.encoding!r}")
        if self.split == "temporal":
            require(self.valid_cutoff is not None, "valid_cutoff", "is required for split=temporal")
            require(self.test_cutoff is not None, "test_cutoff", "is required for split=temporal")
            if splits.is_quantile(self.valid_cutoff) == splits.is_quantile(self.test_cutoff):
                require(self.valid_cutoff <= self.test_cutoff, "valid_cutoff", "must not be after test_cutoff")


def _ascii_compatible(encoding: str) -> bool:
    """Whether `encoding` decodes ASCII bytes as ASCII: lines are cut at b"\\n" and delimiters
    found as bytes before decoding (UTF-16, for one, does neither)."""
    ascii_bytes = bytes(range(128))
    try:
        return ascii_bytes.decode(encoding) == ascii_bytes.decode("ascii")
    except (LookupError, UnicodeError):
        return False


def resolve(config: PrepareConfig, fmt: str) -> PrepareConfig:
    """`config` with the detected format and the k-core defaults filled in (stored in the manifest)."""
    default_k = 0 if fmt == "seq-txt" else 5
    return dataclasses.replace(
        config, format=fmt,
        min_user_interactions=default_k if config.min_user_interactions is None else config.min_user_interactions,
        min_item_interactions=default_k if config.min_item_interactions is None else config.min_item_interactions)


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

    storage.check_output_path(config.output, [config.input])
    pseudonymizer = load_pseudonymizer(config.privacy)  # a missing or short key stops here
    fs_in, in_root = storage.url_to_fs(config.input)
    files = list_input(fs_in, in_root)
    infos = {p: fs_in.info(p) for p in files}
    fmt = resolve_format(fs_in, files, config.format)
    cfg = resolve(config, fmt)
    fingerprint, listing = _fingerprint(fs_in, infos)
    fingerprint = item_features.fingerprint(cfg.item_features, fingerprint)
    fingerprint = with_key_fingerprint(pseudonymizer, fingerprint)
    digest = hashlib.sha256(json.dumps(_stored_config(cfg), sort_keys=True).encode()).hexdigest()[:16]
    fs, out = storage.url_to_fs(cfg.output)
    out = out.rstrip("/")
    existing = storage.read_json(fs, storage.join(out, MANIFEST))
    if existing and (existing.get("config_hash"), existing.get("input", {}).get("fingerprint")) == (digest, fingerprint):
        log.info("prepare: %s is up to date: same config, and the same %d input file(s) by path, size and "
                 "content (%s)", cfg.output, len(files), _compared(listing))
        return existing, {"total": time.perf_counter() - started}
    if existing:
        changed = "config" if existing.get("config_hash") != digest else "input (a path, size or content)"
        log.info("prepare: replacing %s: its %s changed (compared by %s)", cfg.output, changed, _compared(listing))
    storage.check_replaceable(fs, out, MANIFEST)
    input_bytes = sum(int(i.get("size") or 0) for i in infos.values())
    lap("list")
    local = "memory" in _protocols(fs_in) or "memory" in _protocols(fs)
    runner = StageRunner(local, cfg.workers)
    log.info("prepare: %d %s file(s), %.1f MB, %s", len(files), fmt, input_bytes / 1e6,
             "in-process (memory filesystem)" if local else f"Ray tasks, {runner.workers} at once")
    lap("ray")

    tmp = storage.staging_dir(fs, out)
    work = storage.join(tmp, "_work")
    try:
        sizes = [int(infos[p].get("size") or 0) for p in files]
        manifest = _run(cfg, runner, fs_in, files, sizes, fmt, fs, tmp, work, cfg.buckets, lap, pseudonymizer)
        manifest.update({"config": _stored_config(cfg), "config_hash": digest,
                         "input": {"uri": cfg.input, "fingerprint": fingerprint, "files": listing,
                                   "bytes": input_bytes}})
        if pseudonymizer is not None:
            manifest["privacy"] = manifest_section(pseudonymizer)
            log.info("prepare: user ids are pseudonyms (HMAC-SHA256, key fingerprint %s)", pseudonymizer.fingerprint)
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


def _run(cfg: PrepareConfig, runner: StageRunner, fs_in, files: list[str], sizes: list[int], fmt: str, fs,
         tmp: str, work: str, buckets: int, lap: Callable[[str], None],
         pseudonymizer: Pseudonymizer | None = None) -> dict[str, Any]:
    row_groups = ingest.read_schemas(runner, fs_in, files, fmt)
    if not buckets:
        buckets = ingest.auto_buckets(row_groups, sizes)
    log.info("prepare: %d bucket(s) of users", buckets)
    lap("schemas")

    parsed = ingest.parse(runner, fs_in, files, sizes, row_groups, fmt, cfg.columns, cfg.strict, fs, work, buckets,
                          cfg.encoding, pseudonyms=pseudonymizer)
    dropped = Counter({reason: 0 for reason in DROP_REASONS})
    dropped.update(parsed.reasons)
    lap("parse")

    bucket_groups = groups(buckets, runner.workers * 4)
    counted = vocabularies.dedup(runner, fs, work, bucket_groups)
    dropped["duplicate"] = counted.duplicates
    lap("dedup")
    if len(counted.items) == 0:
        raise UserError(f"no usable interactions in {cfg.input}: {parsed.rows} rows read, "
                        f"dropped: {_nonzero(dropped)}")

    kept = vocabularies.kcore(runner, fs, work, bucket_groups, counted, cfg.min_user_interactions,
                              cfg.min_item_interactions)
    dropped["kcore_item"], dropped["kcore_user"] = kept.dropped_items, kept.dropped_users
    lap("k-core")

    items, users = vocabularies.write_vocabularies(fs, tmp, counted.items, kept)
    interactions = int(items.column("count").to_numpy().sum())
    if interactions == 0:
        raise UserError(f"k-core filtering ({cfg.min_user_interactions}/{cfg.min_item_interactions}) "
                        f"left no interactions; lower min_user_interactions/min_item_interactions")
    lap("vocab")
    features = item_features.attach(cfg.item_features, cfg.strict, fs, tmp, work, items)
    held_out = None
    if cfg.cold_items.fraction:
        item_attributes = storage.read_parquet(fs, storage.join(tmp, "vocab", "item_attributes.parquet"))
        held_out = cold_items.choose(cfg.cold_items, items, item_attributes)
        cold_items.write(fs, tmp, held_out)

    split_section = splits.build(runner, fs, work, tmp, bucket_groups, items, users, cfg.split,
                                 (cfg.valid_cutoff, cfg.test_cutoff), cfg.num_negatives, cfg.seed, counted.t_min,
                                 counted.t_max, interactions, cold_items.mask(held_out, items.num_rows))
    ingest.merge_quarantine(fs, work, tmp, files, parsed.line_numbers)
    lap("build")

    if parsed.rows != interactions + sum(dropped.values()):
        raise RuntimeError(f"row accounting is off: {parsed.rows} read, {interactions} kept, dropped {dict(dropped)}")
    manifest = item_features.extend_manifest({
        "schema_version": SCHEMA_VERSION, "created_by": f"flm_dist {__version__}",
        "users": users.num_rows, "items": items.num_rows, "interactions": interactions, "input_rows": parsed.rows,
        "dropped": dict(sorted(dropped.items())), "empty_files": parsed.empty_files, "buckets": buckets,
        "kcore": {"min_user_interactions": cfg.min_user_interactions,
                  "min_item_interactions": cfg.min_item_interactions, "iterations": kept.iterations},
        "splits": split_section, "num_negatives": cfg.num_negatives,
        "vocab_hash": {"items": vocabularies.table_hash(items), "users": vocabularies.table_hash(users)},
    }, features)
    if held_out is not None:
        manifest["cold_holdout"] = cold_items.manifest_section(cfg.cold_items, held_out, items,
                                                             features["items_with_features"], split_section.pop("cold"))
        manifest["vocab_hash"]["cold_items"] = vocabularies.table_hash(held_out)
    return manifest


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def _rel(path: str, root: str) -> list[str]:
    return path[len(root.rstrip("/")) + 1:].split("/")


def _stored_config(cfg: PrepareConfig) -> dict[str, Any]:
    """The resolved config as stored: without `output` (the manifest lives there) and `workers`."""
    stored = to_dict(cfg)
    del stored["output"], stored["workers"]
    if not cfg.privacy.pseudonymize_users:  # so a run without pseudonyms keeps its config hash
        del stored["privacy"]
    if not cfg.item_features.uri:  # so a run without features keeps its config hash
        del stored["item_features"]
    if not cfg.cold_items.fraction:  # so a run without a hold-out keeps its config hash
        del stored["cold_items"]
    return stored


def _fingerprint(fs: fsspec.AbstractFileSystem, infos: dict[str, dict]) -> tuple[str, list[dict[str, Any]]]:
    """(hash of paths + sizes + contents, the listing recorded in the manifest). Content, not
    modification times: `cp -p` and `rsync -t` put an old time back on an edited file."""
    listing, digest = [], hashlib.sha256()
    for path in sorted(infos):
        size, content = infos[path].get("size"), storage.content_id(fs, path, infos[path])
        digest.update(f"{path}\0{size}\0{content}\n".encode())
        listing.append({"path": path, "size": size, "content": content})
    return digest.hexdigest(), listing


def _compared(listing: list[dict[str, Any]]) -> str:
    kinds = sorted({entry["content"].split(":", 1)[0] for entry in listing})
    return " and ".join("SHA-256 of the bytes" if kind == "sha256" else f"the store's {kind}" for kind in kinds)


def _nonzero(counter: Counter) -> dict[str, int]:
    return {k: v for k, v in sorted(counter.items()) if v}


def _summary(manifest: dict[str, Any], timings: dict[str, float]) -> None:
    total = timings["total"]
    lines = [
        ("users", f"{manifest['users']:,}"), ("items", f"{manifest['items']:,}"),
        ("interactions", f"{manifest['interactions']:,}"), ("input rows", f"{manifest['input_rows']:,}"),
    ]
    lines += [(f"dropped: {k}", f"{v:,}") for k, v in manifest["dropped"].items() if v]
    lines += [(f"{s} rows", f"{manifest['splits'][s]['rows']:,}") for s in ("train", "valid", "test")]
    if "features" in manifest:
        lines += [(f"features: {k.replace('_', ' ')}", f"{manifest['features'][k]:,}")
                  for k in ("attributes", "items_with_features", "cold_items", "quarantined_rows")]
    if "cold_holdout" in manifest:
        lines += [("held out as cold: items", f"{manifest['cold_holdout']['items']:,}"),
                  ("held out as cold: interactions", f"{manifest['cold_holdout']['interactions']:,}")]
    lines += [("time", f"{total:.1f} s"), ("rows/s", f"{manifest['input_rows'] / max(total, 1e-9):,.0f}")]
    width = max(len(k) for k, _ in lines)
    log.info("prepare summary:\n%s", "\n".join(f"  {k:<{width}}  {v:>14}" for k, v in lines))
