"""Online recommendations, without Ray: the core that `flm serve` wraps in a Ray Serve deployment.

`RecommenderService` holds one checkpoint's model, the data directory's vocabularies and every
known user's stored history. It turns a request body into a `Query` (`parse`: original ids ->
indices, with a one-line `RequestError` and a 4xx status for anything it cannot answer) and
answers a batch of queries with one forward pass (`recommend`).

Scoring is export's (`flm_dist.eval.export.UserScorer`): the model input is built by
`build_eval_arrays` (the last `max_len` items of the history, left-padded), the user vector is
`user_representation(..., source=eval.user_source)`, and `ranking.top_k` ranks the whole item
table in chunks with the excluded items (the history, unless `exclude_history` is false, and
`exclude`) removed. So a known user's answer is export's top-K for the same user. A model with
item features also ranks the data's known cold items (features, no interactions), scored from
their attributes, and accepts them in `items` and `exclude`.

Stored history: a known user's row of DATA/<split> (`split=test`: the history `flm export` and
`flm evaluate` score after); a user without a row there (too few events for the split) falls back
to their training sequence (DATA/train). An ad-hoc history (`items`) is scored as given; with a
`user` as well, that user's own CF vector is used, and without one (an anonymous session) a model
with a per-user CF table (`model.cf_user=table`) uses the average user's row.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import nn

from flm_dist.data.batches import build_eval_arrays
from flm_dist.data.item_features import cold_item_ids
from flm_dist.errors import UserError
from flm_dist.eval.ranking import item_chunk_size, top_k
from flm_dist.models.cf import MatrixFactorization
from flm_dist.train.checkpoint import STATE_FILE, checkpoint_or_best, read_meta, verify_checkpoint

REQUEST_FIELDS = ("user", "items", "k", "exclude_history", "exclude")
MAX_REQUEST_ITEMS = 10_000
"""Longest `items` or `exclude` list a request may send."""


class RequestError(Exception):
    """A request that cannot be answered: `status` (4xx) and a one-line `reason`."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class Query:
    """One parsed request: indices, ready to score."""

    user: int
    """User table row scored with (the average user's row for an anonymous session)."""
    user_id: str | None
    history: np.ndarray
    """Item indices of the history scored after, oldest first (int64)."""
    exclude: np.ndarray
    """Item indices removed from the ranking (the history, unless exclude_history is false, and
    `exclude`)."""
    k: int
    unknown_items: list[str] = field(default_factory=list)
    unknown_exclude: list[str] = field(default_factory=list)


def resolve_model(checkpoint: str, data: str = "") -> tuple[Path, str]:
    """(checkpoint directory, prepared data directory) of `flm serve CHECKPOINT [--data D]`, checked.

    `checkpoint` is a checkpoint or a run directory (its best/). Its checksums must hold (a torn
    or tampered model directory is refused here, before anything is deployed). Without `data`, the
    run directory's config.json `data` (else the checkpoint's own config) names it.
    """
    directory = checkpoint_or_best(checkpoint)
    problem = verify_checkpoint(directory)
    if problem:
        raise UserError(f"refusing to serve {directory}: {problem}")
    meta = read_meta(directory)
    if not data:
        run_config = directory.parent / "config.json"
        recorded = json.loads(run_config.read_text()).get("data") if run_config.is_file() else None
        data = recorded or meta.get("config", {}).get("data") or ""
        if not data:
            raise UserError(f"{directory} does not record its data directory (no data in "
                            f"{run_config}); pass --data")
    manifest_path = Path(data) / "manifest.json"
    if not manifest_path.is_file():
        raise UserError(f"{data} is not prepared data (no manifest.json); pass --data with the "
                        f"prepared data the model was trained on")
    if json.loads(manifest_path.read_text())["vocab_hash"] != meta["vocab_hash"]:
        raise UserError(f"{directory} was trained on another vocabulary than {data} (vocab hashes differ)")
    return directory, str(Path(data).resolve())


