"""`flm synth`: a synthetic interaction log with structure a sequence model can learn.

The generative story, per event of a user:
  * with probability `markov` (not at a session start) the next item is one of the last item's few
    successors (a sparse item -> next-item transition table, mostly within the item's cluster);
  * else with probability `taste` an item of the user's taste cluster, by popularity in the cluster;
  * else an item by global Zipf popularity.
Users have heavy-tailed (log-normal) activity and sessions: short gaps inside a session, days
between sessions. So popularity alone is a weak baseline, "last item -> next item" is a strong one,
and a sequence model that also learns tastes does better still.

Output: partitioned Parquet `part-00000.parquet`, ... with `user_id:int64, item_id:int64,
timestamp:int64`, rows of a file in time order (like a real log). Users are split into contiguous
partitions of about `rows_per_file` events, each generated from its own seed (seed, partition), so
any size streams in bounded memory and partitions can run in parallel. A `_synth.json` written last
marks a complete output and lets a rerun with the same config skip.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from flm_dist import __version__, ray_seam
from flm_dist.config import config_hash, require, to_dict
from flm_dist.data import storage

log = logging.getLogger("flm_dist")

SCHEMA = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("timestamp", pa.int64())])
MARKER = "_synth.json"
_START = 1_577_836_800  # 2020-01-01, so timestamps look like real ones


@dataclass
class SynthConfig:
    """Size and structure of a synthetic log."""

    output: str = "out/synth"
    """Directory (local path or fsspec URI) for the Parquet parts; replaced atomically."""
    users: int = 2000
    """Number of users (ids 0..users-1)."""
    items: int = 800
    """Number of items (ids 1..items)."""
    interactions: int = 60_000
    """Total number of events (rows), exactly."""
    clusters: int = 16
    """Number of taste clusters; each user has one, each item a home cluster."""
    seed: int = 0
    """Seed of everything; the same config gives byte-identical files."""
    rows_per_file: int = 1_000_000
    """Target rows per Parquet part (users never straddle parts)."""
    zipf: float = 0.8
    """Exponent of the Zipf item popularity."""
    markov: float = 0.5
    """Probability that an event follows the previous item's transitions."""
    taste: float = 0.3
    """Probability that an event is drawn from the user's taste cluster (the rest: popularity)."""
    successors: int = 4
    """Successors per item in the transition table (weights 1/2, 1/4, ...)."""
    session_break: float = 0.1
    """Probability that an event starts a new session."""
    activity_sigma: float = 1.0
    """Sigma of the log-normal user activity (larger: heavier tail)."""
    workers: int = 1
    """Partitions generated in parallel as Ray tasks when > 1; 1 = in this process."""

    def __post_init__(self):
        require(self.users >= 1, "users", "must be >= 1")
        require(self.items >= 2, "items", "must be >= 2")
        require(self.interactions >= self.users, "interactions", "must be >= users (every user acts once)")
        require(1 <= self.clusters <= self.items, "clusters", "must be between 1 and items")
        require(self.rows_per_file >= 1, "rows_per_file", "must be >= 1")
        require(self.zipf >= 0, "zipf", "must be >= 0")
        require(0 <= self.markov <= 1 and 0 <= self.taste <= 1 and self.markov + self.taste <= 1,
                "markov", "markov and taste must be probabilities with markov + taste <= 1")
        require(self.successors >= 1, "successors", "must be >= 1")
        require(0 <= self.session_break <= 1, "session_break", "must be in [0, 1]")
        require(self.activity_sigma >= 0, "activity_sigma", "must be >= 0")
        require(self.workers >= 1, "workers", "must be >= 1")


def embedded_default(output: str, seed: int = 0) -> SynthConfig:
    """The small log of the demo and quick start: 2,000 users, 800 items, 60,000 events."""
    return SynthConfig(output=output, users=2000, items=800, interactions=60_000, clusters=16, seed=seed)


