"""`flm bench topk`: full ranking over a large random catalog, printed as one JSON line.

Random user vectors against a random item table (no data needed), scored the way evaluation
and export score: in item chunks within `max_score_elements`. Two timed passes over the same
users: export's running top-K, and evaluation's target ranks (a random target and `history`
random history items per user, removed chunk by chunk). Peak memory is what scoring adds on top
of the inputs: `torch.cuda.max_memory_allocated` on a GPU, the growth of the process's peak RSS
(`ru_maxrss`) on a CPU.
"""

from __future__ import annotations

import json
import platform
import resource
import time
from typing import Any

import torch

from flm_dist.eval.ranking import item_chunk_size, rank_targets, top_k


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def run_bench_topk(items: int, users: int, dim: int, k: int = 50, device: str = "cpu",
                   batch_size: int = 1024, max_score_elements: int = 2 ** 26, history: int = 50,
                   seed: int = 0) -> dict[str, Any]:
    device = torch.device(device)
    generator = torch.Generator(device).manual_seed(seed)
    # Scaled in place: a temporary copy of a 10M-item table would set the peak before scoring.
    item_table = torch.randn(items + 1, dim, generator=generator, device=device).mul_(dim ** -0.5)
    item_table[0] = 0.0
    vectors = torch.randn(users, dim, generator=generator, device=device).mul_(dim ** -0.5)
    target = torch.randint(1, items + 1, (users,), generator=generator, device=device)
    seen = torch.randint(1, items + 1, (users, history), generator=generator, device=device)
    chunk_size = item_chunk_size(min(batch_size, users), items, max_score_elements)
    starts = range(0, users, batch_size)

    def history_pairs(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.arange(stop - start, device=device).repeat_interleave(history)
        return rows, seen[start:stop].reshape(-1)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # One user through both paths first: kernel selection and allocator warm-up are not timed.
    top_k(vectors[:1], item_table, k, chunk_size, history_pairs(0, 1))
    rank_targets(vectors[:1], item_table, target[:1], history_pairs(0, 1), chunk_size)
    synchronize()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else _peak_bytes(device)

    started = time.perf_counter()
    for start in starts:
        stop = min(start + batch_size, users)
        top_k(vectors[start:stop], item_table, k, chunk_size, history_pairs(start, stop))
    synchronize()
    topk_seconds = time.perf_counter() - started
    started = time.perf_counter()
    for start in starts:
        stop = min(start + batch_size, users)
        rank_targets(vectors[start:stop], item_table, target[start:stop], history_pairs(start, stop), chunk_size)
    synchronize()
    rank_seconds = time.perf_counter() - started
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "items": items, "users": users,
        "dim": dim, "k": k, "batch_size": batch_size, "history": history, "chunk_items": chunk_size,
        "chunks_per_batch": -(-items // chunk_size),
        "topk_users_per_s": users / topk_seconds, "rank_users_per_s": users / rank_seconds,
        "topk_s": topk_seconds, "rank_s": rank_seconds,
        "inputs_gb": (item_table.numel() + vectors.numel()) * 4 / 1e9,
        "peak_scoring_memory_gb": max(0, _peak_bytes(device) - baseline) / 1e9,
        "peak_memory_source": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "ru_maxrss growth",
    }
    print(json.dumps(result))
    return result
