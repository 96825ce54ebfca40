"""flm prepare: counts on real data, split semantics, negatives, bad input, atomic and deterministic output.

Hand-made logs live on the fsspec memory filesystem (the pipeline then runs in-process); the real
files, determinism and atomic publishing run through Ray on local disk.
"""

import json
import logging
import os
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flm_dist.config import ConfigKeyError, from_dict
from flm_dist.data import ingest as ingest_module
from flm_dist.data import negatives as negatives_module
from flm_dist.data import prepare as prepare_module
from flm_dist.data import stage_runner as stage_runner_module
from flm_dist.data import vocabularies as vocabularies_module
from flm_dist.data.events import ColumnMap
from flm_dist.data.prepare import PrepareConfig, draw_negatives, run_prepare
from flm_dist.data.readers import list_input
from flm_dist.data.synth import SynthConfig, run_synth
from flm_dist.errors import UserError

MEMORY = fsspec.filesystem("memory")


@pytest.fixture
def mem():
    """A fresh memory:// root, removed afterwards."""
    root = f"/prepare-{uuid.uuid4().hex[:8]}"
    yield root
    if MEMORY.exists(root):
        MEMORY.rm(root, recursive=True)


def put(root: str, name: str, text: str) -> str:
    with MEMORY.open(f"{root}/{name}", "w") as handle:
        handle.write(text)
    return f"memory://{root}/{name}"


def csv(rows) -> str:
    return "user_id,item_id,timestamp\n" + "".join(",".join(map(str, r)) + "\n" for r in rows)


def load(fs, root: str, name: str) -> list[dict]:
    if not fs.exists(f"{root}/{name}"):
        return []
    files = sorted(p for p in fs.find(f"{root}/{name}") if p.endswith(".parquet"))
    tables = [pq.read_table(fs.open(p, "rb")) for p in files]
    return pa.concat_tables(tables).to_pylist() if tables else []


def config(**kw) -> PrepareConfig:
    kw.setdefault("min_user_interactions", 0)
    kw.setdefault("min_item_interactions", 0)
    return PrepareConfig(**kw)


def accounted(manifest) -> bool:
    return manifest["input_rows"] == manifest["interactions"] + sum(manifest["dropped"].values())


# ---------------------------------------------------------------------------------------------- splits


def test_leave_one_out_on_hand_made_log(mem):
    # File order is not time order: the pipeline sorts by timestamp.
    rows = [(10, "b", 2), (10, "a", 1), (10, "c", 3), (10, "d", 4), (10, "a", 5),
            (2, "a", 7), (2, "b", 8), (2, "e", 6),
            (3, "c", 1), (3, "a", 2),
            (4, "e", 1)]
    out = f"memory://{mem}/out"
    manifest = run_prepare(config(input=put(mem, "log.csv", csv(rows)), output=out, num_negatives=2))
    items = {r["item_id"]: r["index"] for r in load(MEMORY, f"{mem}/out", "vocab/items.parquet")}
    assert list(items) == ["a", "b", "c", "e", "d"]  # by count desc (4, 2, 2, 2, 1), ties by id
    users = [r["user_id"] for r in load(MEMORY, f"{mem}/out", "vocab/users.parquet")]
    assert users == ["2", "3", "4", "10"]  # integer ids sort numerically
    a, b, c, d, e = (items[x] for x in "abcde")
    train = {r["user"]: (r["items"], r["timestamps"]) for r in load(MEMORY, f"{mem}/out", "train")}
    assert train == {3: ([a, b, c], [1, 2, 3]), 0: ([e], [6]), 1: ([c, a], [1, 2]), 2: ([e], [1])}
    valid = {r["user"]: (r["history"], r["target"]) for r in load(MEMORY, f"{mem}/out", "valid")}
    test = {r["user"]: (r["history"], r["target"]) for r in load(MEMORY, f"{mem}/out", "test")}
    assert valid == {3: ([a, b, c], d), 0: ([e], a)}
    assert test == {3: ([a, b, c, d], a), 0: ([e, a], b)}
    assert manifest["splits"]["users_without_valid"] == 2 and manifest["splits"]["users_without_test"] == 2
    assert manifest["splits"]["train"]["interactions"] + 4 == manifest["interactions"] == 11
    negatives = {r["user"]: r["negatives"] for r in load(MEMORY, f"{mem}/out", "test")}
    assert sorted(negatives[3]) == [e] and len(negatives[0]) == 2 and set(negatives[0]) <= {c, d}
    assert manifest["splits"]["short_negatives"] == 2  # user 10 has seen all items but one (valid, test)


def test_temporal_split_with_quantile_cutoffs(mem):
    rows = [("u", i, t) for i, t in zip("abcdef", (10, 20, 30, 40, 50, 60))] + \
           [("v", "a", 25), ("v", "b", 45), ("v", "g", 65), ("w", "c", 55)]
    out = f"memory://{mem}/out"
    # 10 timestamps; quantile 0.4 -> the 5th smallest (40), 0.7 -> the 8th (55).
    manifest = run_prepare(config(input=put(mem, "log.csv", csv(rows)), output=out, split="temporal",
                                  valid_cutoff=0.4, test_cutoff=0.7, num_negatives=1))
    assert (manifest["splits"]["valid_cutoff"], manifest["splits"]["test_cutoff"]) == (40, 55)
    name = {r["index"]: r["item_id"] for r in load(MEMORY, f"{mem}/out", "vocab/items.parquet")}
    user = {r["index"]: r["user_id"] for r in load(MEMORY, f"{mem}/out", "vocab/users.parquet")}

    def named(split):
        return {user[r["user"]]: ([name[i] for i in r["history"]], name[r["target"]])
                for r in load(MEMORY, f"{mem}/out", split)}

    train = {user[r["user"]]: [name[i] for i in r["items"]] for r in load(MEMORY, f"{mem}/out", "train")}
    assert train == {"u": ["a", "b", "c"], "v": ["a"]}
    assert named("valid") == {"u": (["a", "b", "c"], "d"), "v": (["a"], "b")}
    assert named("test") == {"u": (["a", "b", "c", "d", "e"], "f"), "v": (["a", "b"], "g")}
    assert manifest["splits"]["test_no_history"] == 1  # w's only event is its test target
    absolute = run_prepare(config(input=f"memory://{mem}/log.csv", output=f"memory://{mem}/abs", split="temporal",
                                  valid_cutoff=40, test_cutoff=55, num_negatives=1))
    for split in ("train", "valid", "test"):
        assert load(MEMORY, f"{mem}/abs", split) == load(MEMORY, f"{mem}/out", split)
    assert absolute["config"]["valid_cutoff"] == 40


