import dataclasses
import json
import logging
import runpy
import shutil
from pathlib import Path

import numpy as np
import pytest

from flm_dist.cli.main import build_parser
from flm_dist.config import ConfigKeyError, from_dict
from flm_dist.errors import UserError
from flm_dist.eval.evaluate import user_ranks
from flm_dist.eval.metrics import ndcg_at, wilcoxon_normal_p_value, wilcoxon_p_value
from flm_dist.experiments.ablate import (
    DEFAULT_VARIANTS,
    VARIANTS,
    AblateConfig,
    _finetune_config,
    _finished_summary,
    _pretrain_config,
    run_ablation,
)
from flm_dist.train.configs import FinetuneConfig


def _flm_cli(argv):
    args = build_parser().parse_args(argv)
    args.run(args)


def test_ablation_end_to_end(tiny_data, tmp_path, capsys, caplog):
    output = tmp_path / "ablation"
    overrides = ["common.scaling.workers=0", "common.train.epochs=1", "common.train.max_steps=2",
                 "common.train.batch_size=64", "common.train.warmup_steps=1", "common.eval.batch_size=128",
                 "pretrain.model.hidden=16", "pretrain.model.max_len=12", "pretrain.model.flow_hidden=16",
                 "pretrain.model.flow_layers=2"]
    common = ["ablate", "--data", tiny_data, "--output", str(output), "--fractions", "1.0,0.5"]
    # Seed 1 on its own first (as another machine would), then the command over both seeds.
    _flm_cli(common + ["--first-seed", "1", "--seeds", "1"] + overrides)
    seed1_alone = json.loads((output / "ablation.json").read_text())
    assert seed1_alone["seeds"] == [1] and not (output / "runs" / "seed0").exists()
    seed1_files = sorted((output / "runs" / "seed1").glob("**/metrics.json")) + sorted(
        (output / "runs" / "seed1").glob("**/test_user_ranks.npz"))
    assert len(seed1_files) == len({VARIANTS[v][0] for v in DEFAULT_VARIANTS}) + 2 * len(DEFAULT_VARIANTS) * 2
    written = {path: path.stat().st_mtime_ns for path in seed1_files}
    assert {p.name for p in (output / "seeds").iterdir()} == {"seed1.json", "seed1.npz"}
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="flm_dist"):
        _flm_cli(common + ["--seeds", "2"] + overrides)
    # Seed 1 comes from its seed result; only seed 0's stages run.
    stages = len({VARIANTS[v][0] for v in DEFAULT_VARIANTS}) + 2 * len(DEFAULT_VARIANTS)
    assert f"seed 1: read back from {output / 'seeds' / 'seed1.json'}" in caplog.text
    assert f"ablation stage 1/{stages}, seed 0: pretraining " in caplog.text
    assert f"ablation stage {stages}/{stages}, seed 0 fraction 0.5: fine-tuning {DEFAULT_VARIANTS[-1]}" in caplog.text
    assert "seed 1 fraction" not in caplog.text
    table = (output / "ablation.md").read_text()
    assert table in capsys.readouterr().out
    report = json.loads((output / "ablation.json").read_text())
    assert len(report["results"]) == len(DEFAULT_VARIANTS) * 2 and report["reference"] == "flm"
    for row in report["results"]:
        assert f"| {row['variant']} | {row['fraction']} |" in table
        alone = next(r for r in seed1_alone["results"]
                     if (r["variant"], r["fraction"]) == (row["variant"], row["fraction"]))
        for protocol in ("full", "full_nomask"):
            for metric in (f"ndcg@10/{protocol}", f"hr@10/{protocol}"):
                assert len(row[metric]["per_seed"]) == 2 and 0.0 <= row[metric]["mean"] <= 1.0
                assert row[metric]["per_seed"][1] == alone[metric]["per_seed"][0]
            assert row["variant"] == "flm" or 0.0 <= row["p_value_vs_reference"][protocol] <= 1.0
    # Seed 1's finished runs were read back, neither trained nor scored again.
    assert {path: path.stat().st_mtime_ns for path in seed1_files} == written
    run = output / "runs" / "seed1" / "fraction0.5" / "whiten"
    recorded = from_dict(FinetuneConfig, json.loads((run / "metrics.json").read_text())["config"])
    assert _finished_summary(recorded) is not None
    longer = dataclasses.replace(recorded, train=dataclasses.replace(recorded.train, epochs=2))
    assert _finished_summary(longer) is None  # a changed config resumes the run instead
    for fraction in ("1.0", "0.5"):
        for protocol in ("full", "full_nomask"):
            test = report["significance"][fraction][protocol]
            assert test["best_other"] in DEFAULT_VARIANTS and test["best_other"] != "flm" and 0.0 <= test["p_value"] <= 1.0
            rows = {r["variant"]: r for r in report["results"] if str(r["fraction"]) == fraction}
            best = max((v for v in rows if v != "flm"), key=lambda v: rows[v][f"ndcg@10/{protocol}"]["mean"])
            assert test["best_other"] == best

    # The per-user values behind the tests are the ones behind metrics.json, per protocol.
    run = output / "runs" / "seed1" / "fraction0.5" / "whiten"
    final = json.loads((run / "metrics.json").read_text())["final"]
    ranks = user_ranks(run / "best", tiny_data)
    row = next(r for r in report["results"] if r["variant"] == "whiten" and r["fraction"] == 0.5)
    for protocol in ("full", "full_nomask"):
        per_user = ndcg_at(ranks[protocol], 10)
        assert per_user.mean() == pytest.approx(final[f"test/ndcg@10/{protocol}"], abs=1e-9)
        assert row[f"ndcg@10/{protocol}"]["per_seed"][1] == final[f"test/ndcg@10/{protocol}"]


