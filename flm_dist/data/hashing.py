"""Stable hashes of prepare: user ids to buckets, and the splitmix64 mixer behind them and the
counter-based streams of negatives. They depend on the ids only, never on the process or the
sharding, so every task and every run agrees on them."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 (wrapping arithmetic is intended)."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64, copy=False)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def string_buffers(array: pa.StringArray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, UTF-8 bytes) of a string array without copying; offsets index into the full buffer."""
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int32)[array.offset: array.offset + len(array) + 1]
    data = array.buffers()[2]
    data = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    return offsets, data[offsets[0]: offsets[-1]]


def bucket_of(users: pa.Array, buckets: int) -> np.ndarray:
    """Stable bucket per user id string: a vectorised polynomial hash of the UTF-8 bytes."""
    users = users.cast(pa.string())
    if isinstance(users, pa.ChunkedArray):
        users = users.combine_chunks()
    n = len(users)
    if buckets == 1 or n == 0:
        return np.zeros(n, dtype=np.int64)
    offsets, data = string_buffers(users)
    starts = (offsets[:-1] - offsets[0]).astype(np.int64)
    lengths = np.diff(offsets).astype(np.int64)
    powers = np.cumprod(np.full(int(lengths.max()) + 1, 1099511628211, dtype=np.uint64))  # wraps mod 2**64
    position = np.arange(len(data), dtype=np.int64) - np.repeat(starts, lengths)
    with np.errstate(over="ignore"):
        terms = data.astype(np.uint64) * powers[position]
        sums = np.add.reduceat(terms, np.minimum(starts, len(data) - 1))  # ids are never empty (null_id)
    return (mix(sums ^ lengths.astype(np.uint64)) % np.uint64(buckets)).astype(np.int64)

