"""`flm demo`: the whole pipeline on the embedded synthetic log, on one machine, no download.

synth -> prepare (Ray Data) -> pretrain (Ray Train) -> evaluate the best checkpoint -> a table.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flm_dist.config import load_config

log = logging.getLogger("flm_dist")


def run_demo(workdir: str = "demo", workers: int = 1, epochs: int = 12, overrides: list[str] | None = None) -> dict:
    from flm_dist.evaluate import EvaluateConfig, run_evaluate
    from flm_dist.prepare import PrepareConfig, run_prepare
    from flm_dist.pretrain import PretrainConfig, final_metrics_table, run_pretrain
    from flm_dist.ray_seam import ensure_ray
    from flm_dist.synth import embedded_default, run_synth

    root = Path(workdir)
    started = time.perf_counter()
    ensure_ray()
    log.info("demo 1/4: synthetic log (embedded default)")
    synth = embedded_default(str(root / "log"))
    run_synth(synth)
    log.info("demo 2/4: prepare")
    run_prepare(PrepareConfig(input=str(root / "log"), format="parquet", output=str(root / "data")))
    log.info("demo 3/4: pretrain on %d Ray Train worker(s)", workers)
    config = load_config(PretrainConfig, None, [
        f"data={root / 'data'}", f"output={root / 'pretrain'}", f"scaling.workers={workers}",
        "scaling.cpus_per_worker=1", f"train.epochs={epochs}", "train.patience=5", "model.max_len=50",
        "model.dropout=0.2", "train.lr=0.003", *(overrides or [])])
    run_pretrain(config)
    log.info("demo 4/4: evaluate the best checkpoint")
    metrics = run_evaluate(EvaluateConfig(checkpoint=str(root / "pretrain" / "best"), data=str(root / "data"),
                                          output=str(root / "evaluation.json")))
    print(final_metrics_table(metrics, ks=(10, 50)))
    print(f"\ndemo finished in {time.perf_counter() - started:.0f}s; artifacts in {root}/: "
          f"log/ (synthetic Parquet), data/ (prepared shards, manifest.json), "
          f"pretrain/ (best/, metrics.json, tensorboard/), evaluation.json")
    return metrics
