import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from flm_dist.cli.main import build_parser
from flm_dist.config import ConfigKeyError, load_config
from flm_dist.data.batches import build_eval_arrays, build_train_arrays
from flm_dist.errors import UserError
from flm_dist.runs import build_model, load_model_for_data, read_manifest
from flm_dist.train.checkpoint import load_checkpoint
from flm_dist.train.configs import FinetuneConfig, PretrainConfig
from flm_dist.train.finetune import build_recommender, fraction_of_users, resolve, run_finetune
from flm_dist.train.pretrain import run_pretrain

SMALL = ["model.hidden=16", "model.heads=2", "model.max_len=12", "model.flow_hidden=16",
         "model.flow_layers=2", "train.batch_size=64", "train.warmup_steps=2", "eval.batch_size=128"]
FAST = ["scaling.workers=0", "train.epochs=1", "train.max_steps=4", "train.warmup_steps=1",
        "train.batch_size=64", "eval.batch_size=128"]


def _finetune(pretrained, data, output, *overrides):
    return load_config(FinetuneConfig, None, [f"pretrained={pretrained}", f"data={data}", f"output={output}",
                                              *FAST, *overrides])


@pytest.fixture(scope="module")
def pretrained(tiny_data, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("pretrained") / "run"
    run_pretrain(load_config(PretrainConfig, None, [f"data={tiny_data}", f"output={output}", *SMALL,
                                                    "scaling.workers=0", "train.epochs=1"]))
    return output


@pytest.fixture(scope="module")
def shifted_data(tiny_data, tmp_path_factory) -> str:
    """The tiny log prepared again with some users dropped, some users and items renamed (new ids):
    its own vocabulary, partly overlapping the pretrained one, in a different index order."""
    from flm_dist.data.prepare import PrepareConfig, run_prepare

    log = pq.read_table(Path(tiny_data).parent / "log")
    log = log.filter(pc.not_equal(pc.bit_wise_and(log.column("user_id"), 7), 0))
    users, items = log.column("user_id").to_numpy(), log.column("item_id").to_numpy()
    log = log.set_column(0, "user_id", pa.array(np.where(users % 5 == 0, users + 100_000, users)))
    log = log.set_column(1, "item_id", pa.array(np.where(items % 9 == 0, items + 5_000, items)))
    root = tmp_path_factory.mktemp("shifted")
    pq.write_table(log, root / "log.parquet")
    run_prepare(PrepareConfig(input=str(root / "log.parquet"), format="parquet", output=str(root / "data")))
    return str(root / "data")


@pytest.fixture(scope="module")
def full_run(pretrained, tiny_data, tmp_path_factory):
    """Full fine-tuning with the flow latent on the pretraining data (identical vocabulary)."""
    output = tmp_path_factory.mktemp("finetune") / "full"
    summary = run_finetune(_finetune(pretrained, tiny_data, output, "finetune.flow=latent", "train.lr=0.01"))
    return output, summary


def _vocab(data_dir, name, column):
    table = pq.read_table(Path(data_dir) / "vocab" / f"{name}.parquet")
    return dict(zip(table.column(column).to_pylist(), table.column("index").to_pylist()))


def _initial_recommender(config):
    config = resolve(config)
    torch.manual_seed(config.train.seed)
    return build_recommender(config, read_manifest(config.data)), config.vocabulary


def test_weights_are_the_pretrained_ones_mapped_by_original_id(pretrained, shifted_data, tmp_path):
    model, counts = _initial_recommender(_finetune(pretrained, shifted_data, tmp_path / "ft"))
    state = model.backbone.state_dict()
    before = load_checkpoint(pretrained / "best")[0]["model"]
    old_items, new_items = _vocab(pretrained, "items", "item_id"), _vocab(shifted_data, "items", "item_id")
    old_users, new_users = _vocab(pretrained, "users", "user_id"), _vocab(shifted_data, "users", "user_id")
    assert counts.items_known == len(new_items.keys() & old_items.keys()) > 0
    assert counts.items_new == len(new_items.keys() - old_items.keys()) > 0
    assert counts.items_unused == len(old_items.keys() - new_items.keys())
    assert counts.users_known == len(new_users.keys() & old_users.keys()) > 0
    assert counts.users_new == len(new_users.keys() - old_users.keys()) > 0
    assert counts.users_unused == len(old_users.keys() - new_users.keys()) > 0
    # The index spaces really differ: some known items moved to another index.
    assert any(new_items[i] != old_items[i] for i in new_items.keys() & old_items.keys())

    hidden = state["item_embedding.weight"].shape[1]
    for name, tensor in before.items():
        if name.endswith("item_embedding.weight"):
            vocab_new, vocab_old = new_items, old_items
            assert torch.equal(state[name][0], torch.zeros(hidden))
        elif name == "cf.user_embedding.weight":
            vocab_new, vocab_old = new_users, old_users
        else:
            assert torch.equal(state[name], tensor), name
            continue
        for original_id, index in vocab_new.items():
            if original_id in vocab_old:
                assert torch.equal(state[name][index], tensor[vocab_old[original_id]]), (name, original_id)
        fresh = torch.stack([state[name][index] for i, index in vocab_new.items() if i not in vocab_old])
        assert fresh.std().item() == pytest.approx(hidden ** -0.5, rel=0.3)  # the pretrained tables' init


def test_a_pretrained_user_head_is_loaded_and_ranks_as_it_did(tiny_data, tmp_path):
    pretrained = tmp_path / "headed"
    run_pretrain(load_config(PretrainConfig, None, [f"data={tiny_data}", f"output={pretrained}", *SMALL,
                                                    "scaling.workers=0", "train.epochs=1", "train.max_steps=4",
                                                    "train.lr=0.05", "model.user_head=linear"]))
    head = load_checkpoint(pretrained / "best")[0]["model"]
    assert not torch.equal(head["sequence_head.weight"], torch.eye(16))  # it trained
    model, _ = _initial_recommender(_finetune(pretrained, tiny_data, tmp_path / "ft", "finetune.head=identity",
                                              "finetune.flow=none", "finetune.source=sequence",
                                              "eval.user_source=sequence"))
    for name in ("sequence_head.weight", "sequence_head.bias"):
        assert torch.equal(model.backbone.state_dict()[name], head[name]), name
    pretrained_model, _, _ = load_model_for_data(str(pretrained / "best"), tiny_data, torch.device("cpu"))
    arrays = build_eval_arrays(pq.read_table(Path(tiny_data) / "test"), 12)
    model.eval(), pretrained_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.score_all(arrays.user, arrays.input),
                                   pretrained_model.score_all(arrays.user, arrays.input, source="sequence"))


