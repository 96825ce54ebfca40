"""`flm submit` / `flm jobs`: the submission we build, and a real job on a local two-node Ray cluster."""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

import pytest
from local_cluster import started_cluster

from flm_dist.cli.submit import add_commands, build_submission
from flm_dist.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="flm")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(list(argv))


def test_add_commands_registers_run_submit_jobs():
    from flm_dist.cli.submit import cmd_jobs, cmd_run, cmd_submit

    assert _parse("run", "jobs/demo.yaml", "pretrain.train.epochs=1").run is cmd_run
    args = _parse("submit", "jobs/demo.yaml", "--address", "http://h:8265", "--follow", "--pip", "x==1")
    assert args.run is cmd_submit and args.follow and args.pip == ["x==1"]
    for action in ("status", "logs", "stop"):
        assert _parse("jobs", action, "raysubmit_1", "--address", "http://h:8265").run is cmd_jobs
    assert _parse("jobs", "list").run is cmd_jobs


def test_submission_for_a_repo_job(monkeypatch):
    monkeypatch.chdir(REPO)
    submission = build_submission("jobs/demo.yaml", ["pretrain.train.epochs=1", "pretrain.output=runs/a b"])
    assert submission["entrypoint"] == "flm run jobs/demo.yaml pretrain.train.epochs=1 'pretrain.output=runs/a b'"
    runtime_env = submission["runtime_env"]
    assert runtime_env["working_dir"] == str(REPO)
    for pattern in ("/runs/", "/.data/", ".git/"):
        assert pattern in runtime_env["excludes"]
    assert "pip" not in runtime_env
    assert submission["submission_id"].startswith("flm-demo-")
    assert submission["metadata"] == {"flm_job": "demo", "job_file": "jobs/demo.yaml"}
    assert not any("TOKEN" in key for key in runtime_env["env_vars"])


def test_submission_pip_env_and_remote_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "jobs").mkdir()
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\ndependencies = ["numpy>=1", "pyyaml"]\n')
    (tmp_path / "requirements.txt").write_text("# pinned\ntqdm==4.66.0  # progress\n\n")
    (tmp_path / "jobs" / "j.yaml").write_text(
        "steps:\n  - synth: {output: .data/s}\n"
        "runtime: {pip: [requests], env: {A: '1'}, excludes: [big/], entrypoint_num_cpus: 0.5}\n")
    submission = build_submission("jobs/j.yaml")
    assert submission["runtime_env"]["pip"] == ["requests"]
    assert submission["runtime_env"]["env_vars"]["A"] == "1"
    assert "big/" in submission["runtime_env"]["excludes"]
    assert submission["entrypoint_num_cpus"] == 0.5
    submission = build_submission("jobs/j.yaml", pip=["project", "requirements.txt"], env={"B": "2"},
                                  remote_cwd="/opt/flm/project", entrypoint_command="python -m flm_dist.cli")
    assert submission["runtime_env"]["pip"] == ["numpy>=1", "pyyaml", "tqdm==4.66.0"]
    assert submission["runtime_env"]["env_vars"]["B"] == "2"
    assert submission["entrypoint"] == ('FLM_JOB_DIR="$PWD" && cd /opt/flm/project && '
                                        'python -m flm_dist.cli run "$FLM_JOB_DIR"/jobs/j.yaml')
    assert build_submission("jobs/j.yaml", pip=[])["runtime_env"].get("pip") is None


def test_submission_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "j.yaml").write_text("steps:\n  - synth: {output: .data/s}\n")
    outside = tmp_path / "project"
    outside.mkdir()
    with pytest.raises(UserError, match="outside the working directory"):
        build_submission(str(tmp_path / "j.yaml"), working_dir=str(outside))
    with pytest.raises(UserError, match="looks like a credential"):
        build_submission("j.yaml", env={"RAY_AUTH_TOKEN": "abc"})
    with pytest.raises(UserError, match="must start with a step name"):
        build_submission("j.yaml", ["synth_users=3"])
    with pytest.raises(UserError, match="unknown key"):
        build_submission("j.yaml", ["synth.userz=3"])


