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
    ("model.flow_stop_gradient=maybe", "model.flow_stop_gradient"),
    ("model.cf_user=items", "model.cf_user"),
    ("loss.decay=[seq,cf,fused]", "loss.decay"),  # nothing left with a constant weight
    ("loss.decay=[cf,cf]", "loss.decay"),
    ("loss.decay=[ranking]", "loss.decay[0]"),
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


def test_missing_required_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigKeyError, match="'data'"):
        load_config(PretrainConfig, None, ["output=o"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(ModelConfig, str(bad))
    with pytest.raises(UserError, match="not found"):
        load_config(ModelConfig, str(tmp_path / "missing.yaml"))
