"""A diverged model never looks good, and a broken best/ is rebuilt (issue 37, cases 1 and 5).

Configs refuse NaN and infinity; a NaN or infinite loss or gradient skips its step and, several
steps in a row, stops the run with one line while best/ keeps the last good epoch; ranking puts
non-finite scores below every finite one; a checkpoint with non-finite weights is refused; a re-run
publishes a truncated best/ again from the kept checkpoint of its epoch, or says how to go on.
"""

import math
import shutil
from pathlib import Path

import pytest
import torch

import flm_dist.train.loop as loop_module
from flm_dist.cli.main import main
from flm_dist.config import ConfigKeyError, load_config
from flm_dist.data.synth import SynthConfig
from flm_dist.errors import UserError
from flm_dist.eval.evaluate import EvaluateConfig, run_evaluate
from flm_dist.eval.metrics import target_ranks
from flm_dist.eval.ranking import rank_targets, top_k
from flm_dist.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_meta,
    repair_best,
    save_checkpoint,
    verify_checkpoint,
)
from flm_dist.train.configs import PretrainConfig
from flm_dist.train.pretrain import run_pretrain

NAN, INF = math.nan, math.inf
SMALL = ["model.hidden=16", "model.heads=2", "model.max_len=12", "model.flow_hidden=16",
         "model.flow_layers=2", "train.batch_size=64", "train.warmup_steps=2", "eval.batch_size=128",
         "scaling.workers=0", "train.epochs=2"]
MONITOR = "valid/ndcg@10/full"


def _config(data, output, *overrides):
    return load_config(PretrainConfig, None, [f"data={data}", f"output={output}", *SMALL, *overrides])


@pytest.fixture(scope="module")
def healthy_run(tiny_data, tmp_path_factory):
    """A finished two-epoch run: (run directory, metrics.json); copy it before changing it."""
    output = tmp_path_factory.mktemp("healthy") / "run"
    return output, run_pretrain(_config(tiny_data, output))


def _poisoned_forward_backward(monkeypatch, poison):
    """Make the loop's micro-step `n` (1-based) call `poison(n, model, losses)` after its
    backward pass, to plant a NaN where a diverging run would have one."""
    real = loop_module.forward_backward
    calls = {"n": 0}

    def forward_backward(model, batch, options, grad_accum):
        losses = real(model, batch, options, grad_accum)
        calls["n"] += 1
        poison(calls["n"], model, losses)
        return losses

    monkeypatch.setattr(loop_module, "forward_backward", forward_backward)


def _nan_loss(losses, term="seq"):
    losses[term] = losses[term] * NAN
    losses["total"] = losses["total"] * NAN


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override", ["train.lr=.inf", "train.lr=.nan", "train.lr=-.inf", "train.grad_clip=.inf",
                                      "train.min_lr_ratio=.nan", "model.dropout=.nan", "loss.flow=1e999",
                                      "loss.contrast_temperature=.inf", "scaling.cpus_per_worker=.inf"])
def test_configs_refuse_non_finite_numbers(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigKeyError, match=f"config key '{key}': must be a finite number"):
        load_config(PretrainConfig, None, ["data=d", "output=o", override])


def test_every_config_refuses_non_finite_numbers_and_the_guard_needs_a_positive_limit():
    with pytest.raises(ConfigKeyError, match="'zipf': must be a finite number"):
        load_config(SynthConfig, None, ["output=o", "zipf=.nan"])
    with pytest.raises(ConfigKeyError, match="'train.max_nonfinite_steps': must be positive"):
        load_config(PretrainConfig, None, ["data=d", "output=o", "train.max_nonfinite_steps=0"])


# ---------------------------------------------------------------------------------------------
# Ranking: a non-finite score ranks below every finite one
# ---------------------------------------------------------------------------------------------


def test_sampled_ranks_put_non_finite_scores_below_every_finite_one():
    scores = torch.tensor([[NAN, 1.0, 2.0],    # NaN target: a miss, not rank 0
                           [1.0, NAN, INF],    # NaN and +inf candidates never beat a finite target
                           [0.5, -INF, NAN],
                           [INF, 0.0, 1.0],    # +inf target: a miss
                           [-INF, 0.0, 1.0]])  # masked target: a miss, as before
    assert target_ranks(scores, torch.zeros(5, dtype=torch.long)).tolist() == [3, 0, 0, 3, 3]


