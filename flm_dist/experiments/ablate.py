"""`flm ablate`: what each part of Pretraining-FLM contributes, on one prepared dataset.

Every variant runs the same two stages with the same budget (the `pretrain` and `finetune`
overrides, e.g. train.epochs), the same seeds and, per seed and fraction, the same users:

  stage 1, pretraining on every training user, one run per objective and seed:
    sasrec  next-item loss of the sequence encoder only (cf=0 fused=0 flow=0), ranks with it
    mf      MF loss only (seq=0 fused=0 flow=0), ranks with the MF user vector
    noflow  the joint objective without the flow (flow=0)
    flm     the full Pretraining-FLM objective, flow included
  stage 2, fine-tuning (`flm finetune`, full mode, same head) at each data fraction:
    (a) scratch       SASRec from scratch: no pretrained weight (finetune.init=random; the sasrec
                      run gives only the architecture), trained on the fraction's users alone for
                      as many optimiser steps as pretraining plus fine-tuning take, validated about
                      once per full-data epoch of steps
        sasrec        from sasrec, source sequence, flow none (SASRec pretrained on every user's
                      training sequence; at fraction 1.0 the same model and steps as scratch)
    (b) mf            from mf, source cf, flow none
    (c) joint_noflow  from noflow, source fused, flow none
    (d) flm           from flm, source fused, flow latent (the full method)
    (e) whiten        from flm, source fused, flow whiten (the flow's latent replaced by a fixed
                      ZCA whitening of the fused representations)
  and, when asked for by `variants` (not run by default):
        flm_sequence  from flm, source sequence, flow none (the jointly pretrained model fine-tuned
                      from its sequence encoder's state, as sasrec is from its own)

Each fine-tuned best checkpoint is scored on the test split by full ranking under both protocols:
`full_nomask` (history not masked, comparable with RecBole) and `full` (the user's earlier items
removed). Reported per variant, fraction and protocol: test NDCG@10 and HR@10, mean ± std over
seeds. Significance, per protocol: per test user, NDCG@10 averaged over seeds, (d) against each
other variant with the Wilcoxon signed-rank test (two-sided, pairs by user; scipy's when
installed, else its normal approximation with tie correction); the headline p-value is (d)
against the best other variant. `reference` names another variant to test instead of (d).
Outputs: OUT/ablation.md, OUT/ablation.json, and every run under OUT/runs/. Re-running resumes
them: a run whose metrics.json records the same config is read back (with its per-user test
ranks, RUN_DIR/test_user_ranks.npz), any other is started or resumed from its checkpoint.

A seed whose runs have all finished is also written as a seed result (RESULTS/seedN.json with
the final metrics of its fine-tuned and pretraining runs, RESULTS/seedN.npz with the fine-tuned
runs' per-user test ranks; RESULTS is OUT/seeds unless `results` says otherwise). A later
command reads a seed result back instead of the seed's runs, when it was measured with the same
settings (`common`, `pretrain`, `finetune`) on the same prepared data (vocabulary hashes and
split counts): about 1 MB that outlives the runs' checkpoints, so seeds measured on different
machines or at different times combine into one table by copying those files alone.

With `parallel` > 1 the stages run as Ray tasks, up to `parallel` at once (each fine-tuning
stage after its seed's pretraining stage): each stage trains in its task's process on one
device (`scaling.workers=0`), with `scaling.cpus_per_worker` CPUs (1 when unset) and
`scaling.gpus_per_worker` GPUs. Every stage is the same computation wherever it runs, so the
table does not depend on `parallel`.

`baseline_results` and `baseline_variants` put variants of another ablation's seed results into
the table and the tests without training them, labelled `VARIANT (baseline)`: for instance
SASRec from scratch of an ablation pretrained without `model.user_head`, beside one pretrained
with it. The two must share the prepared data, the seeds, and the `common` and `finetune`
settings, so that the runs pair user by user; only `pretrain` may differ.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flm_dist import ray_seam
from flm_dist.config import deep_merge, from_dict, load_config, require, to_dict
from flm_dist.errors import UserError
from flm_dist.eval.evaluate import user_ranks
from flm_dist.eval.metrics import mean_std, ndcg_at, wilcoxon_p_value
from flm_dist.runs import read_manifest
from flm_dist.train.configs import FinetuneConfig, PretrainConfig
from flm_dist.train.finetune import resolve as finetune_resolve
from flm_dist.train.finetune import run_finetune
from flm_dist.train.pretrain import resolve as pretrain_resolve
from flm_dist.train.pretrain import run_pretrain

log = logging.getLogger("flm_dist")

K = 10
METRICS = (f"ndcg@{K}", f"hr@{K}")
PROTOCOLS = ("full_nomask", "full")
OBJECTIVES: dict[str, dict[str, Any]] = {
    "sasrec": {"loss": {"cf": 0.0, "fused": 0.0, "flow": 0.0}, "eval": {"user_source": "sequence"}},
    "mf": {"loss": {"seq": 0.0, "fused": 0.0, "flow": 0.0}, "eval": {"user_source": "cf"}},
    "noflow": {"loss": {"flow": 0.0}, "eval": {"user_source": "fused"}},
    "flm": {"eval": {"user_source": "fused"}},
}
# variant -> (pretraining objective, fine-tuning source, how the flow enters, finetune.init)
VARIANTS: dict[str, tuple[str, str, str, str]] = {
    "scratch": ("sasrec", "sequence", "none", "random"),
    "sasrec": ("sasrec", "sequence", "none", "pretrained"),
    "mf": ("mf", "cf", "none", "pretrained"),
    "joint_noflow": ("noflow", "fused", "none", "pretrained"),
    "flm": ("flm", "fused", "latent", "pretrained"),
    "whiten": ("flm", "fused", "whiten", "pretrained"),
    "flm_sequence": ("flm", "sequence", "none", "pretrained"),
}
# The issue's variants (a) to (e); flm_sequence is asked for by name.
DEFAULT_VARIANTS = ("scratch", "sasrec", "mf", "joint_noflow", "flm", "whiten")


@dataclasses.dataclass
class AblateConfig:
    data: str = ""
    """Prepared data directory; every variant trains and is tested on it."""
    output: str = ""
    """Directory for runs/, ablation.md and ablation.json."""
    seeds: int = 3
    """Seeds per variant (train.seed = first_seed, first_seed + 1, ...; a seed also picks the
    fine-tuning users)."""
    first_seed: int = 0
    """The first seed. Disjoint seed ranges can run as separate commands (on separate machines or
    cores) into one output; a last command over all the seeds then only evaluates the finished
    runs and writes the combined table."""
    fractions: tuple[float, ...] = (1.0, 0.1)
    """Fine-tuning data fractions (finetune.data_fraction)."""
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    """Variants to run (see the module docstring); must include `reference` and one other."""
    reference: str = "flm"
    """The variant tested against every other (the p columns, and the headline test against the
    best other)."""
    common: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Overrides for both stages, e.g. {train: {batch_size: 128}, scaling: {workers: 0}}."""
    pretrain: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Overrides for pretraining only (the architecture lives here: model.hidden, ...)."""
    finetune: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Overrides for fine-tuning only (e.g. train.epochs, finetune.head)."""
    parallel: int = 1
    """Stages run at once. 1: one after another in this process (with any `scaling`); N > 1: as
    Ray tasks on the cluster's free CPUs or GPUs (needs `common.scaling.workers=0`)."""
    results: str = ""
    """Directory of the seed results (seedN.json and seedN.npz); default OUT/seeds. Point it at
    a directory kept with the code to keep finished seeds when the runs are gone."""
    baseline_results: str = ""
    """Seed results of another ablation on the same data and seeds, with the same `common` and
    `finetune` settings (its `pretrain` may differ), to read `baseline_variants` from."""
    baseline_variants: tuple[str, ...] = ()
    """Variants read from `baseline_results` for every seed and fraction, never trained; they join
    the table and the tests as `VARIANT (baseline)`."""

    def __post_init__(self):
        require(bool(self.data), "data", "is required")
        require(bool(self.output), "output", "is required")
        require(self.seeds > 0, "seeds", "must be positive")
        require(self.first_seed >= 0, "first_seed", "must be >= 0")
        require(len(self.fractions) > 0 and all(0 < f <= 1 for f in self.fractions), "fractions",
                "must be in (0, 1]")
        require(set(self.variants) <= set(VARIANTS), "variants", f"must be among {list(VARIANTS)}")
        require(self.reference in VARIANTS, "reference", f"must be among {list(VARIANTS)}")
        require(self.reference in self.variants and len(set(self.variants)) > 1, "variants",
                f"must include the reference ({self.reference}) and at least one other")
        require(self.parallel >= 1, "parallel", "must be >= 1")
        require(set(self.baseline_variants) <= set(VARIANTS), "baseline_variants",
                f"must be among {list(VARIANTS)}")
        require(bool(self.baseline_results) == bool(self.baseline_variants), "baseline_variants",
                "and baseline_results go together")


