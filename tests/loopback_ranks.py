"""Spawn gloo ranks on this machine: the one way tests run a real multi-process group."""

import json
import socket
from pathlib import Path

import torch

from flm_dist.train import distributed


def spawn_on_loopback(rank_fn, world: int, *args) -> None:
    """Run `rank_fn(rank, world, init_method, *args)` in `world` processes over a free 127.0.0.1 port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(rank_fn, args=(world, f"tcp://127.0.0.1:{port}", *args), nprocs=world)


def _write_rank_zero_metrics(rank: int, world: int, init_method: str, metrics_of_rank, result_path: str) -> None:
    torch.set_num_threads(1)
    with distributed.process_group(rank, world, init_method):
        metrics = metrics_of_rank(rank)
        if rank == 0:
            Path(result_path).write_text(json.dumps(metrics))
    distributed.exit_rank_process()


def metrics_on_two_ranks(metrics_of_rank, directory: Path) -> dict[str, float]:
    """Rank 0's `metrics_of_rank(rank)` when two gloo ranks compute it together (it all-reduces);
    `metrics_of_rank` is a module-level function, so that it can be sent to the spawned ranks."""
    result_path = Path(directory) / "rank0.json"
    spawn_on_loopback(_write_rank_zero_metrics, 2, metrics_of_rank, str(result_path))
    return json.loads(result_path.read_text())
