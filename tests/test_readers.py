"""Readers: every format, column mapping, bad rows, memory:// input, the real files in shared/data."""

import gzip
import uuid

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from flm_dist.data.events import EVENTS_SCHEMA, ColumnMap, FileProblem
from flm_dist.data.readers import detect_format, iter_file, list_input, read_file, resolve_format
from flm_dist.data.text_formats import ByteRange, splittable_text
from flm_dist.errors import UserError

LOCAL = fsspec.filesystem("file")


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def rows(table: pa.Table, *columns: str) -> list[tuple]:
    return list(zip(*(table.column(c).to_pylist() for c in columns)))


def test_csv_with_column_mapping_and_timestamp_forms(tmp_path):
    path = write(tmp_path / "log.csv", "uid,iid,when,kind,stars\n"
                 "u1,i1,100,click,4\n"
                 "u1,i2,100.9,buy,\n"
                 "u2,i1,1970-01-01T00:01:40Z,click,3.5\n"
                 "u2,i3,1970-01-01T01:00:00+01:00,click,1\n"
                 "u3,i4,1970-01-01 00:00:07,click,2\n")
    columns = ColumnMap(user="uid", item="iid", timestamp="when", event="kind", weight="stars")
    events, bad = read_file(LOCAL, path, "csv", columns, file_index=3)
    assert events.schema == EVENTS_SCHEMA
    assert bad.num_rows == 0
    assert rows(events, "user", "item", "timestamp", "event", "weight") == [
        ("u1", "i1", 100, "click", 4.0), ("u1", "i2", 100, "buy", None), ("u2", "i1", 100, "click", 3.5),
        ("u2", "i3", 0, "click", 1.0), ("u3", "i4", 7, "click", 2.0)]
    assert events.column("row").to_pylist() == [2, 3, 4, 5, 6]  # line numbers; the header is line 1
    assert set(events.column("file").to_pylist()) == {3}


def test_csv_bad_rows_are_quarantined_with_line_and_reason(tmp_path):
    path = write(tmp_path / "log.csv", "user_id,item_id,timestamp\n"
                 "u1,i1,1\n"
                 "u1,i2\n"            # line 3: wrong field count
                 ",i3,3\n"            # line 4: null user
                 "u2,i4,yesterday\n"  # line 5: bad timestamp
                 "u2,i5,5\n")
    events, bad = read_file(LOCAL, path, "csv")
    assert rows(events, "user", "item", "row") == [("u1", "i1", 2), ("u2", "i5", 6)]
    assert rows(bad, "row", "column", "reason") == [(3, "", "malformed"), (4, "user_id", "null_id"),
                                                    (5, "timestamp", "bad_timestamp")]
    assert set(bad.column("file").to_pylist()) == {path}
    assert bad.column("raw").to_pylist()[0] == "u1,i2"


def test_tsv_without_timestamps(tmp_path):
    path = write(tmp_path / "log.tsv", "user_id\titem_id\nu1\ti1\nu1\ti2\n")
    events, _ = read_file(LOCAL, path, "tsv", ColumnMap(timestamp=None))
    assert rows(events, "user", "item", "timestamp") == [("u1", "i1", None), ("u1", "i2", None)]


def test_missing_column_names_file_column_and_available(tmp_path):
    path = write(tmp_path / "log.csv", "user,item,ts\nu,i,1\n")
    with pytest.raises(FileProblem, match=r"log.csv: column 'user_id' not found \(available columns: user, item, ts\)"):
        read_file(LOCAL, path, "csv")


def test_jsonl_clean_mixed_and_broken_lines(tmp_path):
    clean = write(tmp_path / "a.jsonl", '{"user_id": 1, "item_id": 7, "timestamp": 10}\n\n'
                  '{"user_id": 2, "item_id": 8.0, "timestamp": 11.5}\n')
    events, bad = read_file(LOCAL, clean, "jsonl")
    assert rows(events, "user", "item", "timestamp", "row") == [("1", "7", 10, 1), ("2", "8", 11, 3)]
    assert bad.num_rows == 0
    mixed = write(tmp_path / "b.jsonl", '{"user_id": 1, "item_id": "x", "timestamp": 10}\n'
                  '{"user_id": "u", "item_id": 2, "timestamp": "1970-01-01T00:00:20"}\n'
                  '{"user_id": "v", "item_id": 3\n'
                  '{"item_id": 4, "timestamp": 1}\n')
    events, bad = read_file(LOCAL, mixed, "jsonl")
    assert rows(events, "user", "item", "timestamp") == [("1", "x", 10), ("u", "2", 20)]
    assert rows(bad, "row", "reason") == [(3, "malformed"), (4, "null_id")]