def test_random_init_loads_no_pretrained_weight(pretrained, tiny_data, tmp_path):
    config = _finetune(pretrained, tiny_data, tmp_path / "ft", "finetune.init=random")
    model, counts = _initial_recommender(config)
    assert counts.items_known > 0  # the same vocabulary: every row could have been copied
    manifest = read_manifest(tiny_data)
    torch.manual_seed(config.train.seed)
    fresh = build_model(resolve(config).model, manifest["users"], manifest["items"]).state_dict()
    before = load_checkpoint(pretrained / "best")[0]["model"]
    state = model.backbone.state_dict()
    assert set(state) == set(fresh) == set(before)
    for name, tensor in fresh.items():
        assert torch.equal(state[name], tensor), name
    assert not torch.equal(state["item_embedding.weight"], before["item_embedding.weight"])
    with pytest.raises(ConfigKeyError, match="init=random"):
        _finetune(pretrained, tiny_data, tmp_path / "frozen", "finetune.init=random", "finetune.mode=frozen")


def test_keep_pretrained_validates_the_start_and_keeps_it_unless_beaten(pretrained, tiny_data, tmp_path):
    # At lr 1e-12 fine-tuning changes no ranking, so it never beats the start: only a validated
    # start can be best/, and best/ then holds the pretrained weights themselves.
    common = ("finetune.flow=none", "train.lr=1e-12", "train.max_steps=0", "train.epochs=1")
    kept = run_finetune(_finetune(pretrained, tiny_data, tmp_path / "keep", *common, "finetune.keep_pretrained=true"))
    plain = run_finetune(_finetune(pretrained, tiny_data, tmp_path / "plain", *common))
    monitor = "valid/ndcg@10/full"
    assert [r["epoch"] for r in kept["history"]] == [0, 1] and kept["best"]["epoch"] == 0
    assert [r["epoch"] for r in plain["history"]] == [1] and plain["best"]["epoch"] == 1
    assert kept["history"][0][monitor] == kept["history"][1][monitor] == plain["history"][0][monitor]
    model, _ = _initial_recommender(_finetune(pretrained, tiny_data, tmp_path / "x", "finetune.flow=none"))
    start = model.state_dict()
    best = load_checkpoint(tmp_path / "keep" / "best")[0]["model"]
    assert set(best) == set(start)
    for name in best:
        if "flow" not in name:  # ActNorm's data-dependent init runs in the loop
            assert torch.equal(best[name], start[name]), name
    with pytest.raises(ConfigKeyError, match="keep_pretrained"):
        _finetune(pretrained, tiny_data, tmp_path / "y", "finetune.keep_pretrained=true", "finetune.init=random")


