"""The distributed seam: rank, world size, all-reduce of sums, all-gather (of tensors and of
objects), an all-to-all of objects, DDP wrapping, and the row-wise gradient exchange of a row-sparse table.

The only module besides the Ray seam that touches `torch.distributed`; with no process group
(one process, tests, local mode) every function degrades to the single-process answer.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place (float64 sums stay exact enough to compare 1 vs N ranks)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_(tensor: torch.Tensor, source: int = 0) -> torch.Tensor:
    """Overwrite `tensor` on every rank with rank `source`'s, in place."""
    if is_distributed():
        dist.broadcast(tensor, src=source)
    return tensor


def all_gather(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every rank's `tensors` concatenated along dim 0, in rank order. The tensors of one rank
    share their first dimension, which may differ between ranks (rows are padded for transit)."""
    if not is_distributed():
        return tensors
    length = torch.tensor([tensors[0].shape[0]], device=tensors[0].device)
    lengths = [torch.zeros_like(length) for _ in range(world_size())]
    dist.all_gather(lengths, length)
    lengths = [int(n) for n in lengths]
    gathered = []
    for tensor in tensors:
        padded = tensor.new_zeros((max(lengths), *tensor.shape[1:]))
        padded[:tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in lengths]
        dist.all_gather(parts, padded)
        gathered.append(torch.cat([part[:n] for part, n in zip(parts, lengths)]))
    return tuple(gathered)


def all_gather_objects(value: object) -> list[object]:
    """Every rank's picklable `value`, in rank order (`[value]` in a single process)."""
    if not is_distributed():
        return [value]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def exchange_objects(outgoing: Sequence[object]) -> list[object]:
    """All-to-all of picklable objects: `outgoing[r]` goes to rank r. Returns what every rank sent
    to this one, in rank order (this rank's own part included); one scatter per rank."""
    if not is_distributed():
        return list(outgoing)
    if len(outgoing) != world_size():
        raise ValueError(f"exchange_objects needs one part per rank ({world_size()}), got {len(outgoing)}")
    received = []
    for source in range(world_size()):
        slot = [None]
        dist.scatter_object_list(slot, list(outgoing) if rank() == source else None, src=source)
        received.append(slot[0])
    return received


def average_row_gradients_(parameter: nn.Parameter, sparse: bool = False) -> int:
    """Average a row-sparse gradient over ranks, as DDP would, sending only its nonzero rows.

    For a table whose rows get gradients only where the batch touched it (the item table under
    sampled softmax: inputs, targets, negatives). Every rank all-gathers (row ids, row gradients)
    and adds them into its zeroed gradient: world x touched x (H x 4 + 8) bytes arrive per rank
    instead of an all-reduce of the whole table. Finding the rows still reads the whole local
    gradient, unless the table is `sparse` (`nn.Embedding(sparse=True)`): then the gradient
    lists its rows, nothing is scanned, and the averaged gradient stays sparse. Returns the rows
    this rank sent (0 in a single process, where nothing is sent).
    """
    if not is_distributed():
        return 0
    if parameter.grad is None:  # no lookup on this rank: it still joins the exchange, with no rows
        parameter.grad = (torch.sparse_coo_tensor(torch.empty(1, 0, dtype=torch.long, device=parameter.device),
                                                  parameter.new_empty(0, *parameter.shape[1:]), parameter.shape)
                          if sparse else torch.zeros_like(parameter))
    gradient = parameter.grad
    if sparse:
        gradient = gradient.coalesce()
        rows = gradient.indices()[0]
        ids, values = all_gather(rows, gradient.values() / world_size())
        parameter.grad = torch.sparse_coo_tensor(ids.unsqueeze(0), values, gradient.shape,
                                                 check_invariants=False).coalesce()
        return rows.numel()
    rows = gradient.ne(0).any(dim=1).nonzero().squeeze(1)
    ids, values = all_gather(rows, gradient[rows] / world_size())
    gradient.index_fill_(0, rows, 0.0)
    gradient.index_add_(0, ids, values)
    return rows.numel()


def wrap_model(model: nn.Module, device: torch.device, find_unused_parameters: bool,
               row_sparse: Sequence[nn.Parameter] = ()) -> nn.Module:
    """DDP-wrap `model` when running with several ranks; `unwrap` gives the plain module back.

    Parameters in `row_sparse` are left out of DDP's all-reduce: the caller averages their
    gradients with `average_row_gradients_` before each optimiser step. DDP does not broadcast
    them either, so rank 0's values are broadcast here.
    """
    if not is_distributed():
        return model
    ignored = {id(parameter) for parameter in row_sparse}
    # DDP matches ignored parameters by qualified name; a shared table has one name per owner.
    names = [f"{module_name}.{name}" if module_name else name
             for module_name, module in model.named_modules(remove_duplicate=False)
             for name, parameter in module.named_parameters(recurse=False) if id(parameter) in ignored]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    for parameter in row_sparse:
        broadcast_(parameter.data)
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextmanager
def process_group(rank: int, world_size: int, init_method: str, backend: str = "gloo") -> Iterator[None]:
    """Be one rank of a process group for the `with` block, outside Ray Train (which starts its
    own): benchmarks and tests. A clean block ends at a barrier, so no rank leaves while a peer
    is still in a collective; after an error the group is destroyed at once, since a peer may
    never reach the barrier. A process started for the rank ends with `exit_rank_process`."""
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def exit_rank_process() -> NoReturn:
    """End a process started for one rank (`torch.multiprocessing.spawn`) with status 0, skipping
    interpreter shutdown.

    DDP keeps references to its process group that are never released (10 per wrapper in torch
    2.13), so gloo's worker threads outlive `destroy_process_group`. A worker thread that is still
    releasing its last collective's tensors while the interpreter shuts down aborts the process
    ("terminate called without an active exception"): 6 of 25 runs of the two-rank test in
    tests/test_optim.py on 2 busy cores.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
