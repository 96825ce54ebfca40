"""`flm finetune`: a next-item recommender fine-tuned from a pretrained Pretraining-FLM run.

Reading order: `FinetuneConfig` -> `resolve` (the model comes from the pretrained checkpoint)
-> `run_finetune` (driver) -> `build_recommender` (every worker). Training is the
pretraining recipe itself, `pretrain.train_loop` with a model factory, a training-user filter and
kind "finetune": DDP, checkpoints, resume, early stopping, evaluation and metrics.json are the
same code. `rebuild_model` turns a fine-tuning checkpoint back into its model for
`pretrain.load_model_for_data` (evaluate, export, the final test).

Vocabulary mapping. Fine-tuning data is prepared on its own and has its own index space; indices
of two preparations mean nothing to each other. The pretrained model is therefore moved onto the
fine-tuning data's indices by ORIGINAL id: the run directory keeps the vocabulary it was trained
on (RUN_DIR/vocab, checked against the checkpoint's vocab hash), and row i of the new item table
is the pretrained row of the item whose item_id equals the new index i's item_id; an item the
pretrained model never saw gets a fresh row, drawn like the pretrained table's initial rows. Users
(the MF user table) are mapped the same way. Everything else is copied unchanged. The counts of
known and new items and users are logged and recorded in `config.vocabulary`, hence in every
checkpoint's meta and in metrics.json; every worker recomputes the mapping and refuses to train
if its counts differ from the driver's.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from flm_dist.checkpoint import checkpoint_or_best, load_checkpoint, read_meta
from flm_dist.config import (
    EvalConfig,
    LossConfig,
    ModelConfig,
    ScalingConfig,
    TrainConfig,
    from_dict,
    require,
    require_sampled_softmax_for_item_rows,
    require_user_table_for_sparse_users,
)
from flm_dist.data import filter_users
from flm_dist.errors import UserError
from flm_dist.logs import setup_logging
from flm_dist.models import FLMModel
from flm_dist.models.recommender import Recommender
from flm_dist.pretrain import build_model, launch_training, read_manifest, train_loop

log = logging.getLogger("flm_dist")


@dataclasses.dataclass
class FinetuneOptions:
    mode: Literal["full", "frozen"] = "full"
    """full: every parameter trains; frozen: the pretrained encoders, fusion, item table and flow
    are fixed (requires_grad False, eval mode) and only the head trains."""
    data_fraction: float = 1.0
    """Fine-tune on this fraction of the users, drawn from (train.seed, user index) so every
    worker keeps the same ones (and a smaller fraction's users are a subset of a larger one's);
    validation and test always cover every user."""
    flow: Literal["none", "latent", "density", "whiten"] = "latent"
    """How the flow enters the user vector: none (never evaluated); latent: head([repr ; z]) with
    z the flow's Gaussianised latent of the representation; density: head([repr ; log p / H]);
    whiten: head([repr ; ZCA-whitened repr]), a fixed linear whitening instead of the flow."""
    head: Literal["linear", "mlp", "identity"] = "linear"
    """Map from the features to the user vector; linear and mlp start as the identity on the
    representation, identity (flow none only) scores with the representation itself."""
    source: Literal["fused", "sequence", "cf"] = "fused"
    """Backbone representation the head reads: fused (CF + sequence), sequence state, or the MF
    user vector. Flow features need fused: the flow models the fused representation."""
    dropout: float | None = None
    """Dropout of the pretrained sequence encoder while fine-tuning; None keeps the pretrained
    value (the only architecture setting fine-tuning may change)."""
    init: Literal["pretrained", "random"] = "pretrained"
    """pretrained: the model starts from the pretrained weights, mapped by id; random: the
    pretrained run gives only the architecture and the vocabulary, and every weight is drawn
    fresh from train.seed. This is the from-scratch baseline: the same recipe and users, no
    pretraining."""
    keep_pretrained: bool = False
    """Validate the pretrained model before the first step, as epoch 0: it competes for best/,
    so a fine-tuning that only makes validation worse ends with the pretrained ranking."""

    def __post_init__(self):
        require(0.0 < self.data_fraction <= 1.0, "data_fraction", "must be in (0, 1]")
        require(self.dropout is None or 0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        require(self.flow == "none" or self.source == "fused", "flow",
                "flow features need source=fused (the flow models the fused representation)")
        require(self.head != "identity" or self.flow == "none", "head",
                "identity takes no flow features; use linear or mlp, or flow=none")
        require(self.mode == "full" or self.head != "identity", "mode",
                "frozen with an identity head leaves nothing to train")
        require(self.mode == "full" or self.init == "pretrained", "mode",
                "frozen with init=random would keep random encoders; use mode=full")
        require(not self.keep_pretrained or self.init == "pretrained", "keep_pretrained",
                "needs init=pretrained (with init=random there is no pretrained model to keep)")


@dataclasses.dataclass
class FinetuneLossConfig(LossConfig):
    """LossConfig with fine-tuning's meaning and defaults: the head's next-item losses only."""

    seq: float = 1.0
    """Weight of the next-item CE of the user vector after every position with a target."""
    cf: float = 0.0
    """Weight of the backbone's MF loss, an auxiliary term."""
    flow: float = 0.0
    """Weight of the flow's NLL per dimension, which keeps a fine-tuned flow a density model."""
    fused: float = 1.0
    """Weight of the next-item CE of the user vector after the last position (the ranked one)."""


