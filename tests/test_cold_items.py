"""Cold-item hold-out (issue 32): `flm prepare` holds out a seeded share of the items with features,
their events leave train and every history while they stay valid/test targets; evaluation adds
`/cold` metrics over exactly the users whose target is held out, summed across ranks; the
popularity baselines; checkpoints refuse data with another hold-out.

Tiny generated data only, in-process (memory:// input keeps prepare off Ray, workers=0 training)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from loopback_ranks import metrics_on_two_ranks
from test_item_features import SMALL, _item2attributes, _log

from flm_dist.cli import main as cli_main
from flm_dist.config import ConfigKeyError, EvalConfig, load_config
from flm_dist.data.batches import build_eval_arrays
from flm_dist.data.cold_items import ColdItemsConfig, choose
from flm_dist.data.item_features import ItemFeaturesConfig
from flm_dist.data.prepare import PrepareConfig, run_prepare
from flm_dist.errors import UserError
from flm_dist.eval.baselines import item_scores
from flm_dist.eval.compare import CompareConfig, run_compare
from flm_dist.eval.evaluate import EvaluateConfig, evaluate_split, run_evaluate

PROTOCOLS = ("full", "full_nomask", "sampled3")


def _prepare(tmp_path: Path, name: str, fraction: float = 0.2, seed: int = 3, root: str = "/ci") -> tuple[Path, dict]:
    features = _item2attributes(root)
    config = PrepareConfig(input=_log(root), format="seq-txt", output=str(tmp_path / name),
                           item_features=ItemFeaturesConfig(uri=features),
                           cold_items=ColdItemsConfig(fraction=fraction, seed=seed))
    return tmp_path / name, run_prepare(config)


def _rows(data: Path, split: str) -> dict[int, dict]:
    return {row["user"]: row for row in pq.read_table(data / split).to_pylist()}


def _held_out(data: Path) -> set[int]:
    return set(pq.read_table(data / "vocab" / "cold_items.parquet").column("index").to_pylist())


# ---- prepare --------------------------------------------------------------------------------


def test_held_out_items_leave_training_and_every_history_and_stay_targets(tmp_path):
    plain, before = _prepare(tmp_path, "plain", fraction=0.0)
    data, after = _prepare(tmp_path, "held")
    cold = _held_out(data)
    # 19 of the 20 interacted items have features (item 4 has none): round(0.2 * 19) are held out
    items = {row["index"]: row for row in pq.read_table(data / "vocab" / "items.parquet").to_pylist()}
    featured = set(pq.read_table(data / "vocab" / "item_attributes.parquet").column("index").to_pylist())
    assert len(cold) == 4 and cold <= featured and cold <= set(items)
    assert (plain / "vocab" / "items.parquet").read_bytes() == (data / "vocab" / "items.parquet").read_bytes()

    # No training shard holds a held-out item; each training sequence is the plain one without them.
    train, plain_train = _rows(data, "train"), _rows(plain, "train")
    for part in (data / "train").iterdir():
        flat = pq.read_table(part).column("items").combine_chunks().flatten().to_numpy()
        assert not set(flat.tolist()) & cold
    for user, row in plain_train.items():
        kept = [(i, t) for i, t in zip(row["items"], row["timestamps"]) if i not in cold]
        assert (list(zip(train[user]["items"], train[user]["timestamps"])) if user in train else []) == kept

    # valid/test: the same targets and negatives, histories without held-out items, `cold` flags them.
    for split in ("valid", "test"):
        rows, plain_rows = _rows(data, split), _rows(plain, split)
        assert rows.keys() == plain_rows.keys()  # every user keeps a warm item in its history here
        for user, row in rows.items():
            assert (row["target"], row["negatives"]) == (plain_rows[user]["target"], plain_rows[user]["negatives"])
            assert row["history"] == [i for i in plain_rows[user]["history"] if i not in cold]
            assert row["cold"] == (row["target"] in cold)
        assert after["cold_holdout"][f"{split}_targets"] == sum(r["cold"] for r in rows.values()) > 0
        assert "cold" not in pq.read_schema(next((plain / split).iterdir())).names

    section = after["cold_holdout"]
    assert section["fraction"] == 0.2 and section["seed"] == 3 and section["items"] == 4
    assert section["eligible_items"] == 19
    assert section["interactions"] == sum(items[i]["count"] for i in cold)
    assert section["train_interactions_removed"] == (before["splits"]["train"]["interactions"]
                                                    - after["splits"]["train"]["interactions"])
    # leave-one-out with >= 3 events per user: an event is in a training prefix or a target
    assert section["interactions"] == (section["train_interactions_removed"] + section["valid_targets"]
                                       + section["test_targets"])
    assert "cold_items" not in before["config"] and after["config"]["cold_items"] == {"fraction": 0.2, "seed": 3}
    assert set(after["vocab_hash"]) - set(before["vocab_hash"]) == {"cold_items"}


def test_the_hold_out_is_seeded_by_the_item_ids(tmp_path):
    first, _ = _prepare(tmp_path, "a", seed=3)
    again, _ = _prepare(tmp_path, "b", seed=3)
    other, _ = _prepare(tmp_path, "c", seed=4)
    held_out = Path("vocab") / "cold_items.parquet"
    assert (first / held_out).read_bytes() == (again / held_out).read_bytes()
    for split in ("train", "valid", "test"):
        assert pq.read_table(first / split).equals(pq.read_table(again / split))
    assert _held_out(first) != _held_out(other)
    # On a larger catalogue: the share asked for, by seed, whatever the order of the rows.
    ids = [f"item{i}" for i in range(1000)]
    items = pa.table({"index": pa.array(range(1, 1001), pa.int32()), "item_id": ids, "count": [1] * 1000})
    featured = pa.table({"index": pa.array(range(1, 1001), pa.int32()), "item_id": ids})
    chosen = {seed: set(choose(ColdItemsConfig(0.1, seed), items, featured).column("item_id").to_pylist())
              for seed in (0, 1)}
    shuffled = featured.take(pa.array(np.random.default_rng(0).permutation(1000)))
    assert len(chosen[0]) == 100 and chosen[0] != chosen[1]
    assert set(choose(ColdItemsConfig(0.1, 0), items, shuffled).column("item_id").to_pylist()) == chosen[0]


def test_a_hold_out_needs_item_features(tmp_path, capsys, monkeypatch):
    with pytest.raises(ConfigKeyError, match="cold_items.fraction.*--item-features"):
        PrepareConfig(input="x", output="y", cold_items=ColdItemsConfig(fraction=0.1))
    with pytest.raises(ConfigKeyError, match=r"must be in \[0, 1\)"):
        ColdItemsConfig(fraction=1.0)
    monkeypatch.setattr(cli_main, "setup_logging", lambda verbose=False: None)
    status = cli_main.main(["prepare", "--input", str(tmp_path / "log.txt"), "--output", str(tmp_path / "out"),
                            "cold_items.fraction=0.1"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "cold_items.fraction" in err and "--item-features" in err


# ---- evaluation -------------------------------------------------------------------------------


class _RandomDot(torch.nn.Module):
    """Fixed random user vectors (by user id) against a fixed random item table."""

    def __init__(self, users: int = 12, items: int = 30, hidden: int = 4):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.users = torch.randn(users, hidden, generator=generator)
        self.table = torch.randn(items + 1, hidden, generator=generator)

    def item_table(self):
        return self.table

    def user_representation(self, user, input, source="fused"):
        return self.users[user]


def _eval_table(users: list[int], cold: list[bool] | None) -> pa.Table:
    rng = np.random.default_rng(1)
    columns = {"user": pa.array(users, pa.int32()),
               "history": pa.array([rng.choice(np.arange(1, 31), size=3, replace=False).tolist() for _ in users],
                                   pa.list_(pa.int32())),
               "target": pa.array(rng.integers(1, 31, size=len(users)), pa.int32()),
               "negatives": pa.array([rng.integers(1, 31, size=3).tolist() for _ in users], pa.list_(pa.int32()))}
    if cold is not None:
        columns["cold"] = pa.array(cold)
    return pa.table(columns)


USERS = list(range(12))
COLD = [u in (1, 4, 5, 9, 10) for u in USERS]


def test_cold_metrics_are_every_protocol_over_the_users_whose_target_is_held_out():
    model, config = _RandomDot(), EvalConfig(ks=(1, 5, 10), batch_size=5)  # several batches
    everyone = evaluate_split(model, build_eval_arrays(_eval_table(USERS, COLD), 4), "test", config, 3)
    without = evaluate_split(model, build_eval_arrays(_eval_table(USERS, None), 4), "test", config, 3)
    subset = _eval_table(USERS, None).filter(pa.array(COLD))
    only_cold = evaluate_split(model, build_eval_arrays(subset, 4), "test", config, 3)
    # the ranks differ by user, so the wrong users would give other values
    assert len({only_cold[f"test/mrr/{p}"] for p in PROTOCOLS} | {without["test/mrr/full"]}) > 1
    assert {k: v for k, v in everyone.items() if not k.endswith("/cold")} == without
    cold_names = {k for k in everyone if k.endswith("/cold")}
    assert cold_names == {f"{k}/cold" for k in only_cold if not k.startswith("test/top1_in_history")}
    for name in cold_names:
        assert everyone[name] == pytest.approx(only_cold[name.removesuffix("/cold")], rel=1e-12, abs=0), name
    assert everyone["test/users/full/cold"] == sum(COLD) == 5


def _metrics_of_rank(rank: int) -> dict[str, float]:
    # uneven shares: rank 0 holds one cold user of four, rank 1 four of eight
    users = USERS[:4] if rank == 0 else USERS[4:]
    table = _eval_table(USERS, COLD).filter(pa.array([u in users for u in USERS]))
    return evaluate_split(_RandomDot(), build_eval_arrays(table, 4), "test", EvalConfig(ks=(1, 5, 10)), 3)


def test_cold_metrics_are_sums_and_counts_across_ranks(tmp_path):
    two_ranks = metrics_on_two_ranks(_metrics_of_rank, tmp_path)
    one = evaluate_split(_RandomDot(), build_eval_arrays(_eval_table(USERS, COLD), 4), "test",
                         EvalConfig(ks=(1, 5, 10)), 3)
    assert two_ranks.keys() == one.keys()
    for name, value in one.items():
        assert two_ranks[name] == pytest.approx(value, rel=1e-12, abs=0), name


def test_pretraining_on_a_hold_out_reports_cold_metrics_and_checkpoints_refuse_another_hold_out(tmp_path):
    from flm_dist.runs import load_model_for_data
    from flm_dist.train.configs import PretrainConfig
    from flm_dist.train.loop import loss_options
    from flm_dist.train.pretrain import run_pretrain
    from flm_dist.train.vocabulary import vocabulary_hash

    data, manifest = _prepare(tmp_path, "data", root="/pt")
    cold = sorted(_held_out(data))
    run = tmp_path / "run"
    overrides = [f"data={data}", f"output={run}", *SMALL, "model.item_features=add"]
    summary = run_pretrain(load_config(PretrainConfig, None, overrides))
    for split in ("valid", "test"):
        assert summary["final"][f"{split}/users/full/cold"] == manifest["cold_holdout"][f"{split}_targets"]
        assert np.isfinite(summary["final"][f"{split}/ndcg@10/full/cold"])
    assert run_evaluate(EvaluateConfig(checkpoint=str(run / "best"), data=str(data))) == pytest.approx(
        {k: v for k, v in summary["final"].items() if k.startswith(("valid/", "test/"))})
    assert vocabulary_hash(run / "vocab") == manifest["vocab_hash"]
    # flm compare pairs the /cold users too; its means are the run's own /cold metrics
    report = run_compare(CompareConfig(a=[str(run)], b=[str(run)], data=str(data)))
    assert report["cold_users"] == manifest["cold_holdout"]["test_targets"]
    compared = {row["metric"]: row for row in report["rows"]}
    for metric in ("test/ndcg@10/full/cold", "test/hr@10/full_nomask/cold", "test/ndcg@10/full"):
        assert compared[metric]["a"] == pytest.approx(summary["final"][metric], abs=1e-12)
        assert compared[metric]["difference"] == 0
    # with features, a held-out item is scored from its attributes alone, as a cold item is
    model, _, _ = load_model_for_data(str(run / "best"), str(data), torch.device("cpu"))
    with torch.no_grad():
        table, pooled = model.item_table(), model.item_features.attributes(torch.arange(manifest["items"] + 1))
    warm = [i for i in range(1, manifest["items"] + 1) if i not in cold]
    torch.testing.assert_close(table[cold], pooled[cold])
    assert not torch.allclose(table[warm], pooled[warm])
    # popularity-sampled negatives give the held-out items no mass
    sampled = load_config(PretrainConfig, None,
                          [*overrides, "loss.softmax=sampled", "loss.negative_sampling=popularity"])
    log_prob = loss_options(sampled, torch.device("cpu"))["popularity"].log_prob
    assert bool((log_prob[cold] < -60).all()) and bool((log_prob[1:].exp().sum() - 1).abs() < 1e-5)
    # another seed, or no hold-out, is another vocabulary
    for name, fraction, seed in (("other_seed", 0.2, 4), ("no_hold_out", 0.0, 3)):
        other, _ = _prepare(tmp_path, name, fraction=fraction, seed=seed, root="/pt")
        with pytest.raises(UserError, match="another vocabulary"):
            load_model_for_data(str(run / "best"), str(other), torch.device("cpu"))

    # The baselines, named and counted as the model's metrics: popularity cannot rank a held-out
    # item (it has no training interaction), attribute popularity can score it.
    popularity = run_evaluate(EvaluateConfig(data=str(data), baseline="popularity"))
    assert popularity.keys() == summary["final"].keys() & popularity.keys()
    assert popularity["test/users/full/cold"] == manifest["cold_holdout"]["test_targets"]
    assert all(popularity[f"{s}/hr@5/{p}/cold"] == 0 for s in ("valid", "test")
               for p in ("full", "full_nomask", "sampled99"))
    scores = item_scores("popularity", str(data))
    assert (scores[cold] == 0).all() and (np.delete(scores, [0, *cold]) > 0).all()
    assert (item_scores("attribute_popularity", str(data))[cold] > 0).all()
    with pytest.raises(ConfigKeyError, match="must be empty with baseline"):
        EvaluateConfig(checkpoint=str(run / "best"), data=str(data), baseline="popularity")
