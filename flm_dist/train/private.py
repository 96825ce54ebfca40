"""Differentially private fine-tuning (`finetune.privacy.epsilon`): DP-SGD with Opacus.

The guarantee is user-level (epsilon, delta)-DP of the fine-tuned weights with respect to adding
or removing one user of the fine-tuning set:

- **Users, not windows, are sampled.** Every step draws users by Poisson sampling (Opacus's
  DPDataLoader over user indices, rate q = 1 / ceil(users / train.batch_size)) and takes ONE
  training example per drawn user: one of the user's windows (`train.windows`), picked uniformly
  at random from randomness that does not depend on the data. A user's whole influence on a step
  is therefore one per-example gradient.
- **Each user's gradient is clipped** to `max_grad_norm` (over every trained parameter together)
  and Gaussian noise of standard deviation noise_multiplier x max_grad_norm is added to the sum
  (Opacus's DPOptimizer). The per-user loss (`Recommender.example_losses`) depends on that user's
  example only.
- **The accountant** (Opacus RDP or PRV) sets the noise multiplier so that the planned steps
  (train.epochs x steps per epoch, or train.max_steps) spend at most the target epsilon
  (`get_noise_multiplier`), records every step, and the loop stops before a step that would
  exceed it. The spent epsilon is logged per epoch and stored in the history (`privacy/epsilon`),
  every checkpoint's meta (`privacy`), metrics.json (`privacy`) and hence the HTML report.
- **Only DP-SGD moves weights.** mode=frozen trains the head alone. mode=full trains every layer
  Opacus computes per-user gradients for: the encoders, the head and the item table, whose use
  as the output layer goes through a linear layer tied to it (`_PerUserLoss`). The flow and,
  with item features, the computed item rows keep their pretrained values. Parameters the chosen
  head never reaches are frozen too (Opacus needs a per-user gradient for each trained one). On
  the first step every trained parameter's per-user gradients are checked to add up to its
  ordinary gradient, so a layer used outside Opacus's hooks fails the run instead of silently
  escaping clipping.
- **Nothing is chosen by private validation.** No early stopping and no best-of-epochs: best/
  is the newest epoch. Validation and test metrics are computed and reported as usual; they are
  statistics of the private users and are not covered by the guarantee.

Combinations that would break the guarantee are refused in the config (train/configs.py
`require_private_fit`) and here (`check_private_model`). One worker only. What is and is not
protected overall: docs/guide/privacy.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flm_dist.config import to_dict
from flm_dist.data.batches import (
    TrainArrays,
    build_eval_arrays,
    build_train_arrays,
    window_widths,
)
from flm_dist.errors import UserError
from flm_dist.eval.evaluate import EvaluateConfig, evaluate_split, evaluate_with_session
from flm_dist.logs import tensorboard_writer, write_scalars
from flm_dist.models.recommender import Recommender
from flm_dist.runs import read_manifest
from flm_dist.train import distributed
from flm_dist.train.checkpoint import (
    first_nonfinite,
    load_checkpoint,
    publish_directory,
    save_checkpoint,
)
from flm_dist.train.configs import FinetuneConfig
from flm_dist.train.host_memory import keep_freed_host_memory
from flm_dist.train.loop import Progress
from flm_dist.train.optim import warmup_cosine
from flm_dist.train.streams import rng_state, set_rng_state

log = logging.getLogger("flm_dist")


def _opacus():
    try:
        import opacus
        from opacus.accountants import create_accountant
        from opacus.accountants.utils import get_noise_multiplier
    except ImportError:
        raise UserError("finetune.privacy needs Opacus: pip install 'flm_dist[privacy]' (opacus>=1.6)") from None
    return opacus, create_accountant, get_noise_multiplier


def check_private_model(config: FinetuneConfig) -> None:
    """The refusals that need the resolved (pretrained) architecture; one line each."""
    if not config.finetune.privacy.enabled or config.finetune.mode != "full":
        return
    model, key = config.model, "finetune.privacy.epsilon"
    if model.encoder in ("gru", "lstm"):
        raise UserError(f"{key}: full DP fine-tuning of a {model.encoder} encoder needs Opacus's DP recurrent "
                        f"layers, which flm_dist does not swap in; use finetune.mode=frozen")
    if model.encoder == "sasrec" and model.positions == "last":
        raise UserError(f"{key}: with model.positions=last the position table is read without a batch dimension, "
                        f"so its gradient cannot be split per user; use finetune.mode=frozen")


# ---- the private training set: users, and each user's windows --------------------------------


@dataclasses.dataclass
class UserWindows:
    """The training windows grouped by user: user k owns windows first[k] .. first[k]+count[k]-1."""

    windows: TrainArrays
    first: torch.Tensor
    count: torch.Tensor
    widths: np.ndarray

    @classmethod
    def build(cls, table, max_len: int, windows: str) -> UserWindows:
        arrays = build_train_arrays(table, max_len, windows)  # windows of a user are contiguous
        _, count = torch.unique_consecutive(arrays.user, return_counts=True)
        return cls(arrays, torch.cumsum(count, 0) - count, count, window_widths(arrays))

    def __len__(self) -> int:
        return len(self.count)

    def batch(self, users: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """One window per user in `users` (indices 0..len-1), drawn uniformly from that user's."""
        pick = (torch.rand(len(users), generator=generator) * self.count[users]).long()
        index = self.first[users] + torch.minimum(pick, self.count[users] - 1)
        return self.windows.take(index, int(self.widths[index.numpy()].max()))


