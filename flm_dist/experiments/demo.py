"""`flm demo`: the whole pipeline on the embedded synthetic log, on one machine, no download.

synth -> prepare (Ray tasks) -> pretrain (Ray Train) -> fine-tune (Ray Train) -> a small sweep of
fine-tuning (Ray Tune, ASHA) -> evaluate the best tuned checkpoint -> HTML reports, then a table
of the pretrained, fine-tuned and best tuned models' metrics.

Sized to stay under 10 minutes on a 2-core machine (6 min 15 s measured on a heavily loaded one):
12 pretraining epochs, 3 of fine-tuning, and a sweep of 4 short trials that runs 2 at a time.
Re-running it in the same workdir retrains nothing (synth and prepare skip, the runs resume at
their end, the sweep is restored).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from flm_dist.config import load_config
from flm_dist.data.prepare import PrepareConfig, run_prepare
from flm_dist.data.synth import embedded_default, run_synth
from flm_dist.eval.evaluate import EvaluateConfig, run_evaluate
from flm_dist.experiments.report import ReportConfig, run_report
from flm_dist.experiments.tune import TuneOptions, parse_space, run_tune
from flm_dist.ray_seam import ensure_ray
from flm_dist.train.configs import FinetuneConfig, PretrainConfig
from flm_dist.train.finetune import run_finetune
from flm_dist.train.pretrain import run_pretrain

log = logging.getLogger("flm_dist")

# The sweep: the learning rate, and whether the head sees the flow latent or not.
TUNE_SPACE = {"train.lr": {"loguniform": [5e-4, 5e-3]}, "finetune.flow": {"choice": ["latent", "none"]}}
TUNE_CONCURRENT = 2
COLUMNS = ("valid/ndcg@10/full", "test/hr@10/full", "test/ndcg@10/full", "test/hr@50/full",
           "test/ndcg@10/sampled99")


@dataclasses.dataclass
class DemoOptions:
    workdir: str = "demo"
    """Everything goes here: log/, data/, pretrain/, finetune/, tune/, evaluation.json."""
    workers: int = 1
    """Ray Train workers of pretraining and fine-tuning (0: in this process, without Ray Train)."""
    epochs: int = 12
    """Pretraining epochs."""
    finetune_epochs: int = 3
    """Epochs of the fine-tuning run and of each tune trial."""
    tune_samples: int = 4
    """Trials of the sweep."""
    overrides: list[str] = dataclasses.field(default_factory=list)
    """Pretraining config overrides (key.sub=value); fine-tuning inherits the model."""


def run_demo(options: DemoOptions) -> dict[str, dict[str, float]]:
    """Run every step; returns the final metrics of the pretrained, fine-tuned and best tuned models."""

    root = Path(options.workdir)
    data, pretrained, finetuned, tuned = (root / name for name in ("data", "pretrain", "finetune", "tune"))
    scaling = [f"scaling.workers={options.workers}"]
    started = time.perf_counter()
    ensure_ray()

    log.info("demo 1/7: synthetic log (embedded default)")
    run_synth(embedded_default(str(root / "log")))

    log.info("demo 2/7: prepare in Ray tasks")
    run_prepare(PrepareConfig(input=str(root / "log"), format="parquet", output=str(data)))

    log.info("demo 3/7: pretrain on %d Ray Train worker(s), %d epochs", options.workers, options.epochs)
    pretrain = run_pretrain(load_config(PretrainConfig, None, [
        f"data={data}", f"output={pretrained}", *scaling, f"train.epochs={options.epochs}", "train.patience=5",
        "model.max_len=50", "model.dropout=0.2", "train.lr=0.003", *options.overrides]))

    log.info("demo 4/7: fine-tune the pretrained model, %d epochs", options.finetune_epochs)
    finetune = run_finetune(load_config(FinetuneConfig, None, [
        f"pretrained={pretrained}", f"data={data}", f"output={finetuned}", *scaling,
        f"train.epochs={options.finetune_epochs}"]))

    log.info("demo 5/7: tune fine-tuning on Ray Tune (ASHA), %d trials, %d at a time",
             options.tune_samples, TUNE_CONCURRENT)
    base = {"pretrained": str(pretrained), "data": str(data), "train": {"epochs": options.finetune_epochs}}
    best = run_tune(TuneOptions(output=str(tuned), space=parse_space(TUNE_SPACE, base), base=base,
                                samples=options.tune_samples, concurrent=TUNE_CONCURRENT, cpus_per_trial=1))

    log.info("demo 6/7: evaluate the best tuned checkpoint (trial %s)", best["trial_id"])
    tuned_metrics = run_evaluate(EvaluateConfig(checkpoint=str(Path(best["run_dir"]) / "best"), data=str(data),
                                                output=str(root / "evaluation.json")))

    log.info("demo 7/7: HTML reports")
    reports = [run_report(ReportConfig(directory=str(d))) for d in (pretrained, finetuned, tuned)]

    results = {"pretrained": pretrain["final"], "fine-tuned": finetune["final"],
               f"best tuned ({_params(best['params'])})": tuned_metrics}
    print(metrics_table(results))
    print(f"\ndemo finished in {time.perf_counter() - started:.0f}s; artifacts in {root}/:\n"
          f"  log/             synthetic interaction log (Parquet)\n"
          f"  data/            prepared shards and manifest.json\n"
          f"  pretrain/        pretrained run: best/, metrics.json, tensorboard/, report.html\n"
          f"  finetune/        fine-tuned run: best/, metrics.json, report.html\n"
          f"  tune/            the sweep: results.md, best.json, curves.png, runs/, report.html\n"
          f"  evaluation.json  every metric of the best tuned checkpoint\n"
          f"reports: {', '.join(str(r) for r in reports)}")
    return results


def _params(params: dict) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v:.2g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                     for k, v in sorted(params.items()))


def metrics_table(results: dict[str, dict[str, float]]) -> str:
    """One row per model, one column per headline metric (full names: split/metric/protocol)."""
    width = max(len(name) for name in results)
    lines = [f"{'model':<{width}}  " + "  ".join(COLUMNS)]
    for name, metrics in results.items():
        cells = [f"{metrics.get(column, float('nan')):>{len(column)}.4f}" for column in COLUMNS]
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)
