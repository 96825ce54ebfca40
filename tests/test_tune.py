import json
from pathlib import Path

import pytest

from flm_dist.config import load_config
from flm_dist.errors import UserError
from flm_dist.pretrain import PretrainConfig, run_pretrain
from flm_dist.tune import TuneOptions, add_commands, load_space, parse_space, run_tune

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


def test_shipped_space_is_valid():
    space = load_space(str(Path(__file__).resolve().parents[1] / "jobs" / "tune_space.yaml"))
    assert {"train.lr", "train.weight_decay", "finetune.dropout", "finetune.flow", "finetune.mode",
            "finetune.head"} <= set(space)
    # An option invalid on the given base config is rejected (identity takes no flow features).
    with pytest.raises(UserError, match="finetune.head"):
        parse_space({"finetune.head": {"choice": ["identity"]}}, {"finetune": {"flow": "latent"}})


def test_cli_registers_tune():
    import argparse

    commands = argparse.ArgumentParser().add_subparsers()
    add_commands(commands)
    args = commands.choices["tune"].parse_args(["--pretrained", "p", "--data", "d", "--space", "s", "--output", "o",
                                                "--cpus-per-trial", "0.5", "train.epochs=2"])
    assert args.cpus_per_trial == 0.5 and args.overrides == ["train.epochs=2"] and not args.resume


@pytest.mark.slow
def test_tune_two_trials_with_asha(tiny_data, tmp_path):
    pretrained = tmp_path / "pretrained"
    run_pretrain(load_config(PretrainConfig, None, [f"data={tiny_data}", f"output={pretrained}", *SMALL,
                                                    "scaling.workers=0", "train.epochs=1", "train.max_steps=3"]))
    base = {"pretrained": str(pretrained), "data": tiny_data,
            "train": {"epochs": 2, "batch_size": 64, "warmup_steps": 1, "windows": "last"},
            "eval": {"batch_size": 128}}
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