class _PerUserLoss(nn.Module):
    """What Opacus wraps: a batch -> each row's loss (rows never interact).

    When the item table trains, the scores go through `scorer`, a bias-free linear layer whose
    weight IS the item table (the same Parameter): Opacus's hooks then see the table both as the
    input embedding and as the output layer and add the two per-user gradients up. Without it
    (`tie_output=False`) the output-layer part would escape per-user clipping, which
    `_check_per_user_gradients` catches.
    """

    def __init__(self, model: Recommender, weights: dict[str, float], seq_positions: str, tie_output: bool = True):
        super().__init__()
        self.model, self.weights, self.seq_positions = model, weights, seq_positions
        table = model.backbone.item_embedding.weight
        self.scorer = None
        if tie_output and table.requires_grad:
            self.scorer = nn.Linear(table.shape[1], table.shape[0], bias=False, device=table.device)
            self.scorer.weight = table

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.example_losses(batch, self.weights, self.seq_positions, self.scorer)


def _trained_parameters(model: Recommender, mode: str, weights: dict[str, float], seq_positions: str) -> list[str]:
    """Freeze what DP-SGD cannot train (see the module docstring); the names of what trains."""
    if mode == "full":
        backbone = model.backbone
        features = getattr(backbone, "item_features", None)  # computed item rows: no single table to tie
        for module in (backbone.item_embedding if features is not None else None, features, backbone.flow):
            if module is not None:
                module.requires_grad_(False)
    # Parameters the loss never reaches get no per-user gradient; which ones is a matter of the
    # architecture, so a fixed synthetic sequence (no private data) finds them.
    length = min(3, model.num_items)
    items = torch.arange(1, length + 1)
    probe = {"user": torch.zeros(1, dtype=torch.long), "input": torch.cat([torch.zeros(1), items[:-1]]).long()[None],
             "target": torch.cat([torch.zeros(1), items[1:]]).long()[None]}
    device = next(model.parameters()).device
    model.zero_grad(set_to_none=True)
    model.example_losses({k: v.to(device) for k, v in probe.items()}, weights, seq_positions).sum().backward()
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.grad is None:
            parameter.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def _check_per_user_gradients(model: Recommender, batch_size: int) -> None:
    """Every trained parameter's per-user gradients must add up to its gradient (first step)."""
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        samples, total = getattr(parameter, "grad_sample", None), parameter.grad
        if samples is None or total is None or samples.shape[0] != batch_size:
            raise UserError(f"DP-SGD: {name} has no per-user gradient of batch {batch_size}; it is used outside "
                            f"Opacus's per-layer hooks; train with finetune.mode=frozen")
        expected = total * batch_size  # loss_reduction "mean": Opacus scales each row by the batch size
        tolerance = 1e-4 * max(1.0, float(expected.abs().max()))
        if not torch.allclose(samples.sum(0), expected, rtol=1e-3, atol=tolerance):
            raise UserError(f"DP-SGD: the per-user gradients of {name} do not add up to its gradient, so part of "
                            f"it would escape clipping (a layer used outside Opacus's hooks); use finetune.mode=frozen")


# ---- accounting -------------------------------------------------------------------------------


@dataclasses.dataclass
class PrivacyPlan:
    """The DP-SGD settings of a run, fixed at its start (restored on resume)."""

    target_epsilon: float
    delta: float
    max_grad_norm: float
    accountant: str
    users: int
    sample_rate: float
    expected_batch_size: int
    steps_per_epoch: int
    planned_steps: int
    noise_multiplier: float


