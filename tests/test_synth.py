"""Synthetic log: schema, exact size, determinism, and structure a sequence model can learn."""

from collections import Counter, defaultdict

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest

from flm_dist.config import ConfigKeyError
from flm_dist.data.synth import MARKER, SCHEMA, SynthConfig, embedded_default, run_synth


def read(path) -> dict[str, np.ndarray]:
    table = pq.read_table(str(path))
    return {name: table.column(name).to_numpy() for name in table.column_names}


def test_schema_size_and_partitions(tmp_path):
    config = SynthConfig(output=str(tmp_path / "log"), users=300, items=120, interactions=10_000,
                         rows_per_file=3_000, seed=3)
    summary = run_synth(config)
    parts = sorted(p.name for p in (tmp_path / "log").glob("part-*.parquet"))
    assert parts == summary["files"] and len(parts) >= 3
    assert (tmp_path / "log" / MARKER).exists()
    for part in parts:
        assert pq.read_schema(tmp_path / "log" / part).remove_metadata() == SCHEMA
    log = read(tmp_path / "log")
    assert len(log["user_id"]) == 10_000
    assert set(np.unique(log["user_id"])) <= set(range(300))
    assert log["item_id"].min() >= 1 and log["item_id"].max() <= 120
    per_user = np.bincount(log["user_id"], minlength=300)
    assert per_user.min() >= 3 and per_user.max() > 5 * np.median(per_user)  # heavy-tailed activity
    # A file holds whole users, in time order.
    first = read(tmp_path / "log" / parts[0])
    assert np.all(np.diff(first["timestamp"]) >= 0)
    assert not set(first["user_id"]) & set(read(tmp_path / "log" / parts[1])["user_id"])


def test_deterministic_per_seed_and_skips_when_done(tmp_path):
    def files(seed, name):
        run_synth(SynthConfig(output=str(tmp_path / name), users=200, items=100, interactions=4_000, seed=seed))
        return {p.name: p.read_bytes() for p in sorted((tmp_path / name).glob("part-*"))}

    assert files(1, "a") == files(1, "b")
    assert files(1, "a") != files(2, "c")
    before = (tmp_path / "a" / MARKER).stat().st_mtime_ns
    files(1, "a")
    assert (tmp_path / "a" / MARKER).stat().st_mtime_ns == before


def test_memory_filesystem_output():
    summary = run_synth(SynthConfig(output="memory://synth-test/log", users=50, items=20, interactions=500))
    fs = fsspec.filesystem("memory")
    assert fs.exists(f"/synth-test/log/{summary['files'][0]}")
    fs.rm("/synth-test", recursive=True)


def test_validation():
    with pytest.raises(ConfigKeyError, match="interactions"):
        SynthConfig(users=10, interactions=5)
    with pytest.raises(ConfigKeyError, match="markov"):
        SynthConfig(markov=0.8, taste=0.5)


def test_sequence_structure_beats_popularity(tmp_path):
    """A first-order 'last item -> next item' model beats popularity on each user's held-out last item."""
    config = embedded_default(str(tmp_path / "demo"))
    assert (config.users, config.items, config.interactions) == (2000, 800, 60_000)
    run_synth(config)
    log = read(tmp_path / "demo")
    order = np.lexsort((log["timestamp"], log["user_id"]))
    users, items = log["user_id"][order], log["item_id"][order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    ends = np.r_[starts[1:], len(users)]

    transitions: dict[int, Counter] = defaultdict(Counter)
    popularity: Counter = Counter()
    for s, e in zip(starts, ends):
        seq = items[s: e - 1]  # the last item is held out
        popularity.update(seq.tolist())
        for a, b in zip(seq[:-1], seq[1:]):
            transitions[a][b] += 1
    top_popular = [i for i, _ in popularity.most_common(10)]
    hits_markov = hits_popular = 0
    for s, e in zip(starts, ends):
        last, target = items[e - 2], items[e - 1]
        guess = [i for i, _ in transitions[last].most_common(10)]
        guess += [i for i in top_popular if i not in guess][: 10 - len(guess)]
        hits_markov += target in guess
        hits_popular += target in top_popular
    hr_markov, hr_popular = hits_markov / len(starts), hits_popular / len(starts)
    assert hr_markov > 1.5 * hr_popular and hr_markov > 0.3, (hr_markov, hr_popular)


def test_parallel_ray_tasks_write_the_same_files(ray_session, tmp_path):
    def files(name, workers):
        run_synth(SynthConfig(output=str(tmp_path / name), users=300, items=100, interactions=6_000,
                              rows_per_file=2_000, workers=workers))
        return {p.name: p.read_bytes() for p in sorted((tmp_path / name).iterdir())}

    serial = files("serial", 1)
    assert len(serial) >= 4 and serial == files("parallel", 2)
