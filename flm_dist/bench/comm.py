"""`flm bench comm`: what DDP ranks exchange per step for the item table, dense vs rows (JSON line).

It spawns `workers` processes (gloo on CPU, NCCL with one GPU each) that train the FLM model
with sampled softmax on random batches, twice from the same parameters and batches:
- `dense`: DDP all-reduces every parameter, the whole item table included;
- `rows`: `train.item_grad_exchange=rows`: the item table is left out of DDP and the rows a step
  touched are all-gathered (`distributed.average_row_gradients_`).
Items are drawn uniformly from the catalog, so a batch touches about as many distinct rows as it
can: popularity-skewed logs touch fewer. Reported per step: bytes each design moves (dense:
the parameters' numel x element size, what DDP's buckets hold; rows: the rest of the model plus
world x touched rows x (H x 4 + 8)), rows touched, step time, the time of the table's exchange
alone (one all-reduce of a table-sized tensor vs `average_row_gradients_`), and the largest
difference between the two runs' final parameters (rows must reproduce dense DDP up to rounding).
"""

from __future__ import annotations

import json
import os
import platform
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from flm_dist.config import LossConfig
from flm_dist.errors import UserError
from flm_dist.models import FLMModel
from flm_dist.train import distributed
from flm_dist.train.loop import forward_backward


