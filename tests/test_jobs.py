"""Job files: schema validation of every jobs/*.yaml and of the presets they compose (jobs/data/,
jobs/recipes/), error messages, output-path confinement, `flm run`."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
from pathlib import Path
from unittest import mock

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from flm_dist.cli.jobs import (
    OUTPUT_ROOTS_ENV,
    STAGES,
    JobError,
    PathEscapeError,
    load_job,
    parse_job,
    resolve_input_path,
    resolve_output_path,
)
from flm_dist.errors import UserError

REPO = Path(__file__).resolve().parents[1]
# Search spaces for `flm tune` live beside the jobs; tests/test_tune.py validates them.
JOB_FILES = sorted(p for p in (REPO / "jobs").glob("*.yaml") if not p.name.endswith("_space.yaml"))
# Presets (`--config` files, a step's `presets:`): jobs/data/ per dataset, jobs/recipes/ per recipe.
PRESET_FILES = sorted([*(REPO / "jobs" / "data").rglob("*.yaml"), *(REPO / "jobs" / "recipes").glob("*.yaml")])


def _parser() -> argparse.ArgumentParser:
    from flm_dist.cli.submit import add_commands

    parser = argparse.ArgumentParser(prog="flm")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def _flm(*argv: str) -> None:
    args = _parser().parse_args(list(argv))
    args.run(args)


# ---------------------------------------------------------------------------------------------
# The stage registry and every job file in jobs/
# ---------------------------------------------------------------------------------------------


def test_stage_registry_loads_lazily_and_names_real_fields():
    assert {"synth", "prepare", "pretrain", "evaluate"} <= set(STAGES)
    for name, stage in STAGES.items():
        config_cls, run = stage.load()
        assert dataclasses.is_dataclass(config_cls) and callable(run), name
        fields = {f.name for f in dataclasses.fields(config_cls)}
        for field in (*stage.inputs, *stage.outputs):
            parent, _, child = field.partition(".")
            assert parent in fields, (name, field)
            if child:  # a field of a section: the section's default names it
                section = config_cls.__dataclass_fields__[parent].default_factory()
                assert child in {f.name for f in dataclasses.fields(section)}, (name, field)


def test_jobs_folder_has_every_stage_for_every_dataset():
    names = {p.name for p in JOB_FILES}
    for dataset in ("beauty", "sports", "toys", "ml100k"):
        for kind in ("prepare", "pretrain", "sasrec"):
            assert f"{kind}_{dataset}.yaml" in names
        assert (REPO / "jobs" / "data" / f"{dataset}.yaml").is_file()
        assert (REPO / "jobs" / "data" / "prepare" / f"{dataset}.yaml").is_file()
    for recipe in ("pretrain", "finetune", "sasrec", "ablate", "ablate_cpu"):
        assert (REPO / "jobs" / "recipes" / f"{recipe}.yaml").is_file()
    assert "demo.yaml" in names


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.name)
def test_every_job_file_validates(path):
    spec = load_job(str(path), root=REPO)
    assert spec.steps and spec.name
    for step in spec.steps:
        config_cls, _ = STAGES[step.stage].load()
        assert isinstance(step.config, config_cls)
        for field in STAGES[step.stage].outputs:
            value = getattr(step.config, field)
            if value:
                assert Path(value).is_absolute() and Path(value).is_relative_to(REPO), (path.name, value)
    text = path.read_text()
    assert "0.0.0.0" not in text and "RAY_AUTH_TOKEN" not in text


DATASETS = {"beauty": ("Beauty.txt", "seq-txt", 0, 50), "sports": ("Sports_and_Outdoors.txt", "seq-txt", 0, 50),
            "toys": ("Toys_and_Games.txt", "seq-txt", 0, 50), "ml100k": ("ml-100k/ml-100k.inter", "recbole", 5, 200)}


@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_dataset_jobs_use_the_agreed_settings(dataset):
    filename, fmt, kcore, max_len = DATASETS[dataset]
    for kind in ("prepare", "pretrain", "sasrec"):
        spec = load_job(str(REPO / "jobs" / f"{kind}_{dataset}.yaml"), root=REPO)
        prepare = spec.step("prepare").config
        assert prepare.input == str(REPO.parent / "shared" / "data" / filename)
        assert prepare.format == fmt
        assert prepare.min_user_interactions == kcore and prepare.min_item_interactions == kcore
        if kind == "prepare":
            assert [s.stage for s in spec.steps] == ["prepare"]
            continue
        pretrain = spec.step("pretrain").config
        assert pretrain.data == prepare.output
        assert (pretrain.model.hidden, pretrain.model.layers, pretrain.model.max_len) == (64, 2, max_len)
        assert pretrain.model.dropout == 0.5
        assert (pretrain.train.batch_size, pretrain.train.lr) == (256, 2e-3 if kind == "sasrec" else 1e-3)
        if kind == "sasrec":
            assert (pretrain.loss.cf, pretrain.loss.fused, pretrain.loss.flow) == (0.0, 0.0, 0.0)
            assert pretrain.loss.seq > 0 and pretrain.eval.user_source == "sequence"
        else:  # the recipe measured best (docs/guide/pretrain.md), then fine-tuning from it
            assert pretrain.loss.cf > 0 and pretrain.eval.user_source == "fused"
            assert (pretrain.model.cf_user, pretrain.model.user_head, pretrain.train.windows) == (
                "history", "linear", "prefixes")
            finetune = spec.step("finetune").config
            assert [s.stage for s in spec.steps] == ["prepare", "pretrain", "finetune"]
            assert finetune.pretrained == pretrain.output and finetune.data == prepare.output
            assert (finetune.finetune.source, finetune.finetune.flow, finetune.eval.user_source) == (
                "sequence", "none", "sequence")
            assert finetune.train.windows == pretrain.train.windows


def test_demo_chains_its_steps():
    spec = load_job(str(REPO / "jobs" / "demo.yaml"), root=REPO)
    synth, prepare, pretrain, finetune, evaluate, report = (s.config for s in spec.steps)
    assert [s.stage for s in spec.steps] == ["synth", "prepare", "pretrain", "finetune", "evaluate", "report"]
    assert prepare.input == synth.output and pretrain.data == prepare.output
    assert finetune.pretrained == pretrain.output and finetune.data == prepare.output
    assert evaluate.data == prepare.output and evaluate.checkpoint.startswith(finetune.output + "/")
    assert report.directory == pretrain.output
    assert pretrain.train.epochs <= 5 and finetune.train.epochs <= 3


# ---------------------------------------------------------------------------------------------
# Errors name the job file, the step and the key
# ---------------------------------------------------------------------------------------------


def _write(tmp_path: Path, data) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(path)


PRETRAIN = {"data": ".data/x", "output": "runs/x"}


@pytest.mark.parametrize("body, expected", [
    ({"steps": [{"pretrain": {**PRETRAIN, "modle": {}}}]}, ["step 1 'pretrain' (pretrain)", "'modle'", "unknown key"]),
    ({"steps": [{"pretrain": {**PRETRAIN, "model": {"hiden": 3}}}]}, ["'model.hiden'"]),
    ({"steps": [{"pretrain": {**PRETRAIN, "train": {"epochs": "many"}}}]}, ["'train.epochs'", "integer"]),
    ({"steps": [{"pretrain": {"output": "runs/x"}}]}, ["'data'", "required"]),
    ({"steps": [{"servve": {}}]}, ["step 1", "unknown stage 'servve'"]),
    ({"steps": [{"prepare": {}, "pretrain": {}}]}, ["exactly one stage"]),
    ({"steps": [{"pretrain": PRETRAIN}, {"pretrain": PRETRAIN}]}, ["step 2", "already exists"]),
    ({"steps": []}, ["non-empty list"]),
    ({"steps": [{"pretrain": PRETRAIN}], "runtim": {}}, ["unknown top-level key 'runtim'"]),
    ({"steps": [{"pretrain": PRETRAIN}], "runtime": {"pipp": []}}, ["runtime", "'pipp'"]),
    ({"steps": [{"pretrain": PRETRAIN}], "runtime": {"env": {"AWS_SECRET_ACCESS_KEY": "x"}}}, ["credential"]),
    ({"steps": [{"pretrain": PRETRAIN}], "runtime": {"env": {OUTPUT_ROOTS_ENV: "/"}}}, ["operator"]),
])
def test_bad_job_files_fail_with_one_clear_line(tmp_path, body, expected):
    path = _write(tmp_path, body)
    with pytest.raises(UserError) as info:
        load_job(path, root=tmp_path)
    message = str(info.value)
    assert "\n" not in message and path in message
    for fragment in expected:
        assert fragment in message, message


def test_missing_and_invalid_job_files(tmp_path):
    with pytest.raises(UserError, match="job file not found"):
        load_job(str(tmp_path / "nope.yaml"))
    with pytest.raises(UserError, match="not valid YAML"):
        load_job(_write(tmp_path, "steps: [\n"))


def test_named_steps_and_overrides(tmp_path):
    path = _write(tmp_path, {"steps": [
        {"pretrain": {**PRETRAIN, "train": {"epochs": 5}}},
        {"name": "baseline", "pretrain": {"data": ".data/x", "output": "runs/base", "loss": {"cf": 0.0}}}]})
    spec = load_job(path, ["pretrain.train.epochs=3", "baseline.model.hidden=32"], root=tmp_path)
    assert spec.step("pretrain").config.train.epochs == 3
    assert spec.step("baseline").config.model.hidden == 32 and spec.step("baseline").config.train.epochs == 200
    with pytest.raises(UserError, match="must start with a step name"):
        load_job(path, ["prepare.output=x"], root=tmp_path)
    with pytest.raises(UserError, match="must start with a step name"):
        load_job(path, ["epochs=3"], root=tmp_path)
    with pytest.raises(JobError, match=r"step 1 'pretrain'.*'train.epochs'"):
        load_job(path, ["pretrain.train.epochs=zero"], root=tmp_path)


# ---------------------------------------------------------------------------------------------
# Paths: outputs cannot leave the working directory, inputs may
# ---------------------------------------------------------------------------------------------


def test_resolve_output_path_inside(tmp_path, monkeypatch):
    monkeypatch.delenv(OUTPUT_ROOTS_ENV, raising=False)
    assert resolve_output_path("runs/a", tmp_path) == str(tmp_path / "runs" / "a")
    assert resolve_output_path("runs/../.data/b/./c", tmp_path) == str(tmp_path / ".data" / "b" / "c")
    assert resolve_output_path(str(tmp_path / "runs" / "abs"), tmp_path) == str(tmp_path / "runs" / "abs")
    assert resolve_output_path(f"file://{tmp_path}/runs/u", tmp_path) == str(tmp_path / "runs" / "u")
    assert resolve_output_path("s3://bucket/runs/x", tmp_path) == "s3://bucket/runs/x"
    monkeypatch.chdir(tmp_path)
    assert resolve_output_path("runs/cwd") == str(tmp_path / "runs" / "cwd")


@pytest.mark.parametrize("path", ["../escape", "runs/../../escape", "a/b/../../../escape", "/etc/flm",
                                  "..", ".", "runs/..", "file:///etc/flm"])
def test_resolve_output_path_rejects_escapes(tmp_path, monkeypatch, path):
    monkeypatch.delenv(OUTPUT_ROOTS_ENV, raising=False)
    root = tmp_path / "work"
    root.mkdir()
    with pytest.raises(PathEscapeError) as info:
        resolve_output_path(path, root)
    assert repr(path) in str(info.value) and "\n" not in str(info.value)


def test_resolve_output_path_sibling_prefix_is_outside(tmp_path, monkeypatch):
    monkeypatch.delenv(OUTPUT_ROOTS_ENV, raising=False)
    (tmp_path / "work").mkdir()
    with pytest.raises(PathEscapeError):
        resolve_output_path(str(tmp_path / "work-other" / "x"), tmp_path / "work")


def test_operator_output_roots(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    monkeypatch.setenv(OUTPUT_ROOTS_ENV, os.pathsep.join([str(shared), "relative/ignored"]))
    assert resolve_output_path(str(shared / "runs" / "x"), tmp_path / "work") == str(shared / "runs" / "x")
    with pytest.raises(PathEscapeError, match=str(shared)):
        resolve_output_path(str(tmp_path / "elsewhere"), tmp_path / "work")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["..", ".", "a", "b", "runs", ""]), min_size=1, max_size=6))
def test_resolve_output_path_never_leaves_the_root(parts):
    root = "/srv/project"
    path = "/".join(parts)
    with mock.patch.dict(os.environ):
        os.environ.pop(OUTPUT_ROOTS_ENV, None)
        try:
            resolved = resolve_output_path(path, root)
        except PathEscapeError:
            return
    assert resolved.startswith(root + "/") and ".." not in resolved.split("/")


def test_job_outputs_confined_but_inputs_free(tmp_path, monkeypatch):
    monkeypatch.delenv(OUTPUT_ROOTS_ENV, raising=False)
    work = tmp_path / "work"
    work.mkdir()
    data = {"steps": [{"prepare": {"input": "../shared/data/x.txt", "format": "seq-txt", "output": ".data/x"}},
                      {"pretrain": {"data": "../shared/prepared", "output": "runs/x"}}]}
    spec = parse_job(data, "job.yaml", root=work)
    assert spec.step("prepare").config.input == str(tmp_path / "shared" / "data" / "x.txt")
    assert spec.step("prepare").config.output == str(work / ".data" / "x")
    assert spec.step("pretrain").config.data == str(tmp_path / "shared" / "prepared")
    for override in ("prepare.output=../escaped", "pretrain.output=/tmp/elsewhere"):
        with pytest.raises(PathEscapeError) as info:
            parse_job(data, "job.yaml", [override], root=work)
        assert "job.yaml: step" in str(info.value) and "outside the working directory" in str(info.value)
    unresolved = parse_job(data, "job.yaml", ["prepare.output=../escaped"], resolve_paths=False, root=work)
    assert unresolved.step("prepare").config.output == "../escaped"


def test_resolve_input_path(tmp_path):
    assert resolve_input_path("../d/x", tmp_path / "w") == str(tmp_path / "d" / "x")
    assert resolve_input_path("gs://b/x", tmp_path) == "gs://b/x"
    assert resolve_input_path("/abs/x", tmp_path) == "/abs/x"


# ---------------------------------------------------------------------------------------------
# flm run
# ---------------------------------------------------------------------------------------------


TINY = """\
name: tiny
steps:
  - synth: {output: .data/tiny/log, users: 60, items: 40, interactions: 900, clusters: 4, seed: 1}
  - prepare: {input: .data/tiny/log, format: parquet, output: .data/tiny/prepared, num_negatives: 10,
              buckets: 1, workers: 1}