def test_finetuning_starts_at_the_pretrained_ranking(pretrained, tiny_data, tmp_path):
    pretrained_model, _, _ = load_model_for_data(str(pretrained / "best"), tiny_data, torch.device("cpu"))
    arrays = build_eval_arrays(pq.read_table(Path(tiny_data) / "test"), 12)
    for flow, head in (("latent", "linear"), ("density", "mlp"), ("whiten", "linear"), ("none", "identity")):
        model, counts = _initial_recommender(_finetune(pretrained, tiny_data, tmp_path / flow,
                                                       f"finetune.flow={flow}", f"finetune.head={head}"))
        assert counts.items_new == counts.users_new == 0
        model.initialize_flow({"user": arrays.user[:64], "input": arrays.input[:64]})
        model.eval(), pretrained_model.eval()
        with torch.no_grad():
            expected = pretrained_model.score_all(arrays.user, arrays.input, source="fused")
            torch.testing.assert_close(model.score_all(arrays.user, arrays.input, source="fused"), expected)


def test_prefix_windows_score_only_the_last_position_with_the_same_loss(pretrained, tiny_data, tmp_path):
    model, _ = _initial_recommender(_finetune(pretrained, tiny_data, tmp_path / "ft", "finetune.head=mlp"))
    prefixes = build_train_arrays(pq.read_table(Path(tiny_data) / "train"), 12, windows="prefixes")
    batch = prefixes.take(torch.arange(min(len(prefixes), 64)))
    model.initialize_flow(batch)
    model.eval()
    weights = {"seq": 1.0, "fused": 0.5}
    every_position, last_only = model(batch, weights), model(batch, weights, seq_positions="last")
    for term in ("seq", "fused", "total"):
        torch.testing.assert_close(last_only[term], every_position[term])


def _perturb_flow(model):
    with torch.no_grad():
        for parameter in model.backbone.flow.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))


def test_flow_none_ignores_the_flow_and_latent_uses_it(pretrained, tiny_data, full_run, tmp_path):
    arrays = build_eval_arrays(pq.read_table(Path(tiny_data) / "test"), 12)

    def scores(model):
        model.eval()
        with torch.no_grad():
            return model.score_all(arrays.user, arrays.input, source="fused")

    for flow in ("none", "whiten"):
        model, _ = _initial_recommender(_finetune(pretrained, tiny_data, tmp_path / flow, f"finetune.flow={flow}"))
        model.initialize_flow({"user": arrays.user[:64], "input": arrays.input[:64]})
        with torch.no_grad():  # a trained head, so that every feature matters
            model.head.linear.weight.add_(0.3 * torch.randn_like(model.head.linear.weight))
        before = scores(model)
        _perturb_flow(model)
        assert torch.equal(scores(model), before), flow

    output, _ = full_run
    model, _, meta = load_model_for_data(str(output / "best"), tiny_data, torch.device("cpu"))
    assert meta["kind"] == "finetune" and model.flow_use == "latent"
    before = scores(model)
    _perturb_flow(model)
    assert not torch.allclose(scores(model), before)


def test_full_finetuning_writes_metrics_and_evaluates_every_user(full_run, tiny_data):
    output, summary = full_run
    assert json.loads((output / "metrics.json").read_text())["final"] == summary["final"]
    manifest = read_manifest(tiny_data)
    for split in ("valid", "test"):
        assert summary["final"][f"{split}/users/full"] == manifest["splits"][split]["rows"]
        assert 0.0 <= summary["final"][f"{split}/ndcg@10/full"] <= 1.0
    assert summary["config"]["vocabulary"]["items_known"] == manifest["items"]
    assert all(math.isfinite(r["loss/total"]) for r in summary["history"])
    _, meta = load_checkpoint(output / "best")
    assert meta["kind"] == "finetune" and meta["config"]["vocabulary"] == summary["config"]["vocabulary"]
    assert (output / "vocab" / "items.parquet").is_file()


