"""Moving a pretrained model onto fine-tuning data by ORIGINAL id.

Fine-tuning data is prepared on its own and has its own index space; indices of two preparations
mean nothing to each other. The run directory keeps the vocabulary it was trained on
(RUN_DIR/vocab, checked against the checkpoint's vocab hash), and row i of the new item table is
the pretrained row of the item whose item_id equals the new index i's item_id; an item the
pretrained model never saw gets a fresh row, drawn like the pretrained table's initial rows. Users
(the MF user table) are mapped the same way, and so are the attributes of a model with item
features (by field and original value: DATA/vocab/attributes.parquet); the fine-tuning data's own
item-attribute lists are used. Everything else is copied unchanged.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from flm_dist.data import cold_items
from flm_dist.data.item_features import has_features, vocabulary_features_hash
from flm_dist.data.vocabularies import table_hash
from flm_dist.errors import UserError
from flm_dist.models import FLMModel
from flm_dist.runs import read_manifest
from flm_dist.train.checkpoint import checkpoint_or_best, read_meta
from flm_dist.train.configs import VocabularyCounts


def pretrained_checkpoint(path: str) -> tuple[Path, dict[str, Any]]:
    """(checkpoint directory, meta): `path` itself if it is a checkpoint, else `path/best`."""
    directory = checkpoint_or_best(path)
    meta = read_meta(directory)
    kind = meta.get("kind", "pretrain")
    if kind != "pretrain":
        raise UserError(f"{directory} is a {kind} checkpoint; fine-tune from a pretraining checkpoint")
    return directory, meta


def vocabulary_hash(vocab_dir: Path) -> dict[str, str]:
    """The vocab hash `flm prepare` records in manifest.json, recomputed from vocab/*.parquet."""
    hashes = {name: table_hash(pq.read_table(vocab_dir / f"{name}.parquet")) for name in ("items", "users")}
    return {**hashes, **vocabulary_features_hash(vocab_dir), **cold_items.vocabulary_hash(vocab_dir)}


def pretrained_vocabulary(checkpoint: Path, meta: dict[str, Any], data_dir: str) -> Path:
    """The vocabulary `checkpoint` was trained on.

    The fine-tuning data's own when the vocab hashes are equal; else RUN_DIR/vocab beside the
    checkpoint (RUN_DIR/best, RUN_DIR/checkpoints/checkpoint_N, RUN_DIR/ray_train/checkpoint_N),
    accepted only if its hash is the checkpoint's.
    """
    if read_manifest(data_dir)["vocab_hash"] == meta["vocab_hash"]:
        return Path(data_dir) / "vocab"
    for vocab_dir in (checkpoint.parent / "vocab", checkpoint.parent.parent / "vocab"):
        if (vocab_dir / "items.parquet").is_file() and vocabulary_hash(vocab_dir) == meta["vocab_hash"]:
            return vocab_dir
    raise UserError(f"cannot find the vocabulary {checkpoint} was trained on (a RUN_DIR/vocab whose hash "
                    f"matches the checkpoint's); without it items cannot be matched by id")


@dataclasses.dataclass
class VocabularyMapping:
    """Pretrained row of each fine-tuning index; -1 marks an id the pretrained model never saw."""

    items: np.ndarray
    """[N + 1] int64; entry 0 (padding) maps to the pretrained padding row 0."""
    users: np.ndarray
    """[U] int64."""
    pretrained_items: int
    pretrained_users: int
    attributes: np.ndarray | None = None
    """[A + 1] int64 pretrained attribute row of each fine-tuning attribute (-1: new); None when
    either side was prepared without item features."""
    pretrained_attributes: int = 0

    def counts(self) -> VocabularyCounts:
        items_known, users_known = int((self.items[1:] >= 0).sum()), int((self.users >= 0).sum())
        attributes = self.attributes if self.attributes is not None else np.zeros(1, np.int64)
        attributes_known = int((attributes[1:] >= 0).sum())
        return VocabularyCounts(items_known=items_known, items_new=len(self.items) - 1 - items_known,
                                items_unused=self.pretrained_items - items_known, users_known=users_known,
                                users_new=len(self.users) - users_known,
                                users_unused=self.pretrained_users - users_known,
                                attributes_known=attributes_known,
                                attributes_new=len(attributes) - 1 - attributes_known,
                                attributes_unused=self.pretrained_attributes - attributes_known
                                if self.attributes is not None else 0)


def _rows_by_id(new: pa.Table, old: pa.Table, id_column: str, first_index: int) -> np.ndarray:
    """For each row of `new` in index order, the `index` in `old` of the same original id, or -1."""
    for table in (new, old):
        index = np.sort(table.column("index").to_numpy())
        if not np.array_equal(index, np.arange(first_index, first_index + len(table))):
            raise UserError(f"a vocabulary's {id_column} indices are not {first_index}..{first_index + len(table) - 1}")
    new = new.sort_by("index")
    position = pc.index_in(new.column(id_column), value_set=old.column(id_column).combine_chunks())
    position = position.fill_null(-1).to_numpy().astype(np.int64)
    old_index = old.column("index").to_numpy().astype(np.int64)
    return np.where(position >= 0, old_index[np.maximum(position, 0)], -1)


def map_vocabulary(pretrained_vocab: Path, data_dir: str) -> VocabularyMapping:
    """Match the fine-tuning vocabulary (DATA/vocab) to the pretrained one by original id."""
    new_vocab = Path(data_dir) / "vocab"
    tables = {(side, name): pq.read_table(directory / f"{name}.parquet")
              for side, directory in (("new", new_vocab), ("old", pretrained_vocab)) for name in ("items", "users")}
    items = _rows_by_id(tables["new", "items"], tables["old", "items"], "item_id", first_index=1)
    users = _rows_by_id(tables["new", "users"], tables["old", "users"], "user_id", first_index=0)
    mapping = VocabularyMapping(items=np.concatenate([[0], items]), users=users,
                                pretrained_items=tables["old", "items"].num_rows,
                                pretrained_users=tables["old", "users"].num_rows)
    if has_features(new_vocab) and has_features(pretrained_vocab):
        keyed = {side: _attribute_keys(pq.read_table(directory / "attributes.parquet"))
                 for side, directory in (("new", new_vocab), ("old", pretrained_vocab))}
        mapping.attributes = np.concatenate([[0], _rows_by_id(keyed["new"], keyed["old"], "key", first_index=1)])
        mapping.pretrained_attributes = keyed["old"].num_rows
    return mapping


def _attribute_keys(attributes: pa.Table) -> pa.Table:
    """index and key = field + NUL + value: an attribute's original id is its field and value."""
    key = pc.binary_join_element_wise(attributes.column("field"), attributes.column("value"), "\0")
    return pa.table({"index": attributes.column("index"), "key": key})


def load_pretrained_weights(model: FLMModel, pretrained: dict[str, torch.Tensor], mapping: VocabularyMapping) -> None:
    """Copy pretrained weights into `model`, built for the fine-tuning vocabulary: item and user
    rows by original id (new ids keep `model`'s freshly initialised rows, drawn like the
    pretrained tables' initial rows), every other tensor unchanged."""
    state = model.state_dict()
    if set(state) != set(pretrained):
        raise UserError(f"the pretrained checkpoint does not fit the model: differing tensors "
                        f"{sorted(set(state) ^ set(pretrained))}")
    for name, tensor in pretrained.items():
        if name.endswith("item_embedding.weight"):  # the shared table, under each of its owners
            rows = mapping.items
        elif name.endswith("attribute_embedding.weight"):
            if mapping.attributes is None:
                raise UserError("the pretrained model uses item features (model.item_features), but the "
                                "pretrained run's or the fine-tuning data's vocab/ has no attribute vocabulary; "
                                "prepare the fine-tuning data with --item-features")
            rows = mapping.attributes
        elif name.endswith("user_embedding.weight"):
            rows = mapping.users
        else:
            if tensor.shape != state[name].shape:
                raise UserError(f"pretrained {name} has shape {tuple(tensor.shape)}, "
                                f"expected {tuple(state[name].shape)}")
            state[name] = tensor
            continue
        known = torch.from_numpy(rows >= 0)
        state[name] = torch.where(known[:, None], tensor[torch.from_numpy(np.maximum(rows, 0))], state[name])
    model.load_state_dict(state)