BASELINE = " (baseline)"


def compared_variants(config: AblateConfig) -> list[str]:
    """The table's rows per fraction: the variants run here, then the baselines' labels."""
    return list(config.variants) + [v + BASELINE for v in config.baseline_variants]


def seed_range(config: AblateConfig) -> range:
    return range(config.first_seed, config.first_seed + config.seeds)


def _pretrain_config(config: AblateConfig, objective: str, seed: int, output: Path) -> PretrainConfig:
    data = deep_merge(deep_merge(config.common, config.pretrain), OBJECTIVES[objective])
    data = deep_merge(data, {"data": config.data, "output": str(output), "train": {"seed": seed}})
    return load_config(PretrainConfig, base=data)


def _finetune_config(config: AblateConfig, variant: str, fraction: float, seed: int, pretrained: Path,
                     output: Path) -> FinetuneConfig:
    objective, source, flow, init = VARIANTS[variant]
    data = deep_merge(config.common, config.finetune)
    finetune = load_config(FinetuneConfig, base=deep_merge(data, {
        "pretrained": str(pretrained), "data": config.data, "output": str(output),
        "finetune": {"source": source, "flow": flow, "data_fraction": fraction, "init": init},
        "eval": {"user_source": source}, "train": {"seed": seed}}))
    if init == "pretrained":
        return finetune
    # From scratch gets the optimiser steps of pretraining (every user) plus fine-tuning (the
    # fraction's users), and validates about once per full-data epoch of steps, so early stopping
    # sees it as often as a pretrained variant's run.
    pretrain_epochs = _pretrain_config(config, objective, seed, pretrained).train.epochs
    every = max(1, round(1 / fraction))
    return dataclasses.replace(finetune, train=dataclasses.replace(
        finetune.train, epochs=round(pretrain_epochs / fraction) + finetune.train.epochs,
        eval_every_epochs=finetune.train.eval_every_epochs * every))


