"""Job files: one stage, or a pipeline of stages, described in YAML and run with `flm run`.

    name: beauty-pretrain
    steps:
      - prepare: {input: ../shared/data/Beauty.txt, format: seq-txt, output: .data/beauty}
      - pretrain: {data: .data/beauty, output: runs/beauty, model: {hidden: 64}}
    runtime: {pip: [...], working_dir: ".", env: {...}}   # read by `flm submit` only

Every step is a mapping with exactly one stage key (see `STAGES`) and, optionally, `name:` (needed
when a job runs the same stage twice; the default name is the stage). Its body is validated
against the stage's config dataclass with `config.from_dict`, so a typo fails before anything
runs, with one line naming the job file, the step and the key. Overrides address a step by name:
`pretrain.train.epochs=3`.

Presets: a step body may list YAML presets, composed as `--config` composes them on the command
line (a dataset file, then a recipe; jobs/README.md):

      - pretrain:
          presets: [data/beauty.yaml, recipes/sasrec.yaml]
          output: runs/sasrec_beauty

A step's settings are, in order (later wins): its presets, each deep-merged over the one before
(`config.merged_settings`), then the step's own keys, then `step.key=value` overrides. Preset
paths are relative to the directory of the job file (absolute paths and URIs are taken as they
are), so a job file and its presets move together, also to a cluster where `flm submit --remote-cwd`
runs in another directory; the paths *inside* a preset (data, output) are stage paths like any
other and resolve against the working directory. A preset holds plain stage settings (no
`presets:` of its own). A bad key written in a preset is one line naming the job file, the step,
the preset file and the key. `step.presets=[...]` overrides replace a step's list.

Paths: relative paths resolve against the current working directory and absolute paths are
allowed; before a stage runs, its local input and output paths (`Stage.inputs`, `Stage.outputs`)
are made absolute, because Ray workers do not share the driver's working directory. Inputs (data
read) may point anywhere, `..` included. Outputs must stay inside the working directory, or inside
one of the directories an operator lists in the environment variable FLM_OUTPUT_ROOTS
(os.pathsep-separated; never read from a job file); remote URIs (s3://, gs://, ...) are not local
paths and pass. See `resolve_output_path`.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flm_dist.cli.common import preset_key_error
from flm_dist.config import (
    ConfigKeyError,
    apply_overrides,
    deep_merge,
    from_dict,
    merged_settings,
    parse_override,
    read_yaml,
    to_dict,
)
from flm_dist.errors import UserError

log = logging.getLogger("flm_dist")

OUTPUT_ROOTS_ENV = "FLM_OUTPUT_ROOTS"
_STEP_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|CREDENTIAL|ACCESS_KEY|PRIVATE_KEY|API_KEY", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Stage:
    """A job stage: where its config class and run function live (imported only when used)."""

    module: str
    config: str
    run: str
    inputs: tuple[str, ...] = ()
    """Config fields the stage reads from (any local path or URI; made absolute); a dotted name
    is a field of a section, e.g. `item_features.uri`."""
    outputs: tuple[str, ...] = ("output",)
    """Top-level config fields the stage writes to; checked with `resolve_output_path`."""

    def load(self) -> tuple[type, Callable[[Any], Any]]:
        module = importlib.import_module(self.module)
        return getattr(module, self.config), getattr(module, self.run)


# One line per stage. Later stages (finetune, tune, ...) are added the same way.
STAGES: dict[str, Stage] = {
    "synth": Stage("flm_dist.data.synth", "SynthConfig", "run_synth"),
    "prepare": Stage("flm_dist.data.prepare", "PrepareConfig", "run_prepare", inputs=("input", "item_features.uri")),
    "pretrain": Stage("flm_dist.train.pretrain", "PretrainConfig", "run_pretrain", inputs=("data",)),
    "evaluate": Stage("flm_dist.eval.evaluate", "EvaluateConfig", "run_evaluate", inputs=("checkpoint", "data")),
    "finetune": Stage("flm_dist.train.finetune", "FinetuneConfig", "run_finetune", inputs=("pretrained", "data")),
    "export": Stage("flm_dist.eval.export", "ExportConfig", "run_export", inputs=("checkpoint", "data")),
    "ablate": Stage("flm_dist.experiments.ablate", "AblateConfig", "run_ablation", inputs=("data",),
                    outputs=("output", "results")),
    # Without `output` the page is written into `directory`, so both are outputs.
    "report": Stage("flm_dist.experiments.report", "ReportConfig", "run_report", outputs=("directory", "output")),
    "serve": Stage("flm_dist.serve", "ServeConfig", "run_serve", inputs=("checkpoint", "data"), outputs=()),
}


class JobError(UserError):
    """A job file is malformed: the message names the file, the step and the key."""


class PathEscapeError(UserError):
    """An output path leaves the working directory (or the allowed output roots)."""


# ---------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------


def output_roots(root: str | os.PathLike | None = None) -> list[str]:
    """Directories outputs may be written under: `root` (default: the working directory) and the
    absolute directories in $FLM_OUTPUT_ROOTS."""
    roots = [os.path.abspath(root if root is not None else os.getcwd())]
    for extra in os.environ.get(OUTPUT_ROOTS_ENV, "").split(os.pathsep):
        if extra.strip() and os.path.isabs(extra.strip()):
            roots.append(os.path.normpath(extra.strip()))
    return roots


def resolve_input_path(path: str, root: str | os.PathLike | None = None) -> str:
    """An input path made absolute against `root` (default: the working directory). Inputs may lie
    anywhere (`..` allowed); URIs other than file:// are returned unchanged."""
    match = _URI.match(path)
    if match and match.group(1).lower() not in ("file", "local"):
        return path
    local = path[match.end():] if match else path
    return os.path.normpath(os.path.join(os.path.abspath(root if root is not None else os.getcwd()), local))