def test_temporal_needs_timestamps_and_cutoffs(mem):
    with pytest.raises(ConfigKeyError, match="valid_cutoff"):
        PrepareConfig(input="x", output="y", split="temporal")
    with pytest.raises(UserError, match="needs timestamps"):
        run_prepare(PrepareConfig(input=put(mem, "seq.txt", "1 2 3 4\n2 3 4 5\n"), output=f"memory://{mem}/o",
                                  split="temporal", valid_cutoff=0.5, test_cutoff=0.8))


def test_config_from_dict_resolves_kcore_defaults(mem):
    cfg = from_dict(PrepareConfig, {"input": "a", "output": "b", "columns": {"user": "uid"}, "num_negatives": 9})
    assert cfg.columns.user == "uid" and cfg.min_user_interactions is None
    assert prepare_module.resolve(cfg, "seq-txt").min_user_interactions == 0
    assert prepare_module.resolve(cfg, "csv").min_item_interactions == 5


# ------------------------------------------------------------------------------------------- negatives


def test_negatives_never_seen_fixed_and_independent_of_buckets(mem):
    run_synth(SynthConfig(output=f"memory://{mem}/log", users=200, items=600, interactions=30_000, seed=5))
    first = run_prepare(config(input=f"memory://{mem}/log", output=f"memory://{mem}/a", buckets=1))
    run_prepare(config(input=f"memory://{mem}/log", output=f"memory://{mem}/b", buckets=4))
    assert first["splits"]["short_negatives"] == 0

    def by_user(out, split):
        return {r["user"]: r for r in load(MEMORY, f"{mem}/{out}", split)}

    train = by_user("a", "train")
    for split in ("valid", "test"):
        a, b = by_user("a", split), by_user("b", split)
        assert a.keys() == b.keys() and len(a) == 200
        for user, row in a.items():
            seen = set(train[user]["items"]) | set(by_user("a", "test")[user]["history"]) | \
                {by_user("a", "test")[user]["target"]}
            negatives = row["negatives"]
            assert len(negatives) == 99 and len(set(negatives)) == 99
            assert not set(negatives) & seen
            assert min(negatives) >= 1 and max(negatives) <= first["items"]
            assert negatives == b[user]["negatives"]
        assert a[0]["negatives"] != by_user("a", "valid" if split == "test" else "test")[0]["negatives"]


def test_vocabulary_lookups_in_groups_of_buckets_change_nothing(mem, monkeypatch):
    """k-core and build look ids up once per group of buckets; one bucket per call gives the same."""
    run_synth(SynthConfig(output=f"memory://{mem}/log", users=120, items=300, interactions=8_000, seed=2))
    kcore = dict(min_user_interactions=40, min_item_interactions=25, buckets=5)
    together = run_prepare(config(input=f"memory://{mem}/log", output=f"memory://{mem}/together", **kcore))
    monkeypatch.setattr(vocabularies_module, "_LOOKUP_ROWS", 1)  # every bucket on its own
    alone = run_prepare(config(input=f"memory://{mem}/log", output=f"memory://{mem}/alone", **kcore))
    assert together["dropped"]["kcore_item"] > 0 and together["dropped"]["kcore_user"] > 0
    assert together["dropped"] == alone["dropped"] and together["kcore"] == alone["kcore"]
    for split in ("train", "valid", "test"):
        assert load(MEMORY, f"{mem}/together", split) == load(MEMORY, f"{mem}/alone", split)


def test_draw_negatives_dense_and_short_users():
    n_items = 10
    seen = np.array([0 * 11 + i for i in range(1, 8)] + [1 * 11 + i for i in range(1, 10)])
    offsets, values = draw_negatives(np.array([0, 1]), 1, seen, n_items, k=2, seed=0)
    assert offsets.tolist() == [0, 2, 3]
    assert set(values[:2]) <= {8, 9, 10} and values[2] == 10
    again = draw_negatives(np.array([1, 0]), 1, seen, n_items, k=2, seed=0)
    assert again[1].tolist() == values[2:].tolist() + values[:2].tolist()



