"""The training loop shared by `flm pretrain` and `flm finetune`, read top to bottom.

`setup_training` (data on the device, model, optimiser, schedule) -> `train_loop` (resume, the
epoch loop with steps, checkpoints, validation and early stopping, then the final test of the best
checkpoint and `metrics.json`) -> `launch_training` (the driver: in this process with
`scaling.workers=0`, else on Ray Train). The recipes (`pretrain.py`, `finetune.py`) only say which
model to build and which users to train on.

Distributed concerns stay behind `flm_dist.train.distributed` (ranks, all-reduce) and the
session (`flm_dist.train.session.LocalSession` or `flm_dist.ray_seam.RaySession`: data shards,
reports, checkpoints).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from flm_dist import ray_seam
from flm_dist.config import ModelConfig, TrainConfig, cosine_decay, to_dict
from flm_dist.data.batches import (
    TrainArrays,
    build_eval_arrays,
    build_train_arrays,
    item_log_frequencies,
    length_bucketed_batches,
    order_by_partner_width,
    same_target_partners,
    same_width_runs,
    window_widths,
)
from flm_dist.data.cold_items import held_out_indices
from flm_dist.data.storage import check_output_path
from flm_dist.errors import UserError
from flm_dist.eval.evaluate import EvaluateConfig, evaluate_split, evaluate_with_session
from flm_dist.logs import PhaseClock, tensorboard_writer, write_scalars
from flm_dist.models import FLMModel
from flm_dist.models.dropout import dropout_rate, set_dropout_rate
from flm_dist.models.losses import ItemDistribution
from flm_dist.runs import build_model, item_attributes_for, read_manifest
from flm_dist.train import distributed
from flm_dist.train.checkpoint import (CheckpointError, first_nonfinite, load_checkpoint, publish_directory,
                                       repair_best, save_checkpoint)
from flm_dist.train.configs import PretrainConfig
from flm_dist.train.flops import step_flops
from flm_dist.train.host_memory import keep_freed_host_memory
from flm_dist.train.intents import intent_centroids
from flm_dist.train.kernels import choose_attention_kernel
from flm_dist.train.optim import LazyRowAdamW, grad_norm, warmup_cosine
from flm_dist.train.session import LocalSession
from flm_dist.train.shards import balance_users
from flm_dist.train.streams import give_ranks_their_own_streams, restore_rng_state, rng_state

log = logging.getLogger("flm_dist")


def autocasts_bf16(precision: str, device: torch.device, warn: bool = True) -> bool:
    """Whether steps run under bf16 autocast: `train.precision` on this device."""
    if precision == "auto":
        return device.type == "cuda"
    if precision == "bf16" and device.type == "cpu" and not torch.cpu._is_avx512_bf16_supported():
        # Emulated bf16 would be slower than fp32 on such a CPU, for less precision.
        if warn:
            log.warning("train.precision=bf16: this CPU has no native bf16 (AVX512-BF16); training in fp32")
        return False
    return precision == "bf16"


def loss_options(config: PretrainConfig, device: torch.device) -> dict[str, Any]:
    """Everything a training step passes to the model besides the batch."""
    popularity = None
    if config.loss.softmax == "sampled" and config.loss.negative_sampling == "popularity":
        counts = pq.read_table(Path(config.data) / "vocab" / "items.parquet", columns=["count"])
        counts = counts.column("count").to_numpy().copy()
        counts[held_out_indices(config.data) - 1] = 0  # held-out cold items' events are not training data
        popularity = ItemDistribution.from_log_weights(item_log_frequencies(counts).to(device))
    use_bf16 = autocasts_bf16(config.train.precision, device)
    return {"weights": config.loss.weights(), "cf_loss": config.loss.cf_loss, "softmax": config.loss.softmax,
            "num_negatives": config.loss.num_negatives, "popularity": popularity,
            "chunk_size": config.loss.chunk_size or None, "bf16": use_bf16,
            "seq_positions": "last" if config.train.windows == "prefixes" else "all",
            "max_in_batch_negatives": config.loss.max_in_batch_negatives,
            "contrast_temperature": config.loss.contrast_temperature,
            "label_smoothing": config.loss.label_smoothing,
            "intent_temperature": config.loss.intent_temperature}


def forward_backward(model: torch.nn.Module, batch: dict[str, torch.Tensor], options: dict[str, Any],
                     grad_accum: int) -> dict[str, torch.Tensor]:
    """One micro-step: losses under autocast (bf16 when asked), backward of the scaled total."""
    device_type = batch["input"].device.type
    kwargs = {k: v for k, v in options.items() if k != "bf16"}
    with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=options["bf16"]):
        losses = model(batch, **kwargs)
    (losses["total"] / grad_accum).backward()
    return losses


def loss_vector(losses: dict[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    """A step's loss terms in `names` order as one fp32 vector; 0 for a term not computed (weight 0)."""
    zero = losses["total"].new_zeros(())
    return torch.stack([losses.get(name, zero).detach().float() for name in names])


