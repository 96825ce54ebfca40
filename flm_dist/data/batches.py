"""From prepared split tables (pyarrow) to left-padded tensors, vectorised with numpy.

Each worker reads its shard of the prepared splits once, turns it into fixed-size arrays, keeps
them on its device and draws batches by index: no per-step host work, no per-step transfers.
Sequences are left-padded (most recent item at the last position); item 0 is padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch


def _list_parts(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (int64, len rows+1) and flat int64 values of a list<int> column."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(array) == 0:
        return np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64)
    offsets = array.offsets.to_numpy().astype(np.int64)
    values = array.values.to_numpy(zero_copy_only=False).astype(np.int64)
    return offsets - offsets[0], values[offsets[0]:offsets[-1]]


def _place_right_aligned(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
                         width: int, shift: int = 0) -> np.ndarray:
    """Rows of `values[start + shift : start + shift + length]` right-aligned in a [rows, width] array."""
    out = np.zeros((len(starts), width), dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return out
    rows = np.repeat(np.arange(len(starts)), lengths)
    within = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    columns = width - np.repeat(lengths, lengths) + within
    out[rows, columns] = values[np.repeat(starts, lengths) + within + shift]
    return out


@dataclass
class TrainArrays:
    """Next-item training windows: `input[:, t]` predicts `target[:, t]` (0 = no target)."""

    user: torch.Tensor
    input: torch.Tensor
    target: torch.Tensor

    def __len__(self) -> int:
        return self.user.shape[0]

    def to(self, device: torch.device) -> "TrainArrays":
        return TrainArrays(self.user.to(device), self.input.to(device), self.target.to(device))

    def take(self, index: torch.Tensor, width: int | None = None) -> dict[str, torch.Tensor]:
        """Rows `index`, cut to their last `width` positions (left padding makes that lossless
        when no row has more than `width` items)."""
        width = width or self.input.shape[1]
        return {"user": self.user[index], "input": self.input[index, -width:],
                "target": self.target[index, -width:]}


def build_train_arrays(table: pa.Table, max_len: int, windows: str = "all") -> TrainArrays:
    """Windows of `max_len + 1` items from each training sequence (column `items`).

    `windows="last"` keeps only the most recent window per user (SASRec's choice); `"all"` cuts
    longer sequences into consecutive windows ending at the last item, so no interaction is
    unused. Windows overlap by one item: the last input of one is the first target of the next.
    `"prefixes"` gives one window per target, the up to `max_len` items before it, with only
    the last position carrying a target (RecBole's augmentation: every prefix is a sample with
    its own dropout; the transformer runs once per target instead of once per window).
    Users with fewer than two items have no next-item target and give no window.
    """
    offsets, values = _list_parts(table.column("items"))
    users = table.column("user").to_numpy().astype(np.int64)
    lengths = np.diff(offsets)
    if windows == "prefixes":
        return _prefix_windows(users, offsets, values, lengths, max_len)
    if windows == "last":
        count = (lengths >= 2).astype(np.int64)
    else:
        count = np.where(lengths >= 2, -(-(lengths - 1) // max_len), 0)
    row_of_window = np.repeat(np.arange(len(lengths)), count)
    window_index = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
    ends = offsets[row_of_window] + lengths[row_of_window] - window_index * max_len
    starts = np.maximum(offsets[row_of_window], ends - (max_len + 1))
    input_lengths = ends - starts - 1
    return TrainArrays(
        user=torch.from_numpy(users[row_of_window]),
        input=torch.from_numpy(_place_right_aligned(values, starts, input_lengths, max_len)),
        target=torch.from_numpy(_place_right_aligned(values, starts, input_lengths, max_len, shift=1)),
    )


def _prefix_windows(users: np.ndarray, offsets: np.ndarray, values: np.ndarray, lengths: np.ndarray,
                    max_len: int) -> TrainArrays:
    targets_per_user = np.maximum(lengths - 1, 0)
    row_of_window = np.repeat(np.arange(len(lengths)), targets_per_user)
    target_index = np.arange(int(targets_per_user.sum())) - np.repeat(
        np.cumsum(targets_per_user) - targets_per_user, targets_per_user) + 1
    target_position = offsets[row_of_window] + target_index
    input_lengths = np.minimum(target_index, max_len)
    target = np.zeros((len(row_of_window), max_len), dtype=np.int64)
    target[:, -1] = values[target_position]
    return TrainArrays(
        user=torch.from_numpy(users[row_of_window]),
        input=torch.from_numpy(_place_right_aligned(values, target_position - input_lengths, input_lengths, max_len)),
        target=torch.from_numpy(target),
    )


@dataclass
class EvalArrays:
    """One held-out target per row with its model input, full history and fixed negatives."""

    user: torch.Tensor
    input: torch.Tensor
    target: torch.Tensor
    negatives: torch.Tensor
    history_offsets: torch.Tensor
    history_items: torch.Tensor
    cold: torch.Tensor | None = None
    """bool [rows]: the target is a held-out cold item (data/cold_items.py); None when the data
    has no hold-out."""

    def __len__(self) -> int:
        return self.user.shape[0]

    def to(self, device: torch.device) -> "EvalArrays":
        return EvalArrays(*(None if getattr(self, f) is None else getattr(self, f).to(device)
                            for f in self.__dataclass_fields__))

    def by_input_length(self) -> "EvalArrays":
        """The same rows ordered (stably) by input length, so that consecutive rows make batches
        that `input_width` cuts to few positions: most users' histories are far shorter than
        max_len, and the encoder's cost grows with the positions it runs over."""
        lengths = (self.input != 0).sum(dim=1)
        order = torch.argsort(lengths, stable=True)
        history_lengths = (self.history_offsets[1:] - self.history_offsets[:-1])[order]
        offsets = torch.zeros_like(self.history_offsets)
        torch.cumsum(history_lengths, dim=0, out=offsets[1:])
        within = torch.arange(int(offsets[-1]), device=offsets.device) - torch.repeat_interleave(
            offsets[:-1], history_lengths)
        items = self.history_items[torch.repeat_interleave(self.history_offsets[:-1][order], history_lengths) + within]
        return EvalArrays(self.user[order], self.input[order], self.target[order], self.negatives[order],
                          offsets, items, None if self.cold is None else self.cold[order])

    def input_width(self, start: int, stop: int, multiple: int = 8) -> int:
        """Positions rows start..stop-1 need: their longest input rounded up to `multiple`, at
        most max_len. Left padding makes cutting the input to it lossless."""
        longest = int((self.input[start:stop] != 0).sum(dim=1).max()) if stop > start else 0
        return int(padded_width(longest, self.input.shape[1], multiple))

    def history_pairs(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(row within batch, item) pairs of the full histories of rows start..stop-1."""
        lo, hi = self.history_offsets[start], self.history_offsets[stop]
        lengths = self.history_offsets[start + 1:stop + 1] - self.history_offsets[start:stop]
        rows = torch.repeat_interleave(torch.arange(stop - start, device=lengths.device), lengths)
        return rows, self.history_items[lo:hi]


def build_eval_arrays(table: pa.Table, max_len: int) -> EvalArrays:
    """Model input = the last `max_len` history items; the full history is kept for masking."""
    table = table.sort_by("user")
    offsets, values = _list_parts(table.column("history"))
    lengths = np.diff(offsets)
    tail = np.minimum(lengths, max_len)
    model_input = _place_right_aligned(values, offsets[:-1] + lengths - tail, tail, max_len)
    # Small catalogs can leave a user fewer unseen items than negatives asked for: such rows are
    # padded with item 0, whose score is -inf, and carry their true candidate count.
    negative_offsets, negative_values = _list_parts(table.column("negatives"))
    negative_counts = np.diff(negative_offsets)
    width = int(negative_counts.max()) if len(table) else 0
    return EvalArrays(
        user=torch.from_numpy(table.column("user").to_numpy().astype(np.int64)),
        input=torch.from_numpy(model_input),
        target=torch.from_numpy(table.column("target").to_numpy().astype(np.int64)),
        negatives=torch.from_numpy(_place_right_aligned(negative_values, negative_offsets[:-1],
                                                        negative_counts, width)),
        history_offsets=torch.from_numpy(offsets),
        history_items=torch.from_numpy(values),
        cold=(torch.from_numpy(table.column("cold").combine_chunks().to_numpy(zero_copy_only=False).astype(bool))
              if "cold" in table.column_names else None),
    )


def concat_tables(batches: list[pa.Table]) -> pa.Table:
    """Concatenate shard batches, tolerating an empty shard (returns an empty table)."""
    batches = [b for b in batches if b.num_rows]
    if not batches:
        return pa.table({})
    return pa.concat_tables(batches, promote_options="default")


def item_log_frequencies(item_counts: np.ndarray) -> torch.Tensor:
    """log q(item) for logQ correction of sampled softmax; index 0 (padding) gets -inf."""
    counts = np.asarray(item_counts, dtype=np.float64)
    probs = counts / counts.sum()
    log_probs = np.concatenate([[-np.inf], np.log(np.maximum(probs, 1e-30))])
    return torch.from_numpy(log_probs).float()


def filter_users(table: pa.Table, keep_users: np.ndarray) -> pa.Table:
    """Rows of `table` whose user index is in `keep_users` (used by low-data fine-tuning)."""
    return table.filter(pc.is_in(table.column("user"), pa.array(keep_users, type=table.schema.field("user").type)))


def deal_by_length(users: np.ndarray, lengths: np.ndarray, parts: int) -> np.ndarray:
    """The part (0 .. parts - 1) of each user: users sorted by history length (longest first, ties
    by user id) and dealt out in snake order (0, 1, .., parts - 1, parts - 1, .., 0, 0, 1, ..), so
    every part gets about as many windows, and of each width, as the others. Depends on the set of
    users alone, not on the order they are given in."""
    order = np.lexsort((users, -np.asarray(lengths)))
    turn = np.arange(len(users)) % (2 * parts)
    owner = np.empty(len(users), dtype=np.int64)
    owner[order] = np.where(turn < parts, turn, 2 * parts - 1 - turn)
    return owner


def padded_width(lengths, max_len: int, multiple: int = 8):
    """Item counts (an int or an array) rounded up to `multiple`, at least 1 and at most max_len:
    the positions a batch of left-padded rows is cut to. Few distinct widths keep kernel shapes few."""
    return np.minimum(max_len, np.maximum(1, -(-lengths // multiple)) * multiple)


def window_widths(arrays: TrainArrays, multiple: int = 8) -> np.ndarray:
    """Per window, its item count rounded up to `multiple` (capped at max_len): the batch width."""
    return padded_width((arrays.input != 0).sum(dim=1).cpu().numpy(), arrays.input.shape[1], multiple)


def length_bucketed_batches(widths: np.ndarray, batch_size: int, seed: int,
                            min_batches: int = 0) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """One epoch's order of windows and its batches as (start, stop, width) slices of that order.

    Windows of the same width are batched together so a batch is cut to its width (most positions
    of short-history data are padding otherwise); batches are shuffled. Everything is decided
    here on the host, from (seed, epoch), so the step itself needs no host-device sync and a
    resumed epoch replays the same batches. `min_batches` repeats random batches until there are
    that many, so every DDP rank runs the same number of steps.
    """
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(len(widths))
    order = shuffled[np.argsort(widths[shuffled], kind="stable")]
    batches = []
    sorted_widths = widths[order]
    for width in np.unique(sorted_widths):
        first, last = np.searchsorted(sorted_widths, [width, width + 1])
        batches += [(start, min(start + batch_size, last), int(width)) for start in range(first, last, batch_size)]
    batches = [batches[i] for i in rng.permutation(len(batches))]
    if len(batches) < min_batches:
        extra = rng.integers(0, len(batches), size=min_batches - len(batches))
        batches += [batches[i] for i in extra]
    return order, batches


def same_target_partners(targets: np.ndarray, seed: int) -> np.ndarray:
    """For each window, the index of another window with the same next item `targets[i]`, drawn
    uniformly from (seed); a window whose target no other window has, or without a target (0),
    is its own partner. DuoRec's supervised positive: two histories that led to the same item."""
    rng = np.random.default_rng(seed)
    order = np.argsort(targets, kind="stable")
    sorted_targets = targets[order]
    group_start = np.searchsorted(sorted_targets, sorted_targets, side="left")
    group_size = np.searchsorted(sorted_targets, sorted_targets, side="right") - group_start
    own = np.arange(len(targets))
    # Uniform over the group's other members: draw among size - 1 slots and step over one's own.
    pick = group_start + (rng.random(len(targets)) * np.maximum(group_size - 1, 1)).astype(np.int64)
    pick = np.where(pick >= own, pick + 1, pick)
    pick = np.where((group_size > 1) & (sorted_targets != 0), pick, own)
    partners = np.empty_like(order)
    partners[order] = order[pick]
    return partners


def order_by_partner_width(order: np.ndarray, batches: list[tuple[int, int, int]], partners: np.ndarray,
                           widths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`order` and its windows' `partners` (aligned with it) with every batch's rows reordered by
    their partner's width, so that the partners' pass can run one width at a time
    (`same_width_runs`); a batch's own windows share one width, so their order is free."""
    order, partners = order.copy(), partners.copy()
    for first, last, _ in batches:
        inner = np.argsort(widths[partners[first:last]], kind="stable")
        order[first:last], partners[first:last] = order[first:last][inner], partners[first:last][inner]
    return order, partners


def same_width_runs(widths: np.ndarray) -> list[tuple[int, int, int]]:
    """(start, stop, width) of each run of equal values in sorted `widths`."""
    values, starts = np.unique(widths, return_index=True)
    stops = np.append(starts[1:], len(widths))
    return [(int(a), int(b), int(w)) for a, b, w in zip(starts, stops, values)]
