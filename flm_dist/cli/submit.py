"""`flm run`, `flm submit` and `flm jobs`: run a job file here, or on a Ray cluster via the Jobs API.

`flm submit jobs/x.yaml --address http://HEAD:8265` uploads the working directory (without runs/,
.data/, .git/ and other outputs) as the job's `working_dir` and starts `flm run jobs/x.yaml ...`
on the cluster; the same can be done by hand with

    ray job submit --address http://HEAD:8265 --working-dir . -- flm run jobs/x.yaml

Authentication: the Jobs client reads RAY_AUTH_MODE and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH,
or ~/.ray/auth_token) from this process's environment and sends the token as a header. The token
is never copied into the job's runtime environment, its metadata or any file.

Other secrets stay out too: a job's runtime environment and entrypoint are stored by the cluster
and shown to anyone who can list its jobs, so `--env` values, `runtime.env` values and overrides
that look like credentials (a URL's user:password, the prefixes of common keys and tokens, see
`CREDENTIALS`) are refused, and such values are scrubbed from every message and log line this
module prints (`scrub`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import secrets
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from flm_dist.cli.jobs import SECRET_NAME, RuntimeSpec, describe, load_job, run_job
from flm_dist.errors import UserError
from flm_dist.eval.tables import final_metrics_table

log = logging.getLogger("flm_dist")

DEFAULT_EXCLUDES = ["/runs/", "/.data/", "/.bench/", "/out/", ".git/", "__pycache__/", "*.pyc", "*.egg-info/",
                    ".pytest_cache/", ".hypothesis/", ".venv/", ".ruff_cache/", ".mypy_cache/",
                    # Secrets that live beside code: dotenv files, keys and certificates.
                    ".env", ".env.*", "*.pem", "*.key"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")

CREDENTIALS = {
    # scheme://user:password@host: the password is the secret (up to the authority's last @).
    "a URL with a password": re.compile(r"(?<=://)([^/\s:@]*:)[^/\s]+(?=@)"),
    "an AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "a GitHub token": re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})"),
    "a GitLab token": re.compile(r"\bglpat-[A-Za-z0-9_-]{20,}"),
    "an API secret key (sk-...)": re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"),
    "a Slack token": re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
    "a Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{30,}"),
    "a Google API key": re.compile(r"\bAIza[0-9A-Za-z_-]{35}"),
    "a private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
}
"""What a value that looks like a credential matches, by what it is called in an error."""


def credential_kind(text: str) -> str | None:
    """What kind of credential `text` seems to hold (see `CREDENTIALS`), or None."""
    return next((kind for kind, pattern in CREDENTIALS.items() if pattern.search(text)), None)


def scrub(text: str) -> str:
    """`text` with every credential-looking value replaced by *** (a URL keeps its user name)."""
    for pattern in CREDENTIALS.values():
        text = pattern.sub(r"\1***" if pattern.groups else "***", text)
    return text


def _refuse_credentials(env: dict[str, str], overrides: list[str] | tuple[str, ...]) -> None:
    """Refuse environment variables and overrides that would put a credential into what the
    cluster stores and shows about the job (its runtime environment and its entrypoint)."""
    where = ("keep it in the cluster's secret store, or have the cluster set it in the job's "
             "environment (its own runtime_env or the nodes' environment)")
    for name, value in env.items():
        kind = "its name" if SECRET_NAME.search(name) else credential_kind(value)
        if kind:
            raise UserError(f"environment variable {name} looks like a credential ({kind}); it would be "
                            f"stored in the job's runtime environment, visible to anyone who can list "
                            f"the cluster's jobs; {where}, not in --env or runtime.env")
    for override in overrides:
        kind = credential_kind(override)
        if kind:
            raise UserError(f"override {override.partition('=')[0]}=... looks like a credential ({kind}); it "
                            f"would be stored in the job's entrypoint, visible to anyone who can list the "
                            f"cluster's jobs; {where}, and read it from there")


# ---------------------------------------------------------------------------------------------
# flm run
# ---------------------------------------------------------------------------------------------


def _summary_line(stage: str, result: Any) -> str:
    if not isinstance(result, dict):
        return ""
    if stage == "pretrain" and isinstance(result.get("final"), dict):
        return "\n" + final_metrics_table(result["final"])
    if stage == "evaluate":
        return "\n" + final_metrics_table(result)
    parts = [f"{key}={result[key]}" for key in ("rows", "users", "items", "interactions") if key in result]
    return " ".join(parts)


def cmd_run(args: argparse.Namespace) -> None:
    spec = load_job(args.job, args.overrides)
    only = [s for s in (args.steps or "").split(",") if s]
    if args.dry_run:
        for name in only:
            spec.step(name)
        print(json.dumps(describe(spec), indent=2))
        return
    for summary in run_job(spec, only or None):
        print(f"step {summary['step']} ({summary['stage']}) done in {summary['seconds']:.1f} s "
              f"{_summary_line(summary['stage'], summary['result'])}".rstrip())


# ---------------------------------------------------------------------------------------------
# Building a submission
# ---------------------------------------------------------------------------------------------


def project_requirements(project_dir: str | os.PathLike) -> list[str]:
    """The [project].dependencies of `project_dir/pyproject.toml` (for `--pip project`)."""
    import tomllib

    pyproject = Path(project_dir) / "pyproject.toml"
    if not pyproject.is_file():
        raise UserError(f"--pip project: no pyproject.toml in {project_dir}")
    return list(tomllib.loads(pyproject.read_text()).get("project", {}).get("dependencies", []))


def _submission_id(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:40] or "job"
    return f"flm-{slug}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def build_submission(job: str, overrides: list[str] | tuple[str, ...] = (), *, pip: list[str] | None = None,
                     working_dir: str | None = None, env: dict[str, str] | None = None,
                     excludes: list[str] | tuple[str, ...] = (), entrypoint_command: str = "flm",
                     submission_id: str | None = None, remote_cwd: str | None = None) -> dict[str, Any]:
    """Keyword arguments for `JobSubmissionClient.submit_job` that run `job` on a cluster.

    The job is validated here first (schema and overrides; output paths are checked where the
    job runs, against that machine's working directory and $FLM_OUTPUT_ROOTS).
    pip: `--pip` values (a package, a requirements file, or `project` for pyproject's
    dependencies); None falls back to the job's `runtime.pip`; empty means no pip environment.
    remote_cwd: a directory on the cluster nodes to run in (default: the job's `runtime.remote_cwd`,
    else the uploaded working directory). The uploaded code and job file are still used, but
    relative paths then resolve there, e.g. /opt/flm/project of cluster/Dockerfile, whose .data/
    and runs/ live on a shared volume.
    """
    spec = load_job(job, overrides, resolve_paths=False)
    runtime: RuntimeSpec = spec.runtime
    root = Path(working_dir or runtime.working_dir).resolve()
    if not root.is_dir():
        raise UserError(f"working directory not found: {root}")
    job_path = Path(job).resolve()
    try:
        relative_job = job_path.relative_to(root).as_posix()
    except ValueError:
        raise UserError(f"job file {job} is outside the working directory {root}, so it would not be "
                        f"uploaded; run from the project root or pass --working-dir") from None
    packages: list[str] = []
    for item in (pip if pip is not None else runtime.pip):
        if item == "project":
            packages.extend(project_requirements(root))
        elif item.endswith(".txt") and (root / item).is_file():
            packages.extend(line.split("#", 1)[0].strip() for line in (root / item).read_text().splitlines()
                            if line.split("#", 1)[0].strip())
        else:
            packages.append(item)
    env_vars = {**runtime.env, **(env or {})}
    _refuse_credentials(env_vars, overrides)
    kind = credential_kind(job_path.read_text(errors="replace"))
    if kind:
        log.warning("job file %s holds a value that looks like a credential (%s); it is uploaded with the "
                    "working directory and kept by the cluster", relative_job, kind)
    env_vars.setdefault("RAY_DEDUP_LOGS", "0")
    env_vars.setdefault("TQDM_DISABLE", "1")
    runtime_env: dict[str, Any] = {"working_dir": str(root),
                                   "excludes": DEFAULT_EXCLUDES + list(runtime.excludes) + list(excludes),
                                   "env_vars": env_vars}
    if packages:
        runtime_env["pip"] = packages
    remote_cwd = remote_cwd or runtime.remote_cwd
    job_arg = shlex.quote(relative_job)
    prefix = ""
    if remote_cwd:
        # The driver starts in the unpacked working_dir (also on PYTHONPATH, so its code is used).
        prefix = f'FLM_JOB_DIR="$PWD" && cd {shlex.quote(remote_cwd)} && '
        job_arg = f'"$FLM_JOB_DIR"/{job_arg}'
    entrypoint = prefix + " ".join([entrypoint_command, "run", job_arg, *(shlex.quote(o) for o in overrides)])
    submission: dict[str, Any] = {
        "entrypoint": entrypoint, "runtime_env": runtime_env,
        "submission_id": submission_id or _submission_id(spec.name),
        "metadata": {"flm_job": spec.name, "job_file": relative_job},
    }
    if runtime.entrypoint_num_cpus is not None:
        submission["entrypoint_num_cpus"] = runtime.entrypoint_num_cpus
    if runtime.entrypoint_num_gpus is not None:
        submission["entrypoint_num_gpus"] = runtime.entrypoint_num_gpus
    return submission


# ---------------------------------------------------------------------------------------------
# Talking to the cluster
# ---------------------------------------------------------------------------------------------


def client(address: str | None):
    """A JobSubmissionClient for `address` (default $RAY_ADDRESS); the token comes from the env."""
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UserError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    try:
        return JobSubmissionClient(address)
    except ValueError as exc:  # not an address at all
        raise UserError(f"{scrub(address)!r} is not a Ray Jobs API address ({scrub(str(exc))}); "
                        f"expected http://HEAD:8265") from None
    except (ConnectionError, RuntimeError) as exc:
        raise UserError(_unreachable(address, exc)) from None


def _unreachable(address: str, exc: Exception) -> str:
    """The one-line message of a Jobs API that could not be reached or refused us, scrubbed."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    hint = ""
    if "401" in str(exc) or "403" in str(exc) or "uthenticat" in str(exc):
        hint = " (set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN, or put the token in ~/.ray/auth_token)"
    return scrub(f"cannot reach the Ray Jobs API at {address}: {message}{hint}")


def follow(job_client, job_id: str, out=None, poll_s: float = 1.0) -> str:
    """Stream the job's logs to `out` until it ends; returns its final status name."""
    out = out or sys.stdout

    async def tail() -> None:
        async for chunk in job_client.tail_job_logs(job_id):
            out.write(scrub(chunk))
            out.flush()

    try:
        asyncio.run(tail())
    except RuntimeError as exc:  # connection dropped: fall back to polling
        print(scrub(f"(log stream ended: {exc}; waiting for the job)"), file=sys.stderr)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running (flm jobs stop {job_id} to end it)",
              file=sys.stderr)
        raise
    return wait(job_client, job_id, poll_s=poll_s)