def nonfinite_terms(losses: torch.Tensor, names: Sequence[str], optimizer: LazyRowAdamW,
                    grad_clip: float) -> list[str]:
    """Clip the gradients for `optimizer`'s next step (when `grad_clip`) and name what was NaN or
    infinite in this update on any rank: the loss terms (`losses`, summed over the update's
    micro-steps, one per name) and `grad_norm`. An empty list means the update may be applied.

    One all-reduce of a few flags per update, so that every rank skips the same steps (a loss is
    per rank; DDP has already averaged the gradients, so a NaN on one rank is on all of them).
    """
    norm = optimizer.clip_grad_norm_(grad_clip) if grad_clip else grad_norm(optimizer.parameters())
    flags = torch.cat([losses, norm.detach().reshape(1).to(losses)]).isfinite().logical_not()
    flags = distributed.all_reduce_max(flags.float())
    return [name for name, flag in zip((*names, "grad_norm"), flags.tolist()) if flag]


def _user_table(model: torch.nn.Module) -> torch.nn.Embedding | None:
    """The CF user table (pretraining or fine-tuning model), if the model has one."""
    for name, module in model.named_modules():
        if name == "cf.user_embedding" or name.endswith(".cf.user_embedding"):
            return module
    return None


def _item_embedding(model: torch.nn.Module) -> torch.nn.Embedding:
    """The module of the shared item table (pretraining or fine-tuning model)."""
    return next(module for name, module in model.named_modules()
                if name == "item_embedding" or name.endswith(".item_embedding"))


def _param_groups(model: torch.nn.Module, train: TrainConfig) -> list[dict[str, Any]]:
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    user_table = _user_table(model)
    decay, no_decay, users = [], [], []
    for parameter in model.parameters():
        if user_table is not None and parameter is user_table.weight:
            users.append(parameter)
        elif parameter.ndim >= 2 and id(parameter) not in embeddings:
            decay.append(parameter)
        else:
            no_decay.append(parameter)
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if users:
        groups.append({"params": users, "weight_decay": 0.0, "lr": train.lr * train.user_lr_scale})
    return groups


@dataclasses.dataclass
class Progress:
    """Where training stands; all of it goes into every checkpoint."""

    epoch: int = 0
    step: int = 0
    micro_step_in_epoch: int = 0
    best_value: float = -1.0
    best_epoch: int = -1
    evals_without_improvement: int = 0
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    resumed_at_steps: list[int] = dataclasses.field(default_factory=list)
    """The step of each checkpoint this run was resumed from (crash, restart or re-run)."""
    nonfinite_steps: int = 0
    """Optimiser steps skipped in a row for a non-finite loss or gradient (`train.max_nonfinite_steps`)."""
    wall_seconds: float = 0.0
    """Seconds of setup, training and validation so far, summed over resumes (time to quality)."""


def _diverged(progress: Progress, step: int, what: str, lr: float) -> UserError:
    """The one-line error that stops a run whose training went non-finite."""
    kept = f"best/ keeps epoch {progress.best_epoch}" if progress.best_epoch >= 0 else "no best/ was published"
    return UserError(f"training diverged at step {step}: {what}, at learning rate {lr:.3g}; {kept}; "
                     f"lower train.lr (or raise train.warmup_steps) and train again with a new --output")


