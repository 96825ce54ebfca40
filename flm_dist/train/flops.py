"""Model FLOPs of a training step (an analytic count of the matmuls) and the device's measured
matmul peak, so that throughput can be read as a fraction of what the hardware does.

`step_flops` counts what the model multiplies; `matmul_peak_flops` times what one large matmul
reaches on this device, in this precision, with this process's threads. Their ratio is the
fraction of peak `flm bench train`, `flm bench quality` and the training log report. On a GPU
the vendor's dense bf16 peak is known (`BF16_PEAK_FLOPS`) and gives MFU as well.
"""

from __future__ import annotations

import functools
import platform
import time

import torch

from flm_dist.train.configs import PretrainConfig

# Dense bf16 tensor-core peaks (FLOP/s) of devices we benchmark on; MFU is null elsewhere.
BF16_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def encoder_macs(rows: int, width: int, config: PretrainConfig, last_only: bool) -> int:
    """Multiply-accumulates of one sequence-encoder pass over `rows` windows of `width` positions.

    Per token of a transformer block: QKV and output (4 H^2), the 4x feed-forward (8 H^2),
    attention scores and values (2 L H); a frequency filter is one [L, L] matrix per channel
    (L H), beside attention for BSARec, instead of it for FMLP-Rec. `last_only` (a pass that
    keeps the last state alone, as prefix windows' training and ranking do): the last block
    computes QKV (3 H^2) and the filter at every position, the rest at the last.
    """
    hidden, layers = config.model.hidden, config.model.layers
    tokens = rows * width
    if config.model.encoder != "sasrec":
        gates = 3 if config.model.encoder == "gru" else 4
        return layers * tokens * gates * 2 * hidden * hidden

    def block(outputs: int) -> int:
        """One block computing `outputs` positions' outputs (QKV and the filter at every token)."""
        attention = tokens * 3 * hidden * hidden + outputs * (hidden * hidden + 2 * width * hidden)
        filter_ = tokens * width * hidden
        mixer = {"attention": attention, "bsarec": attention + filter_, "fmlp": filter_}[config.model.mixer]
        return mixer + outputs * 8 * hidden * hidden

    if not last_only or layers == 0:
        return layers * block(tokens)
    return (layers - 1) * block(tokens) + block(rows)


def step_flops(rows: int, width: int, config: PretrainConfig, num_items: int) -> float:
    """Training FLOPs of one batch of `rows` windows of `width` positions: 6 x multiply-accumulates
    of every matmul (forward + backward).

    Counts the encoder (`encoder_macs`; prefix windows keep the last state alone),
    the softmax logits of each active loss term (all positions for `seq`, one row per user for
    `cf` and `fused`; in-batch + sampled columns for sampled softmax), the flow's couplings and,
    for the contrastive term, the second encoder pass (last states) and its similarity block; for
    the intent term, the nearest-centroid search and its similarity block (the clustering pass at
    each epoch's start is not a step's and is left out).
    Embedding lookups, norms and element-wise work are left out.
    """
    hidden = config.model.hidden
    tokens = rows * width
    macs = encoder_macs(rows, width, config, last_only=config.train.windows == "prefixes")
    weights = config.loss.weights()
    if weights["contrast"]:  # a second encoder pass and the [2B x 2B] similarity block
        macs += encoder_macs(rows, width, config, last_only=True) + (2 * rows) ** 2 * hidden
    if weights.get("intent"):
        macs += rows * config.loss.intent_clusters * hidden + (2 * rows) ** 2 * hidden
    scored = rows if config.train.windows == "prefixes" else tokens  # positions with a seq target

    def softmax_columns(scored_rows: int) -> int:
        """The catalogue, or the in-batch (capped) plus sampled negatives of `scored_rows` rows."""
        if config.loss.softmax == "full":
            return num_items
        cap = config.loss.max_in_batch_negatives
        return (min(scored_rows, cap) if cap else scored_rows) + config.loss.num_negatives

    if weights["seq"]:
        macs += scored * softmax_columns(scored) * hidden
    for term in ("cf", "fused"):
        if weights[term]:
            macs += rows * softmax_columns(rows) * hidden
    if weights["flow"] or weights["fused"]:
        macs += rows * 2 * hidden * hidden  # fusion projection
    if weights["flow"]:
        flow_hidden = config.model.flow_hidden
        macs += rows * config.model.flow_layers * (hidden // 2 * flow_hidden + flow_hidden * flow_hidden
                                                   + flow_hidden * hidden)
    return 6.0 * macs


@functools.lru_cache(maxsize=None)
def _measured_peak(device_type: str, device_index: int | None, bf16: bool, threads: int) -> float:
    device = torch.device(device_type, device_index)
    # Large enough to be compute-bound (2048: about 48 GFLOP/s on one core of the development
    # CPU; a GPU needs 8192 to fill its tensor cores).
    size = 8192 if device.type == "cuda" else 2048
    dtype = torch.bfloat16 if bf16 else torch.float32
    left = torch.randn(size, size, device=device, dtype=dtype)
    right = torch.randn(size, size, device=device, dtype=dtype)

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.matmul(left, right)  # first call: kernels picked, memory paged in
    synchronize()
    # The best of at least three, for at least a second: on a shared machine a burst of other work
    # in a few short trials once read half the peak and doubled the reported fraction of it.
    best, trials, began = float("inf"), 0, time.perf_counter()
    while trials < 3 or (trials < 50 and time.perf_counter() - began < 1.0):
        started = time.perf_counter()
        torch.matmul(left, right)
        synchronize()
        best = min(best, time.perf_counter() - started)
        trials += 1
    return 2.0 * size ** 3 / best


def matmul_peak_flops(device: torch.device, bf16: bool) -> float:
    """FLOP/s of a large square matmul on `device` in bf16 or fp32 with the current torch thread
    count: the best of at least three trials over at least a second, measured once per process."""
    return _measured_peak(device.type, device.index, bf16, torch.get_num_threads())


def device_name_and_peak(device: torch.device) -> tuple[str, float | None]:
    """The device's name and, for a known GPU, its dense bf16 peak (FLOP/s) for MFU."""
    if device.type != "cuda":
        return platform.processor() or platform.machine(), None
    name = torch.cuda.get_device_name(device)
    return name, next((flops for key, flops in BF16_PEAK_FLOPS.items() if key in name), None)