@dataclass
class _World:
    """What all partitions share: popularity, clusters, transitions, user activity."""

    pop_cdf: np.ndarray        # cumulative item popularity (item index 0..I-1)
    cluster_keys: np.ndarray   # cluster id + within-cluster cumulative popularity, sorted
    cluster_items: np.ndarray  # items in the order of cluster_keys
    user_cluster: np.ndarray   # taste cluster per user
    succ: np.ndarray           # [items, successors] next-item table
    succ_cdf: np.ndarray       # cumulative weights over the successors
    lengths: np.ndarray        # events per user
    bounds: np.ndarray         # user index where each partition starts (plus the end)


def _world(cfg: SynthConfig) -> _World:
    rng = np.random.default_rng([cfg.seed, 0])
    pop = 1.0 / np.arange(1, cfg.items + 1) ** cfg.zipf
    pop = pop[np.argsort(rng.permutation(cfg.items))]  # popularity rank is unrelated to the item id
    pop /= pop.sum()
    home = rng.integers(cfg.clusters, size=cfg.items)
    order = np.lexsort((np.arange(cfg.items), home))
    within = np.empty(cfg.items)
    sums = np.bincount(home, weights=pop, minlength=cfg.clusters)
    cum = np.cumsum(pop[order])
    starts = np.r_[0, np.cumsum(np.bincount(home, minlength=cfg.clusters))[:-1]]
    first_cum = np.where(starts > 0, cum[np.maximum(starts - 1, 0)], 0.0)
    within[:] = (cum - first_cum[home[order]]) / sums[home[order]]
    cluster_keys = home[order] + np.minimum(within, 1.0 - 1e-12)
    cluster_items = order

    # Successors: mostly popular items of the same cluster, sometimes anywhere.
    draws = rng.random((cfg.items, cfg.successors))
    same = rng.random((cfg.items, cfg.successors)) < 0.8
    in_cluster = cluster_items[np.minimum(np.searchsorted(cluster_keys, home[:, None] + draws), cfg.items - 1)]
    anywhere = np.minimum(np.searchsorted(np.cumsum(pop), rng.random((cfg.items, cfg.successors))), cfg.items - 1)
    succ = np.where(same, in_cluster, anywhere)
    weights = 0.5 ** np.arange(1, cfg.successors + 1)
    succ_cdf = np.cumsum(weights / weights.sum())

    user_cluster = rng.integers(cfg.clusters, size=cfg.users)
    lengths = _lengths(cfg, np.random.default_rng([cfg.seed, 1]))
    cum_rows = np.r_[0, np.cumsum(lengths)]
    cuts = np.searchsorted(cum_rows, np.arange(cfg.rows_per_file, cfg.interactions, cfg.rows_per_file))
    bounds = np.unique(np.r_[0, cuts, cfg.users])
    return _World(np.cumsum(pop), cluster_keys, cluster_items, user_cluster, succ, succ_cdf, lengths, bounds)


