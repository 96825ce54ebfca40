"""Item side information (issue 32): the feature readers on tiny files (malformed rows, unknown ids,
items without features), the join by original id and the cold items of `flm prepare`, the
attribute encoder and objective, cold items in scoring and serving, mapping attribute rows by
original id for fine-tuning, and a default config that builds exactly the model it built before.

Tiny generated data only, in-process (memory:// input keeps prepare off Ray, workers=0 training)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from flm_dist.config import ConfigKeyError, LossConfig, ModelConfig, load_config
from flm_dist.data.item_features import (
    ItemFeaturesConfig,
    load_item_attributes,
    read_features,
    vocabulary_features_hash,
)
from flm_dist.data.prepare import PrepareConfig, run_prepare
from flm_dist.errors import UserError
from flm_dist.eval.ranking import top_k
from flm_dist.models import FLMModel
from flm_dist.models.attributes import AttributeEncoder, FusedItemEmbedding, attribute_loss
from flm_dist.recommend import RecommenderService
from flm_dist.runs import build_model, item_attributes_for, load_model_for_data
from flm_dist.train.configs import PretrainConfig
from flm_dist.train.vocabulary import load_pretrained_weights, map_vocabulary, vocabulary_hash

MEMORY = fsspec.filesystem("memory")
SMALL = ["model.hidden=16", "model.heads=2", "model.max_len=8", "model.flow_hidden=8", "model.flow_layers=1",
         "model.layers=1", "train.batch_size=32", "train.warmup_steps=1", "eval.batch_size=64",
         "scaling.workers=0", "train.epochs=1"]


def _write(path: str, text: str | bytes) -> str:
    with MEMORY.open(path, "wb") as handle:
        handle.write(text.encode() if isinstance(text, str) else text)
    return f"memory://{path}"


def _log(root: str, users: int = 40, items: int = 20, seed: int = 0) -> str:
    """seq-txt: items 1..items in two halves (attribute 'a' for odd ids, 'b' for even), each user
    walking within one half, so attributes say something about the next item."""
    rng = np.random.default_rng(seed)
    lines = []
    for user in range(1, users + 1):
        parity = user % 2
        pool = [i for i in range(1, items + 1) if i % 2 == parity]
        lines.append(" ".join([str(user)] + [str(i) for i in rng.choice(pool, size=6)]))
    return _write(f"{root}/log.txt", "\n".join(lines) + "\n")


def _item2attributes(root: str, items: int = 20, cold: tuple[int, ...] = (101, 102)) -> str:
    features = {str(i): [1 if i % 2 else 2, 10 + i % 3] for i in range(1, items + 1) if i != 4}
    features.update({str(c): [1, 11] for c in cold})  # cold items: features, no interactions
    return _write(f"{root}/item2attributes.json", json.dumps(features))


def _prepare(tmp_path: Path, name: str, features: str | None, root: str = "/if") -> str:
    log = _log(root)
    config = PrepareConfig(input=log, format="seq-txt", output=str(tmp_path / name),
                           item_features=ItemFeaturesConfig(uri=features or ""))
    run_prepare(config)
    return str(tmp_path / name)


# ---- readers --------------------------------------------------------------------------------


def test_item2attributes_reader_quarantines_malformed_rows():
    uri = _write("/r/a.json", json.dumps({"1": [3, 4], "2": [], " ": [1], "3": "x", "4": [[1]], "5": [7, 7.0],
                                          "6": [1.5], "7": ["brand", True]}))
    read = read_features(ItemFeaturesConfig(uri=uri, field="attr"))
    assert read.format == "item2attributes" and read.rows == 8
    pairs = sorted(zip(*[read.pairs.column(c).to_pylist() for c in ("item_id", "field", "value")]))
    assert pairs == [("1", "attr", "3"), ("1", "attr", "4"), ("5", "attr", "7"), ("5", "attr", "7")]
    bad = {row["row"]: (row["column"], row["reason"]) for row in read.bad.to_pylist()}
    assert bad == {3: ("item", "null_id"), 4: ("attr", "malformed"), 5: ("attr", "bad_value"),
                   7: ("attr", "bad_value"), 8: ("attr", "bad_value")}
    with pytest.raises(UserError, match=r"row 3, column 'item': null_id"):
        read_features(ItemFeaturesConfig(uri=uri), strict=True)
    with pytest.raises(UserError, match="not an item2attributes JSON object"):
        read_features(ItemFeaturesConfig(uri=_write("/r/b.json", "{not json")))


def test_recbole_item_reader_token_and_token_seq_columns():
    text = ("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\tscore:float\n"
            "1\tToy Story\t1995\tAnimation Children's Comedy\t3.5\n"
            "2\tGoldenEye\t1995\tAction\n"          # a field short: malformed
            "\tNo Id\t1990\tDrama\t1\n"             # no item id
            "3\tFour Rooms\t\tThriller\t2\n")       # an empty token is just a missing attribute
    uri = _write("/r/ml.item", text)
    read = read_features(ItemFeaturesConfig(uri=uri))
    assert read.format == "recbole"
    got = sorted(zip(*[read.pairs.column(c).to_pylist() for c in ("item_id", "field", "value")]))
    assert ("1", "class", "Animation") in got and ("1", "release_year", "1995") in got
    assert ("1", "movie_title", "Toy") in got and not any(f == "score" for _, f, _ in got)
    assert [p for p in got if p[0] == "3"] == [("3", "class", "Thriller"), ("3", "movie_title", "Four"),
                                              ("3", "movie_title", "Rooms")]
    assert [(r["row"], r["reason"]) for r in read.bad.to_pylist()] == [(3, "malformed"), (4, "null_id")]
    chosen = read_features(ItemFeaturesConfig(uri=uri, categorical=["release_year"], multi=["class"]))
    assert set(chosen.pairs.column("field").to_pylist()) == {"release_year", "class"}
    with pytest.raises(UserError, match="score' is float"):
        read_features(ItemFeaturesConfig(uri=uri, categorical=["score"]))
    with pytest.raises(UserError, match="column 'genre' not found"):
        read_features(ItemFeaturesConfig(uri=uri, multi=["genre"]))


def test_csv_and_parquet_readers_with_categorical_and_multi_valued_columns():
    csv_uri = _write("/r/items.csv", 'sku,brand,tags\nA,acme,"x|y"\nB,,y\n,acme,x\nC,zeta\n')
    read = read_features(ItemFeaturesConfig(uri=csv_uri, item="sku", categorical=["brand"], multi=["tags"]))
    got = sorted(zip(*[read.pairs.column(c).to_pylist() for c in ("item_id", "field", "value")]))
    assert got == [("A", "brand", "acme"), ("A", "tags", "x"), ("A", "tags", "y"), ("B", "tags", "y")]
    assert [(r["row"], r["reason"]) for r in read.bad.to_pylist()] == [(4, "null_id"), (5, "malformed")]

    table = pa.table({"item": pa.array([1, 2, None, 4], pa.int64()), "genre": ["a|b", "c", "a", None],
                      "tags": pa.array([["t1", "t2"], [], ["t1"], None], pa.list_(pa.string())),
                      "year": [1990.0, 2000.0, 1.0, 2001.5]})
    with MEMORY.open("/r/items.parquet", "wb") as handle:
        pq.write_table(table, handle)
    read = read_features(ItemFeaturesConfig(uri="memory:///r/items.parquet", item="item", categorical=["year"],
                                            multi=["genre", "tags"]))
    got = sorted(zip(*[read.pairs.column(c).to_pylist() for c in ("item_id", "field", "value")]))
    assert got == [("1", "genre", "a"), ("1", "genre", "b"), ("1", "tags", "t1"), ("1", "tags", "t2"),
                   ("1", "year", "1990"), ("2", "genre", "c"), ("2", "year", "2000")]
    assert {(r["row"], r["reason"]) for r in read.bad.to_pylist()} == {(3, "null_id"), (4, "bad_value")}


# ---- prepare ---------------------------------------------------------------------------------


def test_prepare_joins_by_original_id_keeps_cold_items_and_leaves_the_splits_unchanged(tmp_path):
    plain = _prepare(tmp_path, "plain", None)
    features = _item2attributes("/if", cold=(101, 102))
    # a quarantined row in the features input
    features = _write("/if/item2attributes.json", json.dumps({**json.loads(MEMORY.cat("/if/item2attributes.json")),
                                                              "55": "oops"}))
    data = _prepare(tmp_path, "features", features)
    before, after = (json.loads((Path(d) / "manifest.json").read_text()) for d in (plain, data))
    # Training and evaluation data are the same files; the item vocabulary is the same.
    for split in ("train", "valid", "test"):
        for part in sorted((Path(plain) / split).iterdir()):
            assert part.read_bytes() == (Path(data) / split / part.name).read_bytes()
    assert (Path(plain) / "vocab" / "items.parquet").read_bytes() == (Path(data) / "vocab" / "items.parquet").read_bytes()
    assert "item_features" not in before["config"] and after["config"]["item_features"]["uri"] == features
    assert {k: after["vocab_hash"][k] for k in ("items", "users")} == before["vocab_hash"]
    assert set(after["vocab_hash"]) == {"items", "users", "attributes", "item_attributes"}
    section = after["features"]
    n = after["items"]
    assert section["items_with_features"] == n - 1 and section["items_without_features"] == 1  # item 4
    assert section["cold_items"] == 2 and section["quarantined_rows"] == 1
    assert section["quarantined"]["malformed"] == 1 and section["attributes"] == 5
    assert section["fields"] == {"attribute": {"attributes": 5, "items": n - 1 + 2}}
    assert section["features_per_item"] == {"mean": 2.0, "min": 2, "max": 2}
    quarantine = pq.read_table(Path(data) / "quarantine").to_pylist()
    assert [(q["row"], q["reason"]) for q in quarantine] == [(22, "malformed")]

    items = pq.read_table(Path(data) / "vocab" / "items.parquet").to_pylist()
    index_of = {row["item_id"]: row["index"] for row in items}
    attributes = {row["index"]: row["value"] for row in pq.read_table(Path(data) / "vocab" / "attributes.parquet").to_pylist()}
    listed = {row["item_id"]: (row["index"], [attributes[a] for a in row["attributes"]])
              for row in pq.read_table(Path(data) / "vocab" / "item_attributes.parquet").to_pylist()}
    assert listed["7"] == (index_of["7"], ["1", "11"]) and "4" not in listed
    assert listed["101"] == (n + 1, ["1", "11"]) and listed["102"] == (n + 2, ["1", "11"])
    arrays = load_item_attributes(data, n)
    assert arrays.matrix.shape == (n + 3, 2) and arrays.cold_ids == ["101", "102"]
    assert arrays.matrix[index_of["4"]].tolist() == [0, 0] and arrays.num_attributes == 5
    assert vocabulary_features_hash(Path(data) / "vocab") == {k: after["vocab_hash"][k]
                                                             for k in ("attributes", "item_attributes")}
    # same input and config: up to date; the strict run stops at the bad row
    assert run_prepare(PrepareConfig(input="memory:///if/log.txt", format="seq-txt", output=data,
                                     item_features=ItemFeaturesConfig(uri=features))) == after
    with pytest.raises(UserError, match="row 22"):
        run_prepare(PrepareConfig(input="memory:///if/log.txt", format="seq-txt", output=str(tmp_path / "s"),
                                  strict=True, item_features=ItemFeaturesConfig(uri=features)))


def test_the_cli_flag_and_job_config_key():
    from flm_dist.cli.common import config_from_args
    from flm_dist.cli.main import build_parser

    args = build_parser().parse_args(["prepare", "--input", "x", "--output", "y", "--item-features", "f.json",
                                      "item_features.multi=[genre]"])
    config = config_from_args(PrepareConfig, args, {"input": args.input, "output": args.output,
                                                    "item_features.uri": args.item_features})
    assert config.item_features == ItemFeaturesConfig(uri="f.json", multi=["genre"])


# ---- model -----------------------------------------------------------------------------------

DEFAULT_KEYS = [
    "cf.item_embedding.weight", "cf.user_embedding.weight", "flow.steps.0.bias", "flow.steps.0.initialized",
    "flow.steps.0.log_scale", "flow.steps.1.inverse_permutation", "flow.steps.1.permutation",
    "flow.steps.2.conditioner.0.bias", "flow.steps.2.conditioner.0.weight", "flow.steps.2.conditioner.2.bias",
    "flow.steps.2.conditioner.2.weight", "flow.steps.2.conditioner.4.bias", "flow.steps.2.conditioner.4.weight",
    "fusion.projection.bias", "fusion.projection.weight", "item_embedding.weight",
    "sequence.blocks.0.attention_norm.bias", "sequence.blocks.0.attention_norm.weight",
    "sequence.blocks.0.attention_output.bias", "sequence.blocks.0.attention_output.weight",
    "sequence.blocks.0.feedforward.0.bias", "sequence.blocks.0.feedforward.0.weight",
    "sequence.blocks.0.feedforward.2.bias", "sequence.blocks.0.feedforward.2.weight",
    "sequence.blocks.0.feedforward_norm.bias", "sequence.blocks.0.feedforward_norm.weight",
    "sequence.blocks.0.qkv.bias", "sequence.blocks.0.qkv.weight", "sequence.item_embedding.weight",
    "sequence.output_norm.bias", "sequence.output_norm.weight", "sequence.position_embedding.weight"]


def test_a_default_config_builds_exactly_the_model_it_built_before():
    """Keys, sizes and (same seed) values recorded from the commit before item features existed."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden=8, max_len=5, layers=1, heads=2, flow_layers=1, flow_hidden=8), 4, 10)
    state = model.state_dict()
    assert sorted(state) == DEFAULT_KEYS
    assert sum(v.numel() for v in state.values()) == 1577
    assert float(sum(v.float().sum() for v in state.values())) == pytest.approx(88.79109954833984, rel=1e-6)
    assert model.item_features is None and model.catalog_table() is model.item_table()
    assert LossConfig().weights() == {"seq": 1.0, "cf": 1.0, "flow": 0.1, "fused": 1.0, "contrast": 0.0}
    assert "attributes" in LossConfig(attributes=0.5).weights()


