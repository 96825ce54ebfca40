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

Each fine-tuned best checkpoint is scored on the test split by full ranking under both protocols:
`full_nomask` (history not masked, comparable with RecBole) and `full` (the user's earlier items
removed). Reported per variant, fraction and protocol: test NDCG@10 and HR@10, mean ± std over
seeds. Significance, per protocol: per test user, NDCG@10 averaged over seeds, (d) against each
other variant with the Wilcoxon signed-rank test (two-sided, pairs by user; scipy's when
installed, else its normal approximation with tie correction); the headline p-value is (d)
against the best other variant.
Outputs: OUT/ablation.md, OUT/ablation.json, and every run under OUT/runs/. Re-running resumes
them: a run whose metrics.json records the same config is read back (with its per-user test
ranks, RUN_DIR/test_user_ranks.npz), any other is started or resumed from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from flm_dist.config import _deep_merge, from_dict, load_config, require, to_dict
from flm_dist.errors import UserError
from flm_dist.evaluate import user_ranks
from flm_dist.finetune import FinetuneConfig, run_finetune
from flm_dist.finetune import resolve as finetune_resolve
from flm_dist.metrics import mean_std, ndcg_at, wilcoxon_p_value
from flm_dist.pretrain import PretrainConfig, run_pretrain
from flm_dist.pretrain import resolve as pretrain_resolve

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
}
REFERENCE = "flm"


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
    variants: tuple[str, ...] = tuple(VARIANTS)
    """Variants to run; must include flm and one other."""
    common: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Overrides for both stages, e.g. {train: {batch_size: 128}, scaling: {workers: 0}}."""
    pretrain: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Overrides for pretraining only (the architecture lives here: model.hidden, ...)."""
    finetune: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Overrides for fine-tuning only (e.g. train.epochs, finetune.head)."""

    def __post_init__(self):
        require(bool(self.data), "data", "is required")
        require(bool(self.output), "output", "is required")
        require(self.seeds > 0, "seeds", "must be positive")
        require(self.first_seed >= 0, "first_seed", "must be >= 0")
        require(len(self.fractions) > 0 and all(0 < f <= 1 for f in self.fractions), "fractions",
                "must be in (0, 1]")
        require(set(self.variants) <= set(VARIANTS), "variants", f"must be among {list(VARIANTS)}")
        require(REFERENCE in self.variants and len(set(self.variants)) > 1, "variants",
                f"must include {REFERENCE} and at least one other")


def seed_range(config: AblateConfig) -> range:
    return range(config.first_seed, config.first_seed + config.seeds)


def _pretrain_config(config: AblateConfig, objective: str, seed: int, output: Path) -> PretrainConfig:
    data = _deep_merge(_deep_merge(config.common, config.pretrain), OBJECTIVES[objective])
    data = _deep_merge(data, {"data": config.data, "output": str(output), "train": {"seed": seed}})
    return load_config(PretrainConfig, base=data)


def _finetune_config(config: AblateConfig, variant: str, fraction: float, seed: int, pretrained: Path,
                     output: Path) -> FinetuneConfig:
    objective, source, flow, init = VARIANTS[variant]
    data = _deep_merge(config.common, config.finetune)
    finetune = load_config(FinetuneConfig, base=_deep_merge(data, {
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
              ranks: dict[tuple[str, float, int], dict[str, np.ndarray]]) -> dict[str, Any]:
    """Mean ± std over seeds per (variant, fraction, protocol) and, per protocol, the paired tests
    of flm against the rest."""
    seeds = seed_range(config)
    others = [v for v in config.variants if v != REFERENCE]
    results, significance = [], {}
    for fraction in config.fractions:
        rows = {v: {"variant": v, "fraction": fraction, "p_value_vs_flm": {}} for v in config.variants}
        significance[str(fraction)] = {}
        for protocol in PROTOCOLS:
            per_user = {v: np.mean([ndcg_at(ranks[v, fraction, s][protocol], K) for s in seeds], axis=0)
                        for v in config.variants}
            for v in config.variants:
                for m in METRICS:
                    rows[v][f"{m}/{protocol}"] = mean_std([finals[v, fraction, s][f"test/{m}/{protocol}"]
                                                            for s in seeds])
                rows[v]["p_value_vs_flm"][protocol] = (
                    None if v == REFERENCE else wilcoxon_p_value(per_user[REFERENCE], per_user[v]))
            best = max(others, key=lambda v: rows[v][f"{METRICS[0]}/{protocol}"]["mean"])
            significance[str(fraction)][protocol] = {
                "best_other": best, "p_value": rows[best]["p_value_vs_flm"][protocol],
                "users": len(per_user[REFERENCE]),
                "mean_difference": float(np.mean(per_user[REFERENCE] - per_user[best])),
                "test": f"two-sided Wilcoxon signed-rank on per-user test ndcg@{K}/{protocol} (mean over seeds)"}
        results += [rows[v] for v in config.variants]
    return {"results": results, "significance": significance, "seeds": list(seeds),
            "fractions": list(config.fractions), "protocols": list(PROTOCOLS),
            "variants": {v: dict(zip(("objective", "source", "flow", "init"), VARIANTS[v])) for v in config.variants},
            "config": to_dict(config)}


def markdown_table(report: dict[str, Any]) -> str:
    def cell(stats: dict[str, Any]) -> str:
        return f"{stats['mean']:.4f} ± {stats['std']:.4f}"

    def p_cell(row: dict[str, Any], protocol: str) -> str:
        if row["variant"] != REFERENCE:
            return f"{row['p_value_vs_flm'][protocol]:.3g}"
        test = report["significance"][str(row["fraction"])][protocol]
        return f"{test['p_value']:.3g} vs {test['best_other']}"

    columns = [f"{m.upper()} {p}" for p in PROTOCOLS for m in METRICS]
    lines = [f"# Ablation ({len(report['seeds'])} seeds)", "",
             "Test split, full ranking: `full_nomask` keeps the user's history in the ranking, `full` removes "
             "it; mean ± std over seeds. p: two-sided Wilcoxon signed-rank test of flm against the variant, "
             f"paired by user on test NDCG@{K} of that protocol (mean over seeds); on the flm row, against the "
             "best other variant.", "",
             "| variant | fraction | " + " | ".join(columns) + " | " + " | ".join(f"p {p}" for p in PROTOCOLS) + " |",
             "| --- " * (2 + len(columns) + len(PROTOCOLS)) + "|"]
    for row in report["results"]:
        values = [cell(row[f"{m}/{p}"]) for p in PROTOCOLS for m in METRICS]
        lines.append(f"| {row['variant']} | {row['fraction']} | " + " | ".join(values) + " | "
                     + " | ".join(p_cell(row, p) for p in PROTOCOLS) + " |")
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


def run_ablation(config: AblateConfig) -> dict[str, Any]:
    """Run every stage (see the module docstring); writes and returns the report."""
    output = Path(config.output)
    finals: dict[tuple[str, float, int], dict[str, float]] = {}
    ranks: dict[tuple[str, float, int], dict[str, np.ndarray]] = {}
    objectives = sorted({VARIANTS[v][0] for v in config.variants})
    # Every stage's config is built once up front, so a bad override fails before any training.
    for objective in objectives:
        _pretrain_config(config, objective, 0, output)
    for variant in config.variants:
        _finetune_config(config, variant, config.fractions[0], 0, output, output)
    stages = len(seed_range(config)) * (len(objectives) + len(config.fractions) * len(config.variants))
    stage = 0
    for seed in seed_range(config):
        root = output / "runs" / f"seed{seed}"
        for objective in objectives:
            stage += 1
            log.info("ablation stage %d/%d, seed %d: pretraining %s", stage, stages, seed, objective)
            pretrain = _pretrain_config(config, objective, seed, root / f"pretrain-{objective}")
            if _finished_summary(pretrain_resolve(pretrain)) is None:
                run_pretrain(pretrain)
        for fraction in config.fractions:
            for variant in config.variants:
                stage += 1
                log.info("ablation stage %d/%d, seed %d fraction %g: fine-tuning %s", stage, stages, seed,
                         fraction, variant)
                run_dir = root / f"fraction{fraction:g}" / variant
                pretrained = root / f"pretrain-{VARIANTS[variant][0]}"
                finetune = _finetune_config(config, variant, fraction, seed, pretrained, run_dir)
                summary = _finished_summary(finetune_resolve(finetune))
                trained = summary is None
                if trained:
                    summary = run_finetune(finetune)
                finals[variant, fraction, seed] = summary["final"]
                ranks[variant, fraction, seed] = _test_user_ranks(run_dir, config.data, recompute=trained)
    report = summarize(config, finals, ranks)
    (output / "ablation.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    (output / "ablation.md").write_text(markdown_table(report))
    return report