def test_large_catalog_negatives_by_sorted_keys_equal_the_bitmap_draw(monkeypatch):
    """Catalogs above _BITMAP_MAX_ITEMS use sorted keys (a bitmap zeroes rows x items bytes):
    same negatives, repeats among a row's candidates and seen items included."""
    rng = np.random.default_rng(0)
    n_items, k = 200, 20  # 30 candidates per row from 200 items: repeats are common
    users = np.arange(300)
    seen = np.unique(np.concatenate([u * (n_items + 1) + rng.choice(np.arange(1, n_items + 1), size=n, replace=False)
                                     for u, n in zip(users, rng.integers(1, 120, size=len(users)))]))
    by_bitmap = draw_negatives(users, 2, seen, n_items, k, seed=3)
    monkeypatch.setattr(negatives_module, "_BITMAP_MAX_ITEMS", 0)
    by_keys = draw_negatives(users, 2, seen, n_items, k, seed=3)
    assert by_keys[0].tolist() == by_bitmap[0].tolist() and by_keys[1].tolist() == by_bitmap[1].tolist()
    for u in users:
        mine = by_keys[1][by_keys[0][u]: by_keys[0][u + 1]]
        assert len(mine) == k and len(set(mine.tolist())) == k
        assert not set((u * (n_items + 1) + mine).tolist()) & set(seen.tolist())

# ------------------------------------------------------------------------------------------- bad input


def test_bad_rows_are_quarantined_and_counted(mem):
    text = csv([("u1", "a", 1), ("u1", "b", 2), ("u1", "b", 2), ("u1", "c", 3), ("", "a", 4), ("u2", "a", "soon"),
                ("u2", "b", 5), ("u2", "c", 6), ("u3", "d", 1)]) + "u9,x\n"
    put(mem, "in/a.csv", text)
    put(mem, "in/b.csv", "user_id,item_id,timestamp\n")
    out = f"memory://{mem}/out"
    manifest = run_prepare(config(input=f"memory://{mem}/in", output=out, min_user_interactions=2,
                                  min_item_interactions=2))
    assert manifest["dropped"] == {"bad_encoding": 0, "bad_id": 0, "bad_timestamp": 1, "bad_weight": 0,
                                   "duplicate": 1, "header": 0, "kcore_item": 2, "kcore_user": 0, "malformed": 1,
                                   "null_id": 1}
    # Left after dedup: u1 a b c, u2 b c, u3 d; items a and d have one event each.
    assert manifest["input_rows"] == 10 and manifest["interactions"] == 4 and accounted(manifest)
    assert manifest["empty_files"] == [f"{mem}/in/b.csv"]
    bad = load(MEMORY, f"{mem}/out", "quarantine")
    assert [(r["file"].split("/")[-1], r["row"], r["column"], r["reason"]) for r in bad] == [
        ("a.csv", 6, "user_id", "null_id"), ("a.csv", 7, "timestamp", "bad_timestamp"), ("a.csv", 11, "", "malformed"),
        ("b.csv", 0, "", "empty_file")]
    assert bad[2]["raw"] == "u9,x"
    assert "quarantine/part-00000.parquet" in manifest["files"]



def test_a_large_parquet_file_is_parsed_in_row_group_runs_with_the_same_result(mem, monkeypatch):
    rng = np.random.default_rng(3)
    n = 3000
    timestamps = rng.integers(0, 10_000, n).astype(str).astype(object)
    timestamps[[5, 1717, 2999]] = "soon"  # bad rows in the first, a middle and the last row group
    table = pa.table({"user_id": rng.integers(0, 120, n).astype(str), "item_id": rng.integers(0, 60, n).astype(str),
                      "timestamp": timestamps.astype(str)})
    table = pa.concat_tables([table, table.slice(10, 1), table.slice(2500, 1)])  # duplicates across row groups
    units = []
    parse_task = ingest_module._parse_task
    monkeypatch.setattr(ingest_module, "_parse_task", lambda fs, files, *rest: units.append(files) or
                        parse_task(fs, files, *rest))
    results = {}
    for layout, row_group_size in (("whole", len(table)), ("split", 97)):
        with MEMORY.open(f"{mem}/{layout}/log.parquet", "wb") as handle:
            pq.write_table(table, handle, row_group_size=row_group_size)
        units.clear()
        manifest = run_prepare(config(input=f"memory://{mem}/{layout}/log.parquet", output=f"memory://{mem}/{layout}/out",
                                      workers=2, buckets=2, num_negatives=5))
        assert accounted(manifest) and manifest["input_rows"] == len(table)
        assert manifest["dropped"]["bad_timestamp"] == 3 and manifest["dropped"]["duplicate"] >= 2
        pieces = sorted(unit[2] or (0, 1) for task in units for unit in task)
        results[layout] = (pieces, manifest, {name: load(MEMORY, f"{mem}/{layout}/out", name)
                                              for name in ("train", "valid", "test", "vocab/items.parquet",
                                                                           "vocab/users.parquet", "quarantine")})
    # The one-row-group file is one task's work; the 31-group file is cut into 8 runs (2 workers x 4)
    # of whole row groups that tile it, and the output is the same to the row.
    assert results["whole"][0] == [(0, 1)]
    split = results["split"][0]
    assert len(split) == 8 and split[0][0] == 0 and split[-1][1] == 31
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(split, split[1:]))
    for key in ("input_rows", "interactions", "users", "items", "dropped", "vocab_hash"):
        assert results["split"][1][key] == results["whole"][1][key]
    for name, rows in results["whole"][2].items():
        if name == "quarantine":
            for row in rows + results["split"][2][name]:
                row["file"] = row["file"].split("/")[-1]
            assert [r["row"] for r in rows] == [6, 1718, 3000]  # numbered from the file's first row
        assert results["split"][2][name] == rows, name


