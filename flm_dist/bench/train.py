"""`flm bench train`: timed pretraining steps on one device, printed as one JSON line.

It runs the exact step of `pretrain` (same setup, batches, `forward_backward` and the update's
non-finite check, `nonfinite_terms`), in this process, for `warmup` untimed and `steps` timed
optimiser steps. The step time is split into data (building the batch from the on-device
windows) and compute (forward, backward, non-finite check, optimiser). MFU is model FLOPs per second (an analytic count of the matmuls, see `step_flops`)
over the device's dense bf16 peak.
"""

from __future__ import annotations

import json
import platform
import time
from typing import Any

import torch

from flm_dist.data.batches import length_bucketed_batches
from flm_dist.train.configs import PretrainConfig
from flm_dist.train.loop import (
    forward_backward,
    loss_vector,
    nonfinite_terms,
    setup_training,
)
from flm_dist.train.session import LocalSession

# Dense bf16 tensor-core peaks (FLOP/s) of devices we benchmark on; MFU is null elsewhere.
BF16_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def step_flops(batch: dict[str, torch.Tensor], config: PretrainConfig, num_items: int) -> float:
    """Training FLOPs of one batch: 6 x multiply-accumulates of every matmul (forward + backward).

    Counts the transformer blocks (QKV, output, 4x feed-forward, attention scores and values),
    the softmax logits of each active loss term (all positions for `seq`, one row per user for
    `cf` and `fused`; in-batch + sampled columns for sampled softmax), the flow's couplings and,
    for the contrastive term, the second encoder pass and its similarity block.
    Embedding lookups, norms and element-wise work are left out.
    """
    rows, width = batch["input"].shape
    hidden, layers = config.model.hidden, config.model.layers
    tokens = rows * width
    if config.model.encoder == "sasrec":
        encoder_macs = layers * tokens * (12 * hidden * hidden + 2 * width * hidden)
    else:
        gates = 3 if config.model.encoder == "gru" else 4
        encoder_macs = layers * tokens * gates * 2 * hidden * hidden
    weights = config.loss.weights()
    macs = encoder_macs
    if weights["contrast"]:  # a second encoder pass and the [2B x 2B] similarity block
        macs += encoder_macs + (2 * rows) ** 2 * hidden
    scored = rows if config.train.windows == "prefixes" else tokens  # positions with a seq target
    cap = config.loss.max_in_batch_negatives

    def sampled_columns(in_batch: int) -> int:
        return (min(in_batch, cap) if cap else in_batch) + config.loss.num_negatives

    columns = num_items if config.loss.softmax == "full" else sampled_columns(scored)
    if weights["seq"]:
        macs += scored * columns * hidden
    for term in ("cf", "fused"):
        if weights[term]:
            macs += rows * (num_items if config.loss.softmax == "full" else sampled_columns(rows)) * hidden
    if weights["flow"] or weights["fused"]:
        macs += rows * 2 * hidden * hidden  # fusion projection
    if weights["flow"]:
        flow_hidden = config.model.flow_hidden
        macs += rows * config.model.flow_layers * (hidden // 2 * flow_hidden + flow_hidden * flow_hidden
                                                   + flow_hidden * hidden)
    return 6.0 * macs


def _device_peak(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return platform.processor() or platform.machine(), None
    name = torch.cuda.get_device_name(device)
    peak = next((flops for key, flops in BF16_PEAK_FLOPS.items() if key in name), None)
    return name, peak


def run_bench_train(config: PretrainConfig, steps: int = 50, warmup: int = 10) -> dict[str, Any]:
    session = LocalSession(config.data, config.output)
    device = session.device()
    setup = setup_training(config, session, device)
    model, optimizer = setup.model, setup.optimizer
    model.initialize_flow(setup.train.take(torch.arange(min(len(setup.train), config.train.batch_size), device=device)))
    step_model = torch.compile(model) if config.train.compile else model
    model.train()
    order, batches = length_bucketed_batches(setup.widths, config.train.batch_size, seed=config.train.seed,
                                             min_batches=steps + warmup)
    order = torch.from_numpy(order).to(device)

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    names = (*setup.step_options["weights"], "total")
    parameters = list(model.parameters())
    data_seconds = compute_seconds = flops = 0.0
    sequences = tokens = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for index in range(warmup + steps):
        first, last, width = batches[index % len(batches)]
        synchronize()
        started = time.perf_counter()
        batch = setup.train.take(order[first:last], width)
        synchronize()
        built = time.perf_counter()
        losses = forward_backward(step_model, batch, setup.step_options, grad_accum=1)
        if not nonfinite_terms(loss_vector(losses, names), names, parameters, config.train.grad_clip):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize()
        finished = time.perf_counter()
        if index >= warmup:
            data_seconds += built - started
            compute_seconds += finished - built
            sequences += batch["input"].shape[0]
            tokens += int(batch["target"].count_nonzero())
            flops += step_flops(batch, config, setup.manifest["items"])
    device_name, peak = _device_peak(device)
    total = data_seconds + compute_seconds
    result = {
        "device": device_name, "torch": torch.__version__, "steps": steps, "batch_size": config.train.batch_size,
        "precision": "bf16" if setup.step_options["bf16"] else "fp32", "compile": config.train.compile,
        "catalog": setup.manifest["items"], "hidden": config.model.hidden, "layers": config.model.layers,
        "max_len": config.model.max_len, "softmax": config.loss.softmax,
        "sequences_per_s": sequences / total, "items_per_s": tokens / total,
        "step_ms": 1000 * total / steps, "data_ms": 1000 * data_seconds / steps,
        "compute_ms": 1000 * compute_seconds / steps, "data_wait_fraction": data_seconds / total,
        "epoch_s_estimate": total / steps * setup.micro_steps_per_epoch,
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
        "model_tflops_per_s": flops / total / 1e12,
        "mfu": flops / total / peak if peak else None,
    }
    print(json.dumps(result))
    return result
