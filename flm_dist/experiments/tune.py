"""`flm tune`: a hyper-parameter sweep of fine-tuning from one pretrained run (Ray Tune + ASHA).

Reading order: `load_space` (YAML -> validated Tune search space) -> `run_tune` (driver: Tuner or
Tuner.restore, then the reports) -> `tune_trial` (one trial).

Design. Each trial is a Tune *function* trainable that fine-tunes IN ITS OWN PROCESS (the trial
actor; `scaling.workers=0`), through the same `pretrain.train_loop` as `flm finetune`, with a
`TuneSession`: a `LocalSession` whose `report` also forwards each end-of-epoch record (the ones
holding the monitored validation metric) to `ray.tune.report`. So one epoch is one Tune
`training_iteration`, which is what ASHA's rungs count. This keeps Ray Train out of the trial
(no Train-inside-Tune worker groups to fit into the CPU count): a trial needs exactly
`--cpus-per-trial` / `--gpus-per-trial` (fractions allowed) and nothing else.

Every trial starts from the same pretrained checkpoint and writes a complete fine-tuning run
directory to TUNE_DIR/runs/<trial_id> (best/, checkpoints/, metrics.json with the test metrics).
Resume: the experiment lives in TUNE_DIR/experiment; `--resume` (or simply the same command when
that experiment exists) uses `tune.Tuner.restore`; an unfinished trial restarted there resumes
its fine-tuning from its own newest checkpoint in runs/<trial_id>/checkpoints (its Tune iteration
count restarts, the epochs do not).

At the end TUNE_DIR holds results.md (one row per trial, best first), best.json (the best
trial's config, its best validation metrics and its final valid/test metrics) and curves.png
(the monitored validation metric against the iteration of every trial).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

from flm_dist.config import (
    ConfigKeyError,
    apply_overrides,
    from_dict,
    read_yaml,
)
from flm_dist.errors import UserError
from flm_dist.logs import setup_logging
from flm_dist.train.configs import FinetuneConfig
from flm_dist.train.finetune import resolve, train_recommender
from flm_dist.train.loop import prepare_run_dir
from flm_dist.train.session import LocalSession

log = logging.getLogger("flm_dist")

DISTRIBUTIONS = ("uniform", "loguniform", "choice", "grid")
EXPERIMENT = "experiment"
ATTEMPTS = "attempts.jsonl"
PLACEHOLDERS = {"pretrained": "PRETRAINED", "data": "DATA", "output": "OUTPUT"}


# ---------------------------------------------------------------------------------------------
# The search space
# ---------------------------------------------------------------------------------------------


def _override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"


def _check_value(base: dict[str, Any], key: str, value: Any) -> None:
    """Build a FinetuneConfig from `base` with `key` set to `value`, or raise a one-line UserError."""

    data = {**PLACEHOLDERS, **base}
    try:
        from_dict(FinetuneConfig, apply_overrides(data, [_override(key, value)]))
    except ConfigKeyError as exc:
        raise UserError(f"search space key '{key}' = {value!r}: {exc}") from None
    except UserError as exc:
        raise UserError(f"search space key '{key}': {exc}") from None


def parse_space(space: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, dict[str, list]]:
    """Validate a search-space mapping {dotted key: {distribution: args}}; returns it normalised.

    uniform / loguniform take [lo, hi] numbers with lo < hi (loguniform: lo > 0); choice and grid
    take a non-empty list. Every bound and option is tried in a FinetuneConfig built on `base`.
    """
    base = base or {}
    if not isinstance(space, dict) or not space:
        raise UserError("the search space must be a non-empty mapping of config keys to distributions")
    parsed: dict[str, dict[str, list]] = {}
    for key, spec in space.items():
        if not isinstance(spec, dict) or len(spec) != 1:
            raise UserError(f"search space key '{key}': expected one of {{{', '.join(DISTRIBUTIONS)}: ...}}, "
                            f"got {spec!r}")
        (kind, args), = spec.items()
        if kind not in DISTRIBUTIONS:
            raise UserError(f"search space key '{key}': unknown distribution '{kind}' "
                            f"(known: {', '.join(DISTRIBUTIONS)})")
        if kind in ("uniform", "loguniform"):
            if (not isinstance(args, list) or len(args) != 2
                    or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)):
                raise UserError(f"search space key '{key}': {kind} takes [lo, hi] numbers, got {args!r}")
            lo, hi = float(args[0]), float(args[1])
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise UserError(f"search space key '{key}': {kind} bounds must be finite with lo < hi, got {args!r}")
            if kind == "loguniform" and lo <= 0:
                raise UserError(f"search space key '{key}': loguniform bounds must be > 0, got {args!r}")
            args = [lo, hi]
        elif not isinstance(args, list) or not args:
            raise UserError(f"search space key '{key}': {kind} takes a non-empty list, got {args!r}")
        for value in args:
            _check_value(base, key, value)
        parsed[key] = {kind: args}
    return parsed


def load_space(path: str, base: dict[str, Any] | None = None) -> dict[str, dict[str, list]]:
    """Read and validate a search-space YAML (see `parse_space`)."""
    return parse_space(read_yaml(path), base)


def tune_space(space: dict[str, dict[str, list]]) -> dict[str, Any]:
    """The Ray Tune param_space of a parsed space (flat, dotted keys)."""
    from ray import tune

    makers = {"uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
              "choice": tune.choice, "grid": tune.grid_search}
    return {key: makers[kind](args) for key, spec in space.items() for kind, args in spec.items()}


# ---------------------------------------------------------------------------------------------
# One trial
# ---------------------------------------------------------------------------------------------


class TuneSession(LocalSession):
    """LocalSession that forwards every end-of-epoch record (it holds `metric`) to Ray Tune."""

    def __init__(self, data_dir: str, run_dir: str, metric: str, device: str | None = None):
        super().__init__(data_dir, run_dir, device)
        self.metric, self.run_dir = metric, run_dir

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        super().report(metrics, checkpoint_dir)
        if self.metric in metrics and not metrics.get("done"):
            from ray import tune

            tune.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))} | {"run_dir": self.run_dir})


def tune_trial(params: dict[str, Any], *, base: dict[str, Any], runs_dir: str, metric: str, threads: int) -> None:
    """Tune function trainable: fine-tune `base` + `params` in this process, one report per epoch."""
    import torch
    from ray import tune

    setup_logging()
    torch.set_num_threads(max(1, threads))
    run_dir = Path(runs_dir) / tune.get_context().get_trial_id()
    _record_attempt(run_dir)
    data = apply_overrides(base, [_override(k, v) for k, v in params.items()]
                           + [_override("output", str(run_dir)), "scaling.workers=0"])
    config = resolve(from_dict(FinetuneConfig, data))
    prepare_run_dir(config)
    train_recommender(config, TuneSession(config.data, str(run_dir), metric))


def _record_attempt(run_dir: Path) -> None:
    """Append this start of the trial to run_dir/attempts.jsonl: Tune restarts a failed trial
    (`--max-failures`), and the report says how many starts each trial needed."""
    import os
    import time

    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ATTEMPTS, "a") as attempts:
        attempts.write(json.dumps({"pid": os.getpid(), "started": time.time()}) + "\n")


def _attempts(run_dir: Path) -> int:
    path = run_dir / ATTEMPTS
    return len(path.read_text().splitlines()) if path.is_file() else 0


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TuneOptions:
    output: str
    """TUNE_DIR: experiment/, runs/, results.md, best.json, curves.png."""
    space: dict[str, dict[str, list]]
    """Parsed search space (`parse_space`)."""
    base: dict[str, Any]
    """The FinetuneConfig mapping every trial starts from (pretrained, data, overrides)."""
    samples: int = 4
    concurrent: int = 1
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    grace_period: int = 1
    reduction_factor: int = 2
    max_failures: int = 2
    """Restarts of a failed trial (an error or a lost process) before it is reported as errored;
    a restarted trial resumes from its own newest checkpoint, and the sweep goes on either way."""
    seed: int = 0
    """Seed of the search: the same seed and space draw the same trial configurations, in the
    same order. Each trial's own training seed is `train.seed` of the base config."""
    resume: bool = False


