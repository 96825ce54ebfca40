"""Cold-item hold-out for `flm prepare` (`cold_items.fraction`, with item features only): a seeded
share of the items that have features is treated as if no one had interacted with them yet, so
recommending new items can be measured on items whose real interactions are known.

Which items: among the items with interactions (indices 1..N) that have features, the
max(1, round(fraction * M)) whose keyed hash of (seed, original id) is smallest. The choice
depends on the seed and the ids alone, not on the vocabulary order, the sharding or the machine.

What the hold-out changes (data/splits.py applies it per user):
  train       every event of a held-out item leaves the training sequences; a user left with no
              training event has no train row.
  valid, test the targets are the events they would be without the hold-out (loo: the last two;
              temporal: the first of each period), so a held-out item can be a target; such rows
              have `cold = true`. The history (the model's input, and what the `full` protocol
              masks) is the user's events before the target WITHOUT the held-out items: a cold
              item is never an input anywhere, as it would not be in production. A row whose
              history held only held-out items is dropped and counted.
The held-out items keep their vocabulary index and their count in vocab/items.parquet (the k-core
ran on every event), so id-only and feature models rank the same catalogue; popularity-sampled
negatives give them no mass (train/loop.py). No positive ever trains their id rows, so an id-only
model cannot rank them, while a model with item features scores them like known cold items, from
their attributes alone (models/attributes.py, `without_id_rows`, set by runs.build_model).

Output: DIR/vocab/cold_items.parquet (index:int32, item_id:string, by index), a bool column `cold`
in valid/ and test/, the manifest's `cold_holdout` section, and `cold_items` in `vocab_hash`, so a
checkpoint trained with another hold-out (or none) refuses the data.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flm_dist.config import require
from flm_dist.data import storage
from flm_dist.data.vocabularies import table_hash
from flm_dist.errors import UserError

COLD_ITEMS_SCHEMA = pa.schema([("index", pa.int32()), ("item_id", pa.string())])
FILE = "cold_items.parquet"


@dataclass
class ColdItemsConfig:
    """Hold out a seeded share of the items with features as cold items (module docstring)."""

    fraction: float = 0.0
    """Share of the items with interactions and features held out as cold: their events leave
    the training split, they stay targets in valid and test. 0 = no hold-out."""
    seed: int = 0
    """Seed of the choice (a keyed hash of each item's original id): the same seed holds out the
    same items of the same data."""

    def __post_init__(self):
        require(0.0 <= self.fraction < 1.0, "fraction", "must be in [0, 1) (0 = no hold-out)")


def _keyed_hash(seed: int, item_id: str) -> int:
    digest = hashlib.blake2b(item_id.encode(), digest_size=8, key=str(seed).encode())
    return int.from_bytes(digest.digest(), "big")


def choose(cfg: ColdItemsConfig, items: pa.Table, item_attributes: pa.Table) -> pa.Table:
    """The held-out items (COLD_ITEMS_SCHEMA, by index) among `items` (the vocabulary 1..N) that
    have a row in `item_attributes`."""
    n_items = items.num_rows
    featured = item_attributes.filter(pc.less_equal(item_attributes.column("index"), n_items))
    indices = featured.column("index").to_numpy().astype(np.int64)
    ids = [str(v) for v in featured.column("item_id").to_pylist()]
    if not ids:
        raise UserError("cold_items.fraction: no item with interactions has features, so none can be held out "
                        "(check that the features' item ids match the log's)")
    wanted = max(1, round(cfg.fraction * len(ids)))
    keys = sorted(range(len(ids)), key=lambda i: (_keyed_hash(cfg.seed, ids[i]), ids[i]))[:wanted]
    chosen = np.sort(indices[keys])
    by_index = dict(zip(indices.tolist(), ids))
    return pa.Table.from_arrays([pa.array(chosen.astype(np.int32)), pa.array([by_index[i] for i in chosen.tolist()],
                                                                              pa.string())], schema=COLD_ITEMS_SCHEMA)


def write(fs, out: str, held_out: pa.Table) -> None:
    storage.write_parquet(fs, storage.join(out, "vocab", FILE), held_out)


def mask(held_out: pa.Table | None, n_items: int) -> np.ndarray | None:
    """bool [N + 1]: whether each item index is held out (None without a hold-out)."""
    if held_out is None:
        return None
    out = np.zeros(n_items + 1, dtype=bool)
    out[held_out.column("index").to_numpy()] = True
    return out


def manifest_section(cfg: ColdItemsConfig, held_out: pa.Table, items: pa.Table, eligible: int,
                     split_stats: dict[str, int]) -> dict[str, Any]:
    """The manifest's `cold_holdout` section: the settings, what was held out and where its events went."""
    counts = items.column("count").to_numpy()[held_out.column("index").to_numpy() - 1]
    return {"fraction": cfg.fraction, "seed": cfg.seed, "eligible_items": eligible, "items": held_out.num_rows,
            "interactions": int(counts.sum()), **split_stats}


def vocabulary_hash(vocab_dir: str | Path) -> dict[str, str]:
    """The `vocab_hash` entry of a vocab directory's hold-out; empty without one."""
    path = Path(vocab_dir) / FILE
    return {"cold_items": table_hash(pq.read_table(path))} if path.is_file() else {}


def held_out_indices(data_dir: str | Path) -> np.ndarray:
    """Vocabulary indices of the held-out items of prepared data (empty without a hold-out)."""
    path = Path(data_dir) / "vocab" / FILE
    if not path.is_file():
        return np.zeros(0, dtype=np.int64)
    return pq.read_table(path, columns=["index"]).column("index").to_numpy().astype(np.int64)