def test_parquet_int_and_float_ids(tmp_path):
    path = str(tmp_path / "log.parquet")
    pq.write_table(pa.table({"user_id": [1, 2, 3], "item_id": [10.0, 11.5, None],
                             "timestamp": pa.array([1, 2, 3], pa.timestamp("s"))}), path)
    events, bad = read_file(LOCAL, path, "parquet")
    assert rows(events, "user", "item", "timestamp", "row") == [("1", "10", 1, 1)]
    assert rows(bad, "row", "column", "reason") == [(2, "item_id", "bad_id"), (3, "item_id", "null_id")]


# Issue 37, case 2: a float id beyond 2**53 stands for several integers; ids beyond int64 broke the cast.
def test_float_ids_beyond_exact_integers_are_bad_ids(tmp_path):
    path = str(tmp_path / "log.parquet")
    pq.write_table(pa.table({"user_id": [2.0**53, 2.0**53 + 2, 2.0**63, 1e20, 2.0**70, -1e20],
                             "item_id": ["a"] * 6, "timestamp": [1] * 6}), path)
    events, bad = read_file(LOCAL, path, "parquet")
    assert rows(events, "user", "row") == [("9007199254740992", 1)]
    assert rows(bad, "row", "reason") == [(2, "bad_id"), (3, "bad_id"), (4, "bad_id"), (5, "bad_id"), (6, "bad_id")]
    jsonl = write(tmp_path / "log.jsonl", "".join(f'{{"user_id": {v}, "item_id": 1, "timestamp": 1}}\n'
                                                  for v in (7, 2**63 + 5, 2**70, "1e20")))
    events, bad = read_file(LOCAL, jsonl, "jsonl")
    assert rows(events, "user", "row") == [("7", 1)] and rows(bad, "row", "reason") == [
        (2, "bad_id"), (3, "bad_id"), (4, "bad_id")]


def test_partitioned_parquet_directory_with_hive_column(tmp_path):
    for country, users in (("fr", [1, 2]), ("de", [3])):
        part = tmp_path / "log" / f"country={country}"
        part.mkdir(parents=True)
        pq.write_table(pa.table({"user_id": users, "item_id": [5] * len(users), "timestamp": [9] * len(users)}),
                       str(part / "part-0.parquet"))
    (tmp_path / "log" / "_SUCCESS").write_text("")
    files = list_input(LOCAL, str(tmp_path / "log"))
    assert [f.split("/")[-2] for f in files] == ["country=de", "country=fr"]
    assert resolve_format(LOCAL, files, "auto") == "parquet"
    events, _ = read_file(LOCAL, files[0], "parquet", ColumnMap(event="country"))
    assert rows(events, "user", "event") == [("3", "de")]


def test_seq_txt_positions_and_short_lines(tmp_path):
    path = write(tmp_path / "seq.txt", "1 5 6 7\n\n2 8\n3\n")
    events, bad = read_file(LOCAL, path, "seq-txt")
    assert rows(events, "user", "item", "row", "pos") == [("1", "5", 1, 0), ("1", "6", 1, 1), ("1", "7", 1, 2),
                                                          ("2", "8", 3, 0)]
    assert rows(bad, "row", "reason", "raw") == [(4, "malformed", "3")]
    assert detect_format(LOCAL, path) == "seq-txt"


def test_pairs_txt_keeps_file_order(tmp_path):
    assert detect_format(LOCAL, write(tmp_path / "clean.txt", "u1 a\nu2 b\nu1 c\n")) == "pairs-txt"
    path = write(tmp_path / "pairs.txt", "u1 a\nu2 b\nu1 c\nu1 d e\n")
    events, bad = read_file(LOCAL, path, "pairs-txt")
    assert rows(events, "user", "item", "row") == [("u1", "a", 1), ("u2", "b", 2), ("u1", "c", 3)]
    assert rows(bad, "row", "reason") == [(4, "malformed")]


