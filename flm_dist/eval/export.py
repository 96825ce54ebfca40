"""`flm export`: a checkpoint's embeddings and top-K recommendations, with the original ids.

Output directory (local path or fsspec URI; written to a sibling staging directory and moved into
place, `_export.json` last, so a reader that sees the marker sees a complete export):

  OUT/items.parquet       item_id:string, embedding:fixed_size_list<float>[H] (the item table;
                          with item features also the known cold items, scored from their
                          attributes, and cold:bool)
  OUT/users/*.parquet     user_id:string, embedding (the user vector scored against the items),
                          flow_latent (the flow's latent of the fused representation),
                          log_density:double (its log-density, nats), items:list<string> (the top-K
                          item ids, best first), scores:list<float>
  OUT/_export.json        what was exported: checkpoint, data, split, k, counts

Users are the rows of DATA/<split>, and each is scored after that row's history, with the whole
history removed from the ranking (the `full` protocol): with split=test (every user with a test
row under leave-one-out) these are exactly the lists `flm evaluate` scores. Scoring is Ray Data
batch inference: the split's Parquet -> `map_batches` with an actor class that loads the model
once (CPU or GPU) -> Parquet. Embedding and recommendation columns share one table, so the scoring
runs once and streams to disk; Parquet readers fetch only the columns they ask for.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from flm_dist.config import require
from flm_dist.data import storage
from flm_dist.data.batches import build_eval_arrays
from flm_dist.data.item_features import cold_item_ids
from flm_dist.eval.ranking import item_chunk_size, top_k

log = logging.getLogger("flm_dist")

MARKER = "_export.json"


@dataclasses.dataclass
class ExportConfig:
    checkpoint: str = ""
    """Checkpoint directory (pretrained or fine-tuned, e.g. RUN_DIR/best)."""
    data: str = ""
    """Prepared data with the checkpoint's vocabulary (its vocab maps indices back to ids)."""
    output: str = ""
    """Output directory, local path or fsspec URI; replaced atomically."""
    k: int = 50
    """Recommendations per user (fewer for a user whose history covers nearly every item)."""
    split: Literal["test", "valid"] = "test"
    """Whose histories the users are scored after."""
    batch_size: int = 1024
    """Users scored at once by an actor."""
    max_score_elements: int = 2 ** 26
    """At most this many user x item scores exist at once in an actor (fp32; 2**26 is 256 MB):
    items are scored in chunks of `max_score_elements // batch_size` with a running top-K."""
    workers: int = 1
    """Scoring actors (each holds one copy of the model)."""
    gpus_per_worker: float = 0.0
    """GPUs per actor; 0 scores on CPU."""
    cpus_per_worker: float = 1.0
    """CPUs per actor."""
    address: str | None = None
    """Ray cluster address (default: $RAY_ADDRESS, else a local instance)."""

    def __post_init__(self):
        require(bool(self.checkpoint), "checkpoint", "is required")
        require(bool(self.data), "data", "is required")
        require(bool(self.output), "output", "is required")
        require(self.k > 0, "k", "must be positive")
        require(self.batch_size > 0, "batch_size", "must be positive")
        require(self.max_score_elements >= self.batch_size, "max_score_elements",
                f"must be at least batch_size={self.batch_size} (one item per chunk)")
        require(self.workers > 0, "workers", "must be positive")
        require(self.gpus_per_worker >= 0, "gpus_per_worker", "must be >= 0")
        require(self.cpus_per_worker > 0, "cpus_per_worker", "must be positive")


def _vectors(values: torch.Tensor) -> pa.FixedSizeListArray:
    values = values.float().cpu()
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1).numpy()), values.shape[1])


def _vocabulary(data_dir: str, name: str, id_column: str) -> pa.Array:
    """Original ids by index (items: position 0 is padding and holds an empty id)."""
    table = pq.read_table(Path(data_dir) / "vocab" / f"{name}.parquet").sort_by("index")
    ids = table.column(id_column).combine_chunks()
    return pa.concat_arrays([pa.array([""]), ids]) if name == "items" else ids


def catalog_ids(data_dir: str, rows: int) -> pa.Array:
    """Original ids of the first `rows` rows of a model's catalog table (`catalog_table`): padding,
    the items with interactions, then the known cold items (only a model with item features has
    rows for them)."""
    items = _vocabulary(data_dir, "items", "item_id")
    cold = cold_item_ids(data_dir, len(items) - 1)
    return pa.concat_arrays([items, pa.array(cold, pa.string())]).slice(0, rows)