def _inside(path: str, root: str) -> bool:
    return path != root and os.path.commonpath([path, root]) == root


def resolve_output_path(path: str, root: str | os.PathLike | None = None, key: str = "output") -> str:
    """Check that output `path` stays inside the output area and return it resolved.

    Relative paths resolve against `root` (default: the current working directory); `..` segments
    are normalised lexically first, so `runs/../../x` is caught. The result must lie strictly
    inside `root` or inside a directory listed in $FLM_OUTPUT_ROOTS (the root itself is refused:
    stages replace their output directory). Remote URIs (s3://, gs://, memory://, ...) are
    returned unchanged; `file://` URIs are checked like local paths. Symlinks are not followed:
    a link placed in the working directory by its owner is trusted.
    """
    if not isinstance(path, str) or not path.strip():
        raise PathEscapeError(f"{key}: an output path is required")
    match = _URI.match(path)
    local = path
    if match:
        if match.group(1).lower() not in ("file", "local"):
            return path
        local = path[match.end():]
    roots = output_roots(root)
    target = os.path.normpath(os.path.join(roots[0], local))
    if any(_inside(target, r) for r in roots):
        return target
    where = roots[0] + (f" or {', '.join(roots[1:])}" if len(roots) > 1 else "")
    if target in roots:
        raise PathEscapeError(f"{key} {path!r} is the output area itself ({target}); "
                              f"name a subdirectory such as runs/NAME")
    raise PathEscapeError(f"{key} {path!r} resolves to {target}, outside the working directory "
                          f"{where}; outputs must stay inside it (operators can allow more directories "
                          f"with ${OUTPUT_ROOTS_ENV})")


# ---------------------------------------------------------------------------------------------
# Job specs
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RuntimeSpec:
    """How `flm submit` ships the job to a cluster (ignored by `flm run`)."""

    working_dir: str = "."
    """Directory uploaded as the job's working directory (relative to where `flm submit` runs);
    it must contain the job file."""
    pip: list[str] = dataclasses.field(default_factory=list)
    """Packages (or a requirements file) installed for the job on the cluster; empty: none, the
    cluster image already holds the project's dependencies."""
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    """Environment variables of the job. Never secrets: those come from the cluster's
    environment (Kubernetes Secrets, the token file)."""
    excludes: list[str] = dataclasses.field(default_factory=list)
    """Extra gitignore-style patterns left out of the upload (runs/, .data/, .git/ always are)."""
    remote_cwd: str | None = None
    """Directory on the cluster to run in (see `flm submit --remote-cwd`); default: the upload."""
    entrypoint_num_cpus: float | None = None
    """CPUs reserved for the driver (`flm run`) on the cluster."""
    entrypoint_num_gpus: float | None = None
    """GPUs reserved for the driver; training workers ask for their own."""

    def __post_init__(self):
        for name in self.env:
            if name == OUTPUT_ROOTS_ENV:
                raise ConfigKeyError(f"env.{name}", "is set by the cluster operator, not by job files")
            if SECRET_NAME.search(name):
                raise ConfigKeyError(f"env.{name}", "looks like a credential; job files must not hold "
                                                   "secrets (set it in the cluster's environment)")


