"""`flm ablate` and `flm tune` with item features on (issue 32): both build their models from
the run's config and data, so the attribute encoder, its vocabulary and the cold items travel
through pretraining, fine-tuning and the reports. Tiny data with features and a cold hold-out."""

import json

import pytest

from flm_dist.cli.main import build_parser
from flm_dist.config import load_config
from flm_dist.experiments.tune import TuneOptions, parse_space, run_tune
from flm_dist.train.configs import PretrainConfig
from flm_dist.train.pretrain import run_pretrain

SMALL = ["model.hidden=16", "model.heads=2", "model.max_len=12", "model.flow_hidden=16", "model.flow_layers=2"]
STEPS = ["train.epochs=1", "train.max_steps=2", "train.batch_size=64", "train.warmup_steps=1", "eval.batch_size=128"]


def test_ablation_with_item_features_trains_every_stage_on_the_fused_item_rows(tiny_cold_data, tmp_path):
    output = tmp_path / "ablation"
    argv = ["ablate", "--data", tiny_cold_data, "--output", str(output), "--fractions", "1.0", "--seeds", "1",
            "variants=[scratch,sasrec]", "reference=sasrec", "common.scaling.workers=0",
            "pretrain.model.item_features=add", "pretrain.loss.attributes=0.5",
            *[f"common.{o}" for o in STEPS], *[f"pretrain.{o}" for o in SMALL]]
    args = build_parser().parse_args(argv)
    args.run(args)

    report = json.loads((output / "ablation.json").read_text())
    assert {row["variant"] for row in report["results"]} == {"scratch", "sasrec"}
    for run in ["pretrain-sasrec", "fraction1/sasrec", "fraction1/scratch"]:
        recorded = json.loads((output / "runs" / "seed0" / run / "metrics.json").read_text())
        assert recorded["config"]["model"]["item_features"] == "add", run
        # Test users whose target is a held-out cold item are scored like the rest.
        assert 0.0 <= recorded["final"]["test/ndcg@10/full/cold"] <= 1.0, run
    pretrained = json.loads((output / "runs" / "seed0" / "pretrain-sasrec" / "metrics.json").read_text())
    assert pretrained["config"]["loss"]["attributes"] == 0.5


def test_tune_fine_tunes_a_model_with_item_features(tiny_cold_data, tmp_path):
    pretrained = tmp_path / "pretrained"
    run_pretrain(load_config(PretrainConfig, None, [f"data={tiny_cold_data}", f"output={pretrained}", *SMALL, *STEPS,
                                                    "scaling.workers=0", "model.item_features=gate"]))
    base = {"pretrained": str(pretrained), "data": tiny_cold_data,
            "train": {"epochs": 1, "batch_size": 64, "warmup_steps": 1, "windows": "last"}, "eval": {"batch_size": 128}}
    space = parse_space({"train.lr": {"loguniform": [1e-3, 1e-2]}}, base)
    best = run_tune(TuneOptions(output=str(tmp_path / "tune"), space=space, base=base, samples=1, concurrent=1,
                                cpus_per_trial=1))
    assert 0.0 <= best["best_value"] <= 1.0
    assert 0.0 <= best["final"]["test/ndcg@10/full/cold"] <= 1.0
    trial = next((tmp_path / "tune").glob("**/metrics.json"))
    assert json.loads(trial.read_text())["config"]["model"]["item_features"] == "gate"


@pytest.fixture(autouse=True)
def _one_ray_session(ray_session):
    """Tune trials run as Ray tasks on the session's one Ray instance."""