def test_submit_dry_run_prints_the_submission(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    args = _parse("submit", "jobs/demo.yaml", "--dry-run", "--submission-id", "flm-test-1")
    args.run(args)
    printed = json.loads(capsys.readouterr().out)
    assert printed["submission_id"] == "flm-test-1" and printed["entrypoint"] == "flm run jobs/demo.yaml"


def test_unreachable_cluster_is_a_user_error():
    args = _parse("jobs", "list", "--address", "http://127.0.0.1:1")
    with pytest.raises(UserError, match="cannot reach the Ray Jobs API"):
        args.run(args)


def test_no_address_is_a_user_error(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    args = _parse("jobs", "status", "raysubmit_1")
    with pytest.raises(UserError, match="no cluster address"):
        args.run(args)


# ---------------------------------------------------------------------------------------------
# A job through the Jobs API on a local two-node cluster (head + one more node, both on loopback)
# ---------------------------------------------------------------------------------------------

TINY_JOB = """\
name: tiny-cluster
steps:
  - synth: {output: .data/tiny/log, users: 60, items: 40, interactions: 900, clusters: 4, seed: 1}
  - prepare: {input: .data/tiny/log, format: parquet, output: .data/tiny/prepared, num_negatives: 10,
              buckets: 1, workers: 1}
  - pretrain:
      data: .data/tiny/prepared
      output: runs/tiny
      model: {hidden: 16, layers: 1, heads: 1, max_len: 10, flow_layers: 1, flow_hidden: 16}
      train: {epochs: 2, batch_size: 64, warmup_steps: 1}
      eval: {ks: [5, 10]}
      scaling: {max_failures: 0}
"""


@pytest.fixture
def local_cluster():
    cluster = started_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.slow
def test_local_two_node_cluster_runs_a_submitted_job(tmp_path, local_cluster, capsys, monkeypatch):
    from ray.job_submission import JobSubmissionClient

    from flm_dist.cli.submit import wait

    started = time.monotonic()
    project = tmp_path / "project"
    (project / "jobs").mkdir(parents=True)
    (project / "jobs" / "tiny.yaml").write_text(TINY_JOB)
    overrides = ["pretrain.train.epochs=1", "pretrain.scaling.workers=1", "pretrain.scaling.cpus_per_worker=0.5"]
    command = "flm"
    submission = build_submission(str(project / "jobs" / "tiny.yaml"), overrides, working_dir=str(project), pip=[],
                                  entrypoint_command=command)
    assert submission["entrypoint"] == f"{command} run jobs/tiny.yaml " + " ".join(shlex.quote(o) for o in overrides)
    assert local_cluster.alive_nodes() == 2

    client = JobSubmissionClient(local_cluster.address)
    job_id = client.submit_job(**submission)
    # ~90 s on an idle 2-core machine; the bound leaves room for a machine shared with other work.
    status = wait(client, job_id, timeout_s=max(60.0, 240.0 - (time.monotonic() - started)), poll_s=2.0)
    logs = client.get_job_logs(job_id)
    assert status == "SUCCEEDED", f"job {status} after {time.monotonic() - started:.0f} s:\n{logs[:2000]}\n...\n{logs[-4000:]}"
    assert "step pretrain (pretrain) done" in logs
    assert "test" in logs and "ndcg@10" in logs
    capsys.readouterr()

    # flm jobs status / logs --follow / stop against the same cluster
    address = ["--address", local_cluster.address]
    for argv in (["jobs", "status", job_id], ["jobs", "logs", job_id, "--follow"], ["jobs", "stop", job_id]):
        args = _parse(*argv, *address)
        args.run(args)
    out = capsys.readouterr().out
    assert f"{job_id}\tSUCCEEDED" in out and "step prepare (prepare) done" in out
    assert f"job {job_id} SUCCEEDED" in out and "already finished" in out
    with pytest.raises(UserError, match="no job 'flm-missing'"):
        args = _parse("jobs", "status", "flm-missing", *address)
        args.run(args)

    # flm submit --follow exits non-zero when the job fails (here: its input does not exist)
    (project / "jobs" / "broken.yaml").write_text(
        "steps:\n  - prepare: {input: .data/missing, format: parquet, output: .data/out}\n")
    monkeypatch.chdir(project)
    args = _parse("submit", "jobs/broken.yaml", *address, "--follow", "--entrypoint-command", command)
    with pytest.raises(SystemExit) as info:
        args.run(args)
    assert info.value.code == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.err and ".data/missing" in captured.out


# ---------------------------------------------------------------------------------------------
# Secrets stay out of submissions, messages and logs (issue 37, case 9)
# ---------------------------------------------------------------------------------------------

AWS_KEY = "AKIA" + "IOSFODNN7EXAMPLE"  # AWS's documented example id, split so no scanner flags this file
GITHUB_TOKEN = "ghp_" + "a1B2" * 9


@pytest.fixture
def synth_job(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "j.yaml").write_text("steps:\n  - synth: {output: .data/s}\n")
    return "j.yaml"


@pytest.mark.parametrize("value", ["postgres://u:hunter2@db/x", AWS_KEY, GITHUB_TOKEN, "sk-" + "x" * 30,
                                   "xoxb-" + "1" * 12])
def test_env_values_that_look_like_credentials_are_refused_without_echoing_them(synth_job, value):
    with pytest.raises(UserError, match="environment variable DATABASE_URL looks like a credential .*secret store") as info:
        build_submission(synth_job, env={"DATABASE_URL": value})
    assert value not in str(info.value) and "hunter2" not in str(info.value) and "\n" not in str(info.value)


def test_credentials_in_overrides_and_job_runtime_env_are_refused(synth_job, tmp_path):
    with pytest.raises(UserError, match=r"override synth.output=\.\.\. looks like a credential \(a URL with a password\)"):
        build_submission(synth_job, ["synth.output=s3://admin:hunter2@minio/x"])
    (tmp_path / "k.yaml").write_text(f"steps:\n  - synth: {{output: .data/s}}\nruntime: {{env: {{KEY: {AWS_KEY}}}}}\n")
    with pytest.raises(UserError, match="environment variable KEY looks like a credential"):
        build_submission("k.yaml")
    assert build_submission(synth_job, ["synth.output=s3://bucket/x"], env={"URL": "http://host:8265"})


def test_a_job_file_holding_a_credential_is_uploaded_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "j.yaml").write_text("steps:\n  - prepare: {input: 's3://u:hunter2@minio/log', output: .data/p}\n")
    build_submission("j.yaml")
    assert "job file j.yaml holds a value that looks like a credential (a URL with a password)" in caplog.text
    assert "hunter2" not in caplog.text


def test_default_excludes_keep_dotenv_files_and_keys_out_of_the_upload(synth_job):
    excludes = build_submission(synth_job)["runtime_env"]["excludes"]
    assert {".env", "*.pem", "*.key"} <= set(excludes)


def test_scrub_hides_passwords_and_key_prefixes():
    from flm_dist.cli.submit import scrub

    text = f"at http://admin:hunter2@host:8265 with {AWS_KEY} and {GITHUB_TOKEN}; s3://bucket/x stays"
    assert scrub(text) == "at http://admin:***@host:8265 with *** and ***; s3://bucket/x stays"


def test_an_address_that_is_not_one_exits_2_with_one_line(synth_job, capsys):
    from flm_dist.cli.main import main

    assert main(["submit", synth_job, "--address", "garbage"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: 'garbage' is not a Ray Jobs API address")


def test_an_unreachable_address_with_a_password_is_not_echoed(synth_job, capsys):
    from flm_dist.cli.main import main

    assert main(["submit", synth_job, "--address", "http://admin:hunter2@127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "cannot reach the Ray Jobs API at http://admin:***@127.0.0.1:1" in err and "hunter2" not in err


def test_job_logs_and_messages_are_scrubbed(capsys):
    import io
    from types import SimpleNamespace

    from flm_dist.cli.submit import _finish, follow

    class FakeClient:
        async def tail_job_logs(self, job_id):
            yield f"connecting to postgres://u:hunter2@db/x with {AWS_KEY}\n"

        def get_job_status(self, job_id):
            return "FAILED"

        def get_job_info(self, job_id):
            return SimpleNamespace(message="failed at http://admin:hunter2@host")

    out = io.StringIO()
    assert follow(FakeClient(), "flm-1", out=out, poll_s=0) == "FAILED"
    assert out.getvalue() == "connecting to postgres://u:***@db/x with ***\n"
    with pytest.raises(SystemExit):
        _finish(FakeClient(), "flm-1", "FAILED")
    assert capsys.readouterr().err == "job flm-1 FAILED: failed at http://admin:***@host\n"