def make_plan(config: FinetuneConfig, users: int) -> PrivacyPlan:
    _, _, get_noise_multiplier = _opacus()
    options, train = config.finetune.privacy, config.train
    steps_per_epoch = math.ceil(users / min(train.batch_size, users))
    sample_rate = 1.0 / steps_per_epoch  # what Opacus's make_private accounts with
    planned = steps_per_epoch * train.epochs
    if train.max_steps:
        planned = min(planned, train.max_steps)
    delta = options.delta if options.delta is not None else 1.0 / users
    try:
        noise = get_noise_multiplier(target_epsilon=options.epsilon, target_delta=delta, sample_rate=sample_rate,
                                     steps=planned, accountant=options.accountant)
    except ValueError as exc:
        raise UserError(f"finetune.privacy.epsilon={options.epsilon} cannot be met over {planned} steps at sample "
                        f"rate {sample_rate:.3g} ({exc}); raise epsilon or delta, or train fewer steps") from None
    return PrivacyPlan(options.epsilon, delta, options.max_grad_norm, options.accountant, users, sample_rate,
                       int(users * sample_rate), steps_per_epoch, planned, float(noise))


def spent_epsilon(mechanism: str, history: list, delta: float) -> float:
    """Epsilon spent by an accountant `history` [(noise multiplier, sample rate, steps), ...]."""
    _, create_accountant, _ = _opacus()
    if not history:
        return 0.0
    accountant = create_accountant(mechanism=mechanism)
    accountant.history = [tuple(entry) for entry in history]
    return float(accountant.get_epsilon(delta=delta))


def steps_within_budget(plan: PrivacyPlan, history: list, limit: int) -> int:
    """The most further steps (<= limit) after `history` that keep the spent epsilon <= target."""
    def within(steps: int) -> bool:
        extra = [(plan.noise_multiplier, plan.sample_rate, steps)] if steps else []
        return spent_epsilon(plan.accountant, list(history) + extra, plan.delta) <= plan.target_epsilon

    if limit <= 0 or within(limit):
        return max(limit, 0)
    low, high = 0, limit  # within(low) (0 extra steps: the run so far), not within(high)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if within(middle) else (low, middle)
    return low


@contextlib.contextmanager
def _hooks_once_per_module():
    """Opacus 1.6 hooks every path to a module: the item table, a child of the model, the CF
    encoder and the sequence encoder, would get three hooks and three times its per-user
    gradient. Visit each module once while the hooks are added (checked by
    `_check_per_user_gradients` on the first step)."""
    from opacus.grad_sample.grad_sample_module import GradSampleModule

    original = GradSampleModule.iterate_submodules

    def once(self, module):
        seen: set[int] = set()
        for submodule in original(self, module):
            if id(submodule) not in seen:
                seen.add(id(submodule))
                yield submodule

    GradSampleModule.iterate_submodules = once
    try:
        yield
    finally:
        GradSampleModule.iterate_submodules = original


def attach_privacy(module: nn.Module, optimizer: torch.optim.Optimizer, plan: PrivacyPlan, batch_size: int,
                   history: list = ()):
    """Opacus's PrivacyEngine over `module` (rows -> per-row losses) and `optimizer`: per-user
    gradients, clipping and noise, Poisson sampling of the plan's users, and an accountant that
    continues `history`. Returns (engine, wrapped module, DP optimizer, DP loader of user indices)."""
    opacus, _, _ = _opacus()
    users = torch.utils.data.TensorDataset(torch.arange(plan.users))
    loader = torch.utils.data.DataLoader(users, batch_size=batch_size)
    with warnings.catch_warnings(), _hooks_once_per_module():
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")  # secure_mode: see docs/guide/privacy.md
        engine = opacus.PrivacyEngine(accountant=plan.accountant)
        engine.accountant.history = [tuple(entry) for entry in history]
        wrapped, dp_optimizer, dp_loader = engine.make_private(
            module=module, optimizer=optimizer, data_loader=loader, noise_multiplier=plan.noise_multiplier,
            max_grad_norm=plan.max_grad_norm, poisson_sampling=True, loss_reduction="mean", grad_sample_mode="hooks")
    if not math.isclose(dp_loader.sample_rate, plan.sample_rate) or len(dp_loader) != plan.steps_per_epoch:
        raise RuntimeError(f"Opacus samples at rate {dp_loader.sample_rate}, {len(dp_loader)} steps an epoch; "
                           f"the plan says {plan.sample_rate}, {plan.steps_per_epoch}")
    return engine, wrapped, dp_optimizer, dp_loader


# ---- the run ----------------------------------------------------------------------------------