def search_algorithm(options: TuneOptions):
    """Random and grid search over the space, seeded so that a sweep draws the same trials again,
    with at most `concurrent` trials running at once."""
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=options.concurrent, random_state=options.seed)


def run_tune(options: TuneOptions) -> dict[str, Any]:
    """Run (or resume) the sweep; writes results.md, best.json, curves.png; returns best.json."""
    import functools

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from flm_dist import ray_seam

    if options.samples < 1 or options.concurrent < 1:
        raise UserError("--samples and --concurrent must be >= 1")
    if options.max_failures < 0:
        raise UserError("--max-failures must be >= 0")
    if options.cpus_per_trial < 0.01 or options.gpus_per_trial < 0:
        raise UserError("--cpus-per-trial must be >= 0.01 and --gpus-per-trial >= 0")
    tune_dir = Path(ray_seam.absolute_storage_path(options.output))
    base = apply_overrides(options.base, [_override("output", str(tune_dir / "runs" / "base")),
                                          "scaling.workers=0"])
    base_config = from_dict(FinetuneConfig, base)  # validates the base overrides up front
    base = apply_overrides(base, [_override("pretrained", ray_seam.absolute_storage_path(base_config.pretrained)),
                                  _override("data", ray_seam.absolute_storage_path(base_config.data))])
    metric, epochs = base_config.eval.monitor, base_config.train.epochs
    tune_dir.mkdir(parents=True, exist_ok=True)
    (tune_dir / "space.json").write_text(json.dumps(options.space, indent=2, sort_keys=True))

    ray_seam.ensure_ray(base_config.scaling.address)
    check_resources(options, ray_seam.cluster_capacity())
    trainable = tune.with_resources(
        functools.partial(tune_trial, base=base, runs_dir=str(tune_dir / "runs"), metric=metric,
                          threads=max(1, int(options.cpus_per_trial))),
        {"cpu": options.cpus_per_trial, "gpu": options.gpus_per_trial})
    experiment = tune_dir / EXPERIMENT
    if tune.Tuner.can_restore(str(experiment)):
        log.info("resuming the sweep in %s", experiment)
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_errored=True)
    elif options.resume:
        raise UserError(f"--resume: {experiment} holds no Tune experiment to resume")
    else:
        log.info("sweep: %d samples of %s, %d at a time, search seed %d", options.samples,
                 ", ".join(options.space), options.concurrent, options.seed)
        # max_t one past the last epoch: ASHA stops a trial that reaches max_t right after its
        # report, which would cut off the final valid/test evaluation and metrics.json.
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=epochs + 1,
                                  grace_period=min(options.grace_period, epochs),
                                  reduction_factor=options.reduction_factor)
        tuner = tune.Tuner(
            trainable, param_space=tune_space(options.space),
            tune_config=tune.TuneConfig(metric=metric, mode="max", scheduler=scheduler,
                                        search_alg=search_algorithm(options), num_samples=options.samples,
                                        trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(tune_dir), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=options.max_failures)))
    results = tuner.fit()
    return write_reports(results, tune_dir, metric, list(options.space))


