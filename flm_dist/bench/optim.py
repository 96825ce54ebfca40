"""`flm bench optim`: one training step of a large embedding table, dense AdamW vs lazy rows (JSON line).

The CF user table is the model's largest tensor once users number in the millions, and a batch
looks up a few thousand of its rows. With a dense gradient, every step still allocates a
table-sized gradient and AdamW reads and writes every row (parameter, gradient, two moments).
With `train.sparse_user_table=true` the gradient holds only the looked-up rows and
`LazyRowAdamW` touches only those. This times backward + optimiser step of a lookup of `batch`
random rows (the rest of the model is left out: it is the same in both designs).
"""

from __future__ import annotations

import json
import platform
import time
from typing import Any

import torch
from torch import nn

from flm_dist.train.optim import LazyRowAdamW


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_seconds(sparse: bool, rows: int, dim: int, batch: int, steps: int, warmup: int,
                  device: torch.device) -> float:
    table = nn.Embedding(rows, dim, sparse=sparse, device=device)
    optimizer = LazyRowAdamW([{"params": [table.weight], "weight_decay": 0.0}], lr=1e-3,
                             fused=device.type == "cuda" and not sparse)
    generator = torch.Generator(device=device).manual_seed(0)
    total = 0.0
    for step in range(warmup + steps):
        lookup = torch.randint(0, rows, (batch,), device=device, generator=generator)
        _synchronize(device)
        started = time.perf_counter()
        table(lookup).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _synchronize(device)
        if step >= warmup:
            total += time.perf_counter() - started
    return total / steps


def run_bench_optim(rows: int, dim: int = 64, batch: int = 4096, steps: int = 10, warmup: int = 2,
                    device: str = "cpu") -> dict[str, Any]:
    target = torch.device(device)
    dense = _step_seconds(False, rows, dim, batch, steps, warmup, target)
    lazy = _step_seconds(True, rows, dim, batch, steps, warmup, target)
    result = {
        "device": torch.cuda.get_device_name(target) if target.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "rows": rows, "dim": dim, "batch": batch, "steps": steps,
        "table_bytes": rows * dim * 4,
        "dense_step_ms": 1000 * dense,
        "lazy_step_ms": 1000 * lazy,
        "dense_over_lazy": dense / lazy,
    }
    print(json.dumps(result))
    return result
