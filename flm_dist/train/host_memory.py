"""Keep a CPU training step's large temporaries in the heap instead of returning them to the OS.

glibc's malloc serves a block above its mmap threshold with a fresh mapping and unmaps it on
free, and returns the heap's free top to the OS beyond its trim threshold; both thresholds move
with the program's pattern of frees. A training step on a CPU frees and reallocates the same
[batch, items] blocks every step (the logits, their fp32 copy for the softmax, its output and
gradients: 9-19 MB each at Sports' 18,357 items), and in practice many of them come back as
new mappings that page-fault in again: `flm bench train` on Sports' attributes recipe, one
thread, 102-124 ms a step by default, 71-73 ms with the thresholds fixed (docs/benchmarks.md).
Fixing the mmap threshold at glibc's maximum (32 MB) and the trim threshold at 256 MB keeps
those blocks in the heap for reuse, at the cost of up to 256 MB of freed memory the process
keeps. A no-op without glibc.
"""

from __future__ import annotations

import ctypes
import sys

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 32 << 20
"""glibc's largest mmap threshold (HEAP_MAX_SIZE / 2 on 64-bit): blocks below it come from the heap."""
TRIM_THRESHOLD_BYTES = 256 << 20
"""Freed memory at the heap's top that stays with the process before malloc returns it."""


def keep_freed_host_memory(device: torch.device) -> bool:
    """Fix glibc's mmap and trim thresholds for this process when it trains on the CPU (see the
    module docstring). True when applied; False for another device, off Linux or off glibc,
    where nothing changes."""
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # only glibc has it; musl's mallopt does nothing
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