def _attributes(num_items: int = 10, cold: int = 2) -> torch.Tensor:
    """[N + 1 + cold, 2]: item i has attributes (1 + i % 2, 3 + i % 3); item 5 none; cold items (1, 6)."""
    rows = [[0, 0]] + [[1 + i % 2, 3 + i % 3] for i in range(1, num_items + 1)] + [[1, 6]] * cold
    rows[5] = [0, 0]
    return torch.tensor(rows)


def _model(fusion: str, **overrides) -> FLMModel:
    torch.manual_seed(0)
    options = dict(num_users=4, num_items=10, hidden=8, max_len=5, layers=1, heads=2, dropout=0.0,
                   flow_layers=1, flow_hidden=8, item_features=fusion, item_attributes=_attributes(),
                   num_attributes=6)
    options.update(overrides)
    return FLMModel(**options)


@pytest.mark.parametrize("fusion", ["add", "gate", "concat"])
def test_fused_item_rows_reach_every_consumer_and_the_attribute_objective_trains(fusion):
    model = _model(fusion, cf_user="history")
    assert model.sequence.item_embedding is model.item_features is model.cf.item_embedding
    table, catalog = model.item_table(), model.catalog_table()
    assert table.shape == (11, 8) and catalog.shape == (13, 8) and torch.equal(catalog[:11], table)
    assert not table[0].any()
    pooled = model.item_features.attributes(torch.tensor([11]))
    if fusion == "add":
        assert torch.allclose(catalog[11], pooled[0])  # a cold item: its attributes alone
        assert torch.allclose(table[3], model.item_embedding.weight[3] + model.item_features.attributes(torch.tensor(3)))
    batch = {"user": torch.tensor([0, 1, 2]), "input": torch.tensor([[0, 1, 2, 3, 4], [0, 0, 5, 6, 7], [1, 3, 5, 7, 9]]),
             "target": torch.tensor([[0, 2, 3, 4, 6], [0, 0, 6, 7, 8], [3, 5, 7, 9, 2]])}
    losses = model.losses(batch, {"seq": 1.0, "cf": 1.0, "fused": 1.0, "attributes": 1.0})
    assert set(losses) == {"seq", "cf", "fused", "attributes", "total"}
    assert all(torch.isfinite(v) for v in losses.values())
    losses["total"].backward()
    assert model.item_features.attributes.attribute_embedding.weight.grad.abs().sum() > 0
    assert model.item_embedding.weight.grad.abs().sum() > 0
    # A cold item in a history is looked up from its attributes (ad-hoc sessions in `flm serve`).
    assert torch.isfinite(model.user_representation(torch.tensor([0]), torch.tensor([[0, 0, 1, 11, 12]]))).all()