def test_strict_names_the_lowest_bad_row_whichever_task_finishes_first(mem, monkeypatch):
    n = 3000
    timestamps = np.arange(n).astype(str).astype(object)
    timestamps[[1717, 5, 2999]] = ["soon", "later", "never"]
    table = pa.table({"user_id": (np.arange(n) % 120).astype(str), "item_id": (np.arange(n) % 60).astype(str),
                      "timestamp": timestamps.astype(str)})
    with MEMORY.open(f"{mem}/log.parquet", "wb") as handle:
        pq.write_table(table, handle, row_group_size=97)
    # In-process tasks run in the order given: reversed, the task with the last row groups goes first.
    balanced = ingest_module.balanced
    monkeypatch.setattr(ingest_module, "balanced", lambda sizes, parts: balanced(sizes, parts)[::-1])
    with pytest.raises(UserError, match=r"log.parquet, row 6, column 'timestamp': bad_timestamp \(raw: '\{.*later"):
        run_prepare(config(input=f"memory://{mem}/log.parquet", output=f"memory://{mem}/out", workers=2, strict=True))
    assert not MEMORY.exists(f"{mem}/out/manifest.json")


def test_parse_units_cut_only_large_parquet_files_into_row_group_runs():
    # 4 parts of 250 bytes: 600 bytes make 3 runs of equal rows, 300 bytes of skewed groups make 2
    # (never an empty run), a file within its share and a text file stay whole.
    units, sizes = ingest_module._parse_units(["big.parquet", "skewed.parquet", "small.parquet", "log.csv"],
                                               [600, 300, 20, 80], {0: [5] * 12, 1: [10, 10, 1000], 2: [1, 1],
                                                                    3: None}, "parquet", parts=4)
    assert [(u[1], u[2]) for u in units] == [("big.parquet", (0, 4)), ("big.parquet", (4, 8)),
                                             ("big.parquet", (8, 12)), ("skewed.parquet", (0, 2)),
                                             ("skewed.parquet", (2, 3)), ("small.parquet", None), ("log.csv", None)]
    assert [u[0] for u in units] == [0, 0, 0, 1, 1, 2, 3]
    assert sizes == [200, 200, 200, 5, 294, 20, 80]

def test_parse_units_cut_large_uncompressed_text_files_into_byte_ranges(monkeypatch):
    monkeypatch.setattr(ingest_module, "MIN_RANGE_BYTES", 100)
    units, sizes = ingest_module._parse_units(["big.csv", "big.csv.gz", "mid.csv", "small.csv"], [1000, 1000, 250, 150],
                                               {}, "csv", parts=8)
    # 2400 bytes in 8 parts of 300: 1000 bytes make 4 ranges, 250 bytes make 1 (within its share),
    # a compressed file cannot be cut, and no range is below MIN_RANGE_BYTES (150 bytes: 1 range).
    assert [(u.path, u.byte_range) for u in units] == [
        ("big.csv", (0, 0, 250)), ("big.csv", (1, 250, 500)), ("big.csv", (2, 500, 750)), ("big.csv", (3, 750, 1000)),
        ("big.csv.gz", None), ("mid.csv", None), ("small.csv", None)]
    assert sizes == [250, 250, 250, 250, 1000, 250, 150]
    parquet, _ = ingest_module._parse_units(["big.parquet"], [1000], {0: None}, "parquet", parts=8)
    assert [u.byte_range for u in parquet] == [None]


def _text_log(fmt: str, rng) -> tuple[str, list[int]]:
    """A log in `fmt` with CRLF and LF endings, bad rows, duplicates and blank lines; returns the
    text and the line numbers of the bad rows."""
    lines, bad = ["user_id,item_id,timestamp"] if fmt == "csv" else [], []
    for n in range(400):
        user, item = f"u{rng.integers(0, 30)}", f"i{rng.integers(0, 40)}"
        if n % 37 == 5:
            bad.append(len(lines) + 1)
            lines.append({"csv": f"{user},{item}", "pairs-txt": user, "seq-txt": user,
                          "jsonl": f'{{"user_id": "{user}", "item_id": '}[fmt])  # malformed
        elif n % 53 == 7 and fmt != "csv":  # a blank line is no row in the line formats, a bad one in CSV
            lines.append("")
        else:
            lines.append({"csv": f"{user},{item},{rng.integers(0, 50)}", "pairs-txt": f"{user} {item}",
                          "seq-txt": f"{user} {item} i{rng.integers(0, 40)} i{rng.integers(0, 40)}",
                          "jsonl": json.dumps({"user_id": user, "item_id": item, "timestamp": int(rng.integers(0, 50))})
                          }[fmt])
        if n % 41 == 3:
            lines.append(lines[-1])  # a duplicate row (a duplicate only where there is a timestamp)
    return "\r\n".join(lines[:200]) + "\r\n" + "\n".join(lines[200:]), bad  # no newline at the end


@pytest.mark.parametrize("fmt", ["csv", "pairs-txt", "seq-txt", "jsonl"])
def test_a_large_text_file_is_parsed_in_byte_ranges_with_the_same_result(mem, monkeypatch, fmt):
    text, bad_lines = _text_log(fmt, np.random.default_rng(5))
    units = []
    parse_task = ingest_module._parse_task
    monkeypatch.setattr(ingest_module, "_parse_task", lambda fs, files, *rest: units.append(files) or
                        parse_task(fs, files, *rest))
    results = {}
    for layout, min_range in (("whole", 1 << 40), ("split", 100)):
        monkeypatch.setattr(ingest_module, "MIN_RANGE_BYTES", min_range)
        path = put(mem, f"{layout}/log.txt", text)
        units.clear()
        manifest = run_prepare(config(input=path, output=f"memory://{mem}/{layout}/out", format=fmt, workers=2,
                                      buckets=2, num_negatives=5))
        assert accounted(manifest) and manifest["dropped"]["malformed"] == len(bad_lines)
        pieces = sorted(unit.byte_range or (0, 0, len(text)) for task in units for unit in task)
        results[layout] = (pieces, manifest, {name: load(MEMORY, f"{mem}/{layout}/out", name)
                                              for name in ("train", "valid", "test", "vocab/items.parquet",
                                                           "vocab/users.parquet", "quarantine")})
    # Whole, one task; split, 8 byte ranges (2 workers x 4) that tile the file; the same output to
    # the row, and quarantined rows numbered as lines of the file.
    assert results["whole"][0] == [(0, 0, len(text))]
    split = results["split"][0]
    assert [p[0] for p in split] == list(range(8)) and split[0][1] == 0 and split[-1][2] == len(text)
    assert all(a[2] == b[1] for a, b in zip(split, split[1:]))
    for key in ("input_rows", "interactions", "users", "items", "dropped", "vocab_hash"):
        assert results["split"][1][key] == results["whole"][1][key], key
    for name, rows in results["whole"][2].items():
        if name == "quarantine":
            for row in rows + results["split"][2][name]:
                row["file"] = row["file"].split("/")[-1]
            assert [r["row"] for r in rows] == bad_lines
        assert results["split"][2][name] == rows, name