def test_frozen_fraction_finetuning_on_new_vocabulary(pretrained, shifted_data, tmp_path):
    config = _finetune(pretrained, shifted_data, tmp_path / "frozen", "finetune.mode=frozen",
                       "finetune.data_fraction=0.3", "train.max_steps=6", "train.lr=0.05")
    initial, counts = _initial_recommender(config)
    summary = run_finetune(config)

    recorded = summary["config"]["vocabulary"]
    assert recorded == dataclasses.asdict(counts) and recorded["items_new"] > 0
    assert load_checkpoint(tmp_path / "frozen" / "best")[1]["config"]["vocabulary"] == recorded
    manifest = read_manifest(shifted_data)
    assert summary["final"]["test/users/full"] == manifest["splits"]["test"]["rows"]  # every user

    trained = load_checkpoint(tmp_path / "frozen" / "best")[0]["model"]
    for name, tensor in initial.state_dict().items():
        if name.startswith("backbone."):
            assert torch.equal(trained[name], tensor), name
    assert not torch.equal(trained["head.linear.weight"], initial.state_dict()["head.linear.weight"])


def test_data_fraction_keeps_the_chosen_users_only(pretrained, tiny_data, tmp_path):
    from flm_dist.train.finetune import _train_filter

    users = read_manifest(tiny_data)["users"]
    chosen = fraction_of_users(users, 0.3, seed=7)
    assert len(chosen) == math.ceil(0.3 * users) and len(set(chosen)) == len(chosen)
    assert np.array_equal(chosen, fraction_of_users(users, 0.3, seed=7))  # same on every worker
    assert set(chosen) < set(fraction_of_users(users, 0.6, seed=7))  # nested
    assert not np.array_equal(chosen, fraction_of_users(users, 0.3, seed=8))

    table = pq.read_table(Path(tiny_data) / "train")
    keep = _train_filter(_finetune(pretrained, tiny_data, tmp_path / "f", "finetune.data_fraction=0.3",
                                   "train.seed=7"))
    assert sorted(keep(table).column("user").to_pylist()) == sorted(set(chosen) & set(table.column("user").to_pylist()))
    assert _train_filter(_finetune(pretrained, tiny_data, tmp_path / "g")) is None


def test_config_takes_the_model_from_the_checkpoint(pretrained, tiny_data, tmp_path):
    config = resolve(_finetune(pretrained, tiny_data, "c", "finetune.dropout=0.1"))
    assert config.model.hidden == 16 and config.model.dropout == 0.1
    assert Path(config.output).is_absolute() and (Path(config.pretrained) / "checkpoint.json").is_file()
    assert resolve(config) == config  # a resolved config (as workers and checkpoints hold it) stays valid
    with pytest.raises(UserError, match="model.hidden=32"):
        run_finetune(_finetune(pretrained, tiny_data, tmp_path / "d", "model.hidden=32"))
    with pytest.raises(UserError, match="neither a checkpoint"):
        run_finetune(_finetune(tmp_path, tiny_data, tmp_path / "e"))
    # Loss keys given for fine-tuning are laid over the fine-tuning weights, not pretraining's.
    loss = _finetune(pretrained, tiny_data, tmp_path / "c", "loss.seq=0.5").loss
    assert (loss.seq, loss.cf, loss.flow, loss.fused) == (0.5, 0.0, 0.0, 1.0)
    sequence = _finetune(pretrained, tiny_data, "s", "finetune.source=sequence", "eval.user_source=sequence",
                         "finetune.flow=none")
    assert sequence.finetune.source == "sequence"
    with pytest.raises(ConfigKeyError, match="eval.user_source"):
        _finetune(pretrained, tiny_data, "s", "finetune.source=sequence", "finetune.flow=none")
    with pytest.raises(ConfigKeyError, match="finetune.flow"):
        _finetune(pretrained, tiny_data, "s", "finetune.source=sequence", "finetune.flow=latent")
    with pytest.raises(ConfigKeyError, match="loss.flow"):
        _finetune(pretrained, tiny_data, "s", "finetune.flow=none", "loss.flow=0.1")
    with pytest.raises(ConfigKeyError, match="loss.contrast"):
        _finetune(pretrained, tiny_data, "s", "loss.contrast=0.1")
    with pytest.raises(ConfigKeyError, match="loss.intent"):
        _finetune(pretrained, tiny_data, "s", "loss.intent=0.1")