def _status(status) -> str:
    return str(getattr(status, "value", status))


def wait(job_client, job_id: str, timeout_s: float | None = None, poll_s: float = 1.0) -> str:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED (or `timeout_s` passes); returns the status."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = _status(job_client.get_job_status(job_id))
        if status in TERMINAL or (deadline is not None and time.monotonic() > deadline):
            return status
        time.sleep(poll_s)


def _finish(job_client, job_id: str, status: str) -> None:
    if status == "SUCCEEDED":
        print(f"job {job_id} SUCCEEDED")
        return
    message = ""
    try:
        message = job_client.get_job_info(job_id).message or ""
    except Exception:  # noqa: BLE001 - the status is what matters
        pass
    print(scrub(f"job {job_id} {status}" + (f": {message}" if message else "")), file=sys.stderr)
    raise SystemExit(1)


def cmd_submit(args: argparse.Namespace) -> None:
    env = {}
    for item in args.env or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--env {item!r} is not KEY=VALUE")
        env[key] = value
    submission = build_submission(args.job, args.overrides, pip=args.pip, working_dir=args.working_dir,
                                  env=env, excludes=args.exclude or [], entrypoint_command=args.entrypoint_command,
                                  submission_id=args.submission_id, remote_cwd=args.remote_cwd)
    if args.dry_run:
        print(json.dumps(submission, indent=2))
        return
    job_client = client(args.address)
    try:
        job_id = job_client.submit_job(**submission)
    except (ConnectionError, RuntimeError) as exc:
        raise UserError(_unreachable(args.address or os.environ["RAY_ADDRESS"], exc)) from None
    print(job_id)
    if args.follow:
        _finish(job_client, job_id, follow(job_client, job_id))