@dataclasses.dataclass
class VocabularyCounts:
    items_known: int = 0
    """Fine-tuning items the pretrained model knows (their rows are the pretrained rows)."""
    items_new: int = 0
    """Fine-tuning items the pretrained model never saw (fresh rows)."""
    items_unused: int = 0
    """Pretrained items absent from the fine-tuning data (their rows are left out)."""
    users_known: int = 0
    """Fine-tuning users the pretrained model knows (their MF vectors are the pretrained ones)."""
    users_new: int = 0
    """Fine-tuning users the pretrained model never saw (fresh MF vectors)."""
    users_unused: int = 0
    """Pretrained users absent from the fine-tuning data."""


@dataclasses.dataclass
class FinetuneConfig:
    pretrained: str = ""
    """Pretraining run directory (its `best/` is used) or a pretraining checkpoint directory."""
    data: str = ""
    """Prepared data to fine-tune and evaluate on; its vocabulary may differ from pretraining's."""
    output: str = ""
    """Run directory: Ray checkpoints, `best/`, `metrics.json`, `tensorboard/`, `vocab/`."""
    model: ModelConfig | None = None
    """The pretrained architecture, filled in by `resolve` from the checkpoint (dropout from
    `finetune.dropout`); a given value must equal that."""
    loss: FinetuneLossConfig = dataclasses.field(default_factory=FinetuneLossConfig)
    """Loss terms and their weights (fine-tuning defaults: seq and fused)."""
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    """Optimisation, precision, checkpointing, early stopping (as in pretraining)."""
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    """Ranking protocol; `user_source` must be `finetune.source`."""
    scaling: ScalingConfig = dataclasses.field(default_factory=ScalingConfig)
    """Workers and resources."""
    finetune: FinetuneOptions = dataclasses.field(default_factory=FinetuneOptions)
    """Mode, data fraction, how the flow enters, head, representation source."""
    vocabulary: VocabularyCounts = dataclasses.field(default_factory=VocabularyCounts)
    """Filled in by `resolve` from the two vocabularies (a given value is replaced): the record of
    the id mapping, kept in every checkpoint and in metrics.json."""

    def __post_init__(self):
        require(bool(self.pretrained), "pretrained", "is required (a pretraining run or checkpoint directory)")
        require(bool(self.data), "data", "is required (a directory written by `flm prepare`)")
        require(bool(self.output), "output", "is required (the run directory)")
        require(self.loss.seq + self.loss.fused > 0, "loss.seq",
                "the head trains through loss.seq and loss.fused; at least one must be > 0")
        require(self.loss.flow == 0 or (self.finetune.mode == "full" and self.finetune.flow in ("latent", "density")),
                "loss.flow", "the flow NLL needs a flow that is used and trained (finetune.flow latent or "
                "density, finetune.mode full)")
        require(self.loss.contrast == 0, "loss.contrast", "is a pretraining term; fine-tuning has none")
        require(self.loss.cf == 0 or self.finetune.mode == "full", "loss.cf",
                "frozen mode fixes the MF user vectors; set loss.cf=0")
        require(self.eval.user_source == self.finetune.source, "eval.user_source",
                f"must be finetune.source ({self.finetune.source}): the head is trained on that representation")
        require_sampled_softmax_for_item_rows(self.train, self.loss)
        if self.model is not None:  # else `resolve` checks it with the pretrained model
            require_user_table_for_sparse_users(self.train, self.model)


# ---------------------------------------------------------------------------------------------
# The pretrained checkpoint and its vocabulary
# ---------------------------------------------------------------------------------------------