class UserScorer:
    """Ray Data actor: holds the model; a batch of split rows -> one output row per user."""

    def __init__(self, checkpoint: str, data: str, k: int, device: str, max_score_elements: int):
        from flm_dist.runs import load_model_for_data

        self.device = torch.device(device)
        self.model, manifest, meta = load_model_for_data(checkpoint, data, self.device)
        self.model.eval()
        self.max_len = meta["config"]["model"]["max_len"]
        self.source = meta["config"]["eval"]["user_source"]
        self.catalog = self.model.catalog_table().detach()  # items, then cold items (item features)
        self.k = min(k, self.catalog.shape[0] - 1)
        self.max_score_elements = max_score_elements
        self.item_ids = catalog_ids(data, self.catalog.shape[0])
        self.user_ids = _vocabulary(data, "users", "user_id")

    @torch.no_grad()
    def __call__(self, batch: pa.Table) -> pa.Table:
        arrays = build_eval_arrays(batch, self.max_len).to(self.device)
        user, input = arrays.user, arrays.input
        vectors = self.model.user_representation(user, input, source=self.source)
        item_table = self.catalog
        chunk_size = item_chunk_size(len(arrays), item_table.shape[0] - 1, self.max_score_elements)
        top_scores, top_items = top_k(vectors, item_table, self.k, chunk_size, arrays.history_pairs(0, len(arrays)))
        # -inf = history or padding: users who have seen almost every item get fewer than k.
        keep = torch.isfinite(top_scores).cpu()
        offsets = np.concatenate([[0], keep.sum(dim=1).cumsum(0).numpy()]).astype(np.int32)
        recommended = self.item_ids.take(pa.array(top_items.cpu()[keep].numpy()))
        return pa.table({
            "user_id": self.user_ids.take(pa.array(user.cpu().numpy())),
            "embedding": _vectors(vectors),
            "flow_latent": _vectors(self.model.flow_latent(user, input)),
            "log_density": pa.array(self.model.flow_log_density(user, input).double().cpu().numpy()),
            "items": pa.ListArray.from_arrays(pa.array(offsets), recommended),
            "scores": pa.ListArray.from_arrays(pa.array(offsets), pa.array(top_scores.cpu()[keep].numpy())),
        })


def run_export(config: ExportConfig) -> dict[str, Any]:
    """Write the export (see the module docstring); returns what `_export.json` records."""
    import ray.data

    from flm_dist import ray_seam
    from flm_dist.runs import load_model_for_data

    # Ray Data actors do not share the driver's working directory: hand them absolute paths.
    config = dataclasses.replace(config, checkpoint=ray_seam.absolute_storage_path(config.checkpoint),
                                 data=ray_seam.absolute_storage_path(config.data))
    # Loaded here too: fails fast on a vocabulary mismatch and gives the item table.
    model, manifest, meta = load_model_for_data(config.checkpoint, config.data, torch.device("cpu"))
    fs, final = storage.url_to_fs(config.output)
    storage.check_replaceable(fs, final, MARKER)
    staging = storage.staging_dir(fs, final)
    try:
        catalog = model.catalog_table().detach()
        items = {"item_id": catalog_ids(config.data, catalog.shape[0])[1:], "embedding": _vectors(catalog[1:])}
        cold = catalog.shape[0] - 1 - manifest["items"]
        if cold:
            items["cold"] = pa.array(np.arange(1, catalog.shape[0]) > manifest["items"])
        with fs.open(storage.join(staging, "items.parquet"), "wb") as handle:
            pq.write_table(pa.table(items), handle)
        ray_seam.ensure_ray(config.address)
        device = "cuda" if config.gpus_per_worker > 0 else "cpu"
        users = storage.join(staging, "users")
        users_uri = ray_seam.absolute_storage_path(users) if storage.is_local(fs) else fs.unstrip_protocol(users)
        (ray.data.read_parquet(f"{config.data.rstrip('/')}/{config.split}")
         .map_batches(UserScorer, batch_size=config.batch_size, batch_format="pyarrow",
                      fn_constructor_kwargs={"checkpoint": config.checkpoint, "data": config.data,
                                             "k": config.k, "device": device,
                                             "max_score_elements": config.max_score_elements},
                      compute=ray.data.ActorPoolStrategy(size=config.workers), num_cpus=config.cpus_per_worker,
                      num_gpus=config.gpus_per_worker)
         .write_parquet(users_uri))
        record = {"checkpoint": config.checkpoint, "data": config.data, "split": config.split,
                  "k": config.k, "kind": meta.get("kind", "pretrain"), "source": meta["config"]["eval"]["user_source"],
                  "users": manifest["splits"][config.split]["rows"], "items": manifest["items"],
                  "hidden": int(model.item_table().shape[1])}
        if cold:
            record["cold_items"] = cold
        storage.write_json(fs, storage.join(staging, MARKER), record)
        storage.publish(fs, staging, final, MARKER)
    except BaseException:
        storage.remove(fs, staging)
        raise
    log.info("exported %d users and %d items to %s", record["users"], record["items"], config.output)
    return record