def cmd_jobs(args: argparse.Namespace) -> None:
    job_client = client(args.address)
    try:
        if args.action == "list":
            for info in job_client.list_jobs():
                print(scrub(f"{info.submission_id or info.job_id}\t{_status(info.status)}\t{info.entrypoint}"))
        elif args.action == "status":
            info = job_client.get_job_info(args.job_id)
            print(scrub(f"{args.job_id}\t{_status(info.status)}" + (f"\t{info.message}" if info.message else "")))
        elif args.action == "logs":
            if args.follow:
                _finish(job_client, args.job_id, follow(job_client, args.job_id))
            else:
                print(scrub(job_client.get_job_logs(args.job_id)), end="")
        elif args.action == "stop":
            stopped = job_client.stop_job(args.job_id)
            print(f"{args.job_id}\t{'stop requested' if stopped else 'already finished'}")
    except RuntimeError as exc:
        if "does not exist" in str(exc) or "404" in str(exc):
            raise UserError(scrub(f"no job {args.job_id!r} on {args.address or os.environ.get('RAY_ADDRESS')}")) from None
        raise


# ---------------------------------------------------------------------------------------------
# CLI wiring: cli.build_parser() calls add_commands(commands)
# ---------------------------------------------------------------------------------------------


def add_commands(subparsers) -> None:
    """Register `run`, `submit` and `jobs` on the `flm` sub-command parser."""
    run = subparsers.add_parser("run", help="run a job file (jobs/*.yaml) here, step by step")
    run.add_argument("job", help="job file, e.g. jobs/demo.yaml")
    run.add_argument("overrides", nargs="*", metavar="step.key=value",
                     help="overrides addressed by step name, e.g. pretrain.train.epochs=3")
    run.add_argument("--steps", help="comma-separated step names to run (default: all, in order)")
    run.add_argument("--dry-run", action="store_true", help="validate and print the resolved steps")
    run.set_defaults(run=cmd_run)

    sub = subparsers.add_parser("submit", help="run a job file on a Ray cluster (Jobs API)")
    sub.add_argument("job", help="job file inside the working directory, e.g. jobs/beauty_pretrain.yaml")
    sub.add_argument("overrides", nargs="*", metavar="step.key=value", help="passed on to `flm run`")
    sub.add_argument("--address", help="Jobs API address, e.g. http://127.0.0.1:8265 (default $RAY_ADDRESS)")
    sub.add_argument("--follow", action="store_true", help="stream logs; exit 1 unless the job succeeds")
    sub.add_argument("--pip", action="append",
                     help="package or requirements file for the job (repeatable; 'project' = pyproject "
                          "dependencies); default: the job's runtime.pip")
    sub.add_argument("--working-dir", help="directory to upload (default: the job's runtime.working_dir, '.')")
    sub.add_argument("--exclude", action="append", help="extra gitignore-style pattern not to upload")
    sub.add_argument("--env", action="append", metavar="KEY=VALUE", help="job environment variable (no secrets)")
    sub.add_argument("--remote-cwd", help="directory on the cluster to run in, e.g. /opt/flm/project "
                                           "(default: the uploaded working directory)")
    sub.add_argument("--submission-id", help="job id to use (default: flm-NAME-TIME-RANDOM)")
    sub.add_argument("--entrypoint-command", default="flm",
                     help="how the cluster runs flm (default 'flm'; e.g. 'python -m flm_dist.cli')")
    sub.add_argument("--dry-run", action="store_true", help="print the submission instead of sending it")
    sub.set_defaults(run=cmd_submit)

    jobs = subparsers.add_parser("jobs", help="status, logs, stop or list jobs on a Ray cluster")
    actions = jobs.add_subparsers(dest="action", required=True)
    for action, text in (("status", "a job's status"), ("logs", "a job's logs"), ("stop", "stop a job")):
        parser = actions.add_parser(action, help=text)
        parser.add_argument("job_id")
        parser.add_argument("--address", help="Jobs API address (default $RAY_ADDRESS)")
        if action == "logs":
            parser.add_argument("--follow", action="store_true", help="stream until the job ends")
        parser.set_defaults(run=cmd_jobs)
    listing = actions.add_parser("list", help="all jobs of the cluster")
    listing.add_argument("--address", help="Jobs API address (default $RAY_ADDRESS)")
    listing.set_defaults(run=cmd_jobs)