def test_full_ranking_puts_non_finite_scores_below_every_finite_one():
    # Items 1..6 score 5, 4, NaN, 3, +inf, 1 for user 0; user 1's vector is NaN (every score NaN).
    table = torch.tensor([[0.0], [5.0], [4.0], [NAN], [3.0], [INF], [1.0]])
    vectors = torch.tensor([[1.0], [NAN]])
    target = torch.tensor([4, 2])
    history = (torch.tensor([0]), torch.tensor([1]))
    for chunk_size in (1, 2, 6):
        ranks = rank_targets(vectors, table, target, history, chunk_size)
        assert ranks.unmasked.tolist() == [2, 6], chunk_size  # items 1 and 2 only; user 1: a miss
        assert ranks.masked.tolist() == [1, 7], chunk_size
        scores, ids = top_k(vectors, table, 6, chunk_size, history)
        assert ids[0, :3].tolist() == [2, 4, 6], chunk_size
        assert torch.isfinite(scores[0, :3]).all() and torch.isneginf(scores[0, 3:]).all()
        assert torch.isneginf(scores[1]).all()


# ---------------------------------------------------------------------------------------------
# Training: skip non-finite steps, stop after several in a row, never publish them
# ---------------------------------------------------------------------------------------------


def test_a_diverging_run_exits_2_with_one_line_and_publishes_no_best(tiny_data, tmp_path, capsys):
    # The command: at lr=1e6 the loss is NaN from the second step.
    output = tmp_path / "diverged"
    code = main(["pretrain", "--data", tiny_data, "--output", str(output), "--workers", "0",
                 "train.lr=1e6", "train.epochs=2", "train.warmup_steps=0"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: training diverged at step ")
    assert "loss/total" in last and "in 3 steps in a row" in last and "at learning rate 9" in last
    assert not (output / "best").exists() and not (output / "metrics.json").exists()


def test_isolated_non_finite_steps_are_skipped_and_leave_the_weights_alone(tiny_data, healthy_run, tmp_path,
                                                                         monkeypatch, caplog):
    snapshots = {}

    def poison(n, model, losses):
        if n == 3:
            _nan_loss(losses)  # a NaN loss term
        if n == 4:
            next(p for p in model.parameters() if p.grad is not None).grad.fill_(INF)  # an inf gradient
        if n in (3, 5):  # weights after step 2 and after skipped steps 3 and 4 (before step 5's update)
            snapshots[n] = [p.detach().clone() for p in model.parameters()]

    _poisoned_forward_backward(monkeypatch, poison)
    summary = run_pretrain(_config(tiny_data, tmp_path / "r"))
    assert all(torch.equal(a, b) for a, b in zip(snapshots[3], snapshots[5]))
    assert [record["skipped_steps"] for record in summary["history"]] == [2, 0]
    assert all(math.isfinite(value) for record in summary["history"] for value in record.values())
    assert summary["steps"] == healthy_run[1]["steps"]  # a skipped step still counts
    assert "step 3 skipped: non-finite loss/seq, loss/total at learning rate" in caplog.text
    assert "step 4 skipped: non-finite grad_norm" in caplog.text


def test_non_finite_steps_in_a_row_stop_the_run_and_best_keeps_the_last_good_epoch(tiny_data, healthy_run,
                                                                                 tmp_path, monkeypatch):
    steps_per_epoch = healthy_run[1]["steps"] // 2
    _poisoned_forward_backward(monkeypatch, lambda n, model, losses: n > steps_per_epoch and _nan_loss(losses, "cf"))
    output = tmp_path / "r"
    with pytest.raises(UserError) as info:
        run_pretrain(_config(tiny_data, output, "train.max_nonfinite_steps=2"))
    assert str(info.value).startswith(f"training diverged at step {steps_per_epoch + 2}: non-finite loss/cf, "
                                      f"loss/total in 2 steps in a row (train.max_nonfinite_steps=2), "
                                      f"at learning rate ")
    assert "best/ keeps epoch 1" in str(info.value) and "\n" not in str(info.value)
    assert verify_checkpoint(output / "best") is None and read_meta(output / "best")["epoch"] == 1
    assert not (output / "metrics.json").exists()


def test_weights_a_step_made_non_finite_are_never_validated_or_published(tiny_data, healthy_run, tmp_path,
                                                                         monkeypatch):
    steps_per_epoch = healthy_run[1]["steps"] // 2

    def poison(n, model, losses):
        if n == steps_per_epoch:  # finite loss and gradient, but the weights overflow
            model.item_embedding.weight.data[3, 0] = INF

    _poisoned_forward_backward(monkeypatch, poison)
    with pytest.raises(UserError, match=r"training diverged at step \d+: the weights hold NaN or inf "
                                        r"\(item_embedding.weight\).*no best/ was published"):
        run_pretrain(_config(tiny_data, tmp_path / "r"))
    assert not (tmp_path / "r" / "best").exists()


def test_a_checkpoint_with_non_finite_weights_is_refused_naming_the_tensor(tiny_data, healthy_run, tmp_path):
    state, meta = load_checkpoint(healthy_run[0] / "best")
    name = "fusion.projection.weight"
    state["model"][name][0, 0] = NAN
    save_checkpoint(tmp_path / "nan", state, {k: v for k, v in meta.items() if k not in ("files", "format")})
    with pytest.raises(CheckpointError, match=f"non-finite weights \\(NaN or inf in {name}\\)"):
        run_evaluate(EvaluateConfig(checkpoint=str(tmp_path / "nan"), data=tiny_data))


# ---------------------------------------------------------------------------------------------
# A broken best/ (case 5)
# ---------------------------------------------------------------------------------------------


def test_a_rerun_rebuilds_a_truncated_best_from_the_checkpoint_of_its_epoch(tiny_data, healthy_run, tmp_path):
    original, summary = healthy_run
    output = tmp_path / "copy"
    shutil.copytree(original, output)
    with open(output / "best" / "state.pt", "r+b") as handle:
        handle.truncate(100)
    again = run_pretrain(_config(tiny_data, output))
    assert verify_checkpoint(output / "best") is None
    assert again["final"] == summary["final"] and again["steps"] == summary["steps"]


def _epoch_checkpoint(path: Path, step: int, epoch: int, metrics: dict) -> Path:
    return save_checkpoint(path, {"model": {"w": torch.full((2,), float(step))}},
                           {"step": step, "epoch": epoch, "config": {}, "vocab_hash": "h", "metrics": metrics})


def test_best_is_rebuilt_from_its_epochs_checkpoint_or_the_error_says_how_to_go_on(tmp_path):
    best = _epoch_checkpoint(tmp_path / "best", 10, 1, {MONITOR: 0.3})
    end_of_1 = _epoch_checkpoint(tmp_path / "checkpoints" / "checkpoint_10", 10, 1, {MONITOR: 0.3})
    inside_2 = _epoch_checkpoint(tmp_path / "checkpoints" / "checkpoint_15", 15, 1, {})  # mid-epoch 2
    end_of_2 = _epoch_checkpoint(tmp_path / "checkpoints" / "checkpoint_20", 20, 2, {MONITOR: 0.2})
    (best / "state.pt").write_bytes(b"torn")
    repair_best(best, [end_of_2, inside_2, end_of_1], 1, MONITOR)
    assert verify_checkpoint(best) is None and torch.equal(load_checkpoint(best)[0]["model"]["w"], torch.full((2,), 10.0))

    shutil.rmtree(end_of_1)
    (best / "state.pt").write_bytes(b"torn")
    with pytest.raises(CheckpointError) as info:
        repair_best(best, [end_of_2, inside_2], 1, MONITOR)
    message = str(info.value)
    assert "\n" not in message and "no kept checkpoint holds its epoch 1" in message
    assert f"the newest intact checkpoint, {end_of_2.resolve()} (epoch 2), can be evaluated" in message
    assert message.endswith("or train again with a new --output")