def summarize(config: AblateConfig, finals: dict[tuple[str, float, int], dict[str, float]],
              ranks: dict[tuple[str, float, int], dict[str, np.ndarray]],
              pretraining: dict[int, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Mean ± std over seeds per (variant, fraction, protocol), per protocol the paired tests of
    the reference variant against the rest, and each seed's pretraining runs' test metrics (where
    kept)."""
    seeds = seed_range(config)
    reference = config.reference
    variants = compared_variants(config)
    others = [v for v in variants if v != reference]
    results, significance = [], {}
    for fraction in config.fractions:
        rows = {v: {"variant": v, "fraction": fraction, "p_value_vs_reference": {}} for v in variants}
        significance[str(fraction)] = {}
        for protocol in PROTOCOLS:
            per_user = {v: np.mean([ndcg_at(ranks[v, fraction, s][protocol], K) for s in seeds], axis=0)
                        for v in variants}
            for v in variants:
                for m in METRICS:
                    rows[v][f"{m}/{protocol}"] = mean_std([finals[v, fraction, s][f"test/{m}/{protocol}"]
                                                            for s in seeds])
                rows[v]["p_value_vs_reference"][protocol] = (
                    None if v == reference else wilcoxon_p_value(per_user[reference], per_user[v]))
            best = max(others, key=lambda v: rows[v][f"{METRICS[0]}/{protocol}"]["mean"])
            significance[str(fraction)][protocol] = {
                "best_other": best, "p_value": rows[best]["p_value_vs_reference"][protocol],
                "users": len(per_user[reference]),
                "mean_difference": float(np.mean(per_user[reference] - per_user[best])),
                "test": f"two-sided Wilcoxon signed-rank on per-user test ndcg@{K}/{protocol} (mean over seeds)"}
        results += [rows[v] for v in variants]
    kept = [f"test/{m}/{p}" for p in PROTOCOLS for m in METRICS]
    # A seed result may hold more objectives than this command's variants use.
    objectives = {VARIANTS[v][0] for v in config.variants}
    pretrained = {str(seed): {objective: {name: final[name] for name in kept if name in final}
                              for objective, final in sorted(pretraining[seed].items()) if objective in objectives}
                  for seed in seeds}
    return {"results": results, "reference": reference, "significance": significance, "pretraining": pretrained,
            "seeds": list(seeds), "fractions": list(config.fractions), "protocols": list(PROTOCOLS),
            "variants": {v: dict(zip(("objective", "source", "flow", "init"), VARIANTS[v.removesuffix(BASELINE)]))
                         for v in variants},
            "config": to_dict(config)}


def markdown_table(report: dict[str, Any]) -> str:
    def cell(stats: dict[str, Any]) -> str:
        return f"{stats['mean']:.4f} ± {stats['std']:.4f}"

    reference = report["reference"]

    def p_cell(row: dict[str, Any], protocol: str) -> str:
        if row["variant"] != reference:
            return f"{row['p_value_vs_reference'][protocol]:.3g}"
        test = report["significance"][str(row["fraction"])][protocol]
        return f"{test['p_value']:.3g} vs {test['best_other']}"

    columns = [f"{m.upper()} {p}" for p in PROTOCOLS for m in METRICS]
    lines = [f"# Ablation ({len(report['seeds'])} seeds)", "",
             "Test split, full ranking: `full_nomask` keeps the user's history in the ranking, `full` removes "
             f"it; mean ± std over seeds. p: two-sided Wilcoxon signed-rank test of {reference} against the "
             f"variant, paired by user on test NDCG@{K} of that protocol (mean over seeds); on the {reference} "
             "row, against the best other variant.", "",
             "| variant | fraction | " + " | ".join(columns) + " | " + " | ".join(f"p {p}" for p in PROTOCOLS) + " |",
             "| --- " * (2 + len(columns) + len(PROTOCOLS)) + "|"]
    for row in report["results"]:
        values = [cell(row[f"{m}/{p}"]) for p in PROTOCOLS for m in METRICS]
        lines.append(f"| {row['variant']} | {row['fraction']} | " + " | ".join(values) + " | "
                     + " | ".join(p_cell(row, p) for p in PROTOCOLS) + " |")
    seeds = [str(seed) for seed in report["seeds"]]
    objectives = sorted({o for seed in seeds for o in report["pretraining"][seed]})
    if objectives:
        missing = any(objective not in report["pretraining"][seed] for seed in seeds for objective in objectives)
        lines += ["", f"Pretraining runs, test NDCG@{K} by the vector each is validated on, "
                  + " / ".join(PROTOCOLS)
                  + (" (— where the seed result predates kept pretraining metrics):" if missing else ":"), "",
                  "| objective | " + " | ".join(f"seed {seed}" for seed in seeds) + " |",
                  "| --- " * (1 + len(seeds)) + "|"]
        for objective in objectives:
            cells = []
            for seed in seeds:
                final = report["pretraining"][seed].get(objective)
                cells.append(" / ".join(f"{final[f'test/ndcg@{K}/{p}']:.4f}" for p in PROTOCOLS) if final else "—")
            lines.append(f"| {objective} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _finished_summary(resolved: PretrainConfig | FinetuneConfig) -> dict[str, Any] | None:
    """The metrics.json of a run that finished with this very config (its recorded config, read
    with today's defaults, equals `resolved`), else None: the run is then started or resumed."""
    path = Path(resolved.output) / "metrics.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    try:
        recorded = from_dict(type(resolved), summary["config"])
    except (KeyError, UserError):
        return None
    return summary if to_dict(recorded) == to_dict(resolved) else None


def _test_user_ranks(run_dir: Path, data: str, recompute: bool) -> dict[str, np.ndarray]:
    """`user_ranks` of the run's best checkpoint on the test split, kept in RUN_DIR/test_user_ranks.npz
    so that a finished run is not scored again (`recompute` after training)."""
    cache = run_dir / "test_user_ranks.npz"
    if not recompute and cache.is_file():
        with np.load(cache) as stored:
            return {protocol: stored[protocol] for protocol in stored.files}
    ranks = user_ranks(run_dir / "best", data)
    partial = run_dir / "test_user_ranks.partial.npz"
    np.savez(partial, **ranks)
    partial.replace(cache)
    return ranks


SEED_RESULT_FORMAT = 1


def _data_identity(data: str) -> dict[str, Any]:
    """What identifies prepared data across machines: its vocabularies and splits, not its path."""
    manifest = read_manifest(data)
    return {"vocab_hash": manifest["vocab_hash"], "splits": manifest["splits"]}


SETTINGS = ("common", "pretrain", "finetune", "data")


def _settings(config: AblateConfig) -> dict[str, Any]:
    """The settings a seed result was measured with; it is reused only under equal settings."""
    return json.loads(json.dumps({"common": config.common, "pretrain": config.pretrain,
                                  "finetune": config.finetune, "data": _data_identity(config.data)},
                                 sort_keys=True))


def _result_key(variant: str, fraction: float) -> str:
    return f"{variant}/{fraction:g}"


def _parse_result_key(key: str) -> tuple[str, float]:
    variant, fraction = key.rsplit("/", 1)
    return variant, float(fraction)


def write_seed_result(directory: Path, seed: int, settings: dict[str, Any],
                      finals: dict[tuple[str, float], dict[str, float]],
                      ranks: dict[tuple[str, float], dict[str, np.ndarray]],
                      pretraining: dict[str, dict[str, float]]) -> None:
    """RESULTS/seedN.npz (per-user test ranks, smallest integer type) then RESULTS/seedN.json,
    each written under a temporary name and renamed, the JSON last: a seed result is complete
    exactly when its JSON exists."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for (variant, fraction), by_protocol in ranks.items():
        for protocol, values in by_protocol.items():
            arrays[f"{_result_key(variant, fraction)}/{protocol}"] = values.astype(
                np.min_scalar_type(int(values.max(initial=0))))
    partial = directory / f"seed{seed}.partial.npz"
    np.savez_compressed(partial, **arrays)
    partial.replace(directory / f"seed{seed}.npz")
    record = {"format": SEED_RESULT_FORMAT, "seed": seed, "settings": settings,
              "final": {_result_key(v, f): final for (v, f), final in finals.items()},
              "pretraining": pretraining,
              "written": {"utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                          "torch": torch.__version__, "machine": platform.machine(),
                          "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}}
    partial_json = directory / f"seed{seed}.partial.json"
    partial_json.write_text(json.dumps(record, indent=1, sort_keys=True))
    partial_json.replace(directory / f"seed{seed}.json")


def _matching_record(directory: Path, seed: int, settings: dict[str, Any],
                     compared: tuple[str, ...]) -> dict[str, Any] | None:
    """The stored seed result's JSON record, when it was measured with the same `compared` parts
    of `settings`; else None."""
    path = directory / f"seed{seed}.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    stored = record.get("settings", {})
    if record.get("format") != SEED_RESULT_FORMAT or any(stored.get(k) != settings[k] for k in compared):
        return None
    return record


def read_seed_result(directory: Path, seed: int, settings: dict[str, Any], variants: tuple[str, ...] | None,
                     fractions: tuple[float, ...], compared: tuple[str, ...] = SETTINGS):
    """(finals, ranks, pretraining finals by objective) of a stored seed result measured with
    `settings` (the `compared` parts of them) that holds every (variant, fraction) asked for
    (variants None: all it holds); None when there is none, or it was measured otherwise. Seed
    results written before pretraining finals were kept have none."""
    record = _matching_record(directory, seed, settings, compared)
    stored_pairs = [] if record is None else [_parse_result_key(key) for key in record["final"]]
    wanted = stored_pairs if variants is None else [(v, f) for f in fractions for v in variants]
    if record is None or not set(wanted) <= set(stored_pairs):
        if (directory / f"seed{seed}.json").is_file():
            log.info("seed %d: %s was measured with other settings or variants", seed, directory / f"seed{seed}.json")
        return None
    with np.load(directory / f"seed{seed}.npz") as stored:
        ranks = {(v, f): {p: stored[f"{_result_key(v, f)}/{p}"].astype(np.int64) for p in PROTOCOLS}
                 for v, f in wanted}
    return ({(v, f): record["final"][_result_key(v, f)] for v, f in wanted}, ranks,
            record.get("pretraining", {}))


def _read_baselines(config: AblateConfig, settings: dict[str, Any]):
    """finals and ranks of the baseline variants, keyed by (label, fraction, seed)."""
    directory = Path(config.baseline_results)
    finals, ranks = {}, {}
    for seed in seed_range(config):
        stored = read_seed_result(directory, seed, settings, config.baseline_variants, config.fractions,
                                  compared=("common", "finetune", "data"))
        if stored is None:
            raise UserError(
                f"{directory / f'seed{seed}.json'}: baseline_results needs a seed result of seed {seed} holding "
                f"{list(config.baseline_variants)} at fractions {list(config.fractions)}, measured on this data "
                "with this ablation's common and finetune settings")
        for (variant, fraction), final in stored[0].items():
            finals[variant + BASELINE, fraction, seed] = final
            ranks[variant + BASELINE, fraction, seed] = stored[1][variant, fraction]
    return finals, ranks


def _pretraining_stage(config: PretrainConfig) -> dict[str, float]:
    """Stage 1 of one objective and seed (a run finished with this config is left as it is);
    returns the run's final metrics."""
    summary = _finished_summary(pretrain_resolve(config)) or run_pretrain(config)
    return summary["final"]


def _finetuning_stage(config: FinetuneConfig) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Stage 2 of one variant, fraction and seed: (final metrics, per-user test ranks)."""
    summary = _finished_summary(finetune_resolve(config))
    trained = summary is None
    if trained:
        summary = run_finetune(config)
    return summary["final"], _test_user_ranks(Path(config.output), config.data, recompute=trained)


def _stage_calls(config: AblateConfig, seeds: list[int]) -> list[ray_seam.TaskCall]:
    """Every stage of `seeds` in the sequential order, each fine-tuning stage after its
    pretraining stage."""
    output = Path(config.output)
    objectives = sorted({VARIANTS[v][0] for v in config.variants})
    calls = []
    for seed in seeds:
        root = output / "runs" / f"seed{seed}"
        for objective in objectives:
            calls.append(ray_seam.TaskCall(
                ("pretrain", objective, seed), f"seed {seed}: pretraining {objective}", _pretraining_stage,
                (_pretrain_config(config, objective, seed, root / f"pretrain-{objective}"),)))
        for fraction in config.fractions:
            for variant in config.variants:
                objective = VARIANTS[variant][0]
                finetune = _finetune_config(config, variant, fraction, seed, root / f"pretrain-{objective}",
                                            root / f"fraction{fraction:g}" / variant)
                calls.append(ray_seam.TaskCall(
                    (variant, fraction, seed), f"seed {seed} fraction {fraction:g}: fine-tuning {variant}",
                    _finetuning_stage, (finetune,), after=(("pretrain", objective, seed),)))
    return calls


def run_ablation(config: AblateConfig) -> dict[str, Any]:
    """Run every stage (see the module docstring); writes and returns the report."""
    output = Path(config.output)
    results = Path(config.results) if config.results else output / "seeds"
    # Every stage's config is built once up front, so a bad override fails before any training.
    for objective in {VARIANTS[v][0] for v in config.variants}:
        _pretrain_config(config, objective, 0, output)
    for variant in config.variants:
        scaling = _finetune_config(config, variant, config.fractions[0], 0, output, output).scaling
        require(config.parallel == 1 or scaling.workers == 0, "parallel",
                "> 1 runs each stage in one Ray task on one device; set common.scaling.workers=0")
    settings = _settings(config)
    baseline_finals, baseline_ranks = _read_baselines(config, settings) if config.baseline_variants else ({}, {})
    finals: dict[tuple[str, float, int], dict[str, float]] = {}
    ranks: dict[tuple[str, float, int], dict[str, np.ndarray]] = {}
    pretraining: dict[int, dict[str, dict[str, float]]] = {seed: {} for seed in seed_range(config)}
    to_run = []
    for seed in seed_range(config):
        stored = read_seed_result(results, seed, settings, config.variants, config.fractions)
        if stored is None:
            to_run.append(seed)
            continue
        log.info("seed %d: read back from %s (its runs are not needed)", seed, results / f"seed{seed}.json")
        for (variant, fraction), final in stored[0].items():
            finals[variant, fraction, seed] = final
            ranks[variant, fraction, seed] = stored[1][variant, fraction]
        pretraining[seed] = stored[2]

    def finished(key, result) -> None:
        if key[0] == "pretrain":
            pretraining[key[2]][key[1]] = result
            return
        finals[key], ranks[key] = result
        seed = key[2]
        mine = [(v, f) for f in config.fractions for v in config.variants]
        if all((v, f, seed) in finals for v, f in mine):
            # What an earlier command measured of this seed under the same settings stays in it.
            earlier = read_seed_result(results, seed, settings, None, config.fractions) or ({}, {}, {})
            write_seed_result(results, seed, settings, {**earlier[0], **{k: finals[(*k, seed)] for k in mine}},
                              {**earlier[1], **{k: ranks[(*k, seed)] for k in mine}},
                              {**earlier[2], **pretraining[seed]})

    calls = _stage_calls(config, to_run)
    if config.parallel == 1:
        for index, call in enumerate(calls, 1):
            log.info("ablation stage %d/%d, %s", index, len(calls), call.label)
            finished(call.key, call.function(*call.args))
    else:
        ray_seam.run_in_parallel(calls, config.parallel, scaling.cpus_per_worker or 1.0, scaling.gpus_per_worker,
                                 on_finished=finished, describe="ablation stage", address=scaling.address)
    report = summarize(config, {**finals, **baseline_finals}, {**ranks, **baseline_ranks}, pretraining)
    output.mkdir(parents=True, exist_ok=True)
    (output / "ablation.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    (output / "ablation.md").write_text(markdown_table(report))
    return report