def test_a_json_column_is_judged_over_the_whole_file_when_read_in_byte_ranges(mem, monkeypatch):
    monkeypatch.setattr(ingest_module, "MIN_RANGE_BYTES", 100)
    lines = [json.dumps({"user_id": f"u{n % 7}", "item_id": f"i{n % 5}", "timestamp": n}) for n in range(60)]
    # the event column only in the last lines: missing from most ranges, present in the file
    lines[-3:] = [json.dumps({"user_id": "u1", "item_id": "i1", "timestamp": 99 + n, "kind": "buy"}) for n in range(3)]
    manifest = run_prepare(config(input=put(mem, "log.jsonl", "\n".join(lines)), output=f"memory://{mem}/out",
                                  workers=2, columns=ColumnMap(event="kind"), num_negatives=0))
    assert accounted(manifest) and sum(manifest["dropped"].values()) == 0
    with pytest.raises(UserError, match=r"log.jsonl: column 'weight' not found \(available columns: item_id, kind"):
        run_prepare(config(input=put(mem, "log.jsonl", "\n".join(lines)), output=f"memory://{mem}/out2", workers=2,
                           columns=ColumnMap(event="kind", weight="weight")))


def test_strict_names_the_lowest_bad_line_of_a_text_file_read_in_byte_ranges(mem, monkeypatch):
    text, bad_lines = _text_log("csv", np.random.default_rng(5))
    monkeypatch.setattr(ingest_module, "MIN_RANGE_BYTES", 100)
    balanced = ingest_module.balanced
    monkeypatch.setattr(ingest_module, "balanced", lambda sizes, parts: balanced(sizes, parts)[::-1])
    with pytest.raises(UserError, match=rf"log.csv, row {bad_lines[0]}: malformed"):
        run_prepare(config(input=put(mem, "log.csv", text), output=f"memory://{mem}/out", workers=2, strict=True))
    # the same with the first bad rows quarantine-free: the first bad line left is in a later range
    lines = text.split("\n")
    for line in bad_lines[:4]:
        lines[line - 1] = lines[line - 2]
    with pytest.raises(UserError, match=rf"log2.csv, row {bad_lines[4]}: malformed"):
        run_prepare(config(input=put(mem, "log2.csv", "\n".join(lines)), output=f"memory://{mem}/out2", workers=2,
                           strict=True))


def test_strict_names_file_row_and_column(mem):
    path = put(mem, "log.csv", csv([("u1", "a", 1), ("u1", "b", "noon")]))
    with pytest.raises(UserError, match=r"log.csv, row 3, column 'timestamp': bad_timestamp"):
        run_prepare(config(input=path, output=f"memory://{mem}/out", strict=True))
    assert not MEMORY.exists(f"{mem}/out/manifest.json")


def test_strict_rejects_empty_files(mem):
    put(mem, "in/a.csv", csv([("u1", "a", 1)]))
    put(mem, "in/b.csv", "")
    with pytest.raises(UserError, match="b.csv is empty"):
        run_prepare(config(input=f"memory://{mem}/in", output=f"memory://{mem}/out", format="csv", strict=True))


def test_missing_column_and_unreadable_input(mem):
    path = put(mem, "log.csv", "user,item_id,timestamp\nu,i,1\n")
    with pytest.raises(UserError, match=r"log.csv: column 'user_id' not found \(available columns: user, item_id"):
        run_prepare(config(input=path, output=f"memory://{mem}/out"))
    with pytest.raises(UserError, match="input not found"):
        run_prepare(config(input=f"memory://{mem}/nothing", output=f"memory://{mem}/out"))


def test_schema_mismatch_names_both_files(mem):
    for name, table in (("a.parquet", pa.table({"user_id": [1], "item_id": [2], "timestamp": [3]})),
                        ("b.parquet", pa.table({"user_id": ["1"], "item_id": [2], "timestamp": [3]}))):
        with MEMORY.open(f"{mem}/in/{name}", "wb") as handle:
            pq.write_table(table, handle)
    with pytest.raises(UserError, match=r"schema of .*b.parquet differs from .*a.parquet"):
        run_prepare(config(input=f"memory://{mem}/in", output=f"memory://{mem}/out"))


def test_all_rows_bad_is_a_clear_error(mem):
    with pytest.raises(UserError, match="no usable interactions"):
        run_prepare(config(input=put(mem, "log.csv", csv([("", "a", 1)])), output=f"memory://{mem}/out"))


