"""`flm compare`: per-user paired test of two checkpoints."""

import json

import pytest

from flm_dist.cli import main
from flm_dist.config import load_config
from flm_dist.pretrain import PretrainConfig, run_pretrain

SMALL = ["model.hidden=16", "model.max_len=12", "model.flow_hidden=16", "model.flow_layers=2", "train.batch_size=64",
         "train.warmup_steps=1", "eval.batch_size=128", "scaling.workers=0", "train.epochs=1",
         "loss.cf=0", "loss.fused=0", "loss.flow=0", "eval.user_source=sequence"]


@pytest.fixture(scope="module")
def two_runs(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    runs = []
    for name, steps in (("short", 1), ("long", 6)):
        run_pretrain(load_config(PretrainConfig, None, [f"data={tiny_data}", f"output={root / name}", *SMALL,
                                                        f"train.max_steps={steps}", "train.lr=0.01"]))
        runs.append(root / name)
    return runs


def test_compare_means_are_the_runs_metrics_and_a_model_ties_itself(two_runs, tiny_data, tmp_path, capsys):
    short, long = two_runs
    out = tmp_path / "compare.json"
    assert main(["compare", str(long), str(short), "--data", tiny_data, "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    printed = capsys.readouterr().out
    final = {run: json.loads((run / "metrics.json").read_text())["final"] for run in (short, long)}
    assert {row["metric"] for row in report["rows"]} == {f"test/{m}@10/{p}" for m in ("ndcg", "hr")
                                                         for p in ("full", "full_nomask")}
    for row in report["rows"]:
        assert row["a"] == pytest.approx(final[long][row["metric"]], abs=1e-9)
        assert row["b"] == pytest.approx(final[short][row["metric"]], abs=1e-9)
        assert row["difference"] == pytest.approx(row["a"] - row["b"])
        assert 0.0 <= row["p_value"] <= 1.0
        assert f"| {row['metric']} | {row['a']:.4f} |" in printed
    ndcg = next(r for r in report["rows"] if r["metric"] == "test/ndcg@10/full")
    assert ndcg["a_better_users"] + ndcg["b_better_users"] > 0  # six steps against one change rankings
    assert report["users"] == final[long]["test/users/full"]

    assert main(["compare", str(long), str(long / "best"), "--data", tiny_data]) == 0
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("| test/"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            assert cells[3:] == ["+0.0000", "0", "0", "1"]


def test_compare_refuses_a_missing_checkpoint(tiny_data, tmp_path, capsys):
    assert main(["compare", str(tmp_path / "nope"), str(tmp_path / "nope"), "--data", tiny_data]) == 2
    assert "is neither a checkpoint nor a run directory" in capsys.readouterr().err
