"""Which fused attention kernel a GPU step runs.

torch prefers cuDNN's fused attention on recent GPUs. cuDNN builds an execution plan for each new
input shape, and training batches come in up to `max_len / 8` widths (validation's in more): on an
H200 the Toys preset's first epoch took 10.6 s with it and 4.7 s with the memory-efficient kernel,
its later epochs 3.6-3.9 s and 3.7-4.3 s (docs/benchmarks.md "On an H200"). A process-wide switch
of torch's, set where a worker picks its device, so model code stays free of device policy.
"""

from __future__ import annotations

import torch


def choose_attention_kernel(device: torch.device, cudnn: bool) -> bool:
    """On a GPU, allow cuDNN's fused attention only with `cudnn` (`train.cudnn_attention`); torch
    then falls back to its flash or memory-efficient kernels. Returns whether cuDNN's is allowed;
    nothing changes on a CPU, which has no cuDNN attention."""
    if device.type != "cuda":
        return False
    torch.backends.cuda.enable_cudnn_sdp(cudnn)
    return cudnn
