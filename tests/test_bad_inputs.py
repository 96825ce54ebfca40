"""No user mistake ends in a traceback: every command, run in-process through
`flm_dist.cli.main.main` on a corpus of bad inputs (issue 37's cases and generated ones: empty
files, binary garbage, wrong format flags, missing columns, negative k, nonexistent paths), exits
with status 2 and prints one line, `error: ...`, naming the file, row or value and the reason.

Any other exception fails the test with its traceback. Nothing here starts Ray: prepare writes to
memory:// (then it runs in this process) or fails before its first stage, training and evaluation
run with --workers 0 or fail before they start, submit stops before contacting a cluster.
"""

import gzip
import json
import logging
import random
import uuid
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flm_dist.cli import main as cli_main
from flm_dist.data.prepare import PrepareConfig, run_prepare

ROWS = [(u, (u + i) % 7, i) for u in range(8) for i in range(7)]


def _csv(rows) -> str:
    return "user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows)


def _jsonl_with(user) -> str:
    lines = [json.dumps({"user_id": u, "item_id": i, "timestamp": t}) for u, i, t in ROWS]
    return "\n".join(lines + [json.dumps({"user_id": user, "item_id": 1, "timestamp": 9})]) + "\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, str]:
    """Paths of the bad inputs (and of the good ones they are paired with), by name."""
    root = tmp_path_factory.mktemp("bad_inputs")
    noise = random.Random(37)
    garbage = bytes(noise.randrange(256) for _ in range(4096))
    files: dict[str, bytes | str] = {
        "log.csv": _csv(ROWS),
        "big70.jsonl": _jsonl_with(2**70), "big63.jsonl": _jsonl_with(2**63 + 5), "e20.jsonl": _jsonl_with(1e20),
        "truncated.jsonl.gz": gzip.compress(_jsonl_with(1).encode())[:-40],
        "empty.csv": b"",
        "garbage.csv": garbage, "garbage.gz": garbage, "garbage.parquet": garbage, "garbage.txt": garbage,
        "garbage.yaml": garbage,
        "nocolumns.csv": "a,b\n1,2\n",
        "afile": "not a directory",
        "badmanifest/manifest.json": "{not json",
        "ck_garbage/checkpoint.json": garbage,
        "ck_list/checkpoint.json": "[1, 2]",
        "job_unknown_stage.yaml": "name: x\nsteps:\n  - frobnicate: {a: 1}\n",
        "job_missing_input.yaml": f"name: x\nsteps:\n  - prepare: {{input: {root}/nowhere.csv, output: {root}/out}}\n",
    }
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    (root / "emptydir").mkdir()
    users = [float(u) for u, _, _ in ROWS]
    pq.write_table(pa.table({"user_id": users + [1e20], "item_id": [i for _, i, _ in ROWS] + [1],
                             "timestamp": [t for *_, t in ROWS] + [9]}), root / "e20.parquet")
    # Prepared data on local disk, prepared in this process (memory:// output), copied out.
    prepared = f"/bad-inputs-{uuid.uuid4().hex[:8]}"
    run_prepare(PrepareConfig(input=str(root / "log.csv"), output=f"memory://{prepared}", num_negatives=3,
                              min_user_interactions=0, min_item_interactions=0))
    memory = fsspec.filesystem("memory")
    memory.get(prepared, str(root / "data"), recursive=True)
    memory.rm(prepared, recursive=True)
    paths = {name.split("/")[0].replace(".", "_"): str(root / name.split("/")[0]) for name in files}
    return {**paths, "root": str(root), "data": str(root / "data"), "emptydir": str(root / "emptydir"),
            "e20_parquet": str(root / "e20.parquet"), "mem": f"memory://bad-inputs-out-{uuid.uuid4().hex[:8]}"}


SMALL = ["--workers", "0", "train.epochs=1", "model.hidden=8", "model.layers=1", "model.max_len=8"]
NO_KCORE = ["min_user_interactions=0", "min_item_interactions=0"]