@dataclasses.dataclass
class Step:
    name: str
    stage: str
    config: Any
    """The validated config dataclass of the stage."""
    presets: list[str] = dataclasses.field(default_factory=list)
    """The preset files composed under the step's own settings, as resolved."""


@dataclasses.dataclass
class JobSpec:
    path: str
    name: str
    steps: list[Step]
    runtime: RuntimeSpec
    description: str = ""

    def step(self, name: str) -> Step:
        for step in self.steps:
            if step.name == name:
                return step
        raise UserError(f"{self.path}: no step named {name!r} (steps: {', '.join(s.name for s in self.steps)})")


_TOP_KEYS = ("name", "description", "steps", "runtime")


def _raw_steps(path: str, data: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    steps = data.get("steps")
    if not isinstance(steps, list) or not steps:
        raise JobError(f"{path}: 'steps' must be a non-empty list of {{stage: {{...}}}} mappings")
    result, seen = [], set()
    for index, entry in enumerate(steps, 1):
        where = f"{path}: step {index}"
        if not isinstance(entry, dict):
            raise JobError(f"{where}: expected a mapping like {{prepare: {{...}}}}, got {entry!r}")
        stages = [k for k in entry if k != "name"]
        unknown = [k for k in stages if k not in STAGES]
        if unknown:
            raise JobError(f"{where}: unknown stage {unknown[0]!r} (stages: {', '.join(STAGES)})")
        if len(stages) != 1:
            raise JobError(f"{where}: needs exactly one stage key, got {stages or 'none'}")
        stage = stages[0]
        name = entry.get("name", stage)
        if not isinstance(name, str) or not _STEP_NAME.match(name):
            raise JobError(f"{where}: step name {name!r} must be letters, digits, '_' or '-'")
        if name in seen:
            raise JobError(f"{where}: a step named {name!r} already exists; give one of them a `name:`")
        seen.add(name)
        body = entry[stage] if entry[stage] is not None else {}
        if not isinstance(body, dict):
            raise JobError(f"{where} '{name}': the {stage} settings must be a mapping, got {body!r}")
        result.append((name, stage, body))
    return result


PRESETS_KEY = "presets"


def _step_overrides(path: str, raw: list[tuple[str, str, dict[str, Any]]],
                    overrides: list[str]) -> dict[str, list[str]]:
    """`step.key=value` overrides grouped by step, the step name cut off."""
    by_step: dict[str, list[str]] = {name: [] for name, _, _ in raw}
    for text in overrides:
        keys, _ = parse_override(text)
        if len(keys) < 2 or keys[0] not in by_step:
            raise UserError(f"override {text!r}: must start with a step name of {path} "
                            f"({', '.join(by_step)}), e.g. {next(iter(by_step))}.output=...")
        by_step[keys[0]].append(text.split(".", 1)[1])
    return by_step


def _preset_paths(path: str, value: Any, where: str) -> list[str]:
    """A step's `presets:` as paths: relative ones resolved against the job file's directory."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise JobError(f"{where}: '{PRESETS_KEY}' must be a list of YAML files, got {value!r}")
    base = os.path.dirname(path)
    return [v if _URI.match(v) or os.path.isabs(v) else os.path.normpath(os.path.join(base, v)) for v in value]


def _step_settings(path: str, where: str, body: dict[str, Any],
                   overrides: list[str]) -> tuple[dict[str, Any], list[str], list[str]]:
    """presets <- the step's own keys <- overrides; returns (settings, presets, the overrides
    applied last). `presets=...` overrides replace the step's list before it is read."""
    listing = [o for o in overrides if parse_override(o)[0][0] == PRESETS_KEY]
    rest = [o for o in overrides if o not in listing]
    body = apply_overrides(body, listing)
    presets = _preset_paths(path, body.pop(PRESETS_KEY, None), where)
    try:
        below = merged_settings(presets) if presets else {}
    except UserError as exc:
        raise JobError(f"{where}: presets: {exc}") from None
    return apply_overrides(deep_merge(below, body), rest), presets, rest