def _lengths(cfg: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """Heavy-tailed events per user summing exactly to `interactions` (at least 3 when possible)."""
    minimum = 3 if cfg.interactions >= 3 * cfg.users else 1
    spare = cfg.interactions - minimum * cfg.users
    share = rng.lognormal(0.0, cfg.activity_sigma, size=cfg.users)
    share = share / share.sum() * spare
    extra = np.floor(share).astype(np.int64)
    left = spare - int(extra.sum())
    if left:
        extra[np.argsort(-(share - extra), kind="stable")[:left]] += 1
    return extra + minimum


def _partition(cfg: SynthConfig, world: _World, part: int) -> pa.Table:
    """The events of the users in partition `part`, in time order."""
    rng = np.random.default_rng([cfg.seed, 2, part])
    u0, u1 = int(world.bounds[part]), int(world.bounds[part + 1])
    lengths = world.lengths[u0:u1]
    n = int(lengths.sum())
    starts = np.r_[0, np.cumsum(lengths)[:-1]]
    user = np.repeat(np.arange(u0, u1), lengths)
    pos = np.arange(n) - np.repeat(starts, lengths)

    new_session = (pos == 0) | (rng.random(n) < cfg.session_break)
    mode = rng.random(n)
    follow = (mode < cfg.markov) & ~new_session
    from_taste = (mode < cfg.markov + cfg.taste) & ~follow
    taste = world.cluster_items[np.minimum(
        np.searchsorted(world.cluster_keys, world.user_cluster[user] + rng.random(n)), cfg.items - 1)]
    popular = np.minimum(np.searchsorted(world.pop_cdf, rng.random(n)), cfg.items - 1)
    items = np.where(from_taste, taste, popular)
    pick = np.searchsorted(world.succ_cdf, rng.random(n))
    pick = np.minimum(pick, cfg.successors - 1)

    # The only sequential step: walk positions, users longest first so the active ones are a prefix.
    order = np.argsort(-lengths, kind="stable")
    sorted_starts, sorted_lengths = starts[order], lengths[order]
    active = np.searchsorted(-sorted_lengths, -np.arange(1, int(lengths.max()) + 1), side="right")
    for t in range(1, len(active)):
        idx = sorted_starts[: active[t]] + t
        hop = follow[idx]
        if hop.any():
            idx = idx[hop]
            items[idx] = world.succ[items[idx - 1], pick[idx]]

    gaps = np.where(new_session, rng.exponential(2 * 86_400, n), rng.exponential(120, n) + 1).astype(np.int64)
    gaps[starts] = 0
    clock = np.cumsum(gaps)
    begin = _START + (rng.random(u1 - u0) * 365 * 86_400).astype(np.int64)
    timestamp = np.repeat(begin - clock[starts], lengths) + clock
    in_time = np.lexsort((pos, user, timestamp))
    return pa.table({"user_id": user[in_time].astype(np.int64), "item_id": items[in_time].astype(np.int64) + 1,
                     "timestamp": timestamp[in_time]}, schema=SCHEMA)


def _write_part(cfg: SynthConfig, world: _World, part: int, fs, directory: str) -> int:
    table = _partition(cfg, world, part)
    with fs.open(storage.join(directory, f"part-{part:05d}.parquet"), "wb") as handle:
        pq.write_table(table, handle, compression="zstd", row_group_size=1 << 20, write_statistics=True)
    return table.num_rows


def run_synth(config: SynthConfig) -> dict[str, Any]:
    """Write the synthetic log to `config.output` (atomically); returns a summary dict.

    Skips the work when the output already holds a complete log written with the same config.
    """
    fs, final = storage.url_to_fs(config.output)
    digest = config_hash(dataclasses.replace(config, output="", workers=1))
    existing = storage.read_json(fs, storage.join(final, MARKER))
    if existing and existing.get("config_hash") == digest:
        log.info("synth: %s is up to date", config.output)
        return existing
    storage.check_replaceable(fs, final, MARKER)
    started = time.perf_counter()
    world = _world(config)
    parts = len(world.bounds) - 1
    tmp = storage.staging_dir(fs, final)
    try:
        bar = tqdm(total=config.interactions, unit="rows", unit_scale=True, desc="synth")
        if config.workers > 1 and parts > 1:
            world_ref = ray_seam.share(world)
            calls = [ray_seam.TaskCall(p, f"part {p}", _write_part, (config, world_ref, p, fs, tmp))
                     for p in range(parts)]
            # A part is written whole by one task, so the task of a lost worker can simply run again.
            ray_seam.run_in_parallel(calls, config.workers, num_cpus=1, num_gpus=0,
                                     on_finished=lambda _, rows: bar.update(rows), describe="synth part",
                                     retries=3, log_level=logging.DEBUG)
        else:
            for part in range(parts):
                bar.update(_write_part(config, world, part, fs, tmp))
        bar.close()
        seconds = time.perf_counter() - started
        stored = {k: v for k, v in to_dict(config).items() if k not in ("output", "workers")}
        summary = {"config": stored, "config_hash": digest, "rows": config.interactions,
                   "users": config.users, "items": config.items,
                   "files": [f"part-{p:05d}.parquet" for p in range(parts)], "created_by": f"flm_dist {__version__}"}
        storage.write_json(fs, storage.join(tmp, MARKER), summary)
        storage.publish(fs, tmp, final, marker=MARKER)
    except BaseException:
        storage.remove(fs, tmp)
        raise
    log.info("synth: %d rows, %d users, %d items, %d files in %.1f s (%.2f M rows/s) -> %s",
             config.interactions, config.users, config.items, parts, seconds,
             config.interactions / seconds / 1e6, config.output)
    return summary