# (id, argv with {corpus} names, what the line must contain)
CASES = [
    # prepare: ids beyond what a number type holds exactly (with --strict the first such row stops the run)
    ("prepare-id-2**70-jsonl", ["prepare", "--input", "{big70_jsonl}", "--output", "{mem}/a", "--strict", *NO_KCORE],
     "big70.jsonl, row 57, column 'user_id': bad_id"),
    ("prepare-id-2**63+5-jsonl", ["prepare", "--input", "{big63_jsonl}", "--output", "{mem}/b", "--strict", *NO_KCORE],
     "big63.jsonl, row 57, column 'user_id': bad_id"),
    ("prepare-id-1e20-jsonl", ["prepare", "--input", "{e20_jsonl}", "--output", "{mem}/c", "--strict", *NO_KCORE],
     "e20.jsonl, row 57, column 'user_id': bad_id"),
    ("prepare-id-1e20-parquet", ["prepare", "--input", "{e20_parquet}", "--output", "{mem}/d", "--strict", *NO_KCORE],
     "e20.parquet, row 57, column 'user_id': bad_id"),
    # prepare: unreadable files
    ("prepare-truncated-gz", ["prepare", "--input", "{truncated_jsonl_gz}", "--output", "{mem}/e"],
     "truncated.jsonl.gz: its compressed data ends early"),
    ("prepare-truncated-gz-strict", ["prepare", "--input", "{truncated_jsonl_gz}", "--output", "{mem}/f", "--strict"],
     "truncated.jsonl.gz: its compressed data ends early"),
    ("prepare-garbage-gz", ["prepare", "--input", "{garbage_gz}", "--output", "{mem}/g", "--format", "csv"],
     "cannot read {garbage_gz}"),
    ("prepare-garbage-csv", ["prepare", "--input", "{garbage_csv}", "--output", "{mem}/h"],
     "garbage.csv: the header line is not utf-8 text"),
    ("prepare-garbage-parquet", ["prepare", "--input", "{garbage_parquet}", "--output", "{mem}/i"],
     "garbage.parquet: not a readable Parquet file"),
    ("prepare-garbage-seq-txt", ["prepare", "--input", "{garbage_txt}", "--output", "{mem}/j", "--format", "seq-txt"],
     "no usable interactions in {garbage_txt}"),
    ("prepare-empty-file", ["prepare", "--input", "{empty_csv}", "--output", "{mem}/k"],
     "cannot detect the format of {empty_csv}"),
    ("prepare-wrong-format-parquet", ["prepare", "--input", "{log_csv}", "--output", "{mem}/l", "--format", "parquet"],
     "log.csv: not a readable Parquet file"),
    ("prepare-wrong-format-csv", ["prepare", "--input", "{e20_parquet}", "--output", "{mem}/m", "--format", "csv"],
     "e20.parquet: the header line is not utf-8 text"),
    ("prepare-missing-column", ["prepare", "--input", "{nocolumns_csv}", "--output", "{mem}/n"],
     "column 'user_id' not found"),
    ("prepare-unknown-format", ["prepare", "--input", "{log_csv}", "--output", "{mem}/o", "--format", "xls"],
     "config key 'format'"),
    ("prepare-bad-encoding-option", ["prepare", "--input", "{log_csv}", "--output", "{mem}/p", "encoding=utf-16"],
     "config key 'encoding'"),
    ("prepare-nonexistent-input", ["prepare", "--input", "{root}/nowhere.csv", "--output", "{mem}/q"],
     "input not found: {root}/nowhere.csv"),
    # prepare: outputs it cannot write, or that would take the place of its input
    ("prepare-output-is-a-file", ["prepare", "--input", "{log_csv}", "--output", "{afile}"],
     "output {afile} is an existing file"),
    ("prepare-output-is-the-input", ["prepare", "--input", "{log_csv}", "--output", "{log_csv}"],
     "output {log_csv} is the input {log_csv} itself"),
    ("prepare-output-under-a-file", ["prepare", "--input", "{log_csv}", "--output", "{afile}/out"],
     "cannot be created: {afile} is a file"),
    ("prepare-output-unwritable", ["prepare", "--input", "{log_csv}", "--output", "/proc/flm-no-such/out"],
     "output /proc/flm-no-such/out cannot be created in /proc"),
    ("prepare-output-inside-input", ["prepare", "--input", "{root}", "--output", "{root}/prepared"],
     "output {root}/prepared is inside the input {root}"),
    ("prepare-input-inside-output", ["prepare", "--input", "{log_csv}", "--output", "{root}"],
     "input {log_csv} is inside the output {root}"),
    # pretrain
    ("pretrain-output-is-a-file", ["pretrain", "--data", "{data}", "--output", "{afile}", *SMALL],
     "output {afile} is an existing file"),
    ("pretrain-output-is-the-data", ["pretrain", "--data", "{data}", "--output", "{data}", *SMALL],
     "output {data} is the input {data} itself"),
    ("pretrain-output-inside-the-data", ["pretrain", "--data", "{data}", "--output", "{data}/run", *SMALL],
     "output {data}/run is inside the input {data}"),
    ("pretrain-output-under-a-file", ["pretrain", "--data", "{data}", "--output", "{afile}/run", *SMALL],
     "cannot be created: {afile} is a file"),
    ("pretrain-output-unwritable", ["pretrain", "--data", "{data}", "--output", "/proc/flm-no-such/run", *SMALL],
     "cannot be created in /proc"),
    ("pretrain-nonexistent-data", ["pretrain", "--data", "{root}/nowhere", "--output", "{root}/r1", *SMALL],
     "{root}/nowhere is not prepared data"),
    ("pretrain-data-is-a-log", ["pretrain", "--data", "{log_csv}", "--output", "{root}/r2", *SMALL],
     "{log_csv} is not prepared data"),
    ("pretrain-broken-manifest", ["pretrain", "--data", "{badmanifest}", "--output", "{root}/r3", *SMALL],
     "{badmanifest}/manifest.json is not a manifest of `flm prepare`"),
    ("pretrain-negative-epochs", ["pretrain", "--data", "{data}", "--output", "{root}/r4", *SMALL, "train.epochs=-1"],
     "config key 'train.epochs'"),
    ("pretrain-garbage-config", ["pretrain", "--data", "{data}", "--output", "{root}/r5", "--config", "{garbage_yaml}"],
     "config file {garbage_yaml} is not UTF-8 text"),
    ("pretrain-nonexistent-config", ["pretrain", "--data", "{data}", "--output", "{root}/r6", "--config",
                                     "{root}/nowhere.yaml"], "config file not found: {root}/nowhere.yaml"),
    # finetune
    ("finetune-nonexistent-pretrained", ["finetune", "--pretrained", "{root}/nowhere", "--data", "{data}",
                                         "--output", "{root}/f1", "--workers", "0"], "{root}/nowhere is neither"),
    ("finetune-garbage-checkpoint", ["finetune", "--pretrained", "{ck_garbage}", "--data", "{data}",
                                     "--output", "{root}/f2", "--workers", "0"], "checkpoint.json is corrupted"),
    ("finetune-not-a-checkpoint", ["finetune", "--pretrained", "{ck_list}", "--data", "{data}",
                                   "--output", "{root}/f3", "--workers", "0"], "checkpoint format a JSON list"),
    # evaluate
    ("evaluate-nonexistent-checkpoint", ["evaluate", "--checkpoint", "{root}/nowhere", "--data", "{data}"],
     "checkpoint not found: {root}/nowhere"),
    ("evaluate-empty-checkpoint", ["evaluate", "--checkpoint", "{emptydir}", "--data", "{data}"],
     "{emptydir} is not a complete checkpoint"),
    ("evaluate-garbage-checkpoint", ["evaluate", "--checkpoint", "{ck_garbage}", "--data", "{data}"],
     "checkpoint.json is corrupted"),
    ("evaluate-not-a-checkpoint", ["evaluate", "--checkpoint", "{ck_list}", "--data", "{data}"],
     "checkpoint format a JSON list"),
    # export
    ("export-negative-k", ["export", "--checkpoint", "{ck_list}", "--data", "{data}", "--output", "{root}/e1",
                           "--k", "-1"], "config key 'k'"),
    ("export-unknown-split", ["export", "--checkpoint", "{ck_list}", "--data", "{data}", "--output", "{root}/e2",
                              "--split", "train"], "config key 'split'"),
    ("export-nonexistent-checkpoint", ["export", "--checkpoint", "{root}/nowhere", "--data", "{data}",
                                       "--output", "{root}/e3"], "{root}/nowhere is not a complete checkpoint"),
    # run
    ("run-nonexistent-job", ["run", "{root}/nowhere.yaml", "--dry-run"], "job file not found"),
    ("run-garbage-job", ["run", "{garbage_yaml}", "--dry-run"], "{garbage_yaml} is not UTF-8 text"),
    ("run-csv-as-job", ["run", "{log_csv}", "--dry-run"], "must hold a mapping"),
    ("run-unknown-stage", ["run", "{job_unknown_stage_yaml}", "--dry-run"], "frobnicate"),
    ("run-failing-step", ["run", "{job_missing_input_yaml}"], "input not found: {root}/nowhere.csv"),
    # submit
    ("submit-nonexistent-job", ["submit", "{root}/nowhere.yaml", "--dry-run"], "job file not found"),
    ("submit-garbage-job", ["submit", "{garbage_yaml}", "--dry-run"], "{garbage_yaml} is not UTF-8 text"),
    ("submit-nonexistent-working-dir", ["submit", "jobs/demo.yaml", "--dry-run", "--working-dir", "{root}/nowhere"],
     "working directory not found"),
    ("submit-garbage-address", ["submit", "jobs/demo.yaml", "--address", "garbage"],
     "'garbage' is not a Ray Jobs API address"),
]


def _quiet_logging(verbose: bool = False) -> None:
    """The CLI's own log lines go to stderr too; off here, so stderr holds what the user is told."""
    logger = logging.getLogger("flm_dist")
    logger.handlers[:] = [logging.NullHandler()]
    logger.propagate = False


@pytest.mark.parametrize("argv, expected", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_a_bad_input_is_one_line_naming_it_and_exit_status_2(argv, expected, corpus, capsys, monkeypatch):
    monkeypatch.setattr(cli_main, "setup_logging", _quiet_logging)
    monkeypatch.setenv("FLM_OUTPUT_ROOTS", corpus["root"])  # job outputs under tmp_path, to reach the step
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # submit reads jobs/demo.yaml
    status = cli_main.main([part.format(**corpus) for part in argv])
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert expected.format(**corpus) in err, err