def _trial_dirname(trial) -> str:
    """The trial's Tune directory is named by its id, like its run directory in runs/: a trial
    that errored before reporting anything is still matched to its run and its attempts."""
    return trial.trial_id


def check_resources(options: TuneOptions, capacity: dict[str, float]) -> None:
    """A trial that can never be placed hangs the sweep: refuse it; warn when fewer run at once.
    `capacity` is what the cluster can give (`ray_seam.cluster_capacity`). A trial trains in its
    own process without Ray Data, so it needs no CPU left free beside it."""
    for name, need in (("CPU", options.cpus_per_trial), ("GPU", options.gpus_per_trial)):
        have = capacity.get(name, 0.0)
        if need > have:
            raise UserError(f"a trial needs {need:g} {name}s but the Ray cluster has {have:g}; "
                            f"lower --{name.lower()}s-per-trial")
        if need and options.concurrent * need > have:
            log.warning("--concurrent %d x %g %ss exceeds the cluster's %g: at most %d trials run at once",
                        options.concurrent, need, name, have, int(have // need))


def _trial_rows(results, tune_dir: Path, metric: str, keys: list[str]) -> list[dict[str, Any]]:
    rows = []
    for result in results:
        frame = result.metrics_dataframe
        curve = []
        if frame is not None and metric in frame.columns:
            curve = [(int(i), float(v)) for i, v in zip(frame["training_iteration"], frame[metric])
                     if not math.isnan(v)]
        best_value = max((v for _, v in curve), default=None)
        reports = frame.to_dict("records") if frame is not None and len(frame) else []
        best_report = max((r for r in reports if isinstance(r.get(metric), float) and not math.isnan(r[metric])),
                          key=lambda r: r[metric], default={})
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
        run_dir = tune_dir / "runs" / trial_id
        final = None
        if (run_dir / "metrics.json").is_file():
            final = json.loads((run_dir / "metrics.json").read_text())
        rows.append({"trial_id": trial_id, "params": {k: result.config.get(k) for k in keys}, "best": best_value,
                     "curve": curve, "iterations": len(curve), "attempts": _attempts(run_dir),
                     "error": _one_line(result.error) if result.error else None,
                     "run_dir": str(run_dir), "best_report": best_report, "metrics_json": final})
    rows.sort(key=lambda r: (r["best"] is None, -(r["best"] or 0.0), r["trial_id"]))
    return rows


def write_reports(results, tune_dir: Path, metric: str, keys: list[str]) -> dict[str, Any]:
    rows = _trial_rows(results, tune_dir, metric, keys)
    if not rows or rows[0]["best"] is None:
        errors = "; ".join(r["error"] for r in rows if r["error"]) or "no trial reported"
        raise UserError(f"no trial reported {metric}: {errors}")
    header = ["rank", "trial", f"best {metric}", "iterations", "attempts", "status", *keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rank, row in enumerate(rows, 1):
        status = "error" if row["error"] else ("completed" if row["metrics_json"] else "stopped (ASHA)")
        best = "-" if row["best"] is None else f"{row['best']:.4f}"
        params = [_fmt(row["params"][k]) for k in keys]
        lines.append("| " + " | ".join([str(rank), row["trial_id"], best, str(row["iterations"]),
                                        str(row["attempts"]), status, *params]) + " |")
    errors = [f"- {row['trial_id']} (after {row['attempts']} attempts): {row['error']}" for row in rows if row["error"]]
    if errors:
        log.warning("%d of %d trials failed after their retries:\n%s", len(errors), len(rows), "\n".join(errors))
        lines += ["", "Failed trials (Tune restarted each up to --max-failures times):", *errors]
    (tune_dir / "results.md").write_text(f"# flm tune: {len(rows)} trials, sorted by best {metric}\n\n"
                                         + "\n".join(lines) + "\n")
    top = rows[0]
    best = {"metric": metric, "trial_id": top["trial_id"], "params": top["params"], "best_value": top["best"],
            "best_report": {k: v for k, v in top["best_report"].items() if _plain(v) and _reported(k)},
            "run_dir": top["run_dir"], "final": (top["metrics_json"] or {}).get("final"),
            "config": (top["metrics_json"] or {}).get("config")}
    (tune_dir / "best.json").write_text(json.dumps(best, indent=2, sort_keys=True, default=str))
    _plot(rows, metric, tune_dir / "curves.png")
    return best


def _reported(key: str) -> bool:
    return key.startswith(("valid/", "loss/")) or key in ("epoch", "step", "training_iteration", "lr")


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"[:300]


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _plain(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool)) and not (isinstance(value, float) and math.isnan(value))


def _plot(rows: list[dict[str, Any]], metric: str, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        log.warning("matplotlib unavailable (%s): skipping %s", exc, path.name)
        return
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        if row["curve"]:
            xs, ys = zip(*row["curve"])
            axes.plot(xs, ys, marker="o", label=row["trial_id"])
    axes.set_xlabel("training_iteration (epoch)")
    axes.set_ylabel(metric)
    axes.grid(alpha=0.3)
    if len(rows) <= 12:
        axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