def test_seed_results_outlive_the_runs_and_parallel_stages_match(tiny_data, tmp_path, caplog):
    """Stages as Ray tasks, two at a time, give the sequential table; the seed results alone
    rebuild it with the runs deleted, for the same settings only."""
    settings = {"common": {"scaling": {"workers": 0}, "train": {"epochs": 1, "max_steps": 2, "batch_size": 64,
                                                                "warmup_steps": 1},
                           "eval": {"batch_size": 128}},
                "pretrain": {"model": {"hidden": 16, "max_len": 12, "flow_hidden": 16, "flow_layers": 2}},
                "variants": ("sasrec", "flm"), "fractions": (0.5,), "seeds": 1}
    sequential = run_ablation(AblateConfig(data=tiny_data, output=str(tmp_path / "one"), **settings))
    results = tmp_path / "kept"
    with caplog.at_level(logging.INFO, logger="flm_dist"):
        parallel = run_ablation(AblateConfig(data=tiny_data, output=str(tmp_path / "two"), parallel=2,
                                             results=str(results), **settings))
    assert "ablation stage 4/4 started" in caplog.text
    assert parallel["results"] == sequential["results"]
    assert parallel["significance"] == sequential["significance"]

    shutil.rmtree(tmp_path / "two")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flm_dist"):
        again = run_ablation(AblateConfig(data=tiny_data, output=str(tmp_path / "two"), results=str(results),
                                          **settings))
    assert "ablation stage" not in caplog.text and not (tmp_path / "two" / "runs").exists()
    assert again["results"] == sequential["results"]
    # The pretraining runs' test metrics outlive them too: those of their own metrics.json.
    assert again["pretraining"] == parallel["pretraining"] == sequential["pretraining"]
    for objective in ("sasrec", "flm"):
        final = json.loads((tmp_path / "one" / "runs" / "seed0" / f"pretrain-{objective}" / "metrics.json").read_text())["final"]
        kept = again["pretraining"]["0"][objective]
        assert set(kept) == {f"test/{m}@10/{p}" for m in ("ndcg", "hr") for p in ("full", "full_nomask")}
        assert all(kept[name] == final[name] for name in kept)
        cells = " / ".join(f"{final[f'test/ndcg@10/{p}']:.4f}" for p in ("full_nomask", "full"))
        assert f"| {objective} | {cells} |" in (tmp_path / "two" / "ablation.md").read_text()
    assert "predates" not in (tmp_path / "two" / "ablation.md").read_text()
    from flm_dist.experiments.ablate import markdown_table
    with_older_seed = markdown_table(dict(again, seeds=[0, 1], pretraining={**again["pretraining"], "1": {}}))
    assert "predates kept pretraining metrics" in with_older_seed and "| sasrec | " in with_older_seed
    assert with_older_seed.count("| —") == 2  # sasrec and flm of seed 1
    # A seed result from before pretraining metrics were kept still reads back, without them.
    record = json.loads((results / "seed0.json").read_text())
    del record["pretraining"]
    (results / "seed0.json").write_text(json.dumps(record))
    older = run_ablation(AblateConfig(data=tiny_data, output=str(tmp_path / "two"), results=str(results),
                                      **settings))
    assert older["results"] == sequential["results"] and older["pretraining"] == {"0": {}}
    assert "Pretraining runs" not in (tmp_path / "two" / "ablation.md").read_text()
    # Other settings, or a variant the seed result lacks, run the seed instead of reusing it.
    from flm_dist.experiments.ablate import _settings, read_seed_result
    config = AblateConfig(data=tiny_data, output="o", **settings)
    assert read_seed_result(results, 0, _settings(config), config.variants, config.fractions) is not None
    longer = dataclasses.replace(config, finetune={"train": {"epochs": 2}})
    assert read_seed_result(results, 0, _settings(longer), config.variants, config.fractions) is None
    assert read_seed_result(results, 0, _settings(config), ("mf", "flm"), config.fractions) is None
    assert read_seed_result(results, 0, _settings(config), config.variants, (1.0,)) is None
    assert read_seed_result(results, 1, _settings(config), config.variants, config.fractions) is None

    # A variant added to finished runs trains alone; the reference moves to it.
    finished = {path: path.stat().st_mtime_ns for path in (tmp_path / "one" / "runs").glob("**/metrics.json")}
    extended = run_ablation(AblateConfig(data=tiny_data, output=str(tmp_path / "one"), reference="flm_sequence",
                                         **dict(settings, variants=("sasrec", "flm", "flm_sequence"))))
    assert {path: path.stat().st_mtime_ns for path in finished} == finished
    added = tmp_path / "one" / "runs" / "seed0" / "fraction0.5" / "flm_sequence"
    recorded = from_dict(FinetuneConfig, json.loads((added / "metrics.json").read_text())["config"])
    assert recorded.pretrained == str(tmp_path / "one" / "runs" / "seed0" / "pretrain-flm" / "best")
    assert (recorded.finetune.source, recorded.finetune.flow, recorded.eval.user_source) == ("sequence", "none", "sequence")
    rows = {r["variant"]: r for r in extended["results"]}
    before = {r["variant"]: r for r in sequential["results"]}
    for variant in ("sasrec", "flm"):  # read back, not retrained
        assert all(rows[variant][f"{m}@10/{p}"] == before[variant][f"{m}@10/{p}"]
                   for m in ("ndcg", "hr") for p in ("full", "full_nomask"))
    assert rows["flm_sequence"]["p_value_vs_reference"] == {"full_nomask": None, "full": None}
    assert all(0.0 <= rows[v]["p_value_vs_reference"]["full"] <= 1.0 for v in ("sasrec", "flm"))
    assert extended["reference"] == "flm_sequence"
    assert extended["significance"]["0.5"]["full"]["best_other"] in ("sasrec", "flm")
    assert "Wilcoxon signed-rank test of flm_sequence against" in (tmp_path / "one" / "ablation.md").read_text()
    # The seed result now holds the added variant too, and still serves the smaller set.
    seeds = tmp_path / "one" / "seeds"
    assert read_seed_result(seeds, 0, _settings(config), ("sasrec", "flm", "flm_sequence"), (0.5,)) is not None
    assert read_seed_result(seeds, 0, _settings(config), config.variants, (0.5,)) is not None
    # A later command with fewer variants keeps what the seed result held.
    run_ablation(AblateConfig(data=tiny_data, output=str(tmp_path / "one"), **dict(settings, variants=("flm", "whiten"))))
    assert read_seed_result(seeds, 0, _settings(config), ("sasrec", "flm", "flm_sequence", "whiten"), (0.5,)) is not None
    fewer = run_ablation(AblateConfig(data=tiny_data, output=str(tmp_path / "one"), **dict(settings, variants=("flm", "whiten"))))
    assert list(fewer["pretraining"]["0"]) == ["flm"]  # sasrec's pretraining is kept, but not this table's

    # Baselines: another ablation's seed results join the table untrained, paired by user.
    headed = dict(settings, pretrain={**settings["pretrain"], "model": {**settings["pretrain"]["model"],
                                                                        "user_head": "linear"}})
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flm_dist"):
        mixed = run_ablation(AblateConfig(data=tiny_data, output=str(tmp_path / "head"), baseline_results=str(seeds),
                                          baseline_variants=("sasrec", "flm_sequence"), **headed))
    assert "fine-tuning sasrec" in caplog.text and "fine-tuning flm_sequence" not in caplog.text
    rows = {r["variant"]: r for r in mixed["results"]}
    assert list(rows) == ["sasrec", "flm", "sasrec (baseline)", "flm_sequence (baseline)"]
    assert rows["sasrec (baseline)"]["ndcg@10/full"] == before["sasrec"]["ndcg@10/full"]
    assert rows["sasrec"]["ndcg@10/full"] != before["sasrec"]["ndcg@10/full"]  # pretrained with the head
    with np.load(tmp_path / "head" / "seeds" / "seed0.npz") as head_ranks, np.load(seeds / "seed0.npz") as base:
        for protocol in ("full", "full_nomask"):
            expected = wilcoxon_p_value(ndcg_at(head_ranks[f"flm/0.5/{protocol}"], 10),
                                        ndcg_at(base[f"flm_sequence/0.5/{protocol}"], 10))
            assert rows["flm_sequence (baseline)"]["p_value_vs_reference"][protocol] == expected
    assert "| sasrec (baseline) | 0.5 |" in (tmp_path / "head" / "ablation.md").read_text()
    assert mixed["variants"]["flm_sequence (baseline)"]["source"] == "sequence"
    # Only the pretraining settings may differ.
    with pytest.raises(UserError, match="seed0.json: baseline_results needs"):
        run_ablation(AblateConfig(data=tiny_data, output=str(tmp_path / "head"), baseline_results=str(seeds),
                                  baseline_variants=("sasrec",), **dict(headed, finetune={"train": {"lr": 0.01}})))
    with pytest.raises(UserError, match="seed0.json: baseline_results needs"):
        run_ablation(AblateConfig(data=tiny_data, output=str(tmp_path / "head"), baseline_results=str(seeds),
                                  baseline_variants=("mf",), **headed))


