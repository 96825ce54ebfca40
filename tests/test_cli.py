"""The `flm` command line: paths may come from presets, and a missing one is a one-line error."""

from flm_dist.cli.common import settings_from_args
from flm_dist.cli.main import main, parse_arguments


def test_paths_may_come_from_composed_presets(tmp_path):
    dataset = tmp_path / "dataset.yaml"
    dataset.write_text("data: .data/beauty\noutput: runs/from_preset\nmodel: {max_len: 50}\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: {hidden: 32}\noutput: runs/from_recipe\n")
    args = parse_arguments(["pretrain", "--config", str(dataset), "--config", str(recipe), "model.hidden=16"])
    settings = settings_from_args(args, {"data": args.data, "output": args.output})
    assert settings == {"data": ".data/beauty", "output": "runs/from_recipe", "model": {"max_len": 50, "hidden": 16}}
    args = parse_arguments(["pretrain", "--config", str(dataset), "--output", "runs/flag"])
    assert settings_from_args(args, {"data": args.data, "output": args.output})["output"] == "runs/flag"


def test_a_path_given_nowhere_is_one_line_naming_the_key(capsys):
    assert main(["pretrain", "--output", "runs/x"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "'data'" in error and "required" in error