def test_attribute_encoder_pools_the_mean_of_an_items_attributes_and_zero_without_any():
    bags = _attributes()
    bags[3] = torch.tensor([2, 0])  # one attribute: its mean is that attribute alone
    encoder = AttributeEncoder(bags, 6, 4)
    table = encoder.attribute_embedding.weight
    ids = torch.tensor([[1, 3], [5, 0]])  # any shape of ids; 5 has no attributes, 0 is padding
    expected = torch.stack([torch.stack([(table[2] + table[4]) / 2, table[2]]), torch.zeros(2, 4)])
    torch.testing.assert_close(encoder(ids), expected)
    encoder(ids).sum().backward()
    assert table.grad[0].abs().sum() == 0 and table.grad[2].abs().sum() > 0



def test_sparse_pooling_matches_embedding_bag_in_values_and_gradients():
    torch.manual_seed(0)
    bags = torch.randint(0, 30, (200, 7))
    bags[:, 0] = bags[:, 0].clamp(min=1)
    bags[5] = 0  # no attributes
    bags[6, :3] = 4  # one attribute three times counts three times, as in embedding_bag
    encoder = AttributeEncoder(bags, 29, 8)
    table = encoder.attribute_embedding.weight
    expected = torch.nn.functional.embedding_bag(bags, table, mode="mean", padding_idx=0)
    weights = torch.randn(200, 8)
    (expected * weights).sum().backward()
    expected_grad, table.grad = table.grad.clone(), None
    pooled = encoder.pooled()
    (pooled * weights).sum().backward()
    torch.testing.assert_close(pooled, expected)
    torch.testing.assert_close(table.grad, expected_grad)
    ids = torch.tensor([[3, 5], [6, 0]])
    torch.testing.assert_close(encoder(ids), pooled[ids])  # a lookup pools just its ids, the same way
    assert not pooled[5].any() and not table.grad[0].any()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert encoder.pooled().dtype == torch.float32  # pooled in fp32 under autocast


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("reads_padding", [False, True])
@pytest.mark.parametrize("sparse", [False, True])
def test_pooling_onto_rows_equals_adding_the_pooled_rows_with_the_padding_row_zeroed(device, reads_padding, sparse):
    # One autograd node for rows + pooled with row 0 zero: the same values and gradients as the
    # sum with row 0 zeroed in place, whether or not a consumer gives row 0 a gradient (which
    # must not reach the rows), from a dense gradient or only lookups' sparse one.
    torch.manual_seed(0)
    bags = torch.randint(0, 6, (9, 3))
    bags[0] = 0
    encoder = AttributeEncoder(bags, 5, 4).to(device)
    ids = torch.tensor([0, 2, 2, 7] if reads_padding else [2, 2, 7], device=device)
    weights = torch.randn(ids.shape[0], 4).to(device)
    start, results = torch.randn(9, 4).to(device), []
    for onto in (True, False):
        rows = start.clone().requires_grad_()
        encoder.zero_grad()
        if onto:
            fused = encoder.pooled_onto(rows)
        else:
            fused = rows + encoder.pooled()
            fused[0] = 0
        # The reference reads the rows densely: the in-place write cannot take a sparse gradient.
        loss = (torch.nn.functional.embedding(ids, fused, sparse=sparse and onto) * weights).sum()
        if not sparse:
            loss = loss + (fused * fused.detach()).sum()
        loss.backward()
        results.append((fused.detach(), rows.grad, encoder.attribute_embedding.weight.grad))
    for onto, reference in zip(*results):
        torch.testing.assert_close(onto, reference)
    assert not results[0][0][0].any() and not results[0][1][0].any()