def test_parallel_stages_need_in_task_training():
    with pytest.raises(ConfigKeyError, match="parallel"):
        run_ablation(AblateConfig(data="d", output="o", parallel=2))


def test_variant_configs(tmp_path):
    config = AblateConfig(data="d", output="o", common={"train": {"epochs": 2}}, pretrain={"loss": {"cf": 0.5}})
    sasrec = _pretrain_config(config, "sasrec", 1, tmp_path / "p")
    assert (sasrec.loss.cf, sasrec.loss.fused, sasrec.loss.flow, sasrec.eval.user_source) == (0, 0, 0, "sequence")
    assert sasrec.train.epochs == 2 and sasrec.train.seed == 1
    mf = _pretrain_config(config, "mf", 0, tmp_path / "p")
    assert (mf.loss.seq, mf.loss.fused, mf.loss.flow, mf.eval.user_source) == (0, 0, 0, "cf")
    joint = _pretrain_config(config, "flm", 0, tmp_path / "p")
    assert joint.loss.cf == 0.5 and joint.loss.flow > 0
    # From scratch: no pretrained weight, the fraction's users, the steps of pretraining (2 epochs
    # of every user = 20 epochs of a tenth) plus fine-tuning (2 epochs), validated every 10 epochs.
    scratch = _finetune_config(config, "scratch", 0.1, 1, tmp_path / "p", tmp_path / "f")
    assert (scratch.finetune.init, scratch.finetune.source, scratch.finetune.flow) == ("random", "sequence", "none")
    assert (scratch.finetune.data_fraction, scratch.train.epochs, scratch.train.eval_every_epochs) == (0.1, 22, 10)
    scratch_all = _finetune_config(config, "scratch", 1.0, 1, tmp_path / "p", tmp_path / "f")
    assert (scratch_all.train.epochs, scratch_all.train.eval_every_epochs) == (4, 1)
    sasrec_ft = _finetune_config(config, "sasrec", 0.1, 1, tmp_path / "p", tmp_path / "f")
    assert (sasrec_ft.finetune.init, sasrec_ft.train.epochs, sasrec_ft.train.eval_every_epochs) == ("pretrained", 2, 1)
    with pytest.raises(ConfigKeyError, match="finetune.hed"):  # before anything trains
        run_ablation(AblateConfig(data="d", output=str(tmp_path / "o"), finetune={"finetune": {"hed": "mlp"}}))
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigKeyError, match="variants"):
        AblateConfig(data="d", output="o", variants=("sasrec", "mf"))
    with pytest.raises(ConfigKeyError, match="variants"):
        AblateConfig(data="d", output="o", variants=("sasrec", "flm"), reference="mf")
    with pytest.raises(ConfigKeyError, match="reference"):
        AblateConfig(data="d", output="o", reference="flow")
    assert "flm_sequence" not in AblateConfig(data="d", output="o").variants
    with pytest.raises(ConfigKeyError, match="baseline_variants"):
        AblateConfig(data="d", output="o", baseline_variants=("scratch",))
    with pytest.raises(ConfigKeyError, match="baseline_variants"):
        AblateConfig(data="d", output="o", baseline_results="r", baseline_variants=("sasrec", "flow"))
    # The joint model fine-tuned from its sequence state: flm's pretraining, sasrec's path.
    joint_sequence = _finetune_config(config, "flm_sequence", 0.1, 1, tmp_path / "p", tmp_path / "f")
    assert (joint_sequence.finetune.init, joint_sequence.finetune.source, joint_sequence.finetune.flow,
            joint_sequence.eval.user_source) == ("pretrained", "sequence", "none", "sequence")
    assert joint_sequence.train == sasrec_ft.train


def test_wilcoxon_fallback_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x = np.round(rng.random(300), 1)  # many ties, some zero differences
    y = np.round(rng.random(300) * 0.9, 1)
    differences = (x - y)[x != y]
    expected = scipy_stats.wilcoxon(differences, method="approx").pvalue
    assert wilcoxon_normal_p_value(differences) == pytest.approx(expected, rel=1e-9)
    assert wilcoxon_p_value(x, y) == pytest.approx(scipy_stats.wilcoxon(x, y).pvalue)
    assert wilcoxon_p_value(x, x) == 1.0


def test_the_results_doc_answer_table_is_what_the_kept_seed_results_give(capsys):
    """The one-table answer of the ablation in docs/results.md is recomputed from results/ on every
    run, so it cannot drift from the seed results it cites."""
    pytest.importorskip("scipy.stats")  # the p-values in docs/results.md are scipy's
    repo = Path(__file__).resolve().parents[1]
    runpy.run_path(str(repo / "results" / "verdict.py"), run_name="__main__")
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == 2 + 2 * 9
    results_doc = (repo / "docs" / "results.md").read_text().splitlines()
    missing = [row for row in rows if row not in results_doc]
    assert not missing, f"docs/results.md lacks these rows of results/verdict.py: {missing}"