def pretrained_checkpoint(path: str) -> tuple[Path, dict[str, Any]]:
    """(checkpoint directory, meta): `path` itself if it is a checkpoint, else `path/best`."""
    directory = checkpoint_or_best(path)
    meta = read_meta(directory)
    kind = meta.get("kind", "pretrain")
    if kind != "pretrain":
        raise UserError(f"{directory} is a {kind} checkpoint; fine-tune from a pretraining checkpoint")
    return directory, meta


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


def vocabulary_hash(vocab_dir: Path) -> dict[str, str]:
    """The vocab hash `flm prepare` records in manifest.json, recomputed from vocab/*.parquet."""
    from flm_dist.prepare import _table_hash

    return {name: _table_hash(pq.read_table(vocab_dir / f"{name}.parquet")) for name in ("items", "users")}


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

    def counts(self) -> VocabularyCounts:
        items_known, users_known = int((self.items[1:] >= 0).sum()), int((self.users >= 0).sum())
        return VocabularyCounts(items_known=items_known, items_new=len(self.items) - 1 - items_known,
                                items_unused=self.pretrained_items - items_known, users_known=users_known,
                                users_new=len(self.users) - users_known,
                                users_unused=self.pretrained_users - users_known)


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
    return VocabularyMapping(items=np.concatenate([[0], items]), users=users,
                             pretrained_items=tables["old", "items"].num_rows,
                             pretrained_users=tables["old", "users"].num_rows)


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


# ---------------------------------------------------------------------------------------------
# The model and the training users
# ---------------------------------------------------------------------------------------------


def _recommender(config: FinetuneConfig, backbone: FLMModel) -> Recommender:
    options = config.finetune
    return Recommender(backbone, head=options.head, flow=options.flow, source=options.source,
                       frozen=options.mode == "frozen")


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
    backbone = build_model(config.model, manifest["users"], manifest["items"])
    if config.finetune.init == "pretrained":
        load_pretrained_weights(backbone, load_checkpoint(checkpoint)[0]["model"], mapping)
    return _recommender(config, backbone)


def rebuild_model(meta: dict[str, Any], manifest: dict[str, Any]) -> Recommender:
    """The (untrained) model of a fine-tuning checkpoint, for `load_model_for_data` to load into."""
    config = from_dict(FinetuneConfig, meta["config"])
    return _recommender(config, build_model(config.model, manifest["users"], manifest["items"]))


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


def _train(config: FinetuneConfig, session) -> dict[str, Any]:
    return train_loop(config, session, model_factory=functools.partial(build_recommender, config),
                      train_filter=_train_filter(config), kind="finetune",
                      validate_first=config.finetune.keep_pretrained)


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def finetune_worker(payload: dict[str, Any]) -> None:
    """Ray Train entry point: rebuild the config from plain data and run the loop."""
    from flm_dist.ray_seam import RaySession

    setup_logging()
    config = from_dict(FinetuneConfig, payload["config"])
    _train(config, RaySession(config.output))


def resolve(config: FinetuneConfig) -> FinetuneConfig:
    """`config` ready to train: absolute paths (Ray workers do not share the driver's working
    directory), the pretrained checkpoint directory, its model and the vocabulary counts."""
    from flm_dist.ray_seam import absolute_storage_path

    checkpoint, meta = pretrained_checkpoint(config.pretrained)
    data = absolute_storage_path(config.data)
    mapping = map_vocabulary(pretrained_vocabulary(checkpoint, meta, data), data)
    return dataclasses.replace(config, pretrained=str(checkpoint), data=data,
                               output=absolute_storage_path(config.output),
                               model=_pretrained_model(config, meta), vocabulary=mapping.counts())