@pytest.mark.parametrize("fusion", ["add", "gate", "concat"])
def test_a_step_that_shares_the_fused_rows_equals_one_that_fuses_at_every_use(fusion):
    batch = {"user": torch.tensor([0, 1]), "input": torch.tensor([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]),
             "target": torch.tensor([[0, 2, 3, 4, 6], [6, 7, 8, 9, 10]])}
    weights = {"seq": 1.0, "cf": 1.0, "fused": 1.0}
    gradients = []
    for shared in (False, True):
        model = _model(fusion, cf_user="history")
        encoder, calls = model.item_features.attributes, []
        pooling_matrices = encoder._pooling_matrices  # each pooling of the whole catalogue asks for them
        encoder._pooling_matrices = lambda: calls.append(1) or pooling_matrices()
        terms = model(batch, weights) if shared else model.losses(batch, weights)
        terms["total"].backward()
        assert len(calls) == 1 if shared else len(calls) > 1
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
        assert model.item_features._shared is None  # nothing kept after the step
    assert gradients[0].keys() == gradients[1].keys()
    for name in gradients[0]:
        torch.testing.assert_close(gradients[1][name], gradients[0][name], msg=name)


@pytest.mark.parametrize("fusion", ["add", "gate", "concat"])
@pytest.mark.parametrize("held_out", [False, True])
def test_the_catalogue_read_whole_equals_a_lookup_of_every_id_in_values_and_gradients(fusion, held_out):
    # The catalogue's id rows come from the table itself (not a gather): the same rows and the
    # same gradients as looking every id up, with cold items and items held out as cold.
    results = []
    for whole in (True, False):
        features = _model(fusion).item_features
        if held_out:
            features.without_id_rows(torch.tensor([2, 7]))
        if fusion != "add":  # move the fusion off its starting point, so that row 0 is not zero by itself
            torch.nn.init.normal_(features.gate.bias if fusion == "gate" else features.projection.bias)
        ids = torch.arange(features.attributes.num_rows)
        rows = features.table(cold=True) if whole else features(ids)
        (rows * torch.linspace(-1, 1, rows.numel()).reshape(rows.shape)).sum().backward()
        results.append((rows.detach(), {name: p.grad.clone() for name, p in features.named_parameters()}))
    (rows_whole, grads_whole), (rows_lookup, grads_lookup) = results
    torch.testing.assert_close(rows_whole, rows_lookup)
    assert not rows_whole[0].any()
    if held_out and fusion == "add":
        torch.testing.assert_close(rows_whole[2], features.attributes(torch.tensor(2)))  # attributes alone
    assert grads_whole.keys() == grads_lookup.keys()
    for name in grads_whole:
        torch.testing.assert_close(grads_whole[name], grads_lookup[name], msg=name)
    assert not grads_whole["item_embedding.weight"][0].any()
    if held_out:
        assert not grads_whole["item_embedding.weight"][[2, 7]].any()