# Issue 37, case 2: ids a number type cannot hold exactly are bad rows, counted in the manifest.
@pytest.mark.parametrize("value", [2**70, 2**63 + 5, 1e20])
def test_ids_beyond_exact_numbers_are_quarantined_and_counted(mem, value):
    lines = [json.dumps({"user_id": u, "item_id": i, "timestamp": i}) for u in range(3) for i in range(4)]
    path = put(mem, "log.jsonl", "\n".join(lines + [json.dumps({"user_id": value, "item_id": 1, "timestamp": 9})]))
    manifest = run_prepare(config(input=path, output=f"memory://{mem}/out", num_negatives=1))
    assert manifest["dropped"]["bad_id"] == 1 and manifest["users"] == 3 and accounted(manifest)
    assert [(r["row"], r["column"], r["reason"]) for r in load(MEMORY, f"{mem}/out", "quarantine")] == [
        (13, "user_id", "bad_id")]


# Issue 37, case 3: undecodable text is quarantined (and counted), or read in the declared encoding.
def test_undecodable_lines_are_quarantined_or_read_in_the_declared_encoding(mem):
    with MEMORY.open(f"{mem}/log.txt", "wb") as handle:
        handle.write("u1 caf\xe9 x y\nu2 caf\xf8 x y\nu3 x y\n".encode("latin-1"))
    strict = run_prepare(config(input=f"memory://{mem}/log.txt", format="seq-txt", output=f"memory://{mem}/a",
                                num_negatives=0))
    assert strict["dropped"]["bad_encoding"] == 2 and strict["items"] == 2 and accounted(strict)
    assert [(r["row"], r["reason"], r["raw"]) for r in load(MEMORY, f"{mem}/a", "quarantine")] == [
        (1, "bad_encoding", "u1 caf\\xe9 x y"), (2, "bad_encoding", "u2 caf\\xf8 x y")]
    declared = run_prepare(config(input=f"memory://{mem}/log.txt", format="seq-txt", output=f"memory://{mem}/b",
                                  num_negatives=0, encoding="latin-1"))
    items = load(MEMORY, f"{mem}/b", "vocab/items.parquet")
    assert declared["items"] == 4 and {"café", "cafø"} <= {r["item_id"] for r in items}
    with pytest.raises(ConfigKeyError, match="encoding"):
        config(input="x", output="y", encoding="utf-16")


# Issue 37, case 4: an edit that keeps the size and the modification time is seen.
def test_an_edit_keeping_size_and_mtime_makes_the_output_stale(mem, tmp_path, caplog):
    log = tmp_path / "log.csv"
    log.write_text(csv([("u1", "a", 1), ("u1", "b", 2), ("u2", "a", 1), ("u2", "b", 2)]))
    stamp = log.stat()
    out = f"memory://{mem}/out"
    run_prepare(config(input=str(log), output=out, num_negatives=0))
    log.write_text(csv([("u1", "a", 1), ("u1", "c", 2), ("u2", "a", 1), ("u2", "c", 2)]))  # b -> c
    os.utime(log, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # as `cp -p` or `rsync -t` leave it
    assert log.stat().st_size == stamp.st_size and log.stat().st_mtime_ns == stamp.st_mtime_ns
    with caplog.at_level(logging.INFO, logger="flm_dist"):
        run_prepare(config(input=str(log), output=out, num_negatives=0))
        assert "its input (a path, size or content) changed (compared by SHA-256 of the bytes)" in caplog.text
        assert sorted(r["item_id"] for r in load(MEMORY, f"{mem}/out", "vocab/items.parquet")) == ["a", "c"]
        caplog.clear()
        run_prepare(config(input=str(log), output=out, num_negatives=0))
    assert "up to date: same config, and the same 1 input file(s) by path, size and content (SHA-256" in caplog.text


# Issue 37, case 6: a zero-byte file in a directory is quarantined, also when the format is detected.
@pytest.mark.parametrize("fmt", ["auto", "csv"])
def test_a_zero_byte_file_in_a_directory_is_quarantined_as_the_guide_says(mem, fmt):
    put(mem, "in/a.csv", csv([("u1", "a", 1), ("u1", "b", 2)]))
    put(mem, "in/b.csv", "")
    manifest = run_prepare(config(input=f"memory://{mem}/in", output=f"memory://{mem}/out", format=fmt,
                                  num_negatives=0))
    assert manifest["empty_files"] == [f"{mem}/in/b.csv"] and manifest["interactions"] == 2
    assert [(r["row"], r["reason"]) for r in load(MEMORY, f"{mem}/out", "quarantine")] == [(0, "empty_file")]


def test_a_zero_byte_parquet_file_is_quarantined(mem):
    with MEMORY.open(f"{mem}/in/a.parquet", "wb") as handle:
        pq.write_table(pa.table({"user_id": ["u1", "u1"], "item_id": ["a", "b"], "timestamp": [1, 2]}), handle)
    put(mem, "in/b.parquet", "")
    manifest = run_prepare(config(input=f"memory://{mem}/in", output=f"memory://{mem}/out", num_negatives=0))
    assert manifest["empty_files"] == [f"{mem}/in/b.parquet"] and manifest["interactions"] == 2


# Issue 37, cases 2 and 7: outputs that cannot be written, or that would overlap the input.
def test_outputs_that_cannot_be_written_or_overlap_the_input_are_refused(mem, tmp_path):
    log = tmp_path / "in" / "log.csv"
    log.parent.mkdir()
    log.write_text(csv([("u1", "a", 1), ("u1", "b", 2)]))
    (tmp_path / "afile").write_text("x")
    refused = {
        str(tmp_path / "afile"): "is an existing file",
        str(log): "is the input",
        str(tmp_path / "afile" / "out"): "cannot be created",
        str(tmp_path / "in" / "prepared"): "is inside the input",
        str(tmp_path): "is inside the output",
    }
    for output, reason in refused.items():
        source = str(log.parent) if output.endswith("prepared") else str(log)
        with pytest.raises(UserError, match=reason):
            run_prepare(config(input=source, output=output))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "in"] and log.parent.joinpath("log.csv").is_file()
    put(mem, "in/log.csv", csv([("u1", "a", 1)]))
    with pytest.raises(UserError, match="is inside the input"):
        run_prepare(config(input=f"memory://{mem}/in", output=f"memory://{mem}/in/out"))