def run_finetune(config: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune on Ray Train (or in this process with `scaling.workers=0`); returns metrics.json."""

    config = resolve(config)
    counts = config.vocabulary
    log.info("vocabulary mapped by original id: items %d known, %d new (%d pretrained unused); "
             "users %d known, %d new (%d pretrained unused)", counts.items_known, counts.items_new,
             counts.items_unused, counts.users_known, counts.users_new, counts.users_unused)
    if config.finetune.init == "random":
        log.info("finetune.init=random: training from scratch; %s gives only the architecture and "
                 "vocabulary", config.pretrained)
    if counts.items_new and config.finetune.mode == "frozen":
        log.warning("%d new items keep random, frozen rows in frozen mode: they will rank at random",
                    counts.items_new)
    return launch_training(config, "finetune", _train, finetune_worker)


# ---------------------------------------------------------------------------------------------
# Command line: `flm finetune`, `flm export`, `flm ablate`
# ---------------------------------------------------------------------------------------------


def _config_data(args, flags: dict[str, Any]) -> dict[str, Any]:
    """defaults <- YAML (--config) <- flags <- key=value overrides, as a plain mapping."""
    from flm_dist.config import apply_overrides, read_yaml

    data = read_yaml(args.config) if args.config else {}
    given = [f"{key}={json.dumps(value)}" for key, value in flags.items() if value is not None]
    return apply_overrides(data, given + args.overrides)


def _cmd_finetune(args) -> None:
    from flm_dist.pretrain import final_metrics_table

    config = from_dict(FinetuneConfig, _config_data(args, {
        "pretrained": args.pretrained, "data": args.data, "output": args.output,
        "scaling.workers": args.workers, "scaling.gpus_per_worker": args.gpus_per_worker}))
    summary = run_finetune(config)
    print(final_metrics_table(summary["final"]))
    print(f"vocabulary: {json.dumps(summary['config']['vocabulary'], sort_keys=True)}")
    print(f"run directory: {config.output} (metrics.json, best/, tensorboard/)")


def _cmd_export(args) -> None:
    from flm_dist.export import ExportConfig, run_export

    config = from_dict(ExportConfig, _config_data(args, {
        "checkpoint": args.checkpoint, "data": args.data, "output": args.output, "k": args.k,
        "split": args.split, "workers": args.workers, "gpus_per_worker": args.gpus_per_worker}))
    print(json.dumps(run_export(config), indent=2, sort_keys=True))


def _cmd_ablate(args) -> None:
    from flm_dist.ablate import AblateConfig, run_ablation

    config = from_dict(AblateConfig, _config_data(args, {
        "data": args.data, "output": args.output, "seeds": args.seeds, "first_seed": args.first_seed,
        "fractions": args.fractions, "parallel": args.parallel, "results": args.results}))
    run_ablation(config)
    print((Path(config.output) / "ablation.md").read_text())


def _fractions(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _add_config_arguments(parser) -> None:
    parser.add_argument("--config", help="YAML preset")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def add_commands(commands) -> None:
    """Register `finetune`, `export` and `ablate` on the `flm` subparsers."""
    finetune = commands.add_parser("finetune", help="fine-tune a recommender from a pretrained run (Ray Train)")
    finetune.add_argument("--pretrained", required=True, help="pretraining run directory (uses best/) or checkpoint")
    finetune.add_argument("--data", required=True, help="prepared data to fine-tune on (any vocabulary)")
    finetune.add_argument("--output", required=True, help="run directory")
    finetune.add_argument("--workers", type=int, help="Ray Train workers (0: in this process)")
    finetune.add_argument("--gpus-per-worker", type=float)
    _add_config_arguments(finetune)
    finetune.set_defaults(run=_cmd_finetune)

    export = commands.add_parser("export", help="embeddings and top-K recommendations as Parquet (Ray Data)")
    export.add_argument("--checkpoint", required=True, help="checkpoint directory (pretrained or fine-tuned)")
    export.add_argument("--data", required=True, help="prepared data with the checkpoint's vocabulary")
    export.add_argument("--output", required=True, help="output directory or URI (replaced atomically)")
    export.add_argument("--k", type=int, help="recommendations per user (default 50)")
    export.add_argument("--split", help="whose histories to recommend after: test (default) or valid")
    export.add_argument("--workers", type=int, help="scoring actors")
    export.add_argument("--gpus-per-worker", type=float)
    _add_config_arguments(export)
    export.set_defaults(run=_cmd_export)

    ablate = commands.add_parser("ablate", help="the Pretraining-FLM ablation on one dataset")
    ablate.add_argument("--data", required=True, help="prepared data directory")
    ablate.add_argument("--output", required=True, help="directory for runs, ablation.md, ablation.json")
    ablate.add_argument("--seeds", type=int, help="seeds per variant (default 3)")
    ablate.add_argument("--first-seed", type=int, help="the first seed (default 0)")
    ablate.add_argument("--fractions", type=_fractions,
                        help="fine-tuning user fractions, comma separated (default 1.0,0.1)")
    ablate.add_argument("--parallel", type=int,
                        help="stages at once, as Ray tasks (default 1: one after another here)")
    ablate.add_argument("--results", help="directory of the seed results (default OUTPUT/seeds)")
    _add_config_arguments(ablate)
    ablate.set_defaults(run=_cmd_ablate)