def test_attribute_loss_is_the_multi_label_cross_entropy_of_items_with_attributes():
    encoder = AttributeEncoder(_attributes(), 6, 4)
    vectors = torch.randn(4, 4)
    ids = torch.tensor([1, 5, 0, 11])  # 5: no attributes, 0: no target; both left out
    logits = vectors @ encoder.attribute_embedding.weight[1:].T
    expected = torch.stack([torch.nn.functional.binary_cross_entropy_with_logits(
        logits[row], torch.tensor([0., 1., 0., 1., 0., 0.] if row == 0 else [1., 0., 0., 0., 0., 1.]))
        for row in (0, 3)]).mean()
    assert torch.allclose(attribute_loss(encoder, vectors, ids), expected)
    assert attribute_loss(encoder, vectors, torch.zeros(4, dtype=torch.long)) == 0
    with pytest.raises(ValueError, match="outside"):
        AttributeEncoder(torch.tensor([[0, 9]]), 6, 4)
    with pytest.raises(ValueError, match="rows"):
        FusedItemEmbedding(torch.nn.Embedding(20, 4, padding_idx=0), encoder, "add")


def test_configs_refuse_what_item_features_cannot_do(tmp_path):
    base = [f"data={tmp_path}", f"output={tmp_path / 'r'}"]
    with pytest.raises(ConfigKeyError, match="loss.attributes"):
        load_config(PretrainConfig, None, [*base, "loss.attributes=1"])
    with pytest.raises(ConfigKeyError, match="model.item_features"):
        load_config(PretrainConfig, None, [*base, "model.item_features=add", "loss.softmax=sampled",
                                           "train.sparse_item_table=true"])
    with pytest.raises(ConfigKeyError, match="model.item_features"):
        load_config(PretrainConfig, None, [*base, "model.item_features=bag"])
    plain = _prepare(tmp_path, "plain", None, root="/cfg")
    with pytest.raises(UserError, match="prepared without them"):
        item_attributes_for(ModelConfig(item_features="gate"), plain)


