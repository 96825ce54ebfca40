"""The training step's allocator setting (flm_dist/train/host_memory.py)."""

import subprocess
import sys

import pytest
import torch

# A fresh process allocates a 20 MB tensor; glibc's default (an mmap threshold of 128 KB until a
# large block is freed) maps it outside the heap, the fixed thresholds put it inside.
PROBE = """
import ctypes, sys, torch
from flm_dist.train.host_memory import keep_freed_host_memory
applied = keep_freed_host_memory(torch.device("cpu")) if sys.argv[1] == "on" else False
libc = ctypes.CDLL(None)
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_long]
block = torch.empty(5_000_000)
print(applied, block.data_ptr() < libc.sbrk(0))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_large_step_blocks_come_from_the_heap_once_the_thresholds_are_fixed():
    def probe(mode: str) -> list[str]:
        return subprocess.run([sys.executable, "-c", PROBE, mode], check=True, capture_output=True,
                              text=True).stdout.split()

    applied, in_heap = probe("on")
    if applied == "False":
        pytest.skip("not glibc")
    assert in_heap == "True"
    assert probe("off") == ["False", "False"]  # the default maps it: the setting is what moved it


def test_no_allocator_change_for_a_gpu_step():
    from flm_dist.train.host_memory import keep_freed_host_memory

    assert keep_freed_host_memory(torch.device("cuda")) is False