def train_private(config: FinetuneConfig, session, model_factory, train_filter=None) -> dict[str, Any]:
    """DP-SGD fine-tuning on one worker: validate and checkpoint every epoch (best/ = newest),
    then test best/ and write metrics.json; returns its contents."""
    _opacus()
    if distributed.world_size() > 1:
        raise UserError("finetune.privacy.epsilon: DP fine-tuning runs on one worker (scaling.workers 0 or 1)")
    check_private_model(config)
    device = session.device()
    keep_freed_host_memory(device)
    manifest = read_manifest(config.data)
    torch.manual_seed(config.train.seed)
    table = session.read_split("train").sort_by("user")
    if train_filter is not None:
        table = train_filter(table)
    data = UserWindows.build(table, config.model.max_len, config.train.windows)
    if len(data) == 0:
        raise UserError("no fine-tuning user has two training items; DP fine-tuning has no examples")
    seq_positions = "last" if config.train.windows == "prefixes" else "all"
    weights = config.loss.weights()
    model = model_factory(manifest).to(device)
    trained = _trained_parameters(model, config.finetune.mode, weights, seq_positions)
    if not trained:
        raise UserError("finetune.privacy: nothing left to train (every parameter is frozen)")
    plan = make_plan(config, len(data))
    run_dir, progress = Path(config.output), Progress()
    matrices = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    others = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": config.train.weight_decay},
                                   {"params": others, "weight_decay": 0.0}], lr=config.train.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(config.train.warmup_steps, plan.planned_steps, config.train.min_lr_ratio))
    history: list = []
    with session.latest_checkpoint() as checkpoint_dir:
        if checkpoint_dir is not None:
            state, meta = load_checkpoint(checkpoint_dir, map_location=device)
            if meta["vocab_hash"] != manifest["vocab_hash"] or "accountant" not in state:
                raise UserError(f"cannot resume: {checkpoint_dir} is not a DP run on this vocabulary; "
                                f"choose a new --output")
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"])
            progress = Progress(**state["progress"])
            progress.resumed_at_steps.append(progress.step)
            started_with = PrivacyPlan(**meta["privacy"]["plan"])
            if (started_with.users, started_with.sample_rate) != (plan.users, plan.sample_rate):
                raise UserError(f"cannot resume {config.output}: it started with {started_with.users} users at sample "
                                f"rate {started_with.sample_rate:.4g}, now {plan.users} at {plan.sample_rate:.4g}; "
                                f"keep the data and train.batch_size, or choose a new --output")
            plan = started_with  # its noise multiplier and planned steps, whatever the config says now
            history = [tuple(entry) for entry in state["accountant"]["history"]]
            log.info("resumed DP fine-tuning from %s at epoch %d step %d", checkpoint_dir, progress.epoch,
                     progress.step)

    engine, wrapped, dp_optimizer, dp_loader = attach_privacy(
        _PerUserLoss(model, weights, seq_positions), optimizer, plan, min(config.train.batch_size, len(data)), history)
    budget = steps_within_budget(plan, history, plan.planned_steps - progress.step)
    log.info("DP fine-tuning: %d users, sample rate %.4g (~%d users a step), %d steps planned (%d left within "
             "the budget), noise multiplier %.4g, max_grad_norm %g, target epsilon %g at delta %.3g (%s); "
             "training %s", plan.users, plan.sample_rate, plan.expected_batch_size, plan.planned_steps, budget,
             plan.noise_multiplier, plan.max_grad_norm, plan.target_epsilon, plan.delta, plan.accountant,
             ", ".join(trained) if len(trained) <= 8 else f"{len(trained)} parameter tensors")
    valid = build_eval_arrays(session.read_split("valid"), config.model.max_len).to(device)
    writer = tensorboard_writer(run_dir)

    def privacy_record() -> dict[str, Any]:
        return {"epsilon": spent_epsilon(plan.accountant, engine.accountant.history, plan.delta),
                "steps": progress.step, "plan": dataclasses.asdict(plan)}

    def write_checkpoint(directory: Path, metrics: dict[str, Any]) -> None:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "rng": rng_state(),
                 "progress": dataclasses.asdict(progress), "accountant": engine.accountant.state_dict()}
        meta = {"step": progress.step, "epoch": progress.epoch, "config": to_dict(config),
                "vocab_hash": manifest["vocab_hash"], "metrics": metrics, "kind": "finetune",
                "privacy": privacy_record()}
        save_checkpoint(directory, state, meta)

    table = model.backbone.item_embedding.weight
    steps_done_here, finished, checked = 0, progress.step >= plan.planned_steps or budget == 0, False
    while progress.epoch < config.train.epochs and not finished:
        started, loss_sum, rows, applied = time.perf_counter(), 0.0, 0, 0
        picker = torch.Generator().manual_seed(config.train.seed * 1_000_003 + progress.epoch)
        wrapped.train()
        for (sampled,) in dp_loader:
            if steps_done_here >= budget:
                log.info("privacy budget: stopping before step %d, which would spend more than epsilon %g",
                         progress.step + 1, plan.target_epsilon)
                finished = True
                break
            if len(sampled):
                batch = {k: v.to(device) for k, v in data.batch(sampled, picker).items()}
                losses = wrapped(batch)
                loss = losses.mean()
                if not torch.isfinite(loss):
                    raise UserError(f"DP fine-tuning diverged at step {progress.step + 1}: non-finite loss; lower "
                                    f"train.lr and train again with a new --output")
                with warnings.catch_warnings():  # frozen inputs: Opacus's hooks see only the outputs' side
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    loss.backward()
                if not checked:
                    _check_per_user_gradients(model, len(sampled))
                    checked = True
                loss_sum, rows = loss_sum + float(losses.detach().sum()), rows + len(sampled)
            else:  # an empty Poisson draw: still a step, with noise only
                for parameter in dp_optimizer.params:
                    parameter.grad_sample = torch.zeros((0, *parameter.shape), device=device)
            dp_optimizer.step()
            if table.requires_grad:
                with torch.no_grad():  # the padding row stays zero (noise would move it; nothing reads it)
                    table[0].zero_()
            scheduler.step()
            dp_optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            steps_done_here += 1
            applied += 1
            if progress.step >= plan.planned_steps:
                finished = True
                break
        progress.epoch += 1
        elapsed = time.perf_counter() - started
        spent = privacy_record()["epsilon"]
        if spent > plan.target_epsilon:  # cannot happen: the budget check stops first
            raise RuntimeError(f"spent epsilon {spent} exceeds the target {plan.target_epsilon}")
        record = {"loss/total": loss_sum / max(rows, 1), "epoch": progress.epoch, "step": progress.step,
                  "epoch_seconds": elapsed, "sequences_per_second": rows / max(elapsed, 1e-9),
                  "lr": scheduler.get_last_lr()[0], "skipped_steps": 0, "privacy/epsilon": spent,
                  "privacy/steps": applied}
        if config.train.validates(progress.epoch) or finished:
            broken = first_nonfinite(model.state_dict())
            if broken:
                raise UserError(f"DP fine-tuning diverged by step {progress.step}: the weights hold NaN or inf "
                                f"({broken}); lower train.lr and train again with a new --output")
            eval_started = time.perf_counter()
            record.update(evaluate_split(model, valid, "valid", config.eval, manifest["num_negatives"]))
            record["eval_seconds"] = time.perf_counter() - eval_started
            # No choice by private validation: best/ is always the newest validated epoch.
            progress.best_value, progress.best_epoch = record[config.eval.monitor], progress.epoch
            with tempfile.TemporaryDirectory() as scratch:
                write_checkpoint(Path(scratch) / "best", record)
                publish_directory(Path(scratch) / "best", run_dir / "best")
        progress.history.append(record)
        monitor = f" {config.eval.monitor}={record[config.eval.monitor]:.4f}" if config.eval.monitor in record else ""
        log.info("epoch %d step %d loss=%.4f%s epsilon=%.4g of %g (delta %.3g) (%.1fs)", progress.epoch,
                 progress.step, record["loss/total"], monitor, spent, plan.target_epsilon, plan.delta, elapsed)
        write_scalars(writer, record)
        with tempfile.TemporaryDirectory() as scratch:
            write_checkpoint(Path(scratch) / "checkpoint", record)
            session.report({**record, "step": progress.step, "epoch": progress.epoch}, Path(scratch) / "checkpoint")

    final = evaluate_with_session(EvaluateConfig(checkpoint=str(run_dir / "best"), data=config.data,
                                                 eval=config.eval), session)
    privacy = {**privacy_record(), "unit": "user", "trained_parameters": trained,
               "sampling": "Poisson over users, one example per sampled user per step"}
    summary = {"best": {"epoch": progress.best_epoch, config.eval.monitor: progress.best_value},
               "final": final, "history": progress.history, "steps": progress.step,
               "resumed_at_steps": progress.resumed_at_steps, "config": to_dict(config), "privacy": privacy,
               "data": {k: manifest[k] for k in ("users", "items", "interactions")}}
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    write_scalars(writer, {f"final/{k}": v for k, v in final.items()})
    writer.close()
    log.info("DP fine-tuning done: epsilon %.4g spent of %g (delta %.3g) over %d steps", privacy["epsilon"],
             plan.target_epsilon, plan.delta, progress.step)
    session.report({**final, "step": progress.step, "epoch": progress.epoch, "done": 1})
    return summary
