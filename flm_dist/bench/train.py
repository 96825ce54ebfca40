"""`flm bench train`: timed pretraining steps on one device, printed as one JSON line.

It runs the exact step of `pretrain` (same setup, batches, `forward_backward` and the update's
non-finite check, `nonfinite_terms`), in this process, for `warmup` untimed and `steps` timed
optimiser steps. The step time is split into data (building the batch from the on-device
windows) and compute (forward, backward, non-finite check, optimiser). Model FLOPs per second (an
analytic count of the matmuls, `flm_dist.train.flops.step_flops`) are reported over the measured
matmul peak of this device in the step's precision (`peak_fraction`) and, on a known GPU, over its
dense bf16 peak (`mfu`). With `profile_steps`, that many further steps run under the torch
profiler, and `profile` lists the operators that took most of their time (self time per step
and share of the profiled steps), to say where the time goes when the fraction of peak is low.
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch

from flm_dist.data.batches import length_bucketed_batches
from flm_dist.train.configs import PretrainConfig
from flm_dist.train.flops import device_name_and_peak, matmul_peak_flops, step_flops
from flm_dist.train.loop import (
    forward_backward,
    loss_vector,
    nonfinite_terms,
    setup_training,
)
from flm_dist.train.session import LocalSession


def run_bench_train(config: PretrainConfig, steps: int = 50, warmup: int = 10, profile_steps: int = 0,
                    profile_ops: int = 15) -> dict[str, Any]:
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
    data_seconds = compute_seconds = flops = 0.0
    sequences = tokens = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step(index: int) -> tuple[dict[str, torch.Tensor], float, float, float]:
        """One optimiser step on the plan's `index`th batch: (batch, start, batch built, step done)."""
        first, last, width = batches[index % len(batches)]
        synchronize()
        started = time.perf_counter()
        batch = setup.train.take(order[first:last], width)
        synchronize()
        built = time.perf_counter()
        losses = forward_backward(step_model, batch, setup.step_options, grad_accum=1)
        if not nonfinite_terms(loss_vector(losses, names), names, optimizer, config.train.grad_clip):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize()
        return batch, started, built, time.perf_counter()

    for index in range(warmup + steps):
        batch, started, built, finished = step(index)
        if index >= warmup:
            data_seconds += built - started
            compute_seconds += finished - built
            sequences += batch["input"].shape[0]
            tokens += int(batch["target"].count_nonzero())
            flops += step_flops(*batch["input"].shape, config, setup.manifest["items"])
    device_name, peak = device_name_and_peak(device)
    measured_peak = matmul_peak_flops(device, setup.step_options["bf16"])
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
        "peak_tflops_per_s": measured_peak / 1e12, "peak_fraction": flops / total / measured_peak,
        "threads": torch.get_num_threads(), "mfu": flops / total / peak if peak else None,
    }
    if profile_steps:
        result["profile"] = _profile(lambda: [step(warmup + steps + i) for i in range(profile_steps)],
                                     profile_steps, profile_ops)
    print(json.dumps(result))
    return result


def _profile(run_steps, steps: int, top: int) -> list[dict[str, Any]]:
    """The `top` operators by self time (CPU, or CUDA where there is a GPU) over `run_steps()`."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as profiler:
        run_steps()
    events = profiler.key_averages()
    if cuda:
        # A kernel's time is also the self device time of the operator that launched it, and an
        # annotation's spans its kernels: keep the operators, so each kernel counts once.
        events = [e for e in events if e.device_type == DeviceType.CPU and not getattr(e, "is_user_annotation", False)]
    self_time = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    total = sum(self_time(e) for e in events) or 1.0
    ranked = sorted(events, key=self_time, reverse=True)[:top]
    return [{"op": e.key, "self_ms_per_step": self_time(e) / 1000 / steps, "share": self_time(e) / total,
             "calls_per_step": e.count / steps} for e in ranked]
