import pytest

from flm_dist.config import ConfigKeyError, ModelConfig, from_dict, load_config, to_dict
from flm_dist.errors import UserError
from flm_dist.train.configs import PretrainConfig


def test_overrides_nested_and_typed(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("data: d\noutput: o\nmodel:\n  hidden: 32\n  heads: 2\n")
    config = load_config(PretrainConfig, str(preset), ["model.layers=3", "train.lr=0.01", "eval.ks=[1,5]"])
    assert config.model.hidden == 32 and config.model.layers == 3
    assert config.train.lr == 0.01 and config.eval.ks == (1, 5)
    assert from_dict(PretrainConfig, to_dict(config)) == config
    # YAML 1.1 reads 1e-3 as a string; a float field takes it as the number it spells
    assert load_config(PretrainConfig, str(preset), ["train.lr=1e-3"]).train.lr == 0.001
    with pytest.raises(ConfigKeyError, match="train.lr"):
        load_config(PretrainConfig, str(preset), ["train.lr=1e-3x"])


@pytest.mark.parametrize("override, key", [
    ("model.hiden=3", "model.hiden"),
    ("model.hidden=abc", "model.hidden"),
    ("model.heads=3", "model.heads"),
    ("model.encoder=bert", "model.encoder"),
    ("train.lr=-1", "train.lr"),
    ("train.eval_from_epoch=0", "train.eval_from_epoch"),
    ("model.dropout_masks=uniform", "model.dropout_masks"),
    ("model.flow_stop_gradient=maybe", "model.flow_stop_gradient"),
    ("model.cf_user=items", "model.cf_user"),
    ("loss.decay=[seq,cf,fused]", "loss.decay"),  # nothing left with a constant weight
    ("loss.decay=[cf,cf]", "loss.decay"),
    ("loss.decay=[ranking]", "loss.decay[0]"),
    ("loss.label_smoothing=1.0", "loss.label_smoothing"),
    ("loss.contrast_positive=same_target", "loss.contrast_positive"),  # loss.contrast is 0
    ("model.init_std=-0.02", "model.init_std"),
    ("loss.intent_clusters=1", "loss.intent_clusters"),
    ("loss.intent_temperature=0", "loss.intent_temperature"),
    ("model.mixer=bsarec", "model.mixer"),  # not causal, and train.windows defaults to all
    ("train.early_dropout=1.0", "train.early_dropout"),
    ("train.early_dropout=0.3", "train.early_dropout"),  # without train.early_dropout_epochs
    ("train.early_dropout_epochs=-1", "train.early_dropout_epochs"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigKeyError) as info:
        load_config(PretrainConfig, None, ["data=d", "output=o", override])
    assert info.value.key == key
    assert f"'{key}'" in str(info.value) and "\n" not in str(info.value)


def test_options_that_need_another_option_name_both():
    with pytest.raises(ConfigKeyError, match="model.cf_user=table") as info:
        load_config(PretrainConfig, None, ["data=d", "output=o", "model.cf_user=history",
                                           "train.sparse_user_table=true"])
    assert info.value.key == "train.sparse_user_table"
    load_config(PretrainConfig, None, ["data=d", "output=o", "model.cf_user=history"])
    with pytest.raises(ConfigKeyError, match="softmax=full") as info:
        load_config(PretrainConfig, None, ["data=d", "output=o", "loss.label_smoothing=0.1", "loss.softmax=sampled"])
    assert info.value.key == "loss.label_smoothing"


def test_missing_required_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigKeyError, match="'data'"):
        load_config(PretrainConfig, None, ["output=o"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(ModelConfig, str(bad))
    with pytest.raises(UserError, match="not found"):
        load_config(ModelConfig, str(tmp_path / "missing.yaml"))


# Presets compose: a dataset file, then a recipe (jobs/data/, jobs/recipes/; later files win).
MAX_LEN = {"beauty": 50, "toys": 50, "sports": 50, "ml100k": 200}


def _preset(name: str) -> str:
    from pathlib import Path

    return str(Path(__file__).resolve().parents[1] / "jobs" / name)


@pytest.mark.parametrize("dataset", sorted(MAX_LEN))
def test_dataset_plus_recipe_gives_the_measured_recipe(dataset):
    data, sasrec, joint = _preset(f"data/{dataset}.yaml"), _preset("recipes/sasrec.yaml"), _preset("recipes/pretrain.yaml")
    config = load_config(PretrainConfig, [data, sasrec], ["output=o"])
    assert config.data == f".data/{dataset}" and config.model.max_len == MAX_LEN[dataset]
    assert (config.model.positions, config.train.windows, config.train.epochs, config.train.patience) == (
        "first", "prefixes", 20, 10)
    assert (config.train.lr, config.train.precision) == (2e-3, "bf16")
    assert (config.loss.cf, config.loss.fused, config.loss.flow) == (0.0, 0.0, 0.0)
    assert (config.eval.user_source, config.eval.mask_history) == ("sequence", False)
    config = load_config(PretrainConfig, [data, joint], ["output=o"])
    assert (config.model.cf_user, config.model.user_head, config.train.windows) == ("history", "linear", "prefixes")
    assert config.model.max_len == MAX_LEN[dataset] and config.eval.user_source == "fused"


def test_a_later_preset_wins_key_by_key(tmp_path):
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text("data: d\noutput: o\nmodel: {hidden: 32, layers: 3}\ntrain: {lr: 0.01}\n")
    second.write_text("model: {hidden: 16}\n")
    config = load_config(PretrainConfig, [str(first), str(second)])
    assert (config.model.hidden, config.model.layers, config.train.lr) == (16, 3, 0.01)
    config = load_config(PretrainConfig, [str(second), str(first)])
    assert config.model.hidden == 32
    assert load_config(PretrainConfig, [str(first), str(second)], ["model.hidden=8"]).model.hidden == 8