def test_recbole_inter_header_types(tmp_path):
    path = write(tmp_path / "x.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                 "u1\ti1\t4\t881250949\nu2\ti2\t3\t881250950.7\n")
    assert detect_format(LOCAL, path) == "recbole"
    events, _ = read_file(LOCAL, path, "recbole", ColumnMap(weight="rating"))
    assert rows(events, "user", "item", "weight", "timestamp") == [("u1", "i1", 4.0, 881250949),
                                                                   ("u2", "i2", 3.0, 881250950)]


def test_movielens_dat_and_csv_require_integer_ids(tmp_path):
    dat = write(tmp_path / "ratings.dat", "1::1193::5::978300760\n1::x::3::978302109\n2::10::4\n")
    assert detect_format(LOCAL, dat) == "movielens"
    events, bad = read_file(LOCAL, dat, "movielens")
    assert rows(events, "user", "item", "weight", "timestamp") == [("1", "1193", 5.0, 978300760)]
    assert rows(bad, "row", "column", "reason") == [(3, "", "malformed"), (2, "item", "bad_id")]
    csv = write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,31,2.5,1260759144\n007,1029,3.0,1\n")
    assert detect_format(LOCAL, csv) == "movielens"
    events, _ = read_file(LOCAL, csv, "movielens")
    assert rows(events, "user", "item", "weight") == [("1", "31", 2.5), ("7", "1029", 3.0)]


def test_memory_filesystem_input():
    fs = fsspec.filesystem("memory")
    root = f"/readers-{uuid.uuid4().hex}"
    with fs.open(f"{root}/log.csv", "w") as handle:
        handle.write("user_id,item_id,timestamp\nu1,i1,1\nu1,i2,2\n")
    fs_, path = fsspec.core.url_to_fs(f"memory://{root}")
    files = list_input(fs_, path)
    events, _ = read_file(fs_, files[0], resolve_format(fs_, files, "auto"))
    assert rows(events, "user", "item", "timestamp") == [("u1", "i1", 1), ("u1", "i2", 2)]
    fs.rm(root, recursive=True)


def test_listing_errors(tmp_path):
    with pytest.raises(UserError, match="input not found"):
        list_input(LOCAL, str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "_SUCCESS").write_text("")
    with pytest.raises(UserError, match="no input files"):
        list_input(LOCAL, str(tmp_path / "empty"))
    (tmp_path / "mix").mkdir()
    write(tmp_path / "mix" / "a.csv", "user_id,item_id\n")
    write(tmp_path / "mix" / "b.parquet", "not parquet")
    with pytest.raises(UserError, match="different formats"):
        resolve_format(LOCAL, list_input(LOCAL, str(tmp_path / "mix")), "auto")


@pytest.mark.parametrize("name, users, items, interactions", [
    ("Beauty.txt", 22363, 12101, 198502),
    ("Sports_and_Outdoors.txt", 35598, 18357, 296337),
    ("Toys_and_Games.txt", 19412, 11924, 167597),
])
def test_real_sequence_files(shared_data, name, users, items, interactions):
    path = str(shared_data / name)
    assert detect_format(LOCAL, path) == "seq-txt"
    events, bad = read_file(LOCAL, path, "seq-txt")
    assert bad.num_rows == 0
    assert (events.num_rows, pc.count_distinct(events["user"]).as_py(),
            pc.count_distinct(events["item"]).as_py()) == (interactions, users, items)


def test_real_recbole_file(shared_data):
    path = str(shared_data / "ml-100k" / "ml-100k.inter")
    assert detect_format(LOCAL, path) == "recbole"
    events, bad = read_file(LOCAL, path, "recbole", ColumnMap(weight="rating"))
    assert (events.num_rows, bad.num_rows) == (100_000, 0)
    assert pc.count_distinct(events["user"]).as_py() == 943
    assert pc.min(events["timestamp"]).as_py() > 8e8


def test_unusable_column_types_are_file_problems(tmp_path):
    path = str(tmp_path / "log.parquet")
    pq.write_table(pa.table({"user_id": [True], "item_id": [1], "timestamp": [1]}), path)
    with pytest.raises(FileProblem, match=r"column 'user_id' has type bool"):
        read_file(LOCAL, path, "parquet")


def test_compressed_text_input(tmp_path):
    path = tmp_path / "seq.txt.gz"
    path.write_bytes(gzip.compress(b"1 5 6 7\n2 8 9\n"))
    assert detect_format(LOCAL, str(path)) == "seq-txt"
    events, _ = read_file(LOCAL, str(path), "seq-txt")
    assert rows(events, "user", "item") == [("1", "5"), ("1", "6"), ("1", "7"), ("2", "8"), ("2", "9")]


@pytest.mark.parametrize("fmt", ["csv", "pairs-txt", "seq-txt", "jsonl"])
def test_byte_ranges_cut_anywhere_tile_the_lines_of_a_file(tmp_path, fmt):
    header = "user_id,item_id,timestamp\n" if fmt == "csv" else ""
    body = {"csv": "u{0},i{1},{0}", "pairs-txt": "u{0} i{1}", "seq-txt": "u{0} i{1} i{0}",
            "jsonl": '{{"user_id": "u{0}", "item_id": "i{1}", "timestamp": {0}}}'}[fmt]
    lines = [body.format(n, n * 7 % 13) if n % 9 else body.format(n, "x" * (n % 40)) for n in range(1, 120)]
    lines[30] = "broken"  # a malformed row, numbered by its line
    path = write(tmp_path / "log.txt", header + "\r\n".join(lines[:50]) + "\r\n" + "\n".join(lines[50:]))
    whole_events, whole_bad = read_file(LOCAL, path, fmt)
    size = (tmp_path / "log.txt").stat().st_size
    rng = np.random.default_rng(0)
    for cuts in ([0, 1, 2, size - 1, size], [0, len(header), len(header) + 1, size],
                 [0, *sorted(rng.choice(np.arange(1, size), 9, replace=False)), size]):
        events, bad, lines_before = [], [], 0
        for number, (start, stop) in enumerate(zip(cuts, cuts[1:])):
            part = ByteRange(number, int(start), int(stop))
            for chunk_events, chunk_bad in iter_file(LOCAL, path, 0, fmt, ColumnMap(), byte_range=part):
                # line numbers count from the part's first line; the parts before it say where that is
                events.append(chunk_events.set_column(6, "row", pc.add(chunk_events.column("row"), lines_before)))
                bad.append(chunk_bad.set_column(1, "row", pc.add(chunk_bad.column("row"), lines_before)))
            lines_before += part.lines
        assert pa.concat_tables(events).equals(whole_events), cuts
        assert pa.concat_tables(bad).to_pylist() == whole_bad.to_pylist() and whole_bad.num_rows == 1


# Issue 37, case 2: truncated or corrupt compressed input is one line naming the file.
@pytest.mark.parametrize("name", ["log.csv.gz", "log.jsonl.gz", "log.txt.gz"])
def test_truncated_compressed_input_is_a_file_problem(tmp_path, name):
    fmt = {"csv": "csv", "jsonl": "jsonl", "txt": "seq-txt"}[name.split(".")[1]]
    text = "user_id,item_id,timestamp\n" if fmt == "csv" else ""
    text += "".join({"csv": f"u{i},i{i},{i}\n", "jsonl": f'{{"user_id": {i}, "item_id": {i}}}\n',
                     "seq-txt": f"u{i} a b c\n"}[fmt] for i in range(2000))
    path = tmp_path / name
    path.write_bytes(gzip.compress(text.encode())[:-200])
    with pytest.raises(FileProblem, match=f"cannot read {path}: its compressed data ends early"):
        read_file(LOCAL, str(path), fmt)
    path.write_bytes(b"\x1f\x8b not gzip at all")
    with pytest.raises(FileProblem, match=f"cannot read {path}"):
        read_file(LOCAL, str(path), fmt)


# Issue 37, case 3: undecodable text is quarantined per line or value, or read as declared.
def test_undecodable_text_is_quarantined_never_replaced(tmp_path):
    seq = tmp_path / "log.txt"
    seq.write_bytes("u1 caf\xe9 x\nu2 caf\xf8 y\nu3 a b\n".encode("latin-1"))
    events, bad = read_file(LOCAL, str(seq), "seq-txt")
    assert rows(events, "user", "item", "row") == [("u3", "a", 3), ("u3", "b", 3)]
    assert rows(bad, "row", "column", "reason", "raw") == [(1, "", "bad_encoding", "u1 caf\\xe9 x"),
                                                           (2, "", "bad_encoding", "u2 caf\\xf8 y")]
    events, bad = read_file(LOCAL, str(seq), "seq-txt", encoding="latin-1")
    assert sorted(set(events.column("item").to_pylist())) == ["a", "b", "café", "cafø", "x", "y"]
    assert bad.num_rows == 0
    table = tmp_path / "log.csv"
    table.write_bytes("user_id,item_id,timestamp\nu1,caf\xe9,1\nu2,b,2\n".encode("latin-1"))
    events, bad = read_file(LOCAL, str(table), "csv")  # was: the whole file refused
    assert rows(events, "user", "item", "row") == [("u2", "b", 3)]
    assert rows(bad, "row", "column", "reason") == [(2, "item_id", "bad_encoding")]
    events, bad = read_file(LOCAL, str(table), "csv", encoding="latin-1")
    assert rows(events, "item") == [("café",), ("b",)] and bad.num_rows == 0


# Issue 37, case 6: row numbers are physical lines; repeated headers are quarantined whatever the columns.
def test_csv_rows_are_numbered_by_physical_line_after_quoted_line_breaks(tmp_path):
    path = write(tmp_path / "log.csv", 'user_id,item_id,timestamp\n'
                 'u1,a,1\n'
                 'u2,"two\nlines",2\n'        # lines 3-4
                 'u3,b,3\n'                    # 5
                 'u4,c\n'                      # 6: malformed
                 'u5,"x, ""y""\n\nz",5\n'    # 7-9
                 'u6,d,soon\n'                 # 10: bad timestamp
                 'u7,5"e,7\n'                  # 11: a quote inside an unquoted value is kept
                 'u8,f,8\n')                   # 12
    events, bad = read_file(LOCAL, path, "csv")
    assert rows(events, "user", "row") == [("u1", 2), ("u2", 3), ("u3", 5), ("u5", 7), ("u7", 11), ("u8", 12)]
    assert rows(bad, "row", "reason") == [(6, "malformed"), (10, "bad_timestamp")]


@pytest.mark.parametrize("header, timestamp", [("user_id,item_id", None), ("user_id,item_id,timestamp", "timestamp")])
def test_a_repeated_header_line_is_quarantined_as_a_header(tmp_path, header, timestamp):
    extra = ",1" if timestamp else ""
    path = write(tmp_path / "log.csv", f"{header}\nu1,a{extra}\n{header}\nu2,b{extra}\n")
    events, bad = read_file(LOCAL, path, "csv", ColumnMap(timestamp=timestamp))
    assert rows(events, "user", "row") == [("u1", 2), ("u2", 4)]
    assert rows(bad, "row", "column", "reason") == [(3, "", "header")]


def test_format_detection_passes_over_empty_files(tmp_path):
    (tmp_path / "a.csv").write_text("user_id,item_id\nu,i\n")
    (tmp_path / "b.dat").write_text("")
    files = list_input(LOCAL, str(tmp_path))
    assert resolve_format(LOCAL, files, "auto") == "csv"
    with pytest.raises(UserError, match="no data to tell it by"):
        resolve_format(LOCAL, files[1:], "auto")


def test_byte_ranges_only_for_uncompressed_line_formats(tmp_path):
    path = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user_id": ["u"], "item_id": ["i"], "timestamp": [1]}), path)
    with pytest.raises(ValueError, match="byte_range applies to uncompressed"):
        list(iter_file(LOCAL, str(path), 0, "parquet", ColumnMap(), byte_range=ByteRange(0, 0, 10)))
    assert splittable_text("s3://b/log.csv", "csv") and not splittable_text("s3://b/log.csv.gz", "csv")