def _skip_step(progress: Progress, nonfinite: list[str], scheduler, limit: int) -> None:
    """Skip the update of step `progress.step + 1` (the weights and the optimiser state stay those
    of the last good step), or stop the run after `limit` such steps in a row."""
    progress.nonfinite_steps += 1
    lr = scheduler.get_last_lr()[0]
    if progress.nonfinite_steps >= limit:
        raise _diverged(progress, progress.step + 1, f"non-finite {', '.join(nonfinite)} in "
                        f"{progress.nonfinite_steps} steps in a row (train.max_nonfinite_steps={limit})", lr)
    if distributed.is_main():
        log.warning("step %d skipped: non-finite %s at learning rate %.3g (%d in a row; the run stops at %d)",
                    progress.step + 1, ", ".join(nonfinite), lr, progress.nonfinite_steps, limit)
    with warnings.catch_warnings():
        # torch warns when the first scheduler step has no optimiser step before it; here that
        # is a step skipped on purpose, and the schedule follows the step count regardless.
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step()`")
        scheduler.step()


def _write_checkpoint(directory: Path, model, optimizer, scheduler, progress: Progress,
                      config: PretrainConfig, manifest: dict[str, Any], metrics: dict[str, float],
                      kind: str, intents: torch.Tensor | None = None,
                      rng_by_rank: list[dict[str, Any]] | None = None) -> None:
    """`rng_by_rank`: every rank's random stream (`rng_state` gathered), for an exact resume."""
    state = {"model": distributed.unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "rng": rng_state(),
             "progress": dataclasses.asdict(progress)}
    if rng_by_rank is not None:
        state["rng_by_rank"] = rng_by_rank
    if intents is not None:  # the epoch's intents, so that a resume inside the epoch keeps them
        state["intents"] = intents
    meta = {"step": progress.step, "epoch": progress.epoch, "config": to_dict(config),
            "vocab_hash": manifest["vocab_hash"], "metrics": metrics, "kind": kind}
    save_checkpoint(directory, state, meta)


@dataclasses.dataclass
class TrainingSetup:
    """What `setup_training` builds for a worker: its data on the device, model, optimiser, plan."""

    manifest: dict[str, Any]
    train: TrainArrays
    widths: np.ndarray
    micro_steps_per_epoch: int
    total_steps: int
    model: FLMModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step_options: dict[str, Any]
    phase_seconds: dict[str, float]
    """Seconds of each setup phase (training data, model, optimiser): where a run's start-up goes."""


def setup_training(config: PretrainConfig, session, device: torch.device, model_factory=None,
                   train_filter=None) -> TrainingSetup:
    """This worker's training windows (read once, kept on `device`), the model and optimiser.

    Fine-tuning reuses this with `model_factory(manifest) -> nn.Module` (a model with the same
    `forward(batch, weights, **options)` / `user_representation` / `item_table` /
    `initialize_flow` interface) and `train_filter(table) -> table` (e.g. keep a fraction of the
    users).
    """
    clock = PhaseClock()
    manifest = read_manifest(config.data)
    keep_freed_host_memory(device)
    choose_attention_kernel(device, cudnn=config.train.cudnn_attention)
    torch.empty(0, device=device)  # a GPU's context is created here, in a phase of its own
    clock.lap("device")
    torch.manual_seed(config.train.seed)
    train_table = session.read_split("train")
    if train_filter is not None:
        train_table = train_filter(train_table)
    # Sorted, so the batch plan does not depend on the order Ray Data delivered the blocks.
    train_table = balance_users(train_table, device).sort_by("user")
    train = build_train_arrays(train_table, config.model.max_len, config.train.windows).to(device)
    if len(train) == 0:
        raise UserError("a worker received no training windows; use fewer workers for this data")
    widths = window_widths(train)
    # Every DDP rank must run the same number of steps: agree on the largest batch count.
    local_batches = len(length_bucketed_batches(widths, config.train.batch_size, seed=0)[1])
    micro_steps_per_epoch = int(distributed.all_reduce_max(torch.tensor(local_batches, device=device)).item())
    options = loss_options(config, device)
    clock.lap("training data")

    model = (model_factory(manifest) if model_factory else
             build_model(config.model, manifest["users"], manifest["items"],
                         item_attributes_for(config.model, config.data))).to(device)
    user_table = _user_table(model)
    if config.train.sparse_user_table and user_table is not None:
        user_table.sparse = True  # sparse gradients: LazyRowAdamW updates only the batch's users
    if config.train.sparse_item_table:
        _item_embedding(model).sparse = True  # only the batch's and the sampled negatives' items
    clock.lap("model")
    # Fused: one pass over each parameter and its moments (a CPU step is bound by memory traffic).
    optimizer = LazyRowAdamW(_param_groups(model, config.train), lr=config.train.lr, fused=device.type in ("cuda", "cpu"))
    total_steps = math.ceil(micro_steps_per_epoch / config.train.grad_accum) * config.train.epochs
    total_steps = min(total_steps, config.train.max_steps) if config.train.max_steps else total_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(config.train.warmup_steps, total_steps, config.train.min_lr_ratio))
    clock.lap("optimiser")
    return TrainingSetup(manifest, train, widths, micro_steps_per_epoch, total_steps, model, optimizer,
                         scheduler, options, clock.seconds)


def train_loop(config: PretrainConfig, session, model_factory=None, train_filter=None,
               kind: str = "pretrain", validate_first: bool = False) -> dict[str, Any]:
    """Train, validate, checkpoint and finally test the best checkpoint; `kind` is recorded in
    every checkpoint so that `load_model_for_data` can rebuild the right model. With
    `validate_first`, the untrained model is validated as epoch 0 and competes for best/."""
    entered = time.perf_counter()
    device = session.device()
    setup = setup_training(config, session, device, model_factory, train_filter)
    manifest, train, widths = setup.manifest, setup.train, setup.widths
    model, optimizer, scheduler = setup.model, setup.optimizer, setup.scheduler
    micro_steps_per_epoch, total_steps, step_options = setup.micro_steps_per_epoch, setup.total_steps, setup.step_options
    clock = PhaseClock()
    valid = build_eval_arrays(session.read_split("valid"), config.model.max_len).to(device)
    clock.lap("validation data")
    run_dir = Path(config.output)
    progress = Progress()
    intents = None  # the intent term's centroids [K, H] for the current epoch

    # ---- resume from the newest intact checkpoint, if any ----
    with session.latest_checkpoint() as checkpoint_dir:
        if checkpoint_dir is not None:
            state, meta = load_checkpoint(checkpoint_dir, map_location=device)
            if meta["vocab_hash"] != manifest["vocab_hash"]:
                raise UserError(f"cannot resume: {checkpoint_dir} was trained on another vocabulary")
            # A key the run's config lacks is an option added since, off by default: as the run was.
            if {**to_dict(ModelConfig()), **meta["config"]["model"]} != to_dict(config)["model"]:
                raise UserError(f"{config.output} holds a run with another model config "
                                f"({meta['config']['model']}); choose a new --output to start afresh")
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            progress = Progress(**state["progress"])
            restore_rng_state(state, config.train.seed, progress.step)
            intents = state.get("intents")
            progress.resumed_at_steps.append(progress.step)
            log.info("resumed from %s at epoch %d step %d", checkpoint_dir, progress.epoch, progress.step)
            if progress.best_epoch >= 0:
                # A torn or truncated best/ would fail the final evaluation of every re-run:
                # publish it again from a kept checkpoint of its epoch (Ray Train's or ours).
                repair_best(run_dir / "best", [checkpoint_dir, *run_dir.glob("*/checkpoint_*")],
                            progress.best_epoch, config.eval.monitor, publish=distributed.is_main())
            clock.lap("resume")

    if progress.step == 0:
        # ActNorm's data-dependent init, before DDP broadcasts rank 0's parameters to every rank.
        model.initialize_flow(train.take(torch.arange(min(len(train), config.train.batch_size), device=device)))
        give_ranks_their_own_streams(config.train.seed, 0)
    weights = config.loss.weights()
    loss_names = (*weights, "total")
    loss_keys = [f"loss/{name}" for name in loss_names]
    # A term with weight 0 leaves its parameters without gradients (the contrastive term has none).
    find_unused = any(w == 0 for term, w in weights.items() if term != "contrast") or config.model.flow_layers == 0
    # Sampled softmax touches a few item rows per step, a batch a few users: all-gather those rows,
    # not the whole table. (parameter, has sparse gradients)
    sparse_items = _item_embedding(model).sparse
    row_exchanged = [(model.item_table(), sparse_items)] if (
        (config.train.item_grad_exchange == "rows" or sparse_items) and model.item_table().requires_grad) else []
    user_table = _user_table(model)
    if user_table is not None and user_table.sparse and user_table.weight.requires_grad:
        row_exchanged.append((user_table.weight, True))
    ddp_model = distributed.wrap_model(model, device, find_unused_parameters=find_unused,
                                       row_sparse=[parameter for parameter, _ in row_exchanged])
    step_model = torch.compile(ddp_model) if config.train.compile else ddp_model
    writer = tensorboard_writer(run_dir) if distributed.is_main() else None
    # FLOPs are counted for the pretraining model; a fine-tuning head is another model.
    count_flops = model_factory is None
    wall_before = progress.wall_seconds
    clock.lap("flow init, DDP")
    setup_seconds = time.perf_counter() - entered  # into the first epoch record of this process
    if distributed.is_main():
        log.info("set up in %.1fs: %s", setup_seconds, ", ".join(
            f"{phase} {seconds:.1f}s" for phase, seconds in {**setup.phase_seconds, **clock.seconds}.items()))

    def wall_seconds() -> float:
        return wall_before + time.perf_counter() - entered

    def checkpoint_now(metrics: dict[str, float]) -> None:
        """Rank 0 writes the checkpoint; every rank reports (Ray needs all ranks to call report).

        It is written to scratch space and published whole, so a full disk or an unreachable
        store fails this checkpoint with a clear error and leaves the previous one intact.
        """
        try:
            rng_by_rank = distributed.all_gather_objects(rng_state())
            with tempfile.TemporaryDirectory() as scratch:
                directory = None
                if distributed.is_main():
                    directory = Path(scratch) / "checkpoint"
                    _write_checkpoint(directory, model, optimizer, scheduler, progress, config, manifest,
                                      metrics, kind, intents, rng_by_rank)
                session.report({**metrics, "step": progress.step, "epoch": progress.epoch}, directory)
        except OSError as exc:
            raise CheckpointError(f"could not write the checkpoint of step {progress.step}: "
                                  f"{exc.strerror or exc}; earlier checkpoints are intact, re-run to resume") from None

    def validate(record: dict[str, Any]) -> None:
        """Validation metrics into `record`; a new best of `eval.monitor` is published as best/."""
        # Skipped steps never change the weights, but a finite step can still overflow them: such
        # a model must not be validated, let alone published as best/.
        broken = first_nonfinite(distributed.unwrap(model).state_dict())
        if broken:
            raise _diverged(progress, progress.step, f"the weights hold NaN or inf ({broken})",
                            scheduler.get_last_lr()[0])
        started = time.perf_counter()
        record.update(evaluate_split(model, valid, "valid", config.eval, manifest["num_negatives"]))
        record["eval_seconds"] = time.perf_counter() - started
        value = record[config.eval.monitor]
        if value > progress.best_value:
            progress.best_value, progress.best_epoch = value, progress.epoch
            progress.evals_without_improvement = 0
            if distributed.is_main():
                with tempfile.TemporaryDirectory() as scratch:
                    _write_checkpoint(Path(scratch) / "best", model, optimizer, scheduler, progress,
                                      config, manifest, record, kind)
                    publish_directory(Path(scratch) / "best", run_dir / "best")
        else:
            progress.evals_without_improvement += 1

    if validate_first and progress.step == 0 and not progress.history:
        record = {"epoch": 0, "step": 0, "epoch_seconds": 0.0, "sequences_per_second": 0.0}
        validate(record)
        record["setup_seconds"], setup_seconds = setup_seconds, None
        progress.history.append(record)
        if distributed.is_main():
            _log_epoch(record, config.eval.monitor)
            write_scalars(writer, record)

    def target_reached() -> bool:
        return bool(config.train.stop_at) and progress.best_value >= config.train.stop_at

    built_dropout = dropout_rate(model)  # the rate after train.early_dropout_epochs
    same_target = config.loss.contrast > 0 and config.loss.contrast_positive == "same_target"
    last_targets = train.target[:, -1].cpu().numpy() if same_target else None
    finished = (progress.step >= total_steps or progress.evals_without_improvement >= config.train.patience
                or target_reached())
    while progress.epoch < config.train.epochs and not finished:
        # Batches per (seed, epoch): a resumed epoch replays the same batches from its position.
        epoch_seed = config.train.seed * 100_003 + progress.epoch
        order, batches = length_bucketed_batches(widths, config.train.batch_size, seed=epoch_seed,
                                                 min_batches=micro_steps_per_epoch)
        if same_target:  # rows follow their partners' widths: the partners' pass runs one width at a time
            order, partners = order_by_partner_width(order, batches, same_target_partners(last_targets, epoch_seed)[order],
                                                     widths)
            partner_widths = widths[partners]
            partners = torch.from_numpy(partners).to(device)
        order = torch.from_numpy(order).to(device)
        # Losses of the applied updates (a skipped step's are left out); those of the update in progress.
        loss_sums = torch.zeros(len(loss_names), device=device)
        update_losses = torch.zeros_like(loss_sums)
        started, windows_seen, micro_steps_run, update_micro_steps, skipped = time.perf_counter(), 0, 0, 0, 0
        epoch_flops = 0.0
        # The epoch's intents count as its training time (they are a pass over its windows).
        if config.loss.intent > 0 and (progress.micro_step_in_epoch == 0 or intents is None):
            intents = intent_centroids(model, train, widths, config.loss.intent_clusters, epoch_seed,
                                       config.train.batch_size, step_options["bf16"])
        if config.train.early_dropout is not None:
            early = progress.epoch < config.train.early_dropout_epochs
            set_dropout_rate(model, config.train.early_dropout if early else built_dropout)
        model.train()
        while progress.micro_step_in_epoch < micro_steps_per_epoch:
            first, last, width = batches[progress.micro_step_in_epoch]
            batch = train.take(order[first:last], width)
            if same_target:
                batch["contrast_input"] = tuple(train.input[partners[first + a:first + b], -w:]
                                                for a, b, w in same_width_runs(partner_widths[first:last]))
            if intents is not None:
                batch["intent_centroids"] = intents
            if count_flops:
                epoch_flops += step_flops(last - first, width, config, manifest["items"])
            if config.loss.decay:
                step_options["weights"] = config.loss.weights(progress.step / total_steps)
            is_update = ((progress.micro_step_in_epoch + 1) % config.train.grad_accum == 0
                         or progress.micro_step_in_epoch + 1 == micro_steps_per_epoch)
            sync = contextlib.nullcontext() if is_update or not distributed.is_distributed() \
                else ddp_model.no_sync()
            with sync:
                losses = forward_backward(step_model, batch, step_options, config.train.grad_accum)
            update_losses += loss_vector(losses, loss_names)
            windows_seen += batch["user"].shape[0]
            update_micro_steps += 1
            progress.micro_step_in_epoch += 1
            if is_update:
                for parameter, sparse in row_exchanged:
                    distributed.average_row_gradients_(parameter, sparse)
                nonfinite = nonfinite_terms(update_losses, loss_keys, optimizer, config.train.grad_clip)
                if nonfinite:
                    _skip_step(progress, nonfinite, scheduler, config.train.max_nonfinite_steps)
                    skipped += 1
                else:
                    optimizer.step()
                    scheduler.step()
                    progress.nonfinite_steps = 0
                    loss_sums += update_losses
                    micro_steps_run += update_micro_steps
                update_losses.zero_()
                update_micro_steps = 0
                optimizer.zero_grad(set_to_none=True)
                progress.step += 1
                if progress.step >= total_steps:
                    finished = True
                    break
                if config.train.checkpoint_every_steps and progress.step % config.train.checkpoint_every_steps == 0:
                    checkpoint_now({})
        elapsed = time.perf_counter() - started
        epoch_done = progress.micro_step_in_epoch >= micro_steps_per_epoch
        progress.epoch += int(epoch_done)
        progress.micro_step_in_epoch = 0 if epoch_done else progress.micro_step_in_epoch

        # ---- end of epoch: losses, validation, best checkpoint, early stopping ----
        # Mean over the micro-steps this pass applied (max_steps or a resume can cut an epoch short).
        loss_sums = distributed.all_reduce_sum(loss_sums) / max(1, micro_steps_run * distributed.world_size())
        record = dict(zip(loss_keys, loss_sums.tolist()))
        record.update({"epoch": progress.epoch, "step": progress.step, "epoch_seconds": elapsed,
                       "skipped_steps": skipped,
                       "sequences_per_second": windows_seen * distributed.world_size() / max(elapsed, 1e-9),
                       "lr": scheduler.get_last_lr()[0]})
        if count_flops:
            total_flops = distributed.all_reduce_sum(torch.tensor(epoch_flops, dtype=torch.float64, device=device))
            record["model_tflops_per_s"] = float(total_flops) / max(elapsed, 1e-9) / 1e12
        if config.train.early_dropout is not None:
            record["dropout"] = dropout_rate(model)
        if config.loss.decay:
            record["loss/decay_factor"] = cosine_decay(progress.step / total_steps)
        # Every rank must take the same decision: the slowest rank's clock decides.
        over_budget = bool(config.train.time_budget_minutes) and distributed.all_reduce_max(
            torch.tensor(wall_seconds(), dtype=torch.float64, device=device)).item() > 60 * config.train.time_budget_minutes
        if config.train.validates(progress.epoch) or finished or over_budget:
            validate(record)
            if progress.evals_without_improvement >= config.train.patience:
                log.info("early stopping: %s has not improved for %d validations",
                         config.eval.monitor, config.train.patience)
                finished = True
            if target_reached():
                log.info("%s reached %.4f (train.stop_at %g): stopping", config.eval.monitor,
                         progress.best_value, config.train.stop_at)
                finished = True
        if over_budget and not finished:
            log.info("time budget of %g minutes spent: stopping", config.train.time_budget_minutes)
            finished = True
        progress.wall_seconds = record["wall_seconds"] = wall_seconds()
        if setup_seconds is not None:
            record["setup_seconds"], setup_seconds = setup_seconds, None
        progress.history.append(record)
        if distributed.is_main():
            _log_epoch(record, config.eval.monitor)
            write_scalars(writer, record)
        checkpoint_now(record)

    # ---- final: the best checkpoint on valid and test ----
    distributed.barrier()
    final = evaluate_with_session(EvaluateConfig(checkpoint=str(run_dir / "best"), data=config.data,
                                                 eval=config.eval), session)
    summary = {"best": {"epoch": progress.best_epoch, config.eval.monitor: progress.best_value},
               "final": final, "history": progress.history, "steps": progress.step,
               "resumed_at_steps": progress.resumed_at_steps, "config": to_dict(config), "data": {k: manifest[k] for k in ("users", "items", "interactions")}}
    if distributed.is_main():
        (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
        write_scalars(writer, {f"final/{k}": v for k, v in final.items()})
        if writer:
            writer.close()
    session.report({**final, "step": progress.step, "epoch": progress.epoch, "done": 1})
    return summary


def _log_epoch(record: dict[str, Any], monitor: str) -> None:
    losses = " ".join(f"{k.split('/')[1]}={v:.4f}" for k, v in record.items() if k.startswith("loss/"))
    validation = f" {monitor}={record[monitor]:.4f}" if monitor in record else ""
    if not losses:  # the validation before the first step
        log.info("epoch 0 (before training)%s (%.1fs)", validation, record["eval_seconds"])
        return
    log.info("epoch %d step %d %s%s (%.1fs, %.0f seq/s)", record["epoch"], record["step"], losses,
             validation, record["epoch_seconds"], record["sequences_per_second"])


def prepare_run_dir(config) -> Path:
    """Create RUN_DIR (`config.output`) with what a run carries beside its checkpoints: the
    vocabulary it was trained on (fine-tuning maps new data onto it by id), the data's manifest
    and the resolved config."""
    manifest = read_manifest(config.data)  # first: a missing or unprepared directory is one line
    run_dir = Path(config.output)
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(Path(config.data) / "vocab", run_dir / "vocab", dirs_exist_ok=True)
    (run_dir / "data_manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    (run_dir / "config.json").write_text(json.dumps(to_dict(config), indent=2, sort_keys=True))
    return run_dir


def launch_training(config, kind: str, local_loop, ray_worker) -> dict[str, Any]:
    """The driver shared by pretrain and finetune: prepare RUN_DIR, then train in this process
    (`scaling.workers=0`, `local_loop(config, session)`) or on Ray Train (`ray_worker(payload)`
    on every worker). Returns the run's metrics.json."""
    check_output_path(config.output, [config.data])
    run_dir = prepare_run_dir(config)
    log.info("%s config:\n%s", kind, json.dumps(to_dict(config), indent=2, sort_keys=True))
    if config.scaling.workers == 0:
        return local_loop(config, LocalSession(config.data, str(run_dir)))
    ray_seam.ensure_ray(config.scaling.address)
    ray_seam.run_trainer(ray_worker, {"config": to_dict(config)},
                         ray_seam.read_parquet_datasets(config.data, ["train", "valid", "test"]),
                         run_dir=str(run_dir), name=ray_seam.RUN_NAME, workers=config.scaling.workers,
                         gpus_per_worker=config.scaling.gpus_per_worker,
                         cpus_per_worker=config.scaling.cpus_per_worker, max_failures=config.scaling.max_failures,
                         placement_strategy=config.scaling.placement_strategy)
    return json.loads((run_dir / "metrics.json").read_text())

