"""`flm demo` wires every stage together: a smoke run on a tiny log with tiny models."""

import json

import pytest

from flm_dist.data.synth import SynthConfig
from flm_dist.experiments.demo import COLUMNS, DemoOptions, run_demo

TINY_MODEL = ["model.hidden=16", "model.heads=2", "model.max_len=12", "model.flow_hidden=16",
              "model.flow_layers=2", "train.batch_size=64", "train.warmup_steps=2", "eval.batch_size=128"]


@pytest.mark.slow
def test_demo_runs_every_step_and_prints_the_table(ray_session, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("flm_dist.experiments.demo.embedded_default",
                        lambda output, seed=0: SynthConfig(output=output, users=300, items=120,
                                                           interactions=6000, seed=1))
    workdir = tmp_path / "demo"
    results = run_demo(DemoOptions(workdir=str(workdir), workers=0, epochs=1, finetune_epochs=1,
                                   tune_samples=2, overrides=TINY_MODEL))

    assert list(results)[:2] == ["pretrained", "fine-tuned"] and list(results)[2].startswith("best tuned (")
    for metrics in results.values():
        assert all(0.0 <= metrics[column] <= 1.0 for column in COLUMNS)
    best = json.loads((workdir / "tune" / "best.json").read_text())
    assert json.loads((workdir / "evaluation.json").read_text()) == results[list(results)[2]]
    assert set(best["params"]) == {"train.lr", "finetune.flow"}
    for run in ("pretrain", "finetune", "tune"):
        assert (workdir / run / "report.html").is_file()
    printed = capsys.readouterr().out
    assert all(column in printed for column in COLUMNS)
    assert "demo finished in" in printed and "report.html" in printed