# ---------------------------------------------------------------------------------- real data, via Ray


@pytest.mark.parametrize("name, users, items, interactions", [
    ("Beauty.txt", 22363, 12101, 198502),
    ("Sports_and_Outdoors.txt", 35598, 18357, 296337),
    ("Toys_and_Games.txt", 19412, 11924, 167597),
])
def test_real_sequence_sets(ray_session, shared_data, tmp_path, name, users, items, interactions):
    out = tmp_path / "out"
    manifest = run_prepare(PrepareConfig(input=str(shared_data / name), output=str(out)))
    assert manifest["config"]["format"] == "seq-txt" and manifest["kcore"]["min_user_interactions"] == 0
    assert (manifest["users"], manifest["items"], manifest["interactions"]) == (users, items, interactions)
    assert manifest["splits"]["test"]["rows"] == users and accounted(manifest)  # every user has >= 3 items
    assert json.loads((out / "manifest.json").read_text()) == manifest
    for path in manifest["files"]:
        assert (out / path).is_file()
    vocab = pq.read_table(out / "vocab" / "items.parquet")
    assert vocab.column("index").to_pylist() == list(range(1, items + 1))
    assert vocab.column("count").to_numpy().sum() == interactions
    assert np.all(np.diff(vocab.column("count").to_numpy()) <= 0)


def kcore_reference(users: np.ndarray, items: np.ndarray, k: int) -> tuple[int, int, int]:
    """Plain iterative k-core on (user, item) pairs: drop users and items under k until stable."""
    keep = np.ones(len(users), dtype=bool)
    while True:
        u, inv_u, cnt_u = np.unique(users[keep], return_inverse=True, return_counts=True)
        i, inv_i, cnt_i = np.unique(items[keep], return_inverse=True, return_counts=True)
        ok = (cnt_u[inv_u] >= k) & (cnt_i[inv_i] >= k)
        if ok.all():
            return len(u), len(i), int(keep.sum())
        keep[np.flatnonzero(keep)[~ok]] = False


def test_ml100k_five_core_matches_reference(ray_session, shared_data, tmp_path):
    path = shared_data / "ml-100k" / "ml-100k.inter"
    manifest = run_prepare(PrepareConfig(input=str(path), output=str(tmp_path / "ml")))
    assert manifest["kcore"]["min_user_interactions"] == manifest["kcore"]["min_item_interactions"] == 5
    raw = np.loadtxt(path, skiprows=1, dtype=np.int64)
    expected = kcore_reference(raw[:, 0], raw[:, 1], 5)
    assert (manifest["users"], manifest["items"], manifest["interactions"]) == expected == (943, 1349, 99287)
    assert manifest["dropped"]["kcore_item"] == 713 and accounted(manifest)


# ------------------------------------------------------------------------------ determinism, atomicity