"""


def test_flm_run_dry_run_and_step_selection(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "tiny.yaml").write_text(TINY)
    _flm("run", "jobs/tiny.yaml", "synth.users=50", "--dry-run")
    described = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in described["steps"]] == ["synth", "prepare"]
    assert described["steps"][0]["config"]["users"] == 50
    assert described["steps"][0]["config"]["output"] == str(tmp_path / ".data" / "tiny" / "log")
    _flm("run", "jobs/tiny.yaml", "--steps", "synth")
    assert "step synth (synth)" in capsys.readouterr().out
    assert (tmp_path / ".data" / "tiny" / "log" / "_synth.json").is_file()
    assert not (tmp_path / ".data" / "tiny" / "prepared").exists()
    with pytest.raises(UserError, match="no step named 'train'"):
        _flm("run", "jobs/tiny.yaml", "--steps", "train")



def test_overrides_may_follow_options_and_keep_their_order(capsys):
    from flm_dist.cli.main import parse_arguments

    args = parse_arguments(["run", "--dry-run", "jobs/tiny.yaml", "synth.users=50", "--steps", "synth",
                            "synth.users=70", "synth.seed=3"])
    assert (args.job, args.steps, args.dry_run) == ("jobs/tiny.yaml", "synth", True)
    assert args.overrides == ["synth.users=50", "synth.users=70", "synth.seed=3"]
    args = parse_arguments(["pretrain", "--data", "d", "--output", "o", "--workers", "0", "train.epochs=3"])
    assert (args.workers, args.overrides) == (0, ["train.epochs=3"])
    for argv in (["run", "jobs/tiny.yaml", "--bogus", "a.b=1"], ["run", "jobs/tiny.yaml", "--steps", "x", "stray"]):
        with pytest.raises(SystemExit):
            parse_arguments(argv)
        assert "unrecognized arguments" in capsys.readouterr().err

def test_flm_run_synth_then_prepare(tmp_path, monkeypatch, capsys, ray_session):
    try:
        importlib.import_module("flm_dist.data.prepare")
    except Exception as exc:  # noqa: BLE001 - prepare is written in parallel
        pytest.skip(f"flm_dist.data.prepare not importable yet: {exc}")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "tiny.yaml").write_text(TINY)
    _flm("run", "jobs/tiny.yaml")
    out = capsys.readouterr().out
    assert "step synth (synth)" in out and "step prepare (prepare)" in out
    manifest = json.loads((tmp_path / ".data" / "tiny" / "prepared" / "manifest.json").read_text())
    assert manifest["interactions"] > 0 and manifest["users"] > 0


# ---------------------------------------------------------------------------------------------
# Presets: a dataset file plus a recipe file, composed by `--config` and by a step's `presets:`
# ---------------------------------------------------------------------------------------------

# The stage each preset folder configures, and the keys a preset leaves to the job or command.
PRESET_STAGES = {"data/prepare": ("prepare", {}),
                 "data": ("pretrain", {"output": "runs/x"}),
                 "recipes/sasrec": ("pretrain", {"data": ".data/x", "output": "runs/x"}),
                 "recipes/pretrain": ("pretrain", {"data": ".data/x", "output": "runs/x"}),
                 "recipes/item_features": ("pretrain", {"data": ".data/x", "output": "runs/x"}),
                 "recipes/fast": ("pretrain", {"data": ".data/x", "output": "runs/x"}),
                 "recipes/large_batch": ("pretrain", {"data": ".data/x", "output": "runs/x"}),
                 "recipes/finetune": ("finetune", {"pretrained": "runs/p", "data": ".data/x", "output": "runs/x"}),
                 "recipes/ablate": ("ablate", {"data": ".data/x", "output": "runs/x"}),
                 "recipes/ablate_cpu": ("ablate", {"data": ".data/x", "output": "runs/x"})}
# The SASRec recipe measured on Beauty (docs/results.md, "Quality on Beauty"); every dataset's SASRec job uses it.
MEASURED_SASREC = {"model": {"hidden": 64, "layers": 2, "dropout": 0.5, "positions": "first", "init_std": 0.02,
                             "dropout_masks": "bits"},
                   "loss": {"seq": 1.0, "cf": 0.0, "fused": 0.0, "flow": 0.0},
                   "train": {"batch_size": 256, "lr": 2e-3, "windows": "prefixes", "epochs": 20, "patience": 10,
                             "precision": "bf16"},
                   "eval": {"user_source": "sequence", "mask_history": False}}


def _preset_stage(path: Path) -> tuple[str, dict]:
    relative = path.relative_to(REPO / "jobs").with_suffix("").as_posix()
    for prefix in sorted(PRESET_STAGES, key=len, reverse=True):
        if relative == prefix or relative.startswith(prefix + "/"):
            return PRESET_STAGES[prefix]
    raise AssertionError(f"{relative}: no stage known for this preset; add it to PRESET_STAGES")


@pytest.mark.parametrize("path", PRESET_FILES, ids=lambda p: p.relative_to(REPO / "jobs").as_posix())
def test_every_preset_validates_and_is_used(path):
    stage, rest = _preset_stage(path)
    spec = parse_job({"steps": [{stage: {"presets": [str(path)], **rest}}]}, "job.yaml", root=REPO)
    assert spec.steps[0].presets == [str(path)]
    text = path.read_text()
    assert "0.0.0.0" not in text and "RAY_AUTH_TOKEN" not in text and "presets" not in yaml.safe_load(text)
    users = [job.name for job in JOB_FILES if any(str(path) in step.presets for step in load_job(str(job)).steps)]
    assert users, f"{path} is composed by no job file"


def _subset(config: dict, expected: dict) -> dict:
    return {key: _subset(config[key], value) if isinstance(value, dict) else config[key]
            for key, value in expected.items()}


@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_every_dataset_gets_the_measured_sasrec_recipe(dataset):
    from flm_dist.config import to_dict

    spec = load_job(str(REPO / "jobs" / f"sasrec_{dataset}.yaml"), root=REPO)
    pretrain = spec.step("pretrain")
    assert pretrain.presets == [str(REPO / "jobs" / "data" / f"{dataset}.yaml"),
                                str(REPO / "jobs" / "recipes" / "sasrec.yaml")]
    settings = to_dict(pretrain.config)
    assert _subset(settings, MEASURED_SASREC) == MEASURED_SASREC
    assert settings["model"]["max_len"] == DATASETS[dataset][3]
    assert settings["output"] == str(REPO / "runs" / f"sasrec_{dataset}")
    # the same recipe for every dataset: only the dataset's own settings differ from Beauty's
    beauty = to_dict(load_job(str(REPO / "jobs" / "sasrec_beauty.yaml"), root=REPO).step("pretrain").config)
    for key in ("data", "output"):
        settings.pop(key), beauty.pop(key)
    settings["model"].pop("max_len"), beauty["model"].pop("max_len")
    assert settings == beauty


@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_flm_pretrain_composes_the_same_presets(dataset, monkeypatch):
    """`flm pretrain --config jobs/data/D.yaml --config jobs/recipes/sasrec.yaml` is the pretrain
    step of jobs/sasrec_D.yaml."""
    import flm_dist.train.pretrain as pretrain_module
    from flm_dist.cli.main import parse_arguments

    seen = []

    class Ran(Exception):
        pass

    def fake_run(config):
        seen.append(config)
        raise Ran

    monkeypatch.setattr(pretrain_module, "run_pretrain", fake_run)
    monkeypatch.chdir(REPO)
    args = parse_arguments(["pretrain", "--config", f"jobs/data/{dataset}.yaml", "--config",
                            "jobs/recipes/sasrec.yaml", "--data", f".data/{dataset}", "--output",
                            f"runs/sasrec_{dataset}"])
    with pytest.raises(Ran):
        args.run(args)
    step = load_job(str(REPO / "jobs" / f"sasrec_{dataset}.yaml"), resolve_paths=False).step("pretrain")
    assert seen == [step.config]


def _files(tmp_path: Path, files: dict[str, object]) -> None:
    for name, content in files.items():
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content if isinstance(content, str) else yaml.safe_dump(content))


def test_step_presets_compose_in_order_under_the_step_and_its_overrides(tmp_path):
    _files(tmp_path, {
        "jobs/data/x.yaml": {"data": ".data/x", "model": {"max_len": 20, "hidden": 16}},
        "jobs/recipes/a.yaml": {"model": {"hidden": 32, "layers": 3}, "train": {"epochs": 7, "lr": 0.01}},
        "jobs/recipes/b.yaml": {"model": {"hidden": 48}, "train": {"epochs": 9}},
        "jobs/job.yaml": {"steps": [{"pretrain": {
            "presets": ["data/x.yaml", "recipes/a.yaml", "recipes/b.yaml"],
            "output": "runs/x", "train": {"epochs": 4}}}]}})
    job = str(tmp_path / "jobs" / "job.yaml")
    config = load_job(job, root=tmp_path).step("pretrain").config
    assert config.data == str(tmp_path / ".data" / "x")             # from the dataset file
    assert (config.model.max_len, config.model.layers) == (20, 3)  # keys only one preset sets
    assert config.model.hidden == 48                                # a later preset wins
    assert (config.train.epochs, config.train.lr) == (4, 0.01)      # the step's own keys win, per key
    config = load_job(job, ["pretrain.train.epochs=2", "pretrain.model.hidden=8"], root=tmp_path).step("pretrain").config
    assert (config.train.epochs, config.model.hidden) == (2, 8)     # overrides win over both
    # `step.presets=[...]` replaces the list (paths still relative to the job file)
    config = load_job(job, ["pretrain.presets=[data/x.yaml,recipes/a.yaml]"], root=tmp_path).step("pretrain").config
    assert config.model.hidden == 32


def test_preset_paths_are_relative_to_the_job_file(tmp_path, monkeypatch):
    _files(tmp_path, {"project/jobs/recipes/r.yaml": {"model": {"hidden": 32}},
                      "elsewhere/recipes/r.yaml": {"model": {"hidden": 8}},
                      "project/jobs/job.yaml": {"steps": [{"pretrain": {**PRETRAIN, "presets": ["recipes/r.yaml"]}}]}})
    monkeypatch.chdir(tmp_path / "elsewhere")   # not where the job file is
    spec = load_job(str(tmp_path / "project" / "jobs" / "job.yaml"), root=tmp_path / "elsewhere")
    assert spec.step("pretrain").config.model.hidden == 32
    assert spec.step("pretrain").presets == [str(tmp_path / "project" / "jobs" / "recipes" / "r.yaml")]
    # stage paths inside the step still resolve against the working directory
    assert spec.step("pretrain").config.data == str(tmp_path / "elsewhere" / ".data" / "x")
    absolute = {"steps": [{"pretrain": {**PRETRAIN, "presets": str(tmp_path / "elsewhere" / "recipes" / "r.yaml")}}]}
    assert parse_job(absolute, str(tmp_path / "project" / "jobs" / "j.yaml"),
                     root=tmp_path).step("pretrain").config.model.hidden == 8


@pytest.mark.parametrize("preset, expected", [
    ({"model": {"hiden": 3}}, ["'model.hiden'", "unknown key"]),
    ({"modle": {}}, ["'modle'", "unknown key"]),
    ({"train": {"epochs": "many"}}, ["'train.epochs'", "integer"]),
    ({"eval": {"ks": [5, "ten"]}}, ["'eval.ks[1]'"]),
])
def test_a_bad_key_in_a_preset_is_one_line_naming_the_file(tmp_path, preset, expected):
    _files(tmp_path, {"jobs/recipes/good.yaml": {"model": {"hidden": 32}},
                      "jobs/recipes/bad.yaml": preset,
                      "jobs/job.yaml": {"steps": [
                          {"prepare": {"input": "x.txt", "output": ".data/x"}},
                          {"pretrain": {**PRETRAIN, "presets": ["recipes/bad.yaml", "recipes/good.yaml"]}}]}})
    job = str(tmp_path / "jobs" / "job.yaml")
    with pytest.raises(JobError) as info:
        load_job(job, root=tmp_path)
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith(f"{job}: step 2 'pretrain' (pretrain): preset {tmp_path}/jobs/recipes/bad.yaml: "), message
    for fragment in expected:
        assert fragment in message, message


def test_a_bad_key_set_over_a_preset_names_where_it_was_written(tmp_path):
    _files(tmp_path, {"jobs/bad.yaml": {"model": {"hiden": 3}, "train": {"epochs": "many"}},
                      "jobs/job.yaml": {"steps": [{"pretrain": {**PRETRAIN, "presets": ["bad.yaml"],
                                                                "model": {"hiden": 4}}}]}})
    job = str(tmp_path / "jobs" / "job.yaml")
    with pytest.raises(JobError) as info:  # the step's own key wins over the preset's: the step is named
        load_job(job, root=tmp_path)
    assert "'model.hiden'" in str(info.value) and "bad.yaml" not in str(info.value)
    with pytest.raises(JobError) as info:  # fixed by an override: the override is not blamed on the preset
        load_job(job, ["pretrain.model={}", "pretrain.train.epochs=zero"], root=tmp_path)
    assert "'train.epochs'" in str(info.value) and "bad.yaml" not in str(info.value)


@pytest.mark.parametrize("presets, expected", [
    (["missing.yaml"], ["config file not found", "missing.yaml"]),
    (["list.yaml"], ["must hold a mapping", "list.yaml"]),
    ({"a": 1}, ["'presets' must be a list of YAML files"]),
    ([3], ["'presets' must be a list of YAML files"]),
])
def test_bad_preset_lists_fail_with_one_line(tmp_path, presets, expected):
    _files(tmp_path, {"list.yaml": "- 1\n- 2\n"})
    path = _write(tmp_path, {"steps": [{"pretrain": {**PRETRAIN, "presets": presets}}]})
    with pytest.raises(UserError) as info:
        load_job(path, root=tmp_path)
    message = str(info.value)
    assert "\n" not in message and f"{path}: step 1 'pretrain' (pretrain)" in message, message
    for fragment in expected:
        assert fragment in message, message


def test_flm_command_names_the_preset_with_the_bad_key(tmp_path, capsys):
    from flm_dist.cli.main import main

    _files(tmp_path, {"data.yaml": {"data": ".data/x"}, "recipe.yaml": {"train": {"epochz": 3}}})
    status = main(["pretrain", "--config", str(tmp_path / "data.yaml"), "--config", str(tmp_path / "recipe.yaml"),
                   "--data", "d", "--output", str(tmp_path / "runs" / "x")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and "\n" not in err
    assert err.startswith(f"error: {tmp_path / 'recipe.yaml'}: config key 'train.epochz': unknown key"), err
    # a flag or an override that sets the key is named as before, not the preset
    status = main(["pretrain", "--config", str(tmp_path / "data.yaml"), "--data", "d", "--output",
                   str(tmp_path / "runs" / "x"), "train.epochz=3"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.startswith("error: config key 'train.epochz'"), err


@pytest.mark.parametrize("dataset", ["beauty", "sports", "toys"])
def test_attribute_jobs_are_the_sasrec_jobs_with_the_items_attributes(dataset):
    from flm_dist.config import to_dict

    filename = DATASETS[dataset][0]
    spec = load_job(str(REPO / "jobs" / f"sasrec_attributes_{dataset}.yaml"), root=REPO)
    plain = load_job(str(REPO / "jobs" / f"sasrec_{dataset}.yaml"), root=REPO)
    prepare = spec.step("prepare").config
    features = filename.replace(".txt", "_item2attributes.json")
    assert prepare.item_features.uri == str(REPO.parent / "shared" / "data" / features)  # resolved as `input` is
    assert dataclasses.replace(prepare, output="o", item_features=plain.step("prepare").config.item_features) == \
        dataclasses.replace(plain.step("prepare").config, output="o")
    pretrain = to_dict(spec.step("pretrain").config)
    assert pretrain["data"] == prepare.output and pretrain["model"]["item_features"] == "add"
    expected = to_dict(plain.step("pretrain").config)
    for resolved in (pretrain, expected):
        resolved.pop("data"), resolved.pop("output"), resolved["model"].pop("item_features")
    # Beauty's and Toys' are also wider: width 128 won there over three seeds (docs/results.md).
    assert pretrain["model"].pop("hidden") == (64 if dataset == "sports" else 128)
    assert expected["model"].pop("hidden") == 64
    assert pretrain == expected


@pytest.mark.parametrize("dataset", ["beauty", "sports", "toys"])
def test_fast_jobs_are_the_attributes_recipe_at_width_64_with_less_dropout(dataset):
    """jobs/fast_D.yaml (jobs/recipes/fast.yaml last) is the SASRec job with the items' attributes
    at width 64 and dropout 0.3, nothing else (docs/benchmarks.md "Dropout 0.3: the fast recipe")."""
    from flm_dist.config import to_dict

    fast = load_job(str(REPO / "jobs" / f"fast_{dataset}.yaml"), root=REPO)
    attributes = load_job(str(REPO / "jobs" / f"sasrec_attributes_{dataset}.yaml"), root=REPO)
    assert fast.step("prepare").config == attributes.step("prepare").config
    settings, expected = (to_dict(spec.step("pretrain").config) for spec in (fast, attributes))
    assert settings["output"] == str(REPO / "runs" / f"fast_{dataset}")
    assert settings["model"].pop("dropout") == 0.3 and expected["model"].pop("dropout") == 0.5
    assert settings["model"].pop("hidden") == 64
    expected["model"].pop("hidden")
    settings.pop("output"), expected.pop("output")
    assert settings == expected
