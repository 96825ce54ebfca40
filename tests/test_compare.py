"""`flm compare`: per-user paired test of two checkpoints."""

import json

import pytest

from flm_dist.cli.main import main
from flm_dist.config import load_config
from flm_dist.train.configs import PretrainConfig
from flm_dist.train.pretrain import run_pretrain

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


def test_several_runs_per_side_average_per_user_and_report_the_spread(two_runs, tiny_data, tmp_path, capsys):
    short, long = two_runs
    final = {run: json.loads((run / "metrics.json").read_text())["final"] for run in (short, long)}

    def rows(a, b):
        out = tmp_path / "compare.json"
        assert main(["compare", a, b, "--data", tiny_data, "--output", str(out)]) == 0
        return {row["metric"]: row for row in json.loads(out.read_text())["rows"]}

    # One model's runs against the same runs in another order: identical per-user means.
    mixed = rows(f"{long},{short}", f"{short},{long}")
    # The same run twice is that run: the per-user test matches the single-run comparison.
    single, doubled = rows(str(long), str(short)), rows(f"{long},{long}", str(short))
    printed = capsys.readouterr().out
    for metric, row in mixed.items():
        values = [final[long][metric], final[short][metric]]
        assert row["a"] == pytest.approx(sum(values) / 2, abs=1e-9)
        assert row["a_runs"] == pytest.approx(values, abs=1e-9)
        assert row["a_std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5, abs=1e-9)
        assert (row["difference"], row["a_better_users"], row["b_better_users"], row["p_value"]) == (0, 0, 0, 1.0)
        assert f"| {metric} | {row['a']:.4f} ± {row['a_std']:.4f} |" in printed
        for key in ("a", "b", "difference", "a_better_users", "b_better_users", "p_value"):
            assert doubled[metric][key] == pytest.approx(single[metric][key], abs=1e-12)
        assert (doubled[metric]["a_std"], single[metric]["a_std"]) == (0.0, 0.0)
    assert "warning" not in printed  # a run listed twice is one run: the sides are even


def test_uneven_sides_are_flagged_because_their_per_user_means_differ_in_granularity(two_runs, tiny_data, tmp_path,
                                                                                    capsys):
    short, long = two_runs
    assert main(["compare", f"{short},{long}", str(short), "--data", tiny_data]) == 0
    assert "warning: the sides have 2 and 1 distinct runs" in capsys.readouterr().out