@pytest.fixture(scope="module")
def small_log(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("log") / "synth"
    run_synth(SynthConfig(output=str(path), users=400, items=300, interactions=12_000, rows_per_file=4_000))
    return str(path)


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_skip_and_replace(ray_session, small_log, tmp_path, caplog):
    a = run_prepare(config(input=small_log, output=str(tmp_path / "a"), buckets=3))
    run_prepare(config(input=small_log, output=str(tmp_path / "b"), buckets=3))
    files_a = tree(tmp_path / "a")
    assert files_a == tree(tmp_path / "b")
    assert {"train/part-00002.parquet", "valid/part-00002.parquet", "manifest.json"} <= set(files_a)

    stamp = (tmp_path / "a" / "manifest.json").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="flm_dist"):
        assert run_prepare(config(input=small_log, output=str(tmp_path / "a"), buckets=3, workers=1)) == a
    assert "up to date" in caplog.text
    assert (tmp_path / "a" / "manifest.json").stat().st_mtime_ns == stamp

    run_prepare(config(input=small_log, output=str(tmp_path / "a"), buckets=1))
    assert sorted(p.name for p in (tmp_path / "a" / "train").iterdir()) == ["part-00000.parquet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no staging or old copies left


def test_failed_run_leaves_no_manifest_and_keeps_old_output(ray_session, small_log, tmp_path, monkeypatch):
    out = tmp_path / "out"
    fresh = tmp_path / "fresh"

    def crash(*args):
        raise RuntimeError("killed in the last stage")

    good = run_prepare(config(input=small_log, output=str(out), buckets=2))
    monkeypatch.setattr(ingest_module, "merge_quarantine", crash)
    with pytest.raises(RuntimeError, match="killed"):
        run_prepare(config(input=small_log, output=str(fresh)))
    with pytest.raises(RuntimeError, match="killed"):
        run_prepare(config(input=small_log, output=str(out), buckets=1))
    assert not fresh.exists()
    assert json.loads((out / "manifest.json").read_text()) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_concurrent_runs_to_one_output_publish_one_whole_output(ray_session, small_log, tmp_path):
    """Two prepares with different layouts race to one output: it ends as exactly one of them."""
    import threading

    out = tmp_path / "out"
    results: dict[int, dict] = {}
    errors: list[BaseException] = []

    def prepare(buckets: int) -> None:
        try:
            results[buckets] = run_prepare(config(input=small_log, output=str(out), buckets=buckets))
        except BaseException as exc:  # noqa: BLE001 - re-raised by the assertion below
            errors.append(exc)

    runs = [threading.Thread(target=prepare, args=(b,)) for b in (1, 3)]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    assert not errors
    published = json.loads((out / "manifest.json").read_text())
    assert published in (results[1], results[3])
    on_disk = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert on_disk == sorted(published["files"] + ["manifest.json"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or old copies left


def test_publish_between_our_renames_is_not_merged(tmp_path, monkeypatch):
    """The race itself, made deterministic: another run publishes between moving the old output
    aside and renaming ours into place. Ours then replaces it whole; nothing is nested or mixed."""
    import os

    from flm_dist.data import storage

    fs = fsspec.filesystem("file")
    final = tmp_path / "out"
    for name in ("old", "theirs", "ours"):
        (tmp_path / name).mkdir()
        (tmp_path / name / f"{name}.txt").write_text(name)
        (tmp_path / name / "manifest.json").write_text(name)
    os.rename(tmp_path / "old", final)
    rename = os.rename
    interleaved = []

    def rename_with_a_rival(src, dst):
        if str(src) == str(tmp_path / "ours") and not interleaved:
            interleaved.append(True)
            rename(tmp_path / "theirs", final)  # the rival lands after our old output moved aside
        return rename(src, dst)

    monkeypatch.setattr(os, "rename", rename_with_a_rival)
    storage.publish(fs, str(tmp_path / "ours"), str(final))
    assert interleaved
    assert sorted(p.name for p in final.iterdir()) == ["manifest.json", "ours.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_memory_output_replaced_without_mixing(mem):
    log = put(mem, "log.csv", csv([(u, i, t) for u in range(6) for t, i in enumerate("abcd")]))
    run_prepare(config(input=log, output=f"memory://{mem}/out", buckets=3, num_negatives=0))
    assert len(MEMORY.find(f"{mem}/out/train")) == 3
    manifest = run_prepare(config(input=log, output=f"memory://{mem}/out", buckets=1, num_negatives=0))
    assert [p.split("/")[-1] for p in MEMORY.find(f"{mem}/out/train")] == ["part-00000.parquet"]
    on_store = sorted(p[len(f"{mem}/out/"):] for p in MEMORY.find(f"{mem}/out"))
    assert on_store == sorted(manifest["files"] + ["manifest.json"])
    assert [p.split("/")[-1] for p in MEMORY.ls(mem, detail=False)] == ["log.csv", "out"]


def test_errors_from_ray_tasks_are_one_line_user_errors(ray_session, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.csv").write_text(csv([("u1", "a", 1), ("u1", "b", "x")]))
    with pytest.raises(UserError, match=r"a.csv, row 3, column 'timestamp'"):
        run_prepare(config(input=str(tmp_path / "in"), output=str(tmp_path / "out"), strict=True))
    with pytest.raises(UserError, match=r"column 'uid' not found"):
        run_prepare(config(input=str(tmp_path / "in"), output=str(tmp_path / "out"), columns=ColumnMap(user="uid")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_refuses_to_replace_an_unrelated_directory(mem):
    put(mem, "precious/notes.txt", "keep me")
    with pytest.raises(UserError, match="not a previous output"):
        run_prepare(config(input=put(mem, "log.csv", csv([("u", "a", 1)])), output=f"memory://{mem}/precious"))
    assert MEMORY.cat(f"{mem}/precious/notes.txt") == b"keep me"


def test_a_task_that_keeps_killing_its_worker_fails_the_run_instead_of_retrying_forever(ray_session):
    """Ray Data retries map tasks without limit by default, so a task killed on every attempt (as
    Ray's memory monitor kills a task that outgrows the node) would hang `flm prepare` forever."""
    import os
    import signal

    def give_up(signum, frame):
        raise TimeoutError("the killed task was still being retried after 300 s")

    previous = signal.signal(signal.SIGALRM, give_up)
    signal.alarm(300)
    try:
        with pytest.raises(Exception) as failure:
            stage_runner_module.StageRunner(local=False, workers=1).map(os._exit, [(1,)], "killed")
        assert not isinstance(failure.value, TimeoutError)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_user_mistake_inside_a_task_is_raised_as_its_one_line(ray_session, tmp_path):
    local = fsspec.filesystem("file")
    (tmp_path / "log.csv").write_text("user_id,item_id\nu,a\n")
    with pytest.raises(UserError) as failure:
        stage_runner_module.StageRunner(local=False, workers=2).map(
            list_input, [(local, str(tmp_path / "missing")), (local, str(tmp_path))], "listing")
    assert str(failure.value) == f"input not found: {tmp_path / 'missing'}"


def test_task_results_pickle_at_the_size_of_what_they_hold():
    """A slice (or a group_by chunk) pickles its whole parent buffers; results must not."""
    import pickle

    parent = pa.table({"item": pa.array([f"item-{i}" for i in range(200_000)]),
                       "count": pa.array(np.arange(200_000))})
    counts = parent.group_by("item", use_threads=False).aggregate([("count", "sum")])
    result = {"items": counts.slice(5, 3), "users": parent.column("item").chunk(0).slice(7, 2),
              "nested": [("ok", parent.slice(0, 1))], "rows": 3}
    assert len(pickle.dumps(result)) > 1_000_000  # the problem: megabytes for six rows

    compacted = stage_runner_module.compact_arrow(result)

    assert len(pickle.dumps(compacted)) < 10_000
    assert compacted["items"].equals(counts.slice(5, 3))
    assert compacted["users"].to_pylist() == ["item-7", "item-8"]
    assert compacted["nested"][0][1].to_pylist() == [{"item": "item-0", "count": 0}]
    assert compacted["rows"] == 3
