import json
import logging
import math
from pathlib import Path

import pytest
import torch

from flm_dist.config import ConfigKeyError, load_config
from flm_dist.eval.evaluate import EvaluateConfig, run_evaluate
from flm_dist.train.checkpoint import load_checkpoint
from flm_dist.train.configs import PretrainConfig
from flm_dist.train.loop import forward_backward, setup_training, train_loop
from flm_dist.train.optim import clip_grad_norm_
from flm_dist.train.pretrain import run_pretrain
from flm_dist.train.session import LocalSession

SMALL = ["model.hidden=16", "model.heads=2", "model.max_len=12", "model.flow_hidden=16",
         "model.flow_layers=2", "train.batch_size=64", "train.warmup_steps=2", "eval.batch_size=128"]


def _config(data, output, *overrides):
    return load_config(PretrainConfig, None, [f"data={data}", f"output={output}", *SMALL, *overrides])


@pytest.fixture(scope="session")
def local_run(tiny_data, tmp_path_factory):
    output = tmp_path_factory.mktemp("run") / "local"
    summary = run_pretrain(_config(tiny_data, output, "scaling.workers=0", "train.epochs=3"))
    return output, summary


def test_local_pretrain_writes_metrics_and_best_checkpoint(local_run):
    output, summary = local_run
    on_disk = json.loads((output / "metrics.json").read_text())
    assert on_disk["final"] == summary["final"]
    final = summary["final"]
    for split in ("valid", "test"):
        for protocol in ("full", "full_nomask", "sampled99"):
            for metric in ("hr@10", "ndcg@10", "recall@10", "mrr", "auc"):
                value = final[f"{split}/{metric}/{protocol}"]
                assert 0.0 <= value <= 1.0, (split, protocol, metric, value)
        assert final[f"{split}/users/full"] == summary["data"]["users"]
    assert len(summary["history"]) == 3
    for record in summary["history"]:
        assert all(math.isfinite(record[f"loss/{k}"]) for k in ("seq", "cf", "flow", "fused", "total"))
    state, meta = load_checkpoint(output / "best")
    assert meta["vocab_hash"] and meta["config"]["model"]["hidden"] == 16
    assert {"model", "optimizer", "scheduler", "rng", "progress"} <= set(state)
    assert (output / "tensorboard").is_dir()


def test_training_reduces_loss(tiny_data, tmp_path):
    summary = run_pretrain(_config(tiny_data, tmp_path / "r", "scaling.workers=0", "train.epochs=4",
                                   "train.lr=0.01", "model.dropout=0.1"))
    losses = [record["loss/seq"] for record in summary["history"]]
    assert losses[-1] < losses[0] - 0.1


class _Crash(Exception):
    pass


