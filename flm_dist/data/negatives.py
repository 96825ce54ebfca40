"""Sampled negatives of the valid/test rows: `num_negatives` items the user never touched, drawn
uniformly without replacement from a counter-based stream keyed by (seed, user, split), so that
neither the sharding nor the order of the work can change them."""

from __future__ import annotations

import numpy as np

from flm_dist.data.hashing import mix

_BITMAP_MAX_ITEMS = 1 << 16  # larger catalogs test negatives by sorted keys, not a bitmap


def _row_streams(seed: int, users: np.ndarray, split: int) -> np.ndarray:
    """One 64-bit stream key per (seed, user, split): negatives depend on nothing else."""
    with np.errstate(over="ignore"):
        base = mix(np.uint64(seed & (2**64 - 1)) * np.uint64(0x9E3779B97F4A7C15) + users.astype(np.uint64))
        return mix(base ^ np.uint64(split * 0xD1B54A32D192ED03 & (2**64 - 1)))


def _draw_streams(rows: np.ndarray, width: int, users, streams, seen, lo, hi, n_items: int, k: int,
                  taken: np.ndarray) -> np.ndarray:
    """The first k fresh candidates among `width` of each row's stream into `taken`; returns rows still short.

    A candidate is fresh if the user never saw it and it is not an earlier candidate of the row.
    """
    short = []
    fresh_among = _fresh_by_bitmap if n_items <= _BITMAP_MAX_ITEMS else _fresh_by_keys
    block = max(1, (1 << 24) // (n_items + 1)) if fresh_among is _fresh_by_bitmap else 1 << 16
    for begin in range(0, len(rows), block):
        chunk = rows[begin: begin + block]
        with np.errstate(over="ignore"):
            draws = mix(streams[chunk, None] + np.arange(width, dtype=np.uint64)[None, :]
                         * np.uint64(0x9E3779B97F4A7C15))
        cand = (draws % np.uint64(n_items)).astype(np.int64) + 1
        fresh = fresh_among(cand, users[chunk].astype(np.int64), seen, lo[chunk], hi[chunk], n_items)
        rank = np.cumsum(fresh, axis=1)
        pick = fresh & (rank <= k)
        complete = rank[:, -1] >= k
        taken[chunk[complete]] = cand[complete][pick[complete]].reshape(-1, k)
        short.append(chunk[~complete])
    return np.concatenate(short)


def _fresh_by_bitmap(cand, users, seen, lo, hi, n_items: int) -> np.ndarray:
    """A bitmap of (row, item) marks the user's items, then each candidate column in counter order:
    a candidate is fresh if unmarked, and marks itself. 1.7x faster than `_fresh_by_keys` at 5k
    items, but it zeroes rows x items bytes, which rules it out for large catalogs."""
    rows = len(cand)
    mark = np.zeros(rows * (n_items + 1), dtype=bool)  # flat [row, item]
    offsets, flat = ranges(lo, hi)
    local = np.repeat(np.arange(rows), np.diff(offsets))
    mark[local * (n_items + 1) + seen[flat] - users[local] * (n_items + 1)] = True
    # Column-major flat positions, so that each step of the loop reads one contiguous column.
    where = np.ascontiguousarray((np.arange(rows)[:, None] * (n_items + 1) + cand).T)
    fresh = np.empty(where.shape, dtype=bool)
    for c in range(where.shape[0]):
        fresh[c] = ~mark[where[c]]
        mark[where[c]] = True
    return fresh.T


def _fresh_by_keys(cand, users, seen, lo, hi, n_items: int) -> np.ndarray:
    """The same answer as `_fresh_by_bitmap` from sorted keys: a binary search in `seen`, and a
    stable sort of each row's candidates, so that only the first of equal candidates is fresh."""
    keys = users[:, None] * (n_items + 1) + cand
    at = np.minimum(np.searchsorted(seen, keys), max(len(seen) - 1, 0))
    was_seen = seen[at] == keys if len(seen) else np.zeros(keys.shape, dtype=bool)
    order = np.argsort(cand, axis=1, kind="stable")
    ordered = np.take_along_axis(cand, order, axis=1)
    repeat = np.zeros(cand.shape, dtype=bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    earlier = np.empty_like(repeat)
    np.put_along_axis(earlier, order, repeat, axis=1)
    return ~was_seen & ~earlier


def draw_negatives(users: np.ndarray, split: int, seen: np.ndarray, n_items: int, k: int,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    """For each row's user, `k` item indices (1..n_items) the user never interacted with.

    `seen` is the sorted array of user * (n_items + 1) + item keys of every event of these users.
    Row r's candidates are the counter stream hash(stream(seed, user, split), c) for c = 0, 1, ...;
    the first k that are neither seen nor repeated are taken, i.e. a uniform sample without
    replacement that depends only on (seed, user, split) and the user's items. Users whose unseen
    items number fewer than 4k take the k unseen items of smallest hash instead (the same
    distribution, without rejection loops); fewer than k unseen gives them all.
    Returns (offsets, values) of a list array.
    """
    rows = len(users)
    users = users.astype(np.int64)
    lo = np.searchsorted(seen, users * (n_items + 1))
    hi = np.searchsorted(seen, (users + 1) * (n_items + 1))
    unseen = n_items - (hi - lo)
    streams = _row_streams(seed, users, split)
    taken = np.zeros((rows, k), dtype=np.int32)
    counts = np.where(unseen < k, unseen, k)
    dense = unseen < 4 * k
    sparse_rows = np.flatnonzero(~dense & (k > 0))
    width = k + k // 8 + 8  # duplicates and seen items are rare; short rows retry wider
    while len(sparse_rows):
        sparse_rows = _draw_streams(sparse_rows, width, users, streams, seen, lo, hi, n_items, k, taken)
        width *= 4  # the longer stream starts with the same candidates, so the result is unchanged
    for r in np.flatnonzero(dense & (k > 0)):
        mine = seen[lo[r]: hi[r]] - users[r] * (n_items + 1)
        free = np.setdiff1d(np.arange(1, n_items + 1), mine)
        with np.errstate(over="ignore"):
            order = np.argsort(mix(streams[r] + free.astype(np.uint64) * np.uint64(0xA24BAED4963EE407)),
                               kind="stable")
        taken[r, : counts[r]] = free[order[:k]]
    offsets = np.r_[0, np.cumsum(counts)].astype(np.int32)
    return offsets, taken[np.arange(k)[None, :] < counts[:, None]]


def ranges(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(list offsets, flat positions) of the half-open ranges [starts[i], ends[i])."""
    lengths = ends - starts
    offsets = np.r_[0, np.cumsum(lengths)]
    flat = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1] - starts, lengths)
    return offsets, flat