# ---- cold items --------------------------------------------------------------------------------


def test_a_cold_item_is_scored_from_its_features_and_can_reach_the_top_k():
    model = _model("add").eval()
    with torch.no_grad():  # make attribute 6 (only the cold items have it) point where the user looks
        vector = model.user_representation(torch.tensor([0]), torch.tensor([[0, 0, 1, 2, 3]]))
        model.item_features.attributes.attribute_embedding.weight[6] = 50 * vector[0] / vector.norm()
        catalog = model.catalog_table()
        scores, items = top_k(vector, catalog, 3, 4)
    assert torch.isfinite(catalog[11:] @ vector[0]).all()
    assert {11, 12} <= set(items[0].tolist())
    without = build_model(ModelConfig(hidden=8, max_len=5, layers=1, heads=2, flow_layers=1, flow_hidden=8), 4, 10)
    assert without.catalog_table().shape[0] == 11  # an id-only model has no row for a cold item


def _service(model, n: int = 10) -> RecommenderService:
    ids = [""] + [f"i{i}" for i in range(1, n + 1)] + ["cold1", "cold2"]
    offsets = np.array([0, 3, 3, 3, 3])
    return RecommenderService(model, ids, ["u0", "u1", "u2", "u3"], offsets, np.array([1, 2, 3]), max_len=5,
                              source="fused", max_k=13)


