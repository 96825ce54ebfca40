import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from flm_dist.config import load_config
from flm_dist.errors import UserError
from flm_dist.experiments.tune import TuneOptions, load_space, parse_space, run_tune, search_algorithm, tune_space
from flm_dist.train.configs import PretrainConfig
from flm_dist.train.pretrain import run_pretrain

SMALL = ["model.hidden=16", "model.heads=2", "model.max_len=12", "model.flow_hidden=16",
         "model.flow_layers=2", "train.batch_size=64", "train.warmup_steps=2", "eval.batch_size=128"]


@pytest.mark.parametrize("space, message", [
    ({"train.lr": {"normal": [0, 1]}}, "unknown distribution 'normal'"),
    ({"train.lr": {"uniform": [0.1, 0.01]}}, "lo < hi"),
    ({"train.lr": {"loguniform": [0.0, 0.1]}}, "must be > 0"),
    ({"train.lr": {"uniform": [0.1]}}, "takes [lo, hi]"),
    ({"train.lrr": {"choice": [0.1]}}, "unknown key"),
    ({"finetune.flow": {"choice": ["latent", "sideways"]}}, "finetune.flow"),
    ({"finetune.dropout": {"uniform": [0.0, 1.5]}}, "must be in [0, 1)"),
    ({"finetune.head": {"grid": []}}, "non-empty list"),
    ({"train.lr": 0.1}, "expected one of"),
])
def test_space_errors_are_one_line(space, message):
    with pytest.raises(UserError) as info:
        parse_space(space)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "jobs").glob("*_space.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_space_parses(path):
    assert load_space(str(path))


def test_shipped_space_is_valid():
    space = load_space(str(Path(__file__).resolve().parents[1] / "jobs" / "tune_space.yaml"))
    assert {"train.lr", "train.weight_decay", "finetune.dropout", "finetune.flow", "finetune.mode",
            "finetune.head"} <= set(space)
    # An option invalid on the given base config is rejected (identity takes no flow features).
    with pytest.raises(UserError, match="finetune.head"):
        parse_space({"finetune.head": {"choice": ["identity"]}}, {"finetune": {"flow": "latent"}})


def test_cli_registers_tune():
    from flm_dist.cli.main import build_parser

    parser = build_parser()
    args = parser.parse_args(["tune", "--pretrained", "p", "--data", "d", "--space", "s", "--output", "o",
                              "--cpus-per-trial", "0.5", "train.epochs=2"])
    assert args.cpus_per_trial == 0.5 and args.overrides == ["train.epochs=2"] and not args.resume
    assert args.seed == 0 and parser.parse_args(
        ["tune", "--pretrained", "p", "--data", "d", "--space", "s", "--output", "o", "--seed", "3"]).seed == 3


def _drawn_trials(space: dict, seed: int, samples: int) -> list[dict]:
    from ray.tune.experiment import Experiment

    # No trial finishes here, so `concurrent` must admit them all for next_trial to draw them.
    search = search_algorithm(TuneOptions(output="o", space=space, base={}, samples=samples,
                                          concurrent=64, seed=seed))
    search.add_configurations([Experiment("sweep", run=lambda config: None, config=tune_space(space),
                                          num_samples=samples)])
    trials = []
    while (trial := search.next_trial()) is not None:
        trials.append(trial.config)
    return trials


def test_the_same_seed_draws_the_same_trials():
    space = parse_space({"train.lr": {"loguniform": [5e-4, 5e-3]}, "finetune.flow": {"choice": ["latent", "none"]},
                         "finetune.head": {"grid": ["linear", "mlp"]}})
    first = _drawn_trials(space, seed=0, samples=3)
    assert len(first) == 6  # 3 samples of each grid point
    assert first == _drawn_trials(space, seed=0, samples=3)
    assert first != _drawn_trials(space, seed=1, samples=3)
    assert len({trial["train.lr"] for trial in first}) == 6


@pytest.fixture(scope="module")
def pretrained(tiny_data, tmp_path_factory) -> str:
    """A 3-step pretraining run every sweep below fine-tunes from."""
    output = tmp_path_factory.mktemp("tune") / "pretrained"
    run_pretrain(load_config(PretrainConfig, None, [f"data={tiny_data}", f"output={output}", *SMALL,
                                                    "scaling.workers=0", "train.epochs=1", "train.max_steps=3"]))
    return str(output)


def _base(pretrained: str, data: str, epochs: int) -> dict:
    return {"pretrained": pretrained, "data": data,
            "train": {"epochs": epochs, "batch_size": 64, "warmup_steps": 1, "windows": "last"},
            "eval": {"batch_size": 128}}


@pytest.mark.slow
def test_tune_two_trials_with_asha(tiny_data, pretrained, tmp_path):
    base = _base(pretrained, tiny_data, epochs=2)
    space = parse_space({"train.lr": {"loguniform": [1e-3, 1e-2]}, "finetune.head": {"choice": ["linear", "mlp"]}},
                        base)
    output = tmp_path / "tune"
    options = TuneOptions(output=str(output), space=space, base=base, samples=2, concurrent=1, cpus_per_trial=1)
    best = run_tune(options)

    rows = [line for line in (output / "results.md").read_text().splitlines() if line.startswith("| ") and
            not line.startswith("| rank")]
    assert len(rows) == 2
    on_disk = json.loads((output / "best.json").read_text())
    assert on_disk["trial_id"] == best["trial_id"]
    assert 0.0 <= on_disk["best_value"] <= 1.0
    assert set(on_disk["params"]) == {"train.lr", "finetune.head"}
    if on_disk["final"] is not None:  # a trial ASHA let finish has its final test metrics
        assert 0.0 <= on_disk["final"]["test/ndcg@10/full"] <= 1.0
    assert (output / "curves.png").is_file()

    # Re-running on the same TUNE_DIR restores the finished experiment instead of starting anew.
    again = run_tune(TuneOptions(output=str(output), space=space, base=base, samples=2, resume=True))
    assert again["trial_id"] == best["trial_id"]


def _kill_trial_starts(runs: Path, plan: list[int], killed: list[tuple[str, int]], stop: threading.Event) -> None:
    """SIGKILL trial processes as they start: the n-th trial to appear is killed on its first
    `plan[n]` starts (-1: every start). Reads each start's pid from runs/<trial>/attempts.jsonl."""
    order: list[str] = []
    seen: set[tuple[str, int]] = set()
    while not stop.is_set():
        for attempts in sorted(runs.glob("*/attempts.jsonl"), key=lambda p: p.stat().st_mtime):
            trial = attempts.parent.name
            if trial not in order:
                order.append(trial)
            budget = plan[order.index(trial)] if order.index(trial) < len(plan) else 0
            for number, line in enumerate(attempts.read_text().splitlines(), 1):
                pid = json.loads(line)["pid"]
                if (trial, pid) in seen:
                    continue
                seen.add((trial, pid))
                if budget == -1 or number <= budget:
                    os.kill(pid, signal.SIGKILL)
                    killed.append((trial, pid))
        time.sleep(0.05)


@pytest.mark.slow
def test_failed_trials_are_retried_then_reported_and_the_sweep_completes(tiny_data, pretrained, tmp_path):
    base = _base(pretrained, tiny_data, epochs=1)
    space = parse_space({"train.lr": {"grid": [1e-3, 2e-3, 3e-3]}}, base)
    output = tmp_path / "tune"
    # Trial 1 loses its process once (transient), trial 2 on every start (permanent), trial 3 none.
    killed: list[tuple[str, int]] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_trial_starts, args=(output / "runs", [1, -1, 0], killed, stop))
    killer.start()
    try:
        best = run_tune(TuneOptions(output=str(output), space=space, base=base, samples=1, concurrent=1,
                                    cpus_per_trial=1, max_failures=1))
    finally:
        stop.set()
        killer.join()

    rows = {line.split(" | ")[1]: line for line in (output / "results.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| rank")}
    trials = sorted(rows, key=lambda t: (output / "runs" / t / "attempts.jsonl").stat().st_ctime)
    assert len(trials) == 3 and len(killed) == 3
    transient, permanent, clean = trials
    attempts, status = zip(*(rows[t].split(" | ")[4:6] for t in (transient, permanent, clean)))
    assert attempts == ("2", "2", "1")
    # ASHA may stop a reporting trial at its rung; only the permanently failing one is an error.
    assert status[1] == "error" and {status[0], status[2]} <= {"completed", "stopped (ASHA)"}
    assert not (output / "runs" / permanent / "metrics.json").exists()
    assert f"- {permanent} (after 2 attempts)" in (output / "results.md").read_text()
    assert best["trial_id"] in (transient, clean)