@pytest.mark.slow
def test_finetune_on_two_ray_workers(pretrained, shifted_data, tmp_path):
    output = tmp_path / "ddp"
    summary = run_finetune(_finetune(pretrained, shifted_data, output, "scaling.workers=2",
                                     "scaling.cpus_per_worker=0.5", "finetune.data_fraction=0.5"))
    assert summary["final"]["test/users/full"] == read_manifest(shifted_data)["splits"]["test"]["rows"]
    assert summary["config"]["vocabulary"]["items_new"] > 0
    assert any((output / "ray_train").glob("checkpoint_*"))


def _flm(argv):
    args = build_parser().parse_args(argv)
    args.run(args)


def test_command_lines(pretrained, tiny_data, tmp_path, monkeypatch, capsys):
    _flm(["finetune", "--pretrained", str(pretrained), "--data", tiny_data, "--output", str(tmp_path / "ft"),
          "--workers", "0", "train.epochs=1", "train.max_steps=1", "finetune.head=mlp"])
    assert "test" in capsys.readouterr().out
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["finetune"]["head"] == "mlp"

    exported = []
    monkeypatch.setattr("flm_dist.eval.export.run_export", lambda config: exported.append(config) or {})
    _flm(["export", "--checkpoint", str(tmp_path / "ft" / "best"), "--data", tiny_data, "--output",
          str(tmp_path / "out"), "--k", "7", "batch_size=64"])
    assert (exported[0].k, exported[0].split, exported[0].batch_size) == (7, "test", 64)
    with pytest.raises(SystemExit):
        _flm(["ablate", "--data", tiny_data, "--output", str(tmp_path / "a"), "--fractions", "1.0,half"])


@pytest.fixture(scope="module")
def history_pretrained(tiny_data, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("pretrained_history") / "run"
    run_pretrain(load_config(PretrainConfig, None, [f"data={tiny_data}", f"output={output}", *SMALL,
                                                    "model.cf_user=history", "scaling.workers=0",
                                                    "train.epochs=1", "train.max_steps=4",
                                                    "train.windows=prefixes", "model.positions=first"]))
    return output


def test_history_cf_finetunes_from_its_weights_without_seeing_later_items(history_pretrained, shifted_data,
                                                                          tiny_data, tmp_path):
    model, counts = _initial_recommender(_finetune(history_pretrained, shifted_data, tmp_path / "map"))
    assert counts.users_new > 0 and not any("user_embedding" in name for name in model.state_dict())
    before = load_checkpoint(history_pretrained / "best")[0]["model"]
    assert torch.equal(model.backbone.cf.projection.weight, before["cf.projection.weight"])

    pretrained_model, _, _ = load_model_for_data(str(history_pretrained / "best"), tiny_data, torch.device("cpu"))
    arrays = build_eval_arrays(pq.read_table(Path(tiny_data) / "test"), 12)
    model, _ = _initial_recommender(_finetune(history_pretrained, tiny_data, tmp_path / "ft", "finetune.flow=latent"))
    model.initialize_flow({"user": arrays.user[:64], "input": arrays.input[:64]})
    model.eval(), pretrained_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.score_all(arrays.user, arrays.input, source="fused"),
                                   pretrained_model.score_all(arrays.user, arrays.input, source="fused"))
        # What the head sees after position t depends on nothing after t: the history CF vector
        # is the prefix's, not the whole window's carried to every position.
        representations = model._representations(arrays.user, arrays.input)
        changed = arrays.input.clone()
        changed[:, -3:] = torch.where(changed[:, -3:] != 0, changed[:, -3:] % 5 + 1, 0)
        assert not torch.equal(changed, arrays.input)
        later = model._representations(arrays.user, changed)
    torch.testing.assert_close(later[:, :-3], representations[:, :-3])

    summary = run_finetune(_finetune(history_pretrained, tiny_data, tmp_path / "run", "finetune.flow=latent",
                                     "train.windows=prefixes", "loss.cf=0.5"))
    assert summary["final"]["test/users/full"] == read_manifest(tiny_data)["splits"]["test"]["rows"]
    assert all(math.isfinite(r["loss/cf"]) for r in summary["history"])