def parse_job(data: dict[str, Any], path: str = "<job>", overrides: list[str] | tuple[str, ...] = (),
              resolve_paths: bool = True, root: str | os.PathLike | None = None) -> JobSpec:
    """Validate a job mapping (see the module docstring) into a `JobSpec`."""
    unknown = [k for k in data if k not in _TOP_KEYS]
    if unknown:
        raise JobError(f"{path}: unknown top-level key {unknown[0]!r} (known: {', '.join(_TOP_KEYS)})")
    name = data.get("name") or Path(path).stem
    if not isinstance(name, str):
        raise JobError(f"{path}: 'name' must be a string")
    raw = _raw_steps(path, data)
    by_step = _step_overrides(path, raw, list(overrides))
    steps = []
    for index, (step_name, stage_name, body) in enumerate(raw, 1):
        stage = STAGES[stage_name]
        config_cls, _ = stage.load()
        where = f"{path}: step {index} '{step_name}' ({stage_name})"
        settings, presets, last = _step_settings(path, where, body, by_step[step_name])
        try:
            config = from_dict(config_cls, settings)
        except ConfigKeyError as exc:
            named = preset_key_error(exc, presets, above=[body], overrides=last)
            raise JobError(f"{where}: {'preset ' if named is not exc else ''}{named}") from None
        except UserError as exc:
            raise JobError(f"{where}: {exc}") from None
        if resolve_paths:
            resolved = {}
            for field in stage.inputs:
                parent, _, child = field.rpartition(".")
                section = getattr(config, parent) if parent else None
                value = getattr(section if parent else config, child, None)
                if value and parent:
                    resolved[parent] = dataclasses.replace(section, **{child: resolve_input_path(value, root)})
                elif value:
                    resolved[field] = resolve_input_path(value, root)
            for field in stage.outputs:
                value = getattr(config, field, None)
                if value:
                    try:
                        resolved[field] = resolve_output_path(value, root, key=field)
                    except PathEscapeError as exc:
                        raise PathEscapeError(f"{where}: {exc}") from None
            config = dataclasses.replace(config, **resolved)
        steps.append(Step(step_name, stage_name, config, presets))
    runtime_data = data.get("runtime") or {}
    if not isinstance(runtime_data, dict):
        raise JobError(f"{path}: 'runtime' must be a mapping")
    try:
        runtime = from_dict(RuntimeSpec, runtime_data)
    except ConfigKeyError as exc:
        raise JobError(f"{path}: runtime: config key '{exc.key}': {exc.reason}") from None
    return JobSpec(path=path, name=name, steps=steps, runtime=runtime, description=data.get("description") or "")


def load_job(path: str, overrides: list[str] | tuple[str, ...] = (), resolve_paths: bool = True,
             root: str | os.PathLike | None = None) -> JobSpec:
    """Read and validate the job file at `path`, with `step.key=value` overrides applied."""
    if not Path(path).is_file():
        raise UserError(f"job file not found: {path}")
    return parse_job(read_yaml(path), path, overrides, resolve_paths=resolve_paths, root=root)


def run_job(spec: JobSpec, only: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the job's steps in order (or only the named ones); returns one summary per step run."""
    if only:
        for name in only:
            spec.step(name)
    selected = [s for s in spec.steps if not only or s.name in only]
    summaries = []
    started = time.perf_counter()
    for index, step in enumerate(selected, 1):
        _, run = STAGES[step.stage].load()
        log.info("job %s: step %d/%d '%s' (%s)", spec.name, index, len(selected), step.name, step.stage)
        clock = time.perf_counter()
        result = run(step.config)
        seconds = time.perf_counter() - clock
        log.info("job %s: step '%s' done in %.1f s", spec.name, step.name, seconds)
        summaries.append({"step": step.name, "stage": step.stage, "seconds": round(seconds, 2),
                          "result": result})
    log.info("job %s: %d step(s) in %.1f s", spec.name, len(selected), time.perf_counter() - started)
    return summaries


def describe(spec: JobSpec) -> dict[str, Any]:
    """The resolved job as a plain dict (for `flm run --dry-run`)."""
    return {"name": spec.name, "file": spec.path,
            "steps": [{"name": s.name, "stage": s.stage, "presets": s.presets, "config": to_dict(s.config)}
                      for s in spec.steps],
            "runtime": to_dict(spec.runtime)}