def run_id(checkpoint_dir: Path, meta: dict[str, Any]) -> str:
    """`<run directory name>@<first 12 hex of the weights' sha256>`: which weights answered."""
    digest = meta.get("files", {}).get(STATE_FILE, {}).get("sha256") or hashlib.sha256(
        json.dumps(meta.get("config", {}), sort_keys=True).encode()).hexdigest()
    return f"{checkpoint_dir.parent.name}@{digest[:12]}"


def _lookup(data_dir: str, name: str, id_column: str) -> tuple[list[str], dict[str, int]]:
    """(ids by index, index by id); items' position 0 is padding and holds an empty id."""
    table = pq.read_table(Path(data_dir) / "vocab" / f"{name}.parquet").sort_by("index")
    ids = [str(value) for value in table.column(id_column).to_pylist()]
    indices = table.column("index").to_pylist()
    if name == "items":
        ids = [""] + ids
    return ids, dict(zip(ids[1:] if name == "items" else ids, indices))


def stored_histories(data_dir: str, split: str, num_users: int) -> tuple[np.ndarray, np.ndarray]:
    """Every user's stored history as (offsets [U + 1], items): their DATA/<split> row's history,
    else their training sequence (see the module docstring)."""
    rows = pq.read_table(Path(data_dir) / split, columns=["user", "history"])
    train = pq.read_table(Path(data_dir) / "train", columns=["user", "items"]).rename_columns(["user", "history"])
    train = train.filter(pc.invert(pc.is_in(train.column("user"), rows.column("user"))))
    table = pa.concat_tables([rows, train.cast(rows.schema)]).sort_by("user")
    users = table.column("user").to_numpy().astype(np.int64)
    histories = table.column("history").combine_chunks()
    lengths = np.zeros(num_users, dtype=np.int64)
    lengths[users] = pc.list_value_length(histories).to_numpy(zero_copy_only=False)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return offsets, histories.flatten().to_numpy(zero_copy_only=False).astype(np.int64)


def _add_average_user(model: nn.Module) -> int | None:
    """Append the mean of a per-user CF table as one more row; its index, or None when the model
    has no such table (history CF needs no user row)."""
    tables = [module for module in model.modules() if isinstance(module, MatrixFactorization)]
    if not tables:
        return None
    old = tables[0].user_embedding
    weight = torch.cat([old.weight.detach(), old.weight.detach().mean(dim=0, keepdim=True)])
    tables[0].user_embedding = nn.Embedding.from_pretrained(weight, freeze=True)
    return weight.shape[0] - 1


