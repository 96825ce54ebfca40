"""The configs of the two training recipes: `PretrainConfig` (`flm pretrain`) and `FinetuneConfig`
(`flm finetune`), built from the section configs of `flm_dist.config`, and the rules that span
sections (`require_*`).

They live apart from the recipes because a run directory records them: `flm_dist.runs` rebuilds a
fine-tuned model from the `FinetuneConfig` in its checkpoint without importing the training code.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from flm_dist.config import (
    EvalConfig,
    LossConfig,
    ModelConfig,
    ScalingConfig,
    TrainConfig,
    require,
)


@dataclasses.dataclass
class PretrainConfig:
    data: str = ""
    """Prepared data directory (the output of `flm prepare`)."""
    output: str = ""
    """Run directory: Ray checkpoints, `best/`, `metrics.json`, `tensorboard/`."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """Encoders, fusion and flow."""
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    """Loss terms and their weights."""
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    """Optimisation, precision, checkpointing, early stopping."""
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    """Ranking protocol used for validation and the final test."""
    scaling: ScalingConfig = dataclasses.field(default_factory=ScalingConfig)
    """Workers and resources."""

    def __post_init__(self):
        require(bool(self.data), "data", "is required (a directory written by `flm prepare`)")
        require(bool(self.output), "output", "is required (the run directory)")
        require_sampled_softmax_for_item_rows(self.train, self.loss)
        require_user_table_for_sparse_users(self.train, self.model)
        require_item_features_fit(self.model, self.loss, self.train)
        require_causal_training(self.model, self.train)


def require_item_features_fit(model: ModelConfig, loss: LossConfig, train: TrainConfig) -> None:
    """The attribute objective needs item features; fused item rows are computed, not looked up,
    so the row-wise item-table options do not apply to them."""
    require(loss.attributes == 0 or model.item_features != "none", "loss.attributes",
            "needs model.item_features (add, gate or concat) and data prepared with item_features.uri")
    require(model.item_features == "none" or not (train.sparse_item_table or train.item_grad_exchange == "rows"),
            "model.item_features", "fuses computed rows into the item table; use train.sparse_item_table=false "
            "and train.item_grad_exchange=dense")


@dataclasses.dataclass
class PrivacyOptions:
    """Differentially private fine-tuning (DP-SGD, train/private.py): off while `epsilon` is unset.

    The unit of privacy is the user: each step samples users (Poisson, rate batch_size / users)
    and takes one training example per sampled user, so a user's whole contribution to a step is
    one clipped gradient. The guarantee covers the fine-tuned weights, not pretraining, not the
    vocabularies and not the validation and test metrics (docs/guide/privacy.md).
    """

    epsilon: float | None = None
    """Target epsilon of (epsilon, delta)-DP at the user level; None = ordinary fine-tuning. The
    noise is set so that the planned steps spend at most this, and training stops before more."""
    delta: float | None = None
    """Target delta; None = 1 / (users in the fine-tuning set), recorded as used. Smaller is
    stronger; keep it below 1 / users."""
    max_grad_norm: float = 1.0
    """Each sampled user's gradient (all trained parameters together) is clipped to this L2 norm
    before the Gaussian noise (standard deviation noise multiplier x max_grad_norm) is added."""
    accountant: Literal["rdp", "prv"] = "rdp"
    """Opacus's privacy accountant: rdp (Renyi DP, the conservative classic) or prv (privacy
    random variables, a tighter epsilon for the same noise)."""

    @property
    def enabled(self) -> bool:
        return self.epsilon is not None

    def __post_init__(self):
        require(self.epsilon is None or self.epsilon > 0, "epsilon", "must be > 0 (unset turns DP off)")
        require(self.delta is None or 0 < self.delta < 1, "delta", "must be in (0, 1)")
        require(self.max_grad_norm > 0, "max_grad_norm", "must be > 0")


def require_user_table_for_sparse_users(train: TrainConfig, model: ModelConfig) -> None:
    require(not train.sparse_user_table or model.cf_user == "table", "train.sparse_user_table",
            "needs model.cf_user=table: history CF has no user table")


def require_causal_training(model: ModelConfig, train: TrainConfig) -> None:
    """A filter mixer mixes later items into every position, so a position's own target would be
    in its input wherever a position other than the last is trained."""
    require(model.mixer == "attention" or train.windows == "prefixes", "model.mixer",
            f"{model.mixer} is not causal: it needs train.windows=prefixes (only the last position is "
            f"trained), got train.windows={train.windows}")


def require_sampled_softmax_for_item_rows(train: TrainConfig, loss: LossConfig) -> None:
    """The item-row options only make sense when a step touches few item rows."""
    reason = "under full softmax every item row gets a gradient every step, and dense is cheaper"
    require(train.item_grad_exchange == "dense" or loss.softmax == "sampled", "train.item_grad_exchange",
            f"rows needs loss.softmax=sampled: {reason}")
    require(not train.sparse_item_table or loss.softmax == "sampled", "train.sparse_item_table",
            f"needs loss.softmax=sampled: {reason}")


def require_private_fit(config: "FinetuneConfig") -> None:
    """With `finetune.privacy.epsilon`, refuse what would train outside DP-SGD or break the
    user-level guarantee; each refusal is one line naming the key and the reason."""
    if not config.finetune.privacy.enabled:
        return
    key, options, train = "finetune.privacy.epsilon", config.finetune, config.train
    others = sorted(name for name, weight in config.loss.weights().items() if weight and name not in ("seq", "fused"))
    require(not others, key, f"DP trains the head's next-item losses only (loss.seq, loss.fused); set "
            f"{', '.join(f'loss.{name}=0' for name in others)}")
    require(config.scaling.workers <= 1, key, "DP fine-tuning runs on one worker (scaling.workers 0 or 1): the "
            "per-user sampling and noise are not shared across DDP ranks")
    require(train.grad_accum == 1, key, "needs train.grad_accum=1: Poisson-sampled steps are accounted one "
            "batch at a time")
    require(not (train.sparse_user_table or train.sparse_item_table), key, "sparse tables are updated row by row "
            "outside per-user clipping; set train.sparse_user_table=false and train.sparse_item_table=false")
    require(config.loss.softmax == "full", key, "needs loss.softmax=full: sampled softmax shares negatives "
            "across the batch's users and draws them from the private item counts")
    require(options.flow != "whiten", key, "finetune.flow=whiten fits its whitening on the private users' "
            "representations outside DP-SGD; use none, latent or density")
    require(options.init == "pretrained", key, "needs finetune.init=pretrained: a random start would "
            "initialise data-dependent layers (the flow's ActNorm) from private data")
    require(not options.keep_pretrained, key, "finetune.keep_pretrained chooses a model by the private users' "
            "validation items, outside the guarantee; under DP best/ is the last epoch")
    require(not train.compile, key, "needs train.compile=false (Opacus's per-sample gradient hooks)")
    require(train.early_dropout is None, key, "DP fine-tuning keeps one dropout rate; unset "
            "train.early_dropout and set finetune.dropout")
    require(train.precision != "bf16", key, "DP-SGD runs in fp32; set train.precision=auto or fp32")
    require(config.loss.label_smoothing == 0, key, "DP-SGD's per-user losses are not smoothed; set "
            "loss.label_smoothing=0")


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
    privacy: PrivacyOptions = dataclasses.field(default_factory=PrivacyOptions)
    """Differentially private fine-tuning (`finetune.privacy.epsilon`, `.delta`, `.max_grad_norm`);
    off while epsilon is unset (docs/guide/privacy.md)."""

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
    attributes_known: int = 0
    """Fine-tuning attributes (field, value) the pretrained model knows (item features only)."""
    attributes_new: int = 0
    """Fine-tuning attributes the pretrained model never saw (fresh rows)."""
    attributes_unused: int = 0
    """Pretrained attributes absent from the fine-tuning data."""


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
        require(self.loss.intent == 0, "loss.intent", "is a pretraining term; fine-tuning has none")
        require(self.loss.cf == 0 or self.finetune.mode == "full", "loss.cf",
                "frozen mode fixes the MF user vectors; set loss.cf=0")
        require(self.eval.user_source == self.finetune.source, "eval.user_source",
                f"must be finetune.source ({self.finetune.source}): the head is trained on that representation")
        require_sampled_softmax_for_item_rows(self.train, self.loss)
        require_private_fit(self)
        if self.model is not None:  # else `resolve` checks it with the pretrained model
            require_user_table_for_sparse_users(self.train, self.model)
            require_item_features_fit(self.model, self.loss, self.train)
            require_causal_training(self.model, self.train)

