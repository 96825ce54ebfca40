"""`flm finetune`: a next-item recommender fine-tuned from a pretrained Pretraining-FLM run.

Reading order: `FinetuneConfig` (train/configs.py) -> `resolve` (the model comes from the
pretrained checkpoint, the vocabulary is mapped by original id: train/vocabulary.py) ->
`run_finetune` (driver) -> `build_recommender` (every worker). Training is the shared loop
(`flm_dist.train.loop.train_loop`) with a model factory, a training-user filter and kind
"finetune": DDP, checkpoints, resume, early stopping, evaluation and metrics.json are the same
code. `flm_dist.runs.rebuild_model` turns a fine-tuning checkpoint back into its model. With
`finetune.privacy.epsilon` set, `train_recommender` runs the DP-SGD loop of train/private.py
instead (same model factory, users and run directory; docs/guide/privacy.md).

The counts of known and new items and users are logged and recorded in `config.vocabulary`, hence
in every checkpoint's meta and in metrics.json; every worker recomputes the mapping and refuses to
train if its counts differ from the driver's.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any

import numpy as np

from flm_dist.config import ModelConfig, from_dict
from flm_dist.data.batches import filter_users
from flm_dist.errors import UserError
from flm_dist.logs import setup_logging
from flm_dist.models.recommender import Recommender
from flm_dist.ray_seam import RaySession, absolute_storage_path
from flm_dist.runs import build_model, item_attributes_for, read_manifest, recommender_for
from flm_dist.train.checkpoint import load_checkpoint, require_finite_weights
from flm_dist.train.configs import FinetuneConfig
from flm_dist.train.loop import launch_training, train_loop
from flm_dist.train.private import check_private_model, train_private
from flm_dist.train.vocabulary import (
    load_pretrained_weights,
    map_vocabulary,
    pretrained_checkpoint,
    pretrained_vocabulary,
)

log = logging.getLogger("flm_dist")


def _pretrained_model(config: FinetuneConfig, meta: dict[str, Any]) -> ModelConfig:
    """The checkpoint's architecture with `finetune.dropout`; a given `config.model` must equal it."""
    pretrained = from_dict(ModelConfig, meta["config"]["model"])
    if config.finetune.dropout is not None:
        pretrained = dataclasses.replace(pretrained, dropout=config.finetune.dropout)
    if config.model is not None and config.model != pretrained:
        changed = [f.name for f in dataclasses.fields(ModelConfig)
                   if getattr(config.model, f.name) != getattr(pretrained, f.name)]
        raise UserError("the model comes from the pretrained checkpoint, but "
                        + ", ".join(f"model.{n}={getattr(config.model, n)!r}" for n in changed) + " differ from its "
                        + ", ".join(f"{n}={getattr(pretrained, n)!r}" for n in changed)
                        + "; leave model out (set dropout with finetune.dropout)")
    return pretrained


def build_recommender(config: FinetuneConfig, manifest: dict[str, Any]) -> Recommender:
    """The recommender for `config.data` with the pretrained weights mapped by id (none with
    `finetune.init=random`).

    Runs on every worker; `setup_training` has seeded torch, so fresh rows are alike everywhere
    (and DDP broadcasts rank 0's parameters anyway).
    """
    checkpoint, meta = pretrained_checkpoint(config.pretrained)
    mapping = map_vocabulary(pretrained_vocabulary(checkpoint, meta, config.data), config.data)
    if mapping.counts() != config.vocabulary:
        raise UserError(f"the vocabularies changed since the run started: {mapping.counts()} here, "
                        f"{config.vocabulary} recorded")
    backbone = build_model(config.model, manifest["users"], manifest["items"],
                           item_attributes_for(config.model, config.data))
    if config.finetune.init == "pretrained":
        state = load_checkpoint(checkpoint)[0]
        require_finite_weights(state, checkpoint)
        load_pretrained_weights(backbone, state["model"], mapping)
    return recommender_for(config, backbone)


def fraction_of_users(num_users: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of ceil(fraction * num_users) users: a prefix of a permutation drawn from
    `seed`, so the choice is the same on every worker and nested across fractions."""
    count = math.ceil(fraction * num_users)
    return np.sort(np.random.default_rng(seed).permutation(num_users)[:count])


def _train_filter(config: FinetuneConfig):
    if config.finetune.data_fraction >= 1.0:
        return None
    keep = fraction_of_users(read_manifest(config.data)["users"], config.finetune.data_fraction, config.train.seed)
    return functools.partial(filter_users, keep_users=keep)


def train_recommender(config: FinetuneConfig, session) -> dict[str, Any]:
    if config.finetune.privacy.enabled:  # DP-SGD: its own small loop (train/private.py)
        return train_private(config, session, functools.partial(build_recommender, config), _train_filter(config))
    return train_loop(config, session, model_factory=functools.partial(build_recommender, config),
                      train_filter=_train_filter(config), kind="finetune",
                      validate_first=config.finetune.keep_pretrained)


def finetune_worker(payload: dict[str, Any]) -> None:
    """Ray Train entry point: rebuild the config from plain data and run the loop."""
    setup_logging()
    config = from_dict(FinetuneConfig, payload["config"])
    train_recommender(config, RaySession(config.output))


def resolve(config: FinetuneConfig) -> FinetuneConfig:
    """`config` ready to train: absolute paths (Ray workers do not share the driver's working
    directory), the pretrained checkpoint directory, its model and the vocabulary counts."""
    checkpoint, meta = pretrained_checkpoint(config.pretrained)
    data = absolute_storage_path(config.data)
    mapping = map_vocabulary(pretrained_vocabulary(checkpoint, meta, data), data)
    return dataclasses.replace(config, pretrained=str(checkpoint), data=data,
                               output=absolute_storage_path(config.output),
                               model=_pretrained_model(config, meta), vocabulary=mapping.counts())


def run_finetune(config: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune on Ray Train (or in this process with `scaling.workers=0`); returns metrics.json."""

    config = resolve(config)
    check_private_model(config)
    counts = config.vocabulary
    log.info("vocabulary mapped by original id: items %d known, %d new (%d pretrained unused); "
             "users %d known, %d new (%d pretrained unused)", counts.items_known, counts.items_new,
             counts.items_unused, counts.users_known, counts.users_new, counts.users_unused)
    if counts.attributes_known or counts.attributes_new:
        log.info("item attributes mapped by field and value: %d known, %d new (%d pretrained unused)",
                 counts.attributes_known, counts.attributes_new, counts.attributes_unused)
    if config.finetune.init == "random":
        log.info("finetune.init=random: training from scratch; %s gives only the architecture and "
                 "vocabulary", config.pretrained)
    if counts.items_new and config.finetune.mode == "frozen":
        log.warning("%d new items keep random, frozen rows in frozen mode: they will rank at random",
                    counts.items_new)
    return launch_training(config, "finetune", train_recommender, finetune_worker)