def test_serving_recommends_cold_items_only_with_features():
    model = _model("add").eval()
    with torch.no_grad():
        vector = model.user_representation(torch.tensor([0]), torch.tensor([[0, 0, 1, 2, 3]]))
        model.item_features.attributes.attribute_embedding.weight[6] = 50 * vector[0] / vector.norm()
    service = _service(model)
    status, answer = service.answer({"user": "u0", "k": 3})
    assert status == 200 and {"cold1", "cold2"} <= {r["item_id"] for r in answer["recommendations"]}
    assert all(math.isfinite(r["score"]) for r in answer["recommendations"])
    assert service.info()["cold_items"] == 2 and service.info()["items"] == 12
    # a cold item in an ad-hoc history is known, and excluded from its own recommendations
    status, answer = service.answer({"items": ["i1", "cold1"], "k": 12})
    assert status == 200 and answer["unknown_items"] == [] and "cold1" not in {r["item_id"] for r in answer["recommendations"]}
    torch.manual_seed(0)
    plain = _service(build_model(ModelConfig(hidden=8, max_len=5, layers=1, heads=2, flow_layers=1, flow_hidden=8),
                                 4, 10).eval())
    _, answer = plain.answer({"user": "u0", "k": 13})
    assert not {"cold1", "cold2"} & {r["item_id"] for r in answer["recommendations"]}
    assert plain.answer({"items": ["cold1"]})[0] == 422 and "cold_items" not in plain.info()


# ---- training, checkpoints and fine-tuning ----------------------------------------------------------


def test_pretraining_with_features_logs_the_attribute_term_and_checkpoints_refuse_other_features(tmp_path):
    from flm_dist.train.pretrain import run_pretrain

    features = _item2attributes("/pt")
    data = _prepare(tmp_path, "data", features, root="/pt")
    run = tmp_path / "run"
    summary = run_pretrain(load_config(PretrainConfig, None, [f"data={data}", f"output={run}", *SMALL,
                                                              "model.item_features=gate", "loss.attributes=0.5"]))
    assert math.isfinite(summary["history"][-1]["loss/attributes"])
    assert math.isfinite(summary["final"]["valid/ndcg@10/full"])
    assert (run / "vocab" / "attributes.parquet").is_file()
    model, manifest, _ = load_model_for_data(str(run / "best"), data, torch.device("cpu"))
    assert model.catalog_table().shape[0] == manifest["items"] + 1 + 2
    service = RecommenderService.load(str(run), data, max_k=manifest["items"] + 2)
    assert service.info()["cold_items"] == 2
    _, answer = service.answer({"user": "1", "k": manifest["items"] + 2})
    assert {"101", "102"} <= {r["item_id"] for r in answer["recommendations"]}
    # flm export's scoring (the Ray Data actor, called in-process): cold items in the top-K and items.parquet
    from flm_dist.eval.export import UserScorer, catalog_ids

    test = pq.read_table(Path(data) / "test")
    scored = UserScorer(str(run / "best"), data, manifest["items"] + 2, "cpu", 2 ** 20)(test)
    assert all({"101", "102"} <= set(items) for items in scored.column("items").to_pylist())
    assert catalog_ids(data, manifest["items"] + 3)[-2:].to_pylist() == ["101", "102"]
    id_only = tmp_path / "id_only"
    run_pretrain(load_config(PretrainConfig, None, [f"data={data}", f"output={id_only}", *SMALL]))
    scored = UserScorer(str(id_only / "best"), data, manifest["items"] + 2, "cpu", 2 ** 20)(test)
    assert not any({"101", "102"} & set(items) for items in scored.column("items").to_pylist())
    # The same log with other features is another vocabulary: the checkpoint refuses it.
    other = _prepare(tmp_path, "other", _write("/pt/other.json", json.dumps({"1": [5], "2": [6]})), root="/pt")
    with pytest.raises(UserError, match="another vocabulary"):
        load_model_for_data(str(run / "best"), other, torch.device("cpu"))
    assert vocabulary_hash(run / "vocab") == manifest["vocab_hash"]


