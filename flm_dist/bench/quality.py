"""`flm bench quality`: time to quality. Pretrain from the prepared data until a validation
metric reaches a target (or a time budget runs out), then print one JSON line.

The run is an ordinary `flm pretrain` with `train.stop_at` (and `train.time_budget_minutes`),
so it measures what a user pays for: data loading, training, validation each
`train.eval_every_epochs`, and (in the total) Ray's start-up and the final test. The time to
the target is the run's own clock (`wall_seconds` in the history: setup, training and
validation up to the end of the epoch that reached it); `outside_epochs_seconds` is the part of
it spent neither training nor validating (setup, checkpoint writes, reports): a GPU run's fixed cost.
`setup_seconds` is the part of that before the first step (the run's log line "set up in" splits
it by phase).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from flm_dist.errors import UserError
from flm_dist.train.configs import PretrainConfig
from flm_dist.train.flops import matmul_peak_flops
from flm_dist.train.loop import autocasts_bf16
from flm_dist.train.pretrain import run_pretrain

PROTOCOLS = {"full": True, "full_nomask": False}


def parse_target(target: str) -> tuple[str, str, bool, float]:
    """`valid/<metric>/<full|full_nomask>=<value>` -> (monitor, metric, mask_history, value)."""
    name, _, value = target.partition("=")
    parts = name.split("/")
    if len(parts) != 3 or parts[0] != "valid" or parts[2] not in PROTOCOLS or not value:
        raise UserError(f"--target {target!r}: expected valid/<metric>/<full|full_nomask>=<value>, "
                        "e.g. valid/ndcg@10/full_nomask=0.0517")
    try:
        number = float(value)
    except ValueError:
        raise UserError(f"--target {target!r}: {value!r} is not a number") from None
    if not 0 < number <= 1:
        raise UserError(f"--target {target!r}: the value must be in (0, 1]")
    return name, parts[1], PROTOCOLS[parts[2]], number


def run_bench_quality(config: PretrainConfig, target: str, budget_minutes: float = 0.0) -> dict[str, Any]:
    monitor, metric, mask_history, value = parse_target(target)
    output = Path(config.output)
    if output.exists() and any(output.iterdir()):
        raise UserError(f"{output} is not empty: time to quality starts from scratch, give a new --output")
    config = dataclasses.replace(
        config,
        eval=dataclasses.replace(config.eval, monitor_metric=metric, mask_history=mask_history),
        train=dataclasses.replace(config.train, stop_at=value, time_budget_minutes=budget_minutes))
    started = time.perf_counter()
    summary = run_pretrain(config)
    total_seconds = time.perf_counter() - started

    history = [row for row in summary["history"] if row["epoch"] > 0]
    reached = next((row for row in history if row.get(monitor, -1.0) >= value), None)
    epochs_seconds = sum(row["epoch_seconds"] + row.get("eval_seconds", 0.0)
                         for row in history if reached and row["epoch"] <= reached["epoch"])
    train_seconds = sum(row["epoch_seconds"] for row in history)
    windows = sum(row["sequences_per_second"] * row["epoch_seconds"] for row in history)
    flops = sum(row.get("model_tflops_per_s", 0.0) * 1e12 * row["epoch_seconds"] for row in history)
    # The device the loop trained on (in this process, or Ray workers with GPUs), as it chose it.
    on_gpu = torch.cuda.is_available() and (config.scaling.workers == 0 or config.scaling.gpus_per_worker > 0)
    device = torch.device("cuda" if on_gpu else "cpu")
    bf16 = autocasts_bf16(config.train.precision, device, warn=False)
    peak = matmul_peak_flops(device, bf16)
    final = summary["final"]
    result = {
        "target": monitor, "target_value": value, "reached": reached is not None,
        "seconds_to_target": reached["wall_seconds"] if reached else None,
        "epochs_to_target": reached["epoch"] if reached else None,
        "outside_epochs_seconds": reached["wall_seconds"] - epochs_seconds if reached else None,
        "setup_seconds": sum(row.get("setup_seconds", 0.0) for row in summary["history"]
                             if row["epoch"] <= reached["epoch"]) if reached else None,
        "steps_to_target": reached["step"] if reached else None,
        "best_value": summary["best"][monitor], "epochs": len(history), "steps": summary["steps"],
        "total_seconds": total_seconds, "train_seconds": train_seconds,
        "validation_seconds": sum(row.get("eval_seconds", 0.0) for row in history),
        "sequences_per_s": windows / max(train_seconds, 1e-9),
        "model_tflops_per_s": flops / max(train_seconds, 1e-9) / 1e12,
        "peak_tflops_per_s": peak / 1e12, "peak_fraction": flops / max(train_seconds, 1e-9) / peak,
        "precision": "bf16" if bf16 else "fp32", "threads": torch.get_num_threads(),
        "workers": config.scaling.workers,
        **{key: final[key] for key in sorted(final) if key.startswith("test/") and "@10/" in key},
    }
    print(json.dumps(result))
    return result
