"""Typed configs: dataclasses with a docstring per field, YAML presets, `key.sub=value` overrides.

Every job config is a dataclass validated in `__post_init__`. `merged_settings` is the one place
settings are merged, in order: the dataclass defaults, YAML presets (several compose, later ones
win), command-line flags, then `key.sub=value` overrides; `from_dict` rejects unknown keys and
wrong types with one line naming the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from typing import Any, Literal, Sequence, TypeVar

import yaml

from flm_dist.errors import UserError

T = TypeVar("T")
_DECIMAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigKeyError(UserError):
    """A config value is unknown, of the wrong type or out of range; `key` is its dotted path."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.reason = message
        super().__init__(f"config key '{key}': {message}")


def require(condition: bool, key: str, message: str) -> None:
    """Validation helper for `__post_init__`: raise a ConfigKeyError naming `key` unless `condition`."""
    if not condition:
        raise ConfigKeyError(key, message)


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML/CLI value to `annotation`, or raise ConfigKeyError naming `key`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigKeyError as exc:
                errors.append(exc.reason)
        raise ConfigKeyError(key, "; ".join(errors))
    if origin is Literal:
        if value not in args:
            raise ConfigKeyError(key, f"must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigKeyError(key, f"expected a mapping, got {value!r}")
        return from_dict(annotation, value, prefix=key)
    if origin in (tuple, list):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigKeyError(key, f"expected a list, got {value!r}")
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigKeyError(key, f"expected a mapping, got {value!r}")
        key_type, value_type = args if args else (Any, Any)
        return {_coerce(k, key_type, key): _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigKeyError(key, f"expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigKeyError(key, f"expected an integer, got {value!r}")
    if annotation is float:
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        # YAML 1.1 reads 1e-3 (no dot in the mantissa) as a string
        if not is_number and not (isinstance(value, str) and _DECIMAL.fullmatch(value.strip())):
            raise ConfigKeyError(key, f"expected a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float range
            number = math.inf
        # No setting means anything at .inf or .nan (YAML's spellings, or 1e999), and the range
        # checks of __post_init__ would pass some (lr=.inf is > 0, grad_clip=.inf >= 0).
        if not math.isfinite(number):
            raise ConfigKeyError(key, f"must be a finite number, got {value!r}")
        return number
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigKeyError(key, f"expected a string, got {value!r}")
    raise ConfigKeyError(key, f"unsupported config type {_type_name(annotation)}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigKeyError(key, f"unknown key (known keys here: {known})")
        kwargs[name] = _coerce(value, hints[name], key)
    try:
        return cls(**kwargs)
    except ConfigKeyError as exc:
        if prefix and not exc.key.startswith(prefix + "."):
            raise ConfigKeyError(f"{prefix}.{exc.key}", exc.reason) from None
        raise


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) of a config dataclass; JSON and YAML serialisable."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_hash(config: Any) -> str:
    """Stable short hash of a config, used to detect 'same job, same settings'."""
    return hashlib.sha256(json.dumps(to_dict(config), sort_keys=True).encode()).hexdigest()[:16]


def parse_override(text: str) -> tuple[list[str], Any]:
    """`model.hidden=64` -> (['model', 'hidden'], 64); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"override {text!r} is not of the form key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with each `key.sub=value` override set (creating nested dicts)."""
    merged = json.loads(json.dumps(data))
    for text in overrides:
        path, value = parse_override(text)
        node = merged
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"override {text!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return merged


def read_yaml(path: str) -> dict[str, Any]:
    """Read a YAML mapping from a local path or any fsspec URI, with a clear error."""
    import fsspec

    try:
        with fsspec.open(path, "r") as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"config file {path} is not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"config file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping at the top level")
    return data


def merged_settings(presets: str | Sequence[str] | None = None, flags: dict[str, Any] | None = None,
                    overrides: Sequence[str] = (), base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The one merge path of every config, as plain data: `base` <- YAML presets (in order, each
    deep-merged over the last, so a dataset file and a recipe file compose) <- flags (dotted keys;
    None means not given) <- `key.sub=value` overrides."""
    data: dict[str, Any] = dict(base or {})
    for path in [presets] if isinstance(presets, str) else list(presets or []):
        data = deep_merge(data, read_yaml(path))
    given = {}
    for dotted, value in (flags or {}).items():
        if value is None:
            continue
        node = given
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return apply_overrides(deep_merge(data, given), list(overrides))


def load_config(cls: type[T], presets: str | Sequence[str] | None = None, overrides: Sequence[str] = (),
                base: dict[str, Any] | None = None, flags: dict[str, Any] | None = None) -> T:
    """`merged_settings(...)` validated into `cls` (defaults for everything not given)."""
    return from_dict(cls, merged_settings(presets, flags, overrides or (), base))


def deep_merge(left: dict[str, Any], right: dict[str, Any]) -> dict[str, Any]:
    """`left` with `right` laid over it; mappings merge key by key, anything else is replaced."""
    merged = dict(left)
    for key, value in right.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# --------------------------------------------------------------------------------------------
# Shared sections of the training-job configs (pretrain, finetune, evaluate, tune).
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ModelConfig:
    hidden: int = 64
    """Width of every representation: item and user embeddings, encoder states, flow dims."""
    max_len: int = 50
    """Longest item history the sequence encoder sees; longer ones are cut into windows."""
    layers: int = 2
    """Transformer blocks (or recurrent layers) in the sequence encoder."""
    heads: int = 2
    """Attention heads of the SASRec encoder; must divide `hidden`."""
    dropout: float = 0.5
    """Dropout in the sequence encoder (embeddings, attention output, feed-forward)."""
    encoder: Literal["sasrec", "gru", "lstm"] = "sasrec"
    """Sequence encoder: causal transformer (SASRec) or a recurrent net."""
    positions: Literal["first", "last"] = "last"
    """SASRec position ids counted from the first item of the window (a training prefix then
    looks exactly as it does when ranked) or back from the most recent item (original SASRec)."""
    norm: Literal["pre", "post"] = "pre"
    """SASRec LayerNorm placement: `pre` (x + f(LN(x)), a final LN, embeddings scaled by
    sqrt(hidden)) or `post` (LN(x + f(x)), a LayerNorm on the embedding sum: RecBole's SASRec)."""
    mixer: Literal["attention", "bsarec", "fmlp"] = "attention"
    """SASRec token mixer: causal self-attention; `bsarec`, attention plus a frequency filter of
    the window (BSARec: low-pass + beta^2 high-pass, mixed by `filter_alpha`); `fmlp`, a learned
    frequency filter instead of attention (FMLP-Rec). The filters see the whole window, later
    items too, so they need `train.windows=prefixes` (only the last position is trained)."""
    filter_alpha: float = 0.7
    """BSARec: weight of the filter branch; 1 - alpha goes to attention (BSARec's Beauty setting)."""
    filter_cutoff: int = 5
    """BSARec's `c`: the low-pass part keeps the lowest c // 2 + 1 frequency bins of the
    `max_len` window (5: 3 bins, BSARec's Beauty setting)."""
    init_std: float = 0.0
    """Initialise the item, position and attribute tables and the sequence encoder's linear
    layers from N(0, init_std) with zero biases (RecBole's SASRec and BERT: 0.02); 0 keeps the
    default (tables std 1/sqrt(hidden), linear layers PyTorch's uniform). The CF encoder, the
    fusions, the user head and the flow keep their own initialisation."""
    dropout_masks: Literal["bernoulli", "bits"] = "bernoulli"
    """Where the sequence encoder's dropout masks come from: `bernoulli`, torch's per-element
    draws; `bits`, 16-bit slices of 64-bit random words against a threshold (p rounded to a
    multiple of 1/65536; models/dropout.py). On a CPU `bits` makes the masks about 6x cheaper,
    where Bernoulli draws took a third of the SASRec step. Another random stream: a run with one
    does not repeat a run with the other step for step. On a GPU, torch's masks are cheap and fused
    into its attention kernel, so `bits` leaves them to torch there. GRU/LSTM inter-layer dropout
    stays torch's."""
    cf_user: Literal["table", "history"] = "table"
    """The CF encoder's user vector: `table`, matrix factorisation (a learned row per user,
    fitted to all of the user's training items), or `history`, item-based factorisation (a
    learned linear map of the mean of the shared item rows the user has seen so far: no row per
    user, and nothing after the position it predicts from)."""
    user_head: Literal["none", "linear"] = "none"
    """Map from the sequence encoder's state to the vector scored against the items: `none`, the
    state itself (SASRec), or `linear`, an identity-initialised W h + b, whose bias b scores every
    item by b . e_i (a learned popularity term). Every use of the sequence state goes through it:
    the sequence loss, the fusion, ranking and the representation fine-tuning reads."""
    fusion: Literal["concat", "sum", "gate"] = "concat"
    """How the CF user vector and the sequence state become one user representation."""
    flow_layers: int = 4
    """Coupling layers of the normalising flow (each with ActNorm and a permutation)."""
    flow_hidden: int = 128
    """Width of the coupling networks inside the flow."""
    flow_kind: Literal["affine", "spline"] = "affine"
    """Affine (RealNVP) or rational-quadratic spline couplings."""
    flow_stop_gradient: bool = True
    """Stop the flow NLL's gradient at the user representation, so encoders cannot lower it by
    collapsing representations; the flow then only models what the encoders learned."""
    item_features: Literal["none", "add", "gate", "concat"] = "none"
    """Item side information (data prepared with `item_features.uri`): `none` ignores it (the
    id-only model); otherwise a bag-of-attributes encoder is fused into the shared item table the
    CF encoder, the sequence encoder and scoring use: `add` (id row + pooled attributes), `gate`
    (a learned per-dimension mix), `concat` (a projection of both, starting as add). Cold items
    (features, no interactions) are then scored from their attributes (export, serve)."""

    def __post_init__(self):
        require(self.hidden > 0, "hidden", "must be positive")
        require(self.max_len > 1, "max_len", "must be at least 2")
        require(self.layers > 0, "layers", "must be positive")
        require(self.heads > 0 and self.hidden % self.heads == 0, "heads", f"must divide hidden={self.hidden}")
        require(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        require(self.flow_layers >= 0, "flow_layers", "must be >= 0")
        require(self.init_std >= 0.0, "init_std", "must be >= 0 (0 keeps the default initialisation)")
        require(self.flow_hidden > 0, "flow_hidden", "must be positive")
        require(self.mixer == "attention" or self.encoder == "sasrec", "mixer", "needs encoder=sasrec")
        require(0.0 <= self.filter_alpha <= 1.0, "filter_alpha", "must be in [0, 1]")
        require(1 <= self.filter_cutoff <= self.max_len, "filter_cutoff", f"must be in [1, max_len={self.max_len}]")


WEIGHTED_LOSS_TERMS = ("seq", "cf", "flow", "fused", "contrast", "attributes", "intent")
# Logged only when their weight is > 0, so runs without them log what they did before.
OPTIONAL_LOSS_TERMS = ("attributes", "intent")


def cosine_decay(progress: float) -> float:
    """1 at progress 0, falling along a half cosine to 0 at progress 1."""
    return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


@dataclasses.dataclass
class LossConfig:
    seq: float = 1.0
    """Weight of the sequence encoder's next-item loss at every position."""
    cf: float = 1.0
    """Weight of the matrix-factorisation loss."""
    flow: float = 0.1
    """Weight of the flow's negative log-likelihood (per dimension) of the user representation."""
    fused: float = 1.0
    """Weight of the next-item loss of the fused user representation."""
    cf_loss: Literal["ce", "bpr"] = "ce"
    """CF objective: full-softmax cross-entropy or BPR with sampled negatives."""
    softmax: Literal["full", "sampled"] = "full"
    """Full softmax over all items, or sampled softmax with logQ correction for huge catalogs."""
    num_negatives: int = 256
    """Extra negatives per batch for sampled softmax and BPR (in-batch negatives come free)."""
    max_in_batch_negatives: int = 0
    """Sampled softmax: at most this many of the batch's targets, a random subset, serve as
    in-batch negatives (0: all of them). The logit block is [rows x (in-batch + num_negatives)]
    with rows = batch x max_len, so this bounds it at large batches (1024 x 200 rows would
    otherwise give a 204,800-column block)."""
    negative_sampling: Literal["uniform", "popularity"] = "uniform"
    """Distribution of the extra negatives; logQ correction uses its log-probabilities."""
    chunk_size: int = 0
    """Full softmax: compute logits this many rows at a time (recomputed in backward), so a
    [rows x catalog] block never lives whole; 0 computes them at once."""
    contrast: float = 0.0
    """Weight of the contrastive term (DuoRec's regulariser): InfoNCE between the sequence
    encoder's last state and that of a second pass with other dropout masks, the other
    sequences of the batch as negatives (those with the same next item left out). It spreads
    the user vectors, and through the dot product the item rows, over the space; it costs a
    second encoder pass per step. Pretraining only."""
    contrast_temperature: float = 1.0
    """Temperature of the contrastive term's dot-product logits (DuoRec uses 1)."""
    contrast_positive: Literal["dropout", "same_target"] = "dropout"
    """The contrastive term's positive for each window: `dropout`, the same window under other
    dropout masks (DuoRec's unsupervised view); `same_target`, another of the worker's training
    windows with the same next item, drawn afresh each epoch (DuoRec's supervised view, ICSRec's
    coarse-grained intent), or the window itself when no other has its target. Either costs one
    more encoder pass a step."""
    attributes: float = 0.0
    """Weight of the attribute objective (needs model.item_features): multi-label BCE of each
    target item's attributes from its id row and from the sequence state that predicts it.
    Logged as loss/attributes only when > 0, so runs without it log what they did before."""
    intent: float = 0.0
    """Weight of the intent contrastive term (ICSRec's fine-grained intent, after ICLRec): at
    each epoch's start the last sequence states of all the workers' training windows are
    clustered by k-means into `intent_clusters` intents (eval mode, no gradients); each step,
    InfoNCE pulls a window's state towards the centroid nearest to it, the other windows'
    centroids as negatives (those of the same intent left out). Costs an encoder pass over the
    training windows per epoch, without the item softmax. Logged as loss/intent only when > 0.
    Pretraining only."""
    intent_clusters: int = 256
    """Number of k-means intents of the intent term (ICSRec uses 256 on Beauty, Toys and Sports)."""
    intent_temperature: float = 1.0
    """Temperature of the intent term's dot-product logits (ICSRec uses 1)."""
    label_smoothing: float = 0.0
    """Label smoothing eps of the full-softmax CE terms (seq, fused, CF with cf_loss=ce): each
    target keeps 1 - eps of the probability mass and eps is spread evenly over all items, which
    caps how sharply the model may bet on one item. Costs nothing; needs softmax=full."""
    decay: list[Literal["seq", "cf", "fused", "flow", "contrast", "attributes", "intent"]] = dataclasses.field(
        default_factory=list)
    """Terms whose weight falls from its set value towards 0 along a cosine of the optimiser
    step over the run (e.g. `[cf, fused, flow]`): the auxiliary terms shape the shared item
    table early and leave the last steps to the remaining terms. Empty: constant weights."""

    def __post_init__(self):
        for name in WEIGHTED_LOSS_TERMS:
            require(getattr(self, name) >= 0.0, name, "loss weights must be >= 0")
        require(self.contrast_temperature > 0, "contrast_temperature", "must be > 0")
        require(self.intent_temperature > 0, "intent_temperature", "must be > 0")
        require(self.intent_clusters >= 2, "intent_clusters", "must be >= 2")
        require(self.contrast_positive == "dropout" or self.contrast > 0, "contrast_positive",
                "needs loss.contrast > 0")
        require(self.seq + self.cf + self.fused > 0, "seq", "at least one of seq, cf, fused must be > 0")
        require(self.num_negatives > 0, "num_negatives", "must be positive")
        require(self.max_in_batch_negatives >= 0, "max_in_batch_negatives", "must be >= 0")
        require(self.chunk_size >= 0, "chunk_size", "must be >= 0")
        require(0.0 <= self.label_smoothing < 1.0, "label_smoothing", "must be in [0, 1)")
        require(self.label_smoothing == 0 or self.softmax == "full", "label_smoothing", "needs softmax=full")
        require(len(set(self.decay)) == len(self.decay), "decay", "names a term twice")
        kept = [name for name in ("seq", "cf", "fused") if getattr(self, name) > 0 and name not in self.decay]
        require(bool(kept), "decay", "must leave at least one of seq, cf, fused with a constant weight > 0")

    def weights(self, progress: float = 0.0) -> dict[str, float]:
        """Weight of each term at `progress` (optimiser step / total steps, in [0, 1)); the
        decayed terms stay above 0 before the last step, so no term drops out of the graph."""
        factor = cosine_decay(progress)
        return {name: getattr(self, name) * (factor if name in self.decay else 1.0)
                for name in WEIGHTED_LOSS_TERMS if name not in OPTIONAL_LOSS_TERMS or getattr(self, name) > 0}


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 200
    """Upper bound on passes over the training windows (early stopping usually ends sooner)."""
    batch_size: int = 256
    """Windows per optimiser micro-step on each worker."""
    grad_accum: int = 1
    """Micro-steps per optimiser step."""
    lr: float = 1e-3
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay on matrices (never on embeddings, norms or biases)."""
    user_lr_scale: float = 1.0
    """Learning-rate multiplier for the CF user table. A user's row only gets a gradient in the
    batches that hold that user (about once per epoch), while item rows and encoder weights get
    one nearly every step, so at the shared `lr` the MF user vectors hardly train."""
    sparse_user_table: bool = False
    """Give the CF user table sparse gradients and lazy Adam updates (`LazyRowAdamW`): a step
    reads, writes and (in DDP) exchanges only the rows of its batch's users, so its cost follows
    the batch, not the number of users. A row's moments then only move when it is touched, so
    this is not the same optimiser as dense AdamW; see the README's performance section."""
    sparse_item_table: bool = False
    """The same for the shared item table (needs `loss.softmax=sampled`, under which a step looks
    up only its batch's items and the sampled negatives): the optimiser step and the DDP
    exchange follow those rows, not the catalog."""
    warmup_steps: int = 100
    """Linear warm-up steps before the cosine decay."""
    min_lr_ratio: float = 0.1
    """Cosine decay floor, as a fraction of `lr`."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    windows: Literal["all", "last", "prefixes"] = "all"
    """Train on every `max_len` window of long sequences (`all`), only the most recent one
    (`last`), or one window per target, the up to `max_len` items before it (`prefixes`,
    RecBole's augmentation; about average-length times more transformer work per epoch)."""
    early_dropout: float | None = None
    """The sequence encoder's dropout in the first `early_dropout_epochs` epochs; the model's own
    from then on (`model.dropout`; in fine-tuning `finetune.dropout` or the pretrained value).
    None: the model's own throughout. Less dropout early reaches a given quality in fewer epochs;
    the full dropout later regularises the rest of the run ("late dropout"). Not with DP
    fine-tuning."""
    early_dropout_epochs: int = 0
    """How many epochs, from the first, train with `early_dropout`."""
    seed: int = 42
    """Seeds parameters, shuffling, dropout and negative sampling."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """bf16 autocast on GPU with `auto`, fp32 on CPU; `bf16` autocasts on a CPU too where it has
    native bf16 (AVX512-BF16; else it falls back to fp32 with a warning). The flow always runs in
    fp32."""
    compile: bool = False
    """torch.compile the model. It compiles again for new batch widths and breaks its graph at
    the attributes' sparse pooling: on an H200 the Toys preset's step averaged 148 ms over its first
    120 steps, against 9.8 ms eager (docs/benchmarks.md "On an H200")."""
    cudnn_attention: bool = False
    """Let GPU steps use cuDNN's fused attention. It builds a plan for each new input shape, and
    batches come in up to max_len / 8 widths: on an H200 that took 5.9 s of the Toys preset's
    first epoch (10.6 s against 4.7 s), with later epochs as fast either way, so by default the
    memory-efficient kernel runs instead (docs/benchmarks.md "On an H200"). No effect on a CPU."""
    checkpoint_every_steps: int = 0
    """Also checkpoint every N optimiser steps (0: only at the end of each epoch)."""
    eval_every_epochs: int = 1
    """Validate every N epochs."""
    eval_from_epoch: int = 1
    """Validate no epoch before this one (the last epoch always is). Early validations rarely hold
    the best checkpoint and never stop a run, so skipping them is time saved; early stopping's
    `patience` counts only the validations that run."""
    patience: int = 10
    """Stop after this many validations without improvement of `eval.monitor`."""
    stop_at: float = 0.0
    """Stop as soon as a validation of `eval.monitor` reaches this value (0: never); the best
    checkpoint and the final test are as for any other stop. For time to quality."""
    time_budget_minutes: float = 0.0
    """Stop after the first epoch that ends past this many minutes of training and validation in
    this process (0: no limit); that epoch is validated. The LR schedule is still planned over
    `epochs`, so pick `epochs` that fit the budget."""
    max_steps: int = 0
    """Stop after this many optimiser steps in total (0: no limit); for smoke tests and benches."""
    max_nonfinite_steps: int = 3
    """Stop the run (one-line error naming the step, the non-finite loss terms and the learning
    rate) after this many optimiser steps in a row whose loss or gradient was NaN or infinite on
    any worker. Each such step is skipped: no parameter or optimiser-state update, while the LR
    schedule and the step count advance as if it had run, so the batch plan, checkpoints and
    resume are unchanged. An isolated bad batch is skipped; several in a row mean the weights or
    the learning rate, not a batch, are the problem."""
    item_grad_exchange: Literal["dense", "rows"] = "dense"
    """How DDP ranks combine the item table's gradient: `dense` all-reduces the whole table with
    the other parameters; `rows` leaves it out of the all-reduce and all-gathers only the rows a
    step touched (needs `loss.softmax=sampled`; pays off when world x touched rows is well
    below the catalog, see the README's performance section)."""

    def __post_init__(self):
        require(self.epochs > 0, "epochs", "must be positive")
        require(self.batch_size > 0, "batch_size", "must be positive")
        require(self.grad_accum > 0, "grad_accum", "must be positive")
        require(self.lr > 0, "lr", "must be positive")
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(self.user_lr_scale > 0, "user_lr_scale", "must be positive")
        require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        require(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", "must be in [0, 1]")
        require(self.grad_clip >= 0, "grad_clip", "must be >= 0")
        require(self.checkpoint_every_steps >= 0, "checkpoint_every_steps", "must be >= 0")
        require(self.eval_every_epochs > 0, "eval_every_epochs", "must be positive")
        require(self.eval_from_epoch > 0, "eval_from_epoch", "must be positive")
        require(self.patience > 0, "patience", "must be positive")
        require(self.max_steps >= 0, "max_steps", "must be >= 0")
        require(self.stop_at >= 0, "stop_at", "must be >= 0 (0: never)")
        require(self.time_budget_minutes >= 0, "time_budget_minutes", "must be >= 0 (0: no limit)")
        require(self.max_nonfinite_steps > 0, "max_nonfinite_steps", "must be positive")
        require(self.early_dropout is None or 0.0 <= self.early_dropout < 1.0, "early_dropout",
                "must be in [0, 1) or null")
        require(self.early_dropout_epochs >= 0, "early_dropout_epochs", "must be >= 0")
        require((self.early_dropout is None) == (self.early_dropout_epochs == 0), "early_dropout",
                "set train.early_dropout and train.early_dropout_epochs together (both or neither)")
        require(not (self.compile and (self.sparse_user_table or self.sparse_item_table)), "compile",
                "torch.compile cannot compile the backward of sparse embedding gradients; use "
                "train.compile=false with sparse_user_table / sparse_item_table, or dense tables")

    def validates(self, epoch: int) -> bool:
        """Whether the scheduled validation runs after `epoch` (a run's last epoch validates anyway)."""
        return epoch >= self.eval_from_epoch and epoch % self.eval_every_epochs == 0


@dataclasses.dataclass
class EvalConfig:
    ks: tuple[int, ...] = (5, 10, 20, 50)
    """Cut-offs for HR@K, Recall@K and NDCG@K."""
    mask_history: bool = True
    """Monitor and headline the protocol that removes the user's earlier items from the ranking
    (`/full`); `/full_nomask` (nothing removed) is always computed as well."""
    monitor_metric: str = "ndcg@10"
    """Validation metric for early stopping and the best checkpoint."""
    user_source: Literal["fused", "sequence", "cf"] = "fused"
    """Which user representation ranks items at evaluation."""
    batch_size: int = 1024
    """Users scored at once."""
    max_score_elements: int = 2 ** 26
    """Memory budget of full ranking: at most this many user x item scores exist at once. 2**26
    fp32 scores are 256 MB; comparison masks and allocator slack add up to as much again. Items
    are scored in chunks of `max_score_elements // batch_size`; catalogs that fit take one chunk."""

    def __post_init__(self):
        require(len(self.ks) > 0 and all(k > 0 for k in self.ks), "ks", "must be positive integers")
        require(self.batch_size > 0, "batch_size", "must be positive")
        require(self.max_score_elements >= self.batch_size, "max_score_elements",
                f"must be at least batch_size={self.batch_size} (one item per chunk)")

    @property
    def monitor(self) -> str:
        return f"valid/{self.monitor_metric}/{'full' if self.mask_history else 'full_nomask'}"


@dataclasses.dataclass
class ScalingConfig:
    workers: int = 1
    """Ray Train workers (DDP ranks). 0 runs the loop in this process without Ray (debugging,
    single-device benchmarks)."""
    gpus_per_worker: float = 0.0
    """GPUs per worker; 0 trains on CPU with gloo."""
    cpus_per_worker: float | None = None
    """CPUs reserved per worker (fractions allowed). Unset: 1, or less where the workers would
    otherwise leave Ray Data no CPU to read with (logged); a value that does that is refused."""
    max_failures: int = 2
    """Times Ray Train restarts the worker group after a crash, resuming from the last checkpoint."""
    placement_strategy: Literal["PACK", "SPREAD"] = "PACK"
    """How workers are placed on nodes: PACK fills a node first (fastest all-reduce); SPREAD puts
    them on different nodes where it can, so losing one node costs one rank, not the whole group."""
    address: str | None = None
    """Ray cluster address (default: $RAY_ADDRESS, else a local instance)."""

    def __post_init__(self):
        require(self.workers >= 0, "workers", "must be >= 0")
        require(self.gpus_per_worker >= 0, "gpus_per_worker", "must be >= 0")
        require(self.cpus_per_worker is None or self.cpus_per_worker > 0, "cpus_per_worker", "must be positive")
        require(self.max_failures >= 0, "max_failures", "must be >= 0")

