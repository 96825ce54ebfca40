from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from flm_dist.config import load_config
from flm_dist.errors import UserError
from flm_dist.eval.export import ExportConfig, run_export
from flm_dist.train.checkpoint import load_checkpoint
from flm_dist.train.configs import FinetuneConfig, PretrainConfig
from flm_dist.train.finetune import run_finetune
from flm_dist.train.pretrain import run_pretrain

SMALL = ["model.hidden=16", "model.heads=2", "model.max_len=12", "model.flow_hidden=16", "model.flow_layers=2",
         "train.batch_size=64", "train.warmup_steps=1", "eval.batch_size=128", "scaling.workers=0", "train.epochs=1"]


@pytest.fixture(scope="module")
def finetuned(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("export_runs")
    run_pretrain(load_config(PretrainConfig, None, [f"data={tiny_data}", f"output={root / 'pre'}", *SMALL]))
    summary = run_finetune(load_config(FinetuneConfig, None, [
        f"pretrained={root / 'pre'}", f"data={tiny_data}", f"output={root / 'ft'}", "scaling.workers=0",
        "train.epochs=1", "train.max_steps=4", "train.batch_size=64", "train.warmup_steps=1",
        "finetune.flow=latent"]))
    return root / "ft", summary


def _ids(data_dir, name, column):
    table = pq.read_table(Path(data_dir) / "vocab" / f"{name}.parquet")
    return dict(zip(table.column("index").to_pylist(), table.column(column).to_pylist()))


def test_export_round_trip(finetuned, tiny_data, tmp_path, ray_session):
    run_dir, summary = finetuned
    output = tmp_path / "export"
    record = run_export(ExportConfig(checkpoint=str(run_dir / "best"), data=tiny_data, output=str(output), k=10))
    assert (output / "_export.json").is_file() and not list(tmp_path.glob("export.tmp-*"))
    item_ids, user_ids = _ids(tiny_data, "items", "item_id"), _ids(tiny_data, "users", "user_id")

    items = pq.read_table(output / "items.parquet")
    table = load_checkpoint(run_dir / "best")[0]["model"]["backbone.item_embedding.weight"]
    assert items.column("item_id").to_pylist() == [item_ids[i] for i in range(1, len(item_ids) + 1)]
    assert torch.equal(torch.tensor(items.column("embedding").to_pylist()), table[1:])

    users = pq.read_table(output / "users").to_pydict()
    test = pq.read_table(Path(tiny_data) / "test").to_pydict()
    assert sorted(users["user_id"]) == sorted(user_ids[u] for u in test["user"])
    assert record["users"] == len(test["user"])
    hidden = table.shape[1]
    assert all(len(v) == hidden for v in users["embedding"] + users["flow_latent"])
    assert all(torch.isfinite(torch.tensor(users["log_density"])))

    row_of = {user_id: row for row, user_id in enumerate(users["user_id"])}
    hits = 0
    for user, history, target in zip(test["user"], test["history"], test["target"]):
        row = row_of[user_ids[user]]
        recommended, scores = users["items"][row], users["scores"][row]
        assert len(recommended) == 10 and len(set(recommended)) == 10
        assert scores == sorted(scores, reverse=True)
        assert not set(recommended) & {item_ids[i] for i in history}  # history is masked
        hits += item_ids[target] in recommended
    # The exported lists are the ones the evaluation ranks: same HR@10 as the run's final test.
    assert hits / len(test["user"]) == pytest.approx(summary["final"]["test/hr@10/full"], abs=1e-9)


def test_export_replaces_only_a_previous_export(finetuned, tiny_data, tmp_path, ray_session):
    run_dir, _ = finetuned
    previous = tmp_path / "out"
    previous.mkdir()
    (previous / "_export.json").write_text("{}")
    (previous / "stale.parquet").write_text("from an older export")
    run_export(ExportConfig(checkpoint=str(run_dir / "best"), data=tiny_data, output=str(previous), k=3,
                            split="valid"))
    assert not (previous / "stale.parquet").exists()
    users = pq.read_table(previous / "users")
    assert users.num_rows == len(pq.read_table(Path(tiny_data) / "valid"))
    assert all(len(items) == 3 for items in users.column("items").to_pylist())

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("not an export")
    with pytest.raises(UserError, match="not a previous output"):
        run_export(ExportConfig(checkpoint=str(run_dir / "best"), data=tiny_data, output=str(tmp_path / "other")))
    assert (tmp_path / "other" / "keep.txt").is_file()