class _CrashAfter(LocalSession):
    """Dies right after the checkpoint of step `crash_step` is published, like a killed worker."""

    def __init__(self, *args, crash_step: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.crash_step = crash_step

    def report(self, metrics, checkpoint_dir=None):
        super().report(metrics, checkpoint_dir)
        if checkpoint_dir is not None and metrics["step"] == self.crash_step:
            raise _Crash()


SPARSE_TABLES = ["train.sparse_user_table=true", "train.sparse_item_table=true", "loss.softmax=sampled",
                 "loss.num_negatives=16", "loss.max_in_batch_negatives=8"]


@pytest.mark.parametrize("variant", ["dense", "sparse_user_table", "sparse_tables", "decayed_weights", "bit_dropout",
                                     "intents", "early_dropout"])
def test_resume_after_crash_matches_uninterrupted_run(tiny_data, tmp_path, variant):
    # The sparse tables' lazy moments live in the optimiser state and must survive the crash;
    # decayed loss weights must pick up at the resumed step, not restart at full weight, and the
    # contrastive term's second pass must draw the same partners and dropout masks; a resume inside
    # an epoch must keep that epoch's intents, and one in the early-dropout epochs their rate.
    overrides = ["scaling.workers=0", "train.epochs=2", "train.checkpoint_every_steps=3", "train.user_lr_scale=5"]
    overrides += {"dense": [], "sparse_user_table": ["train.sparse_user_table=true"],
                  "sparse_tables": SPARSE_TABLES, "decayed_weights": ["loss.decay=[cf,fused,flow]", "loss.contrast=0.1",
                                      "loss.contrast_positive=same_target"],
                  "bit_dropout": ["model.dropout_masks=bits", "loss.contrast=0.1"],
                  "intents": ["loss.intent=0.5", "loss.intent_clusters=4"],
                  "early_dropout": ["train.early_dropout=0.1", "train.early_dropout_epochs=1",
                                    "model.dropout_masks=bits"]}[variant]
    straight = _config(tiny_data, tmp_path / "straight", *overrides)
    train_loop(straight, LocalSession(tiny_data, straight.output))

    resumed = _config(tiny_data, tmp_path / "resumed", *overrides)
    with pytest.raises(_Crash):
        train_loop(resumed, _CrashAfter(tiny_data, resumed.output, crash_step=3))
    session = LocalSession(tiny_data, resumed.output)
    train_loop(resumed, session)
    assert session.reports[0]["step"] > 3  # it continued, it did not start again

    def last_state(run_dir):
        checkpoints = sorted((run_dir / "checkpoints").iterdir())
        return load_checkpoint(checkpoints[-1])[0]

    a, b = last_state(tmp_path / "straight"), last_state(tmp_path / "resumed")
    assert a["progress"]["step"] == b["progress"]["step"]
    for name, tensor in a["model"].items():
        torch.testing.assert_close(tensor, b["model"][name], rtol=1e-5, atol=1e-6, msg=name)


def test_sparse_user_table_gets_sparse_gradients_and_its_own_learning_rate(tiny_data, tmp_path):
    config = _config(tiny_data, tmp_path / "r", "scaling.workers=0", "train.sparse_user_table=true",
                     "train.user_lr_scale=10", "train.lr=0.001")
    setup = setup_training(config, LocalSession(tiny_data, config.output), torch.device("cpu"))
    table = setup.model.cf.user_embedding
    batch = setup.train.take(torch.arange(8), setup.widths.max())
    forward_backward(setup.model, batch, setup.step_options, grad_accum=1)
    assert table.weight.grad.is_sparse
    assert set(table.weight.grad.coalesce().indices()[0].tolist()) == set(batch["user"].tolist())
    (group,) = [g for g in setup.optimizer.param_groups if any(p is table.weight for p in g["params"])]
    assert group["lr"] == pytest.approx(10 * setup.scheduler.get_last_lr()[0])


def test_sparse_item_table_gets_only_the_rows_a_step_looks_up(tiny_data, tmp_path):
    config = _config(tiny_data, tmp_path / "r", "scaling.workers=0", *SPARSE_TABLES)
    setup = setup_training(config, LocalSession(tiny_data, config.output), torch.device("cpu"))
    batch = setup.train.take(torch.arange(8), setup.widths.max())
    before = setup.model.item_table().detach().clone()
    forward_backward(setup.model, batch, setup.step_options, grad_accum=1)
    gradient = setup.model.item_table().grad
    assert gradient.is_sparse
    rows = set(gradient.coalesce().indices()[0].tolist())
    looked_up = set(batch["input"].unique().tolist()) | set(batch["target"].unique().tolist())
    sampled_terms = 3  # seq, cf and fused each draw their own negatives
    assert looked_up <= rows and len(rows) <= len(looked_up) + sampled_terms * config.loss.num_negatives
    clip_grad_norm_(list(setup.model.parameters()), 1.0)
    setup.optimizer.step()
    moved = (setup.model.item_table().detach() != before).any(dim=1).nonzero().flatten().tolist()
    assert set(moved) <= rows and set(moved) - {0}  # untouched rows stay exactly where they were

    with pytest.raises(ConfigKeyError, match="train.sparse_item_table.*loss.softmax=sampled"):
        _config(tiny_data, tmp_path / "full", "train.sparse_item_table=true")
    with pytest.raises(ConfigKeyError, match="train.compile.*sparse"):
        _config(tiny_data, tmp_path / "compiled", *SPARSE_TABLES, "train.compile=true")


def test_rerunning_a_finished_run_does_not_train_again(tiny_data, local_run):
    output, summary = local_run
    again = run_pretrain(_config(tiny_data, output, "scaling.workers=0", "train.epochs=3"))
    assert again["steps"] == summary["steps"]
    assert again["final"] == summary["final"]


@pytest.mark.slow
@pytest.mark.parametrize("features", [[], ["model.item_features=gate", "loss.attributes=0.5"]],
                         ids=["ids", "item_features_and_cold_items"])
def test_two_ray_workers_pretrain_and_evaluate_exactly_as_one_worker_and_in_process(features, request, tmp_path):
    # One Ray Train launch: 2 gloo workers train, then evaluate the best checkpoint on 2 ranks.
    # The same checkpoint evaluated on 1 Ray worker and in-process must give identical metrics:
    # ranks all-reduce sums and counts, and no padded user is counted twice. With item features,
    # on data with held-out cold items, the `/cold` metrics too.
    tiny_data = request.getfixturevalue("tiny_cold_data" if features else "tiny_data")
    output = tmp_path / "ddp"
    summary = run_pretrain(_config(tiny_data, output, "scaling.workers=2", "scaling.cpus_per_worker=0.5",
                                   "train.epochs=2", *features))
    assert summary["final"]["test/users/full"] == summary["data"]["users"]
    assert (output / "best" / "checkpoint.json").is_file()
    assert any((output / "ray_train").glob("checkpoint_*"))
    results = {2: summary["final"]}
    for workers in (0, 1):
        config = EvaluateConfig(checkpoint=str(output / "best"), data=tiny_data)
        config.scaling.workers = workers
        config.scaling.cpus_per_worker = 0.5
        results[workers] = run_evaluate(config)
    assert results[0].keys() == results[1].keys() == results[2].keys()
    assert "test/ndcg@10/full" in results[0] and "valid/ndcg@10/full" in results[0]
    assert ("test/ndcg@10/full/cold" in results[0]) == bool(features)
    for name, value in results[0].items():
        assert results[1][name] == pytest.approx(value, abs=1e-12), name
        assert results[2][name] == pytest.approx(value, abs=1e-12), name


def test_disk_full_while_checkpointing_is_a_clear_error_and_keeps_the_last_checkpoint(tiny_data, tmp_path, monkeypatch):
    import errno

    import flm_dist.train.checkpoint as checkpoint_module
    from flm_dist.train.checkpoint import CheckpointError, verify_checkpoint

    real_save = torch.save
    calls = {"n": 0}

    def save_until_disk_fills(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", save_until_disk_fills)
    config = _config(tiny_data, tmp_path / "full", "scaling.workers=0", "train.epochs=2",
                     "train.checkpoint_every_steps=2")
    with pytest.raises(CheckpointError, match="No space left on device; earlier checkpoints are intact"):
        train_loop(config, LocalSession(tiny_data, config.output))
    kept = sorted((tmp_path / "full" / "checkpoints").iterdir())
    assert kept and all(verify_checkpoint(c) is None for c in kept)


def test_resuming_with_another_model_config_is_a_clear_error(tiny_data, local_run):
    from flm_dist.errors import UserError

    output, _ = local_run
    with pytest.raises(UserError, match="holds a run with another model config"):
        run_pretrain(_config(tiny_data, output, "scaling.workers=0", "train.epochs=3", "model.layers=1"))


def test_an_epoch_cut_short_logs_the_mean_loss_of_the_steps_it_ran(tiny_data, tmp_path):
    items = json.loads((Path(tiny_data) / "manifest.json").read_text())["items"]
    summary = run_pretrain(_config(tiny_data, tmp_path / "r", "scaling.workers=0", "train.epochs=1",
                                   "train.batch_size=8", "train.max_steps=1"))
    # One step from the initial model: about the loss of a uniform guess over the catalog, not
    # that divided by the epoch's ~30 micro-steps.
    assert summary["history"][0]["loss/seq"] == pytest.approx(math.log(items), rel=0.3)


def test_decayed_loss_weights_follow_the_step_and_the_others_stay(tiny_data, tmp_path, monkeypatch):
    import flm_dist.train.loop as loop_module

    seen = []
    real_forward_backward = loop_module.forward_backward

    def recording(model, batch, options, grad_accum):
        seen.append(dict(options["weights"]))
        return real_forward_backward(model, batch, options, grad_accum)

    monkeypatch.setattr(loop_module, "forward_backward", recording)
    summary = run_pretrain(_config(tiny_data, tmp_path / "r", "scaling.workers=0", "train.epochs=2",
                                   "loss.cf=0.5", "loss.decay=[cf,flow]"))
    total = summary["steps"]
    assert len(seen) == total
    for step, weights in enumerate(seen):
        factor = 0.5 * (1 + math.cos(math.pi * step / total))
        assert weights["cf"] == pytest.approx(0.5 * factor) and weights["flow"] == pytest.approx(0.1 * factor)
        assert weights["seq"] == 1.0 and weights["fused"] == 1.0
    assert seen[-1]["cf"] > 0  # still in the graph at the last step
    factors = [record["loss/decay_factor"] for record in summary["history"]]
    assert factors[0] == pytest.approx(0.5, abs=0.05) and factors[-1] == pytest.approx(0.0, abs=1e-9)


def test_ray_train_workers_log_reports_only_as_warnings():
    """Ray Train's INFO line per report carries every metric; a worker's session silences it."""
    from ray.train.v2._internal.execution import context

    from flm_dist.ray_seam import RaySession

    report_log = logging.getLogger(context.__file__)
    report_log.setLevel(logging.INFO)
    RaySession("run")
    assert not report_log.isEnabledFor(logging.INFO) and report_log.isEnabledFor(logging.WARNING)


def test_early_dropout_trains_the_first_epochs_at_its_rate_and_the_rest_at_the_models(tiny_data, tmp_path,
                                                                                      monkeypatch):
    import flm_dist.train.loop as loop_module
    from flm_dist.models.dropout import dropout_rate

    seen = []
    real_forward_backward = loop_module.forward_backward

    def recording(model, batch, options, grad_accum):
        seen.append((dropout_rate(model), model.training))
        return real_forward_backward(model, batch, options, grad_accum)

    monkeypatch.setattr(loop_module, "forward_backward", recording)
    summary = run_pretrain(_config(tiny_data, tmp_path / "r", "scaling.workers=0", "train.epochs=3",
                                   "model.dropout=0.4", "train.early_dropout=0.1", "train.early_dropout_epochs=2"))
    per_epoch = len(seen) // 3
    assert len(seen) == 3 * per_epoch and per_epoch > 0
    assert seen == [(0.1, True)] * 2 * per_epoch + [(0.4, True)] * per_epoch
    assert [record["dropout"] for record in summary["history"]] == [0.1, 0.1, 0.4]
    _, meta = load_checkpoint(tmp_path / "r" / "best")
    assert meta["config"]["model"]["dropout"] == 0.4  # evaluation and fine-tuning rebuild the model's own rate
