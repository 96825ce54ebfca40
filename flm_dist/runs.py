"""A run directory and its data: the prepared data's manifest, building the model for it, and
loading a checkpoint (pretrained or fine-tuned) back into its model.

Evaluation, export, reports and training all come here for a model, so this module sits below
all of them and imports none of them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from flm_dist.config import ModelConfig, from_dict
from flm_dist.data.item_features import ItemAttributeArrays, load_item_attributes
from flm_dist.errors import UserError
from flm_dist.models import FLMModel
from flm_dist.models.dropout import set_dropout_masks
from flm_dist.models.recommender import Recommender
from flm_dist.train.checkpoint import load_checkpoint, require_finite_weights
from flm_dist.train.configs import FinetuneConfig


def read_manifest(data_dir: str) -> dict[str, Any]:
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise UserError(f"{data_dir} is not prepared data (no manifest.json); run `flm prepare` first")
    try:
        manifest = json.loads(path.read_text())
        manifest["num_negatives"] = manifest["config"]["num_negatives"]
    except (ValueError, KeyError, TypeError) as exc:  # edited by hand, or not flm_dist's
        raise UserError(f"{path} is not a manifest of `flm prepare` ({type(exc).__name__}: {exc}); "
                        f"run `flm prepare` again") from None
    return manifest


def item_attributes_for(config: ModelConfig, data_dir: str) -> ItemAttributeArrays | None:
    """The item features of prepared data `data_dir` when the model uses them (else None)."""
    if config.item_features == "none":
        return None
    attributes = load_item_attributes(data_dir, read_manifest(data_dir)["items"])
    if attributes is None:
        raise UserError(f"model.item_features={config.item_features} needs item features, but {data_dir} was "
                        f"prepared without them (flm prepare --item-features URI); or set model.item_features=none")
    return attributes


def build_model(config: ModelConfig, num_users: int, num_items: int,
                attributes: ItemAttributeArrays | None = None) -> FLMModel:
    """The joint model; `attributes` (item_attributes_for) is needed with model.item_features."""
    features = {}
    if config.item_features != "none":
        if attributes is None:
            raise UserError(f"model.item_features={config.item_features} needs the data's item features")
        if attributes.num_items != num_items:
            raise UserError(f"the item features cover {attributes.num_items} items; the model has {num_items}")
        features = {"item_features": config.item_features, "num_attributes": attributes.num_attributes,
                    "item_attributes": torch.from_numpy(attributes.matrix)}
    model = FLMModel(num_users=num_users, num_items=num_items, hidden=config.hidden,
                     max_len=config.max_len, layers=config.layers, heads=config.heads,
                     dropout=config.dropout, encoder=config.encoder, fusion=config.fusion,
                     flow_layers=config.flow_layers, flow_hidden=config.flow_hidden,
                     flow_kind=config.flow_kind, flow_stop_gradient=config.flow_stop_gradient,
                     positions=config.positions, norm=config.norm, cf_user=config.cf_user,
                     user_head=config.user_head, mixer=config.mixer, filter_alpha=config.filter_alpha,
                     filter_cutoff=config.filter_cutoff, **features)
    if config.init_std:
        model.initialize_normal(config.init_std)
    set_dropout_masks(model, config.dropout_masks)
    if features and len(attributes.held_out):  # held-out cold items are scored from their attributes alone
        model.item_features.without_id_rows(torch.from_numpy(attributes.held_out))
    return model


def load_model_for_data(checkpoint_dir: str, data_dir: str, device: torch.device):
    """The model of a checkpoint (pretrained or fine-tuned), checked against `data_dir`'s vocabulary."""
    state, meta = load_checkpoint(checkpoint_dir, map_location="cpu")
    require_finite_weights(state, checkpoint_dir)
    manifest = read_manifest(data_dir)
    if meta["vocab_hash"] != manifest["vocab_hash"]:
        raise UserError(f"{checkpoint_dir} was trained on another vocabulary than {data_dir} "
                        f"(vocab hashes differ)")
    if meta.get("kind", "pretrain") == "pretrain":
        config = from_dict(ModelConfig, meta["config"]["model"])
        model = build_model(config, manifest["users"], manifest["items"], item_attributes_for(config, data_dir))
    else:
        model = rebuild_model(meta, manifest, data_dir)
    model.load_state_dict(state["model"])
    return model.to(device), manifest, meta



def recommender_for(config: FinetuneConfig, backbone: FLMModel) -> Recommender:
    options = config.finetune
    return Recommender(backbone, head=options.head, flow=options.flow, source=options.source,
                       frozen=options.mode == "frozen")


def rebuild_model(meta: dict[str, Any], manifest: dict[str, Any], data_dir: str) -> Recommender:
    """The (untrained) model of a fine-tuning checkpoint, for `load_model_for_data` to load into."""
    config = from_dict(FinetuneConfig, meta["config"])
    return recommender_for(config, build_model(config.model, manifest["users"], manifest["items"],
                                               item_attributes_for(config.model, data_dir)))