class RecommenderService:
    """A checkpoint ready to answer requests (see the module docstring). Not thread-safe for
    `recommend`; the Ray Serve deployment calls it from one batch at a time."""

    def __init__(self, model: nn.Module, item_ids: list[str], user_ids: list[str],
                 history_offsets: np.ndarray, history_items: np.ndarray, *, max_len: int, source: str,
                 max_k: int = 100, max_score_elements: int = 2 ** 24, device: str = "cpu",
                 info: dict[str, Any] | None = None):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.anonymous_user = _add_average_user(self.model)
        self.model.to(self.device)
        with torch.no_grad():  # the items, then the known cold items of a model with item features
            self.catalog = self.model.catalog_table().detach()
        item_ids = item_ids[:self.catalog.shape[0]]
        self.cold_items = max(0, len(item_ids) - 1 - self.model.num_items)
        self.item_ids = item_ids
        self.item_index = {item: index for index, item in enumerate(item_ids) if index > 0}
        self.user_ids = user_ids
        self.user_index = {user: index for index, user in enumerate(user_ids)}
        self.history_offsets = history_offsets
        self.history_items = history_items
        self.max_len = max_len
        self.source = source
        self.max_k = max_k
        self.max_score_elements = max_score_elements
        self.details = dict(info or {})

    @classmethod
    def load(cls, checkpoint: str, data: str = "", *, device: str = "cpu", split: str = "test",
             max_k: int = 100, max_score_elements: int = 2 ** 24) -> "RecommenderService":
        """Load a checkpoint (weights_only, checksums verified) with its data's vocabularies."""
        from flm_dist.runs import load_model_for_data

        directory, data = resolve_model(checkpoint, data)
        model, manifest, meta = load_model_for_data(str(directory), data, torch.device("cpu"))
        item_ids, _ = _lookup(data, "items", "item_id")
        item_ids += cold_item_ids(data, len(item_ids) - 1)  # kept only when the model scores them
        user_ids, _ = _lookup(data, "users", "user_id")
        offsets, items = stored_histories(data, split, len(user_ids))
        config = meta["config"]
        info = {"run_id": run_id(directory, meta), "vocab_hash": meta["vocab_hash"],
                "checkpoint": str(directory), "data": data, "kind": meta.get("kind", "pretrain"),
                "step": meta.get("step"), "epoch": meta.get("epoch"), "model": config["model"],
                "metrics": {k: v for k, v in meta.get("metrics", {}).items()
                            if "/" in k and isinstance(v, (int, float)) and math.isfinite(v)},
                "history_split": split}
        return cls(model, item_ids, user_ids, offsets, items, max_len=config["model"]["max_len"],
                   source=config["eval"]["user_source"], max_k=max_k,
                   max_score_elements=max_score_elements, device=device, info=info)

    # ---- requests ------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """GET /info: the model, its catalogue and the serving settings."""
        anonymous = ("the average user's CF row" if self.anonymous_user is not None
                     else "no user row needed")
        cold = {"cold_items": self.cold_items} if self.cold_items else {}
        return {**self.details, "items": len(self.item_ids) - 1, **cold, "users": len(self.user_ids),
                "source": self.source, "max_len": self.max_len, "max_k": self.max_k,
                "device": str(self.device), "anonymous_sessions": anonymous}

    def _ids(self, value: Any, name: str) -> list[str]:
        if not isinstance(value, list):
            raise RequestError(400, f"'{name}' must be a list of item ids")
        if len(value) > MAX_REQUEST_ITEMS:
            raise RequestError(400, f"'{name}' has {len(value)} ids; at most {MAX_REQUEST_ITEMS} are allowed")
        return [_id_text(item, name) for item in value]

    def parse(self, body: bytes | str | dict[str, Any]) -> Query:
        """A request body (JSON bytes/text or an already decoded object) -> a `Query`, or a
        `RequestError`: 400 malformed or out of range, 404 unknown user, 422 nothing to score."""
        if isinstance(body, (bytes, str)):
            try:
                body = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise RequestError(400, f"malformed JSON: {exc}") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the body must be a JSON object such as {\"user\": \"u1\", \"k\": 10}")
        unknown = sorted(set(body) - set(REQUEST_FIELDS))
        if unknown:
            raise RequestError(400, f"unknown field '{unknown[0]}' (fields: {', '.join(REQUEST_FIELDS)})")
        k = body.get("k", min(10, self.max_k))
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.max_k:
            raise RequestError(400, f"'k' must be an integer from 1 to {self.max_k}, got {json.dumps(k)}")
        exclude_history = body.get("exclude_history", True)
        if not isinstance(exclude_history, bool):
            raise RequestError(400, "'exclude_history' must be true or false")
        if "user" not in body and "items" not in body:
            raise RequestError(400, "send 'user' (a known user id) or 'items' (a history of item ids)")

        user_id = None
        user = self.anonymous_user if self.anonymous_user is not None else 0
        if "user" in body:
            user_id = _id_text(body["user"], "user")
            if user_id not in self.user_index:
                raise RequestError(404, f"unknown user {json.dumps(user_id)}")
            user = self.user_index[user_id]
        unknown_items: list[str] = []
        if "items" in body:
            items = self._ids(body["items"], "items")
            known = [self.item_index.get(item) for item in items]
            unknown_items = [item for item, index in zip(items, known) if index is None]
            history = np.array([index for index in known if index is not None], dtype=np.int64)
            if not items:
                raise RequestError(422, "'items' is empty: nothing to recommend from")
            if not len(history):
                raise RequestError(422, f"no known item in 'items' (unknown: {', '.join(unknown_items[:5])}"
                                        f"{', ...' if len(unknown_items) > 5 else ''})")
        else:
            history = self.history_items[self.history_offsets[user]:self.history_offsets[user + 1]]
            if not len(history):
                raise RequestError(422, f"user {json.dumps(user_id)} has no stored history")
        excluded = self._ids(body.get("exclude", []), "exclude")
        unknown_exclude = [item for item in excluded if item not in self.item_index]
        exclude = np.array([self.item_index[item] for item in excluded if item in self.item_index], dtype=np.int64)
        if exclude_history:
            exclude = np.concatenate([history, exclude])
        return Query(user=user, user_id=user_id, history=history, exclude=exclude, k=k,
                     unknown_items=unknown_items, unknown_exclude=unknown_exclude)

    # ---- scoring -------------------------------------------------------------------------------

    @torch.no_grad()
    def recommend(self, queries: list[Query]) -> list[dict[str, Any]]:
        """The answers to `queries`, scored together: one forward pass and one chunked ranking."""
        if not queries:
            return []
        # build_eval_arrays sorts its rows by `user`: number them 0..B-1 so the order stays the
        # queries', and hand the model the real user rows separately.
        count = len(queries)
        table = pa.table({
            "user": pa.array(np.arange(count, dtype=np.int32)),
            "history": pa.array([q.history for q in queries], type=pa.list_(pa.int32())),
            "target": pa.array(np.zeros(count, dtype=np.int32)),
            "negatives": pa.array([[]] * count, type=pa.list_(pa.int32())),
        })
        model_input = build_eval_arrays(table, self.max_len).input.to(self.device)
        user = torch.tensor([q.user for q in queries], dtype=torch.long, device=self.device)
        vectors = self.model.user_representation(user, model_input, source=self.source)
        item_table = self.catalog
        lengths = torch.tensor([len(q.exclude) for q in queries])
        rows = torch.repeat_interleave(torch.arange(count), lengths).to(self.device)
        items = torch.from_numpy(np.concatenate([q.exclude for q in queries])).to(self.device)
        chunk_size = item_chunk_size(count, item_table.shape[0] - 1, self.max_score_elements)
        k = max(q.k for q in queries)
        scores, indices = top_k(vectors, item_table, k, chunk_size, (rows, items))
        scores, indices = scores.cpu(), indices.cpu()
        return [self._answer(query, scores[row, :query.k], indices[row, :query.k])
                for row, query in enumerate(queries)]

    def _answer(self, query: Query, scores: torch.Tensor, indices: torch.Tensor) -> dict[str, Any]:
        # -inf = excluded: a history that covers nearly the whole catalogue leaves fewer than k.
        keep = [i for i, score in enumerate(scores.tolist()) if math.isfinite(score)]
        return {
            "user": query.user_id,
            "recommendations": [{"item_id": self.item_ids[int(indices[i])], "score": float(scores[i])}
                                 for i in keep],
            "k": query.k,
            "history_length": int(len(query.history)),
            "unknown_items": query.unknown_items,
            "unknown_exclude": query.unknown_exclude,
            "run_id": self.details.get("run_id"),
            "vocab_hash": self.details.get("vocab_hash"),
        }

    def answer(self, body: bytes | str | dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON object) for one request body, unbatched: for tests and tools."""
        try:
            query = self.parse(body)
        except RequestError as exc:
            return exc.status, {"error": exc.reason}
        return 200, self.recommend([query])[0]


def _id_text(value: Any, name: str) -> str:
    """An original id: a string, or an integer taken as its decimal text (vocabularies hold strings)."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    what = f"'{name}'" if name == "user" else f"ids in '{name}'"
    raise RequestError(400, f"{what} must be strings (or integers), got {json.dumps(value)}")
