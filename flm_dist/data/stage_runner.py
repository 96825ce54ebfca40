"""How prepare's stages run: one function mapped over groups of files or buckets, as Ray tasks
(`ray_seam.run_in_parallel`), or in this process where the filesystem is process-local (memory://).
"""

from __future__ import annotations

import heapq
import logging
import time
from typing import Any, Callable

import pyarrow as pa
from tqdm.auto import tqdm

from flm_dist import ray_seam

log = logging.getLogger("flm_dist")

TASK_RETRIES = 2  # a task lost twice more (a dead worker, a memory kill) fails the run


class StageRunner:
    """Maps a function over argument tuples in Ray tasks (`workers` at once) or in this process."""

    def __init__(self, local: bool, workers: int):
        self.local = local
        self.workers = max(1, workers)
        if not local:
            ray_seam.ensure_ray()
            self.workers = workers or ray_seam.cluster_cpus()

    def put(self, obj: Any) -> Any:
        """Share a large read-only object with every task once (object store), not per task."""
        return obj if self.local else ray_seam.share(compact_arrow(obj))

    def map(self, fn: Callable, calls: list[tuple], desc: str) -> list[Any]:
        """Results of fn(*args) for each args in `calls`, in order; a task's `UserError` is raised
        here as the same one-line error."""
        results: list[Any] = [None] * len(calls)
        busy = 0.0
        started = time.perf_counter()
        bar = tqdm(total=len(calls), desc=desc, unit="task", leave=False)

        def finished(index: int, outcome: tuple[Any, float]) -> None:
            nonlocal busy
            results[index], seconds = outcome
            busy += seconds
            bar.update()

        if self.local:
            for index, args in enumerate(calls):
                finished(index, _timed(fn, *args))
        else:
            tasks = [ray_seam.TaskCall(index, f"{desc} {index + 1}", _in_task, (fn, *args))
                     for index, args in enumerate(calls)]
            ray_seam.run_in_parallel(tasks, self.workers, num_cpus=1, num_gpus=0, on_finished=finished,
                                     describe="prepare task", retries=TASK_RETRIES, log_level=logging.DEBUG)
        bar.close()
        log.debug("prepare: %s: %d task(s), %.2f s in tasks, %.2f s wall", desc, len(calls), busy,
                  time.perf_counter() - started)
        return results


def _timed(fn: Callable, *args: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = fn(*args)
    pa.default_memory_pool().release_unused()  # workers are reused: hand freed buffers back to the OS
    return result, time.perf_counter() - started


def _in_task(fn: Callable, *args: Any) -> tuple[Any, float]:
    """`_timed` in a Ray task, its result ready to travel back to the driver."""
    return compact_arrow(_timed(fn, *args))


def compact_arrow(value: Any) -> Any:
    """`value` with every Arrow array copied into buffers of its own length, ready to pickle.

    Pickling an Arrow array writes its whole buffers, however little of them it views. A slice,
    and each 32k-row chunk of a `group_by` result, views buffers shared with the rest, so a
    task's item counts over 1.2M items pickled to 1 GB instead of 24 MB: growing with the
    square of the distinct items per task, this ran a 10M-item prepare out of memory.
    """
    if isinstance(value, pa.Table):
        return pa.table({name: compact_arrow(column) for name, column in zip(value.column_names, value.columns)},
                        schema=value.schema)
    if isinstance(value, pa.ChunkedArray):
        return pa.concat_arrays(value.chunks) if value.num_chunks else pa.array([], value.type)
    if isinstance(value, pa.Array):
        return pa.concat_arrays([value])
    if isinstance(value, dict):
        return {key: compact_arrow(item) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(compact_arrow(item) for item in value)
    return value


def groups(count: int, parts: int) -> list[list[int]]:
    """0..count-1 in `parts` contiguous groups of near-equal size."""
    parts = max(1, min(parts, count))
    return [list(range(count * p // parts, count * (p + 1) // parts)) for p in range(parts)]


def balanced(sizes: list[int], parts: int) -> list[list[int]]:
    """Indices of `sizes` in `parts` groups of similar total size (largest first into the lightest group)."""
    parts = max(1, min(parts, len(sizes)))
    heap = [(0, g) for g in range(parts)]
    chosen: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, g = heapq.heappop(heap)
        chosen[g].append(i)
        heapq.heappush(heap, (load + sizes[i], g))
    return [sorted(g) for g in chosen if g]
