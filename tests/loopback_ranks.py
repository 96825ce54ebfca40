"""Spawn gloo ranks on this machine: the one way tests run a real multi-process group."""

import socket

import torch


def spawn_on_loopback(rank_fn, world: int, *args) -> None:
    """Run `rank_fn(rank, world, init_method, *args)` in `world` processes over a free 127.0.0.1 port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(rank_fn, args=(world, f"tcp://127.0.0.1:{port}", *args), nprocs=world)
