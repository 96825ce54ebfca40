"""`flm bench quality` and the loop's stops it relies on: `train.stop_at` and `train.time_budget_minutes`."""

import json
import logging

import pytest

from flm_dist.bench.quality import parse_target, run_bench_quality
from flm_dist.config import load_config
from flm_dist.errors import UserError
from flm_dist.train.configs import PretrainConfig

SMALL = ["model.hidden=16", "model.max_len=12", "model.flow_hidden=16", "train.batch_size=64",
         "scaling.workers=0", "train.epochs=4", "train.warmup_steps=0", "loss.cf=0", "loss.fused=0", "loss.flow=0",
         "eval.user_source=sequence"]


def _config(data, output, *overrides):
    return load_config(PretrainConfig, None, [f"data={data}", f"output={output}", *SMALL, *overrides])


def test_a_reachable_target_stops_the_run_at_the_epoch_that_reaches_it(tiny_data, tmp_path, capsys):
    result = run_bench_quality(_config(tiny_data, tmp_path / "run"), "valid/ndcg@10/full_nomask=0.0001")
    assert result["reached"] and result["epochs_to_target"] == 1 and result["epochs"] == 1
    assert 0 < result["seconds_to_target"] <= result["total_seconds"]
    assert result["model_tflops_per_s"] > 0 and result["peak_tflops_per_s"] > 0
    assert result["peak_fraction"] == pytest.approx(result["model_tflops_per_s"] / result["peak_tflops_per_s"])
    assert 0 <= result["test/ndcg@10/full_nomask"] <= result["test/hr@10/full_nomask"] <= 1
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    assert history[0]["wall_seconds"] == result["seconds_to_target"]
    assert 0 < result["outside_epochs_seconds"] == pytest.approx(
        history[0]["wall_seconds"] - history[0]["epoch_seconds"] - history[0]["eval_seconds"])
    # The setup is the start of that time: recorded once, in the first epoch's record.
    assert 0 < result["setup_seconds"] == history[0]["setup_seconds"] <= result["outside_epochs_seconds"]


def test_an_unreachable_target_runs_out_the_epochs_or_the_time_budget(tiny_data, tmp_path):
    full = run_bench_quality(_config(tiny_data, tmp_path / "all", "train.epochs=2"), "valid/hr@10/full=1.0")
    assert not full["reached"] and full["seconds_to_target"] is None and full["epochs"] == 2
    assert full["outside_epochs_seconds"] is None
    # A budget of a millisecond is spent by the first epoch, which is still validated.
    budget = run_bench_quality(_config(tiny_data, tmp_path / "budget"), "valid/hr@10/full=1.0",
                               budget_minutes=1e-5)
    assert not budget["reached"] and budget["epochs"] == 1 and budget["best_value"] > 0


def test_the_epoch_log_carries_wall_seconds_setup_and_model_flops(tiny_data, tmp_path, caplog):
    from flm_dist.train.pretrain import run_pretrain

    with caplog.at_level(logging.INFO, logger="flm_dist"):
        summary = run_pretrain(_config(tiny_data, tmp_path / "run", "train.epochs=2"))
    first, second = summary["history"]
    assert 0 < first["wall_seconds"] < second["wall_seconds"]
    assert first["model_tflops_per_s"] > 0
    assert 0 < first["setup_seconds"] < first["wall_seconds"] and "setup_seconds" not in second
    setup_line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("set up in"))
    for phase in ("device", "training data", "model", "optimiser", "validation data", "flow init, DDP"):
        assert f"{phase} " in setup_line



def test_a_resumed_run_records_the_setup_of_each_process(tiny_data, tmp_path, caplog):
    from flm_dist.train.pretrain import run_pretrain

    run_pretrain(_config(tiny_data, tmp_path / "run", "train.epochs=1"))
    with caplog.at_level(logging.INFO, logger="flm_dist"):
        summary = run_pretrain(_config(tiny_data, tmp_path / "run", "train.epochs=2"))
    first, second = summary["history"]
    assert first["setup_seconds"] > 0 and second["setup_seconds"] > 0
    assert any(r.getMessage().startswith("set up in") and "resume " in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("target", ["test/ndcg@10/full=0.1", "valid/ndcg@10/sampled99=0.1", "valid/ndcg@10/full",
                                    "valid/ndcg@10/full=high", "valid/ndcg@10/full=0", "valid/ndcg@10/full=2"])
def test_a_bad_target_is_one_line(target):
    with pytest.raises(UserError, match="--target"):
        parse_target(target)


def test_a_used_output_directory_is_refused(tiny_data, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text("{}")
    with pytest.raises(UserError, match="starts from scratch"):
        run_bench_quality(_config(tiny_data, tmp_path / "run"), "valid/ndcg@10/full=0.1")


def test_bf16_on_a_cpu_without_native_bf16_falls_back_to_fp32(monkeypatch, caplog):
    import torch

    from flm_dist.train.loop import autocasts_bf16

    cpu = torch.device("cpu")
    assert not autocasts_bf16("auto", cpu) and not autocasts_bf16("fp32", cpu)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert autocasts_bf16("bf16", cpu)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    with caplog.at_level("WARNING", logger="flm_dist"):
        assert not autocasts_bf16("bf16", cpu)
    assert "no native bf16" in caplog.text


def test_validation_starts_at_eval_from_epoch_and_leaves_training_unchanged(tiny_data, tmp_path):
    from flm_dist.train.pretrain import run_pretrain

    every = run_pretrain(_config(tiny_data, tmp_path / "every"))["history"]
    late = run_pretrain(_config(tiny_data, tmp_path / "late", "train.eval_from_epoch=3"))["history"]
    monitor = "valid/ndcg@10/full"
    assert [monitor in record for record in every] == [True] * 4
    assert [monitor in record for record in late] == [False, False, True, True]
    # Skipped validations change nothing of training: the same losses and the same validations later.
    assert [r["loss/total"] for r in late] == [r["loss/total"] for r in every]
    assert [r[monitor] for r in late[2:]] == [r[monitor] for r in every[2:]]
    reached = run_bench_quality(_config(tiny_data, tmp_path / "bench", "train.eval_from_epoch=2"),
                                "valid/ndcg@10/full_nomask=0.0001")
    assert reached["epochs_to_target"] == 2