def _vocab_dir(root: Path, items: list[str], attributes: list[tuple[str, str]], item_attributes: dict[str, list[int]]):
    root.mkdir(parents=True)
    pq.write_table(pa.table({"index": pa.array(range(1, len(items) + 1), pa.int32()), "item_id": items,
                             "count": pa.array([1] * len(items), pa.int64())}), root / "items.parquet")
    pq.write_table(pa.table({"index": pa.array([0, 1], pa.int32()), "user_id": ["u0", "u1"]}), root / "users.parquet")
    pq.write_table(pa.table({"index": pa.array(range(1, len(attributes) + 1), pa.int32()),
                             "field": [f for f, _ in attributes], "value": [v for _, v in attributes],
                             "items": pa.array([1] * len(attributes), pa.int64())}), root / "attributes.parquet")
    pq.write_table(pa.table({"index": pa.array([items.index(i) + 1 for i in item_attributes], pa.int32()),
                             "item_id": list(item_attributes),
                             "attributes": pa.array(list(item_attributes.values()), pa.list_(pa.int32()))}),
                   root / "item_attributes.parquet")


def test_fine_tuning_carries_attribute_rows_over_by_field_and_value(tmp_path):
    old = tmp_path / "old" / "vocab"
    new = tmp_path / "new"
    _vocab_dir(old, ["a", "b", "c"], [("brand", "x"), ("brand", "y"), ("genre", "x")], {"a": [1], "b": [2, 3]})
    _vocab_dir(new / "vocab", ["c", "a", "d"], [("genre", "x"), ("brand", "z"), ("brand", "x")],
               {"c": [1], "a": [3], "d": [2]})
    mapping = map_vocabulary(old, str(new))
    assert mapping.attributes.tolist() == [0, 3, -1, 1]  # genre:x is old 3, brand:z new, brand:x old 1
    counts = mapping.counts()
    assert (counts.attributes_known, counts.attributes_new, counts.attributes_unused) == (2, 1, 1)

    def model(num_items, matrix):
        torch.manual_seed(len(matrix))
        return FLMModel(num_users=2, num_items=num_items, hidden=4, max_len=3, layers=1, heads=1, dropout=0.0,
                        flow_layers=0, item_features="add", item_attributes=torch.tensor(matrix), num_attributes=3)

    pretrained = model(3, [[0, 0], [1, 0], [2, 3], [0, 0]])
    target = model(3, [[0, 0], [1, 0], [3, 0], [2, 0], [0, 0]])
    fresh = target.state_dict()["item_features.attributes.attribute_embedding.weight"].clone()
    load_pretrained_weights(target, pretrained.state_dict(), mapping)
    loaded = target.item_features.attributes.attribute_embedding.weight
    old_rows = pretrained.item_features.attributes.attribute_embedding.weight
    assert torch.equal(loaded[1], old_rows[3]) and torch.equal(loaded[3], old_rows[1])
    assert torch.equal(loaded[2], fresh[2])
    assert torch.equal(target.sequence.item_embedding.attributes.attribute_embedding.weight, loaded)

    (new / "vocab" / "attributes.parquet").unlink()
    (new / "vocab" / "item_attributes.parquet").unlink()
    with pytest.raises(UserError, match="no attribute vocabulary"):
        load_pretrained_weights(target, pretrained.state_dict(), map_vocabulary(old, str(new)))