def _random_batch(rank: int, step: int, batch_size: int, max_len: int, items: int, seed: int,
                  device: torch.device) -> dict[str, torch.Tensor]:
    """Full-length windows of uniformly drawn items; each (rank, step) its own."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + rank * 10_007 + step)
    windows = torch.randint(1, items + 1, (batch_size, max_len + 1), generator=generator)
    users = torch.arange(batch_size) + rank * batch_size
    return {"user": users.to(device), "input": windows[:, :-1].to(device), "target": windows[:, 1:].to(device)}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train(mode: str, device: torch.device, settings: dict[str, Any]) -> tuple[FLMModel, dict[str, float]]:
    """`warmup + steps` DDP steps in `mode`: the model and per-step means of the timed steps
    (`step_s`, and in rows mode `exchange_s` and `rows_sent`)."""
    world, rank = distributed.world_size(), distributed.rank()
    batch = {key: settings[key] for key in ("batch_size", "max_len", "items", "seed")}
    torch.manual_seed(settings["seed"])
    model = FLMModel(num_users=settings["batch_size"] * world, num_items=settings["items"],
                     hidden=settings["dim"], max_len=settings["max_len"], layers=2, heads=2,
                     dropout=0.0).to(device)
    # ActNorm's data init on one shared batch, as train_loop does before DDP replicates rank 0.
    model.initialize_flow(_random_batch(0, -1, device=device, **batch))
    row_sparse = [model.item_table()] if mode == "rows" else []
    ddp_model = distributed.wrap_model(model, device, find_unused_parameters=False, row_sparse=row_sparse)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    options = {"weights": LossConfig().weights(), "cf_loss": "ce", "softmax": "sampled",
               "num_negatives": settings["num_negatives"], "popularity": None, "chunk_size": None,
               "bf16": device.type == "cuda"}
    totals = {"step_s": 0.0, "exchange_s": 0.0, "rows_sent": 0.0}
    for step in range(settings["warmup"] + settings["steps"]):
        inputs = _random_batch(rank, step, device=device, **batch)
        _synchronize(device)
        started = time.perf_counter()
        forward_backward(ddp_model, inputs, options, grad_accum=1)
        _synchronize(device)
        exchange_started = time.perf_counter()
        sent = sum(distributed.average_row_gradients_(parameter) for parameter in row_sparse)
        _synchronize(device)
        exchange_seconds = time.perf_counter() - exchange_started
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _synchronize(device)
        if step >= settings["warmup"]:
            totals["step_s"] += time.perf_counter() - started
            totals["exchange_s"] += exchange_seconds
            totals["rows_sent"] += sent
    return model, {key: value / settings["steps"] for key, value in totals.items()}


def _table_all_reduce_seconds(table: torch.Tensor, repeats: int) -> float:
    """Seconds per all-reduce of a table-sized gradient alone: dense DDP's item-table share,
    which it overlaps with the backward pass and a step time cannot separate."""
    gradient = torch.ones_like(table)
    distributed.all_reduce_sum(gradient)
    _synchronize(table.device)
    started = time.perf_counter()
    for _ in range(repeats):
        distributed.all_reduce_sum(gradient)
    _synchronize(table.device)
    return (time.perf_counter() - started) / repeats


def _max_over_ranks(value: float, device: torch.device) -> float:
    return float(distributed.all_reduce_max(torch.tensor(value, dtype=torch.float64, device=device)).item())


def _measure(device: torch.device, settings: dict[str, Any]) -> dict[str, Any]:
    world = distributed.world_size()
    dense_model, dense_times = _train("dense", device, settings)
    dense = {name: parameter.detach().clone() for name, parameter in dense_model.named_parameters()}
    dense_bytes = sum(p.numel() * p.element_size() for p in dense_model.parameters() if p.requires_grad)
    table_bytes = dense_model.item_table().numel() * dense_model.item_table().element_size()
    all_reduce_seconds = _table_all_reduce_seconds(dense_model.item_table().detach(), settings["steps"])
    del dense_model
    rows_model, rows_times = _train("rows", device, settings)
    difference = max((p.detach() - dense[name]).abs().max().item() for name, p in rows_model.named_parameters())
    disagreement = 0.0
    for parameter in rows_model.parameters():
        reference = distributed.broadcast_(parameter.detach().clone())
        disagreement = max(disagreement, (parameter.detach() - reference).abs().max().item())
    gathered_rows = distributed.all_reduce_sum(
        torch.tensor(rows_times["rows_sent"], dtype=torch.float64, device=device)).item()
    row_bytes = settings["dim"] * 4 + 8
    rows_bytes = dense_bytes - table_bytes + gathered_rows * row_bytes
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__, "backend": "nccl" if device.type == "cuda" else "gloo", "workers": world,
        **{key: settings[key] for key in ("items", "dim", "batch_size", "max_len", "num_negatives", "steps")},
        "item_table_bytes": table_bytes,
        "dense_allreduce_bytes_per_step": dense_bytes,
        "rows_touched_per_rank_per_step": gathered_rows / world,
        "rows_gather_bytes_per_step": gathered_rows * row_bytes,
        "rows_total_bytes_per_step": rows_bytes,
        "dense_over_rows_bytes": dense_bytes / rows_bytes,
        # Rows move fewer bytes while world x touched x (H x 4 + 8) < (N + 1) x H x 4.
        "crossover_rows_per_rank": table_bytes / (world * row_bytes),
        "dense_step_ms": 1000 * _max_over_ranks(dense_times["step_s"], device),
        "rows_step_ms": 1000 * _max_over_ranks(rows_times["step_s"], device),
        "table_allreduce_ms": 1000 * _max_over_ranks(all_reduce_seconds, device),
        "rows_exchange_ms": 1000 * _max_over_ranks(rows_times["exchange_s"], device),
        "rows_vs_dense_max_abs_diff": _max_over_ranks(difference, device),
        "rows_max_rank_disagreement": _max_over_ranks(disagreement, device),
    }


def _worker(rank: int, world: int, init_method: str, settings: dict[str, Any], result_path: str) -> None:
    if settings["device"] == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    with distributed.process_group(rank, world, init_method, "nccl" if device.type == "cuda" else "gloo"):
        result = _measure(device, settings)
        if rank == 0:
            Path(result_path).write_text(json.dumps(result))
    distributed.exit_rank_process()


def run_bench_comm(items: int, dim: int = 64, workers: int = 2, batch_size: int = 64, max_len: int = 50,
                   num_negatives: int = 256, steps: int = 10, warmup: int = 2, device: str = "cpu",
                   seed: int = 0) -> dict[str, Any]:
    if workers < 2:
        raise UserError("--workers must be at least 2: one process has nothing to exchange")
    if device == "cuda" and torch.cuda.device_count() < workers:
        raise UserError(f"--device cuda needs one GPU per worker: {workers} workers, "
                        f"{torch.cuda.device_count()} GPUs")
    settings = {"items": items, "dim": dim, "batch_size": batch_size, "max_len": max_len,
                "num_negatives": num_negatives, "steps": steps, "warmup": warmup, "device": device,
                "seed": seed}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as scratch:
        result_path = str(Path(scratch) / "result.json")
        torch.multiprocessing.spawn(_worker, args=(workers, f"tcp://127.0.0.1:{port}", settings, result_path),
                                    nprocs=workers)
        result = json.loads(Path(result_path).read_text())
    print(json.dumps(result))
    return result
