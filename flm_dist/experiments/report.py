"""`flm report`: one self-contained HTML page for a pretraining or fine-tuning run, or a tune directory.

Reading order: `ReportConfig` -> `run_report` (which kind of directory, then the page) ->
`read_run` / `read_tune` (config, per-epoch history and final metrics) -> the sections (config,
metrics, curves, tune results, `latent_projection` for the flow latent space) -> `render_page`.

The page needs nothing but itself: CSS inline, no scripts, figures drawn on matplotlib's Agg
canvas and embedded as base64 PNG data URIs, so it opens offline, from a CI artifact or a mail.

Where the numbers come from:
- a run directory: metrics.json (config, history, final valid/test metrics). A run that is still
  training or was interrupted has none; its config and history then come from its newest intact
  checkpoint (checkpoint.json and the `progress` in state.pt), and the metrics table shows the
  validation record of best/ instead;
- a tune directory (best.json or space.json): results.md, best.json, space.json and every trial's
  run directory TUNE_DIR/runs/<trial> (ASHA-stopped trials have no metrics.json; their newest
  checkpoint has the history);
- the latent section: the best checkpoint (the run's best/, or the best trial's) loaded with the
  data directory its config records (`pretrain.load_model_for_data`), up to `max_users` test
  users through the flow, the latents projected to 2-D with PCA.
"""
from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import io
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from flm_dist.config import require
from flm_dist.data.batches import build_eval_arrays
from flm_dist.errors import UserError
from flm_dist.runs import load_model_for_data
from flm_dist.train.checkpoint import META_FILE, load_checkpoint, newest_valid, read_meta

log = logging.getLogger("flm_dist")

MAX_USERS = 5000
METRIC_ORDER = ("hr", "recall", "ndcg", "mrr", "auc", "users")
HEADLINE = ("ndcg@10", "hr@10")


# ---------------------------------------------------------------------------------------------
# Reading runs and tune directories
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunRecord:
    path: Path
    config: dict[str, Any]
    """The resolved config the run was trained with."""
    history: list[dict[str, Any]]
    """One record per epoch: loss/* terms, valid/* metrics when validated, epoch, step, lr."""
    final: dict[str, float] | None
    """Valid and test metrics of the best checkpoint (metrics.json); None while unfinished."""
    best_validation: dict[str, Any] | None
    """The validation record of best/ (its checkpoint.json), shown when there is no `final`."""
    data: dict[str, Any] | None = None
    """Users, items and interactions of the training data (metrics.json)."""
    privacy: dict[str, Any] | None = None
    """DP fine-tuning only: the spent epsilon and the DP-SGD plan (metrics.json or checkpoint meta)."""

    @property
    def kind(self) -> str:
        return "fine-tuning" if "finetune" in self.config else "pretraining"

    @property
    def monitor(self) -> str:
        evaluation = self.config.get("eval", {})
        protocol = "full" if evaluation.get("mask_history", True) else "full_nomask"
        return f"valid/{evaluation.get('monitor_metric', 'ndcg@10')}/{protocol}"

    def best_value(self) -> float | None:
        values = [r[self.monitor] for r in self.history if _number(r.get(self.monitor))]
        return max(values, default=None)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None


def read_run(run_dir: Path) -> RunRecord | None:
    """The run in `run_dir`, or None when it holds neither metrics.json nor a checkpoint."""
    best = run_dir / "best"
    best_validation = read_meta(best).get("metrics") if (best / META_FILE).is_file() else None
    if (run_dir / "metrics.json").is_file():
        summary = _read_json(run_dir / "metrics.json")
        return RunRecord(run_dir, summary["config"], summary["history"], summary["final"], best_validation,
                         summary.get("data"), summary.get("privacy"))
    # best/ is the last resort: an interrupted run's newest checkpoint holds the longer history.
    candidates = [best, *sorted([*run_dir.glob("checkpoints/checkpoint_*"), *run_dir.glob("ray_train/checkpoint_*")])]
    newest = newest_valid([c for c in candidates if c.is_dir()])
    if newest is None:
        return None
    state, meta = load_checkpoint(newest)
    return RunRecord(run_dir, meta["config"], state["progress"]["history"], None, best_validation,
                     privacy=meta.get("privacy"))


@dataclasses.dataclass
class TuneRecord:
    path: Path
    best: dict[str, Any]
    """best.json (empty while the sweep runs): metric, trial_id, params, best_value, final, config."""
    results_md: str
    space: dict[str, Any] | None
    trials: dict[str, RunRecord]
    """Trial id -> its run, for every trial that has trained at least one epoch."""

    def best_trial(self) -> str | None:
        if self.best.get("trial_id") in self.trials:
            return self.best["trial_id"]
        scored = [(run.best_value(), trial) for trial, run in self.trials.items() if run.best_value() is not None]
        return max(scored)[1] if scored else None


def read_tune(tune_dir: Path) -> TuneRecord:
    runs = tune_dir / "runs"
    trials = {}
    for trial_dir in sorted(runs.iterdir()) if runs.is_dir() else []:
        record = read_run(trial_dir) if trial_dir.is_dir() else None
        if record is not None:
            trials[trial_dir.name] = record
    best, results, space = (tune_dir / name for name in ("best.json", "results.md", "space.json"))
    return TuneRecord(tune_dir, _read_json(best) if best.is_file() else {},
                      results.read_text() if results.is_file() else "",
                      _read_json(space) if space.is_file() else None, trials)


# ---------------------------------------------------------------------------------------------
# The flow latent space
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LatentProjection:
    coords: np.ndarray
    """[n, 2] the users' flow latents on their first two principal components."""
    activity: np.ndarray
    """[n] history length of each user (interactions before the test target)."""
    explained: np.ndarray
    """[2] fraction of the latents' variance along each component."""
    users: int
    """Test users in the data; `n` of them were drawn."""


def latent_projection(checkpoint: Path, data_dir: str, max_users: int = MAX_USERS, seed: int = 0,
                      batch_size: int = 1024) -> LatentProjection:
    """Flow latents of up to `max_users` test users (a seeded draw), projected with PCA (SVD)."""
    import pyarrow.parquet as pq
    import torch


    model, _, meta = load_model_for_data(str(checkpoint), data_dir, torch.device("cpu"))
    model.eval()
    table = pq.read_table(Path(data_dir) / "test")
    users = table.num_rows
    if users > max_users:
        table = table.take(np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False)))
    arrays = build_eval_arrays(table, meta["config"]["model"]["max_len"])
    with torch.no_grad():
        latents = torch.cat([model.flow_latent(arrays.user[i:i + batch_size], arrays.input[i:i + batch_size])
                             for i in range(0, len(arrays), batch_size)]).double().numpy()
    centred = latents - latents.mean(axis=0)
    _, singular, directions = np.linalg.svd(centred, full_matrices=False)
    variance = singular ** 2
    return LatentProjection(coords=centred @ directions[:2].T, activity=np.diff(arrays.history_offsets.numpy()),
                            explained=variance[:2] / max(variance.sum(), 1e-300), users=users)


# ---------------------------------------------------------------------------------------------
# Figures (PNG data URIs)
# ---------------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A bare Figure on the Agg canvas: no display needed and no global pyplot state.
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def _data_uri(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def curves_figure(series: dict[str, list[dict[str, Any]]], keys: list[str]) -> str:
    """One panel per key (value against epoch), one line per series."""
    from matplotlib.ticker import MaxNLocator

    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)
    figure = _figure(4.0 * columns, 2.9 * rows)
    for index, key in enumerate(keys):
        axes = figure.add_subplot(rows, columns, index + 1)
        for label, history in series.items():
            points = [(r["epoch"], r[key]) for r in history if _number(r.get(key))]
            if points:
                xs, ys = zip(*points)
                axes.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, label=label)
        axes.set_title(key, fontsize=9)
        axes.set_xlabel("epoch", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        if index == 0 and 1 < len(series) <= 12:
            axes.legend(fontsize=6)
    figure.tight_layout()
    return _data_uri(figure)


def latent_figure(projection: LatentProjection) -> str:
    from matplotlib.colors import LogNorm

    figure = _figure(7.5, 5.8)
    axes = figure.add_subplot()
    activity = np.maximum(projection.activity, 1)
    order = np.argsort(activity, kind="stable")  # the rarer, most active users drawn on top
    norm = LogNorm(vmin=activity.min(), vmax=max(activity.max(), activity.min() + 1))
    points = axes.scatter(projection.coords[order, 0], projection.coords[order, 1], c=activity[order], s=7,
                          cmap="viridis", norm=norm, alpha=0.8, linewidths=0)
    figure.colorbar(points, ax=axes, label="history length (log scale)")
    axes.set_xlabel(f"PC1 ({projection.explained[0]:.1%} of the variance)")
    axes.set_ylabel(f"PC2 ({projection.explained[1]:.1%})")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return _data_uri(figure)


# ---------------------------------------------------------------------------------------------
# Sections (HTML fragments)
# ---------------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(str(value))


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _image(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{_e(alt)}">'


def _format(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) >= 1000:
        return f"{int(value)}"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _protocol_order(protocol: str) -> tuple:
    return (protocol != "full", protocol != "full_nomask", protocol)


def _metric_order(metric: str) -> tuple:
    name, _, k = metric.partition("@")
    return (METRIC_ORDER.index(name) if name in METRIC_ORDER else len(METRIC_ORDER), int(k) if k.isdigit() else 0, name)


def metrics_table(metrics: dict[str, Any]) -> str:
    """One row per metric, one column per split and protocol; each cell's title is its full name
    (`split/metric/protocol`, e.g. `test/ndcg@10/full`)."""
    cells = {tuple(key.split("/")): value for key, value in metrics.items()
             if key.count("/") == 2 and _number(value)}
    splits = sorted({s for s, _, _ in cells}, key=lambda s: (s != "test", s))
    protocols = sorted({p for _, _, p in cells}, key=_protocol_order)
    columns = [(s, p) for s in splits for p in protocols]
    metrics_ = sorted({m for _, m, _ in cells}, key=_metric_order)
    lines = ["<table class='metrics'><tr><th rowspan='2'>metric</th>"
             + "".join(f"<th colspan='{len(protocols)}'>{_e(s)}</th>" for s in splits) + "</tr>",
             "<tr>" + "".join(f"<th>{_e(p)}</th>" for _, p in columns) + "</tr>"]
    for metric in metrics_:
        css = " class='headline'" if metric in HEADLINE else ""
        tds = "".join(f"<td title='{_e(f'{s}/{metric}/{p}')}'>{_format(cells[s, metric, p])}</td>"
                      if (s, metric, p) in cells else "<td></td>" for s, p in columns)
        lines.append(f"<tr{css}><th>{_e(metric)}</th>{tds}</tr>")
    return "\n".join([*lines, "</table>"])


def config_section(config: dict[str, Any]) -> str:
    """One small table per config group (model, loss, train, ...); paths and scalars first."""
    scalars = {k: v for k, v in config.items() if not isinstance(v, dict)}
    groups = [("run", scalars)] + [(k, v) for k, v in config.items() if isinstance(v, dict)]
    tables = []
    for name, values in groups:
        rows = "".join(f"<tr><th>{_e(f'{name}.{k}' if name != 'run' else k)}</th><td>{_e(json.dumps(v))}</td></tr>"
                       for k, v in _flatten(values).items())
        tables.append(f"<table class='config'><caption>{_e(name)}</caption>{rows}</table>")
    return f"<div class='groups'>{''.join(tables)}</div>"


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _metrics_section(run: RunRecord, final: dict[str, Any] | None) -> str:
    if final:
        return (f"<p>Valid and test metrics of the best checkpoint (best {_e(run.monitor)}), named "
                "<code>split/metric/protocol</code>; hover a cell for its full name.</p>" + metrics_table(final))
    if run.best_validation:
        return (_note("The run has no final evaluation yet (no metrics.json): these are the validation "
                      f"metrics of best/ at epoch {run.best_validation.get('epoch', '?')}.")
                + metrics_table(run.best_validation))
    return _note("No metrics yet: the run has neither metrics.json nor a best checkpoint.")


def _loss_keys(histories: list[list[dict[str, Any]]]) -> list[str]:
    # A term with weight 0 is logged as exactly 0: a flat line says nothing.
    keys = {k for h in histories for r in h for k, v in r.items()
            if k.startswith("loss/") and _number(v) and v != 0}
    return sorted(keys - {"loss/total"}) + sorted(keys & {"loss/total"})


def _validation_keys(histories: list[list[dict[str, Any]]], monitor: str) -> list[str]:
    present = {k for h in histories for r in h for k in r if k.startswith("valid/") and k.count("/") == 2}
    protocols = sorted({k.rsplit("/", 1)[1] for k in present}, key=_protocol_order)
    wanted = [monitor] + [f"valid/{m}@10/{p}" for p in protocols for m in ("ndcg", "hr")]
    return [k for k in dict.fromkeys(wanted) if k in present]


def _curve_sections(series: dict[str, list[dict[str, Any]]], monitor: str, per: str) -> list[tuple[str, str, str]]:
    histories = list(series.values())
    losses, validation = _loss_keys(histories), _validation_keys(histories, monitor)
    loss_body = (f"<p>Mean training loss per epoch, per term{per}; terms that are 0 throughout (weight 0) "
                 "are left out.</p>" + _image(curves_figure(series, losses), "loss curves: " + ", ".join(losses))
                 if losses else _note("No loss records in the history."))
    valid_body = (f"<p>Validation metrics per validated epoch{per} (early stopping and best/ follow "
                  f"<code>{_e(monitor)}</code>).</p>"
                  + _image(curves_figure(series, validation), "validation curves: " + ", ".join(validation))
                  if validation else _note("No validation records in the history."))
    return [("losses", "Loss curves", loss_body), ("validation", "Validation curves", valid_body)]


def latent_section(run: RunRecord, max_users: int) -> str:
    checkpoint = run.path / "best"
    data_dir = str(run.config.get("data") or "")
    if not (checkpoint / META_FILE).is_file():
        return _note(f"No best checkpoint in {run.path} yet: no latent space to show.")
    if not data_dir or not (Path(data_dir) / "manifest.json").is_file():
        return _note(f"The data directory recorded in the run's config ({data_dir or 'none'}) is missing, so no "
                     "user can be embedded; prepare it again at that path to see the latent space.")
    try:
        projection = latent_projection(checkpoint, data_dir, max_users)
    except UserError as exc:
        return _note(f"The best checkpoint could not be loaded with {data_dir}: {exc}")
    shown = len(projection.activity)
    drawn = f"all {shown}" if shown == projection.users else f"{shown} of the {projection.users} (a seeded draw)"
    return (f"<p>The flow latent <code>z = f(u)</code> of the fused user representation, for {drawn} test users, "
            f"from <code>{_e(checkpoint)}</code> on <code>{_e(data_dir)}</code>; projected on the latents' first two "
            f"principal components ({projection.explained.sum():.1%} of the variance). Colour: the user's "
            f"activity, history length {int(projection.activity.min())} to {int(projection.activity.max())} "
            f"(median {int(np.median(projection.activity))}).</p>"
            + _image(latent_figure(projection), "flow latent space"))


def markdown_table(text: str, mark: str | None = None) -> str:
    """The first Markdown table in `text` as HTML; rows containing `mark` get class 'best'."""
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines
            if not re.fullmatch(r"\|[\s:|-]+\|", line)]
    if not rows:
        return _note("results.md holds no table.")
    header, *body = rows
    out = ["<table class='results'><tr>" + "".join(f"<th>{_e(c)}</th>" for c in header) + "</tr>"]
    for row in body:
        css = " class='best'" if mark and mark in row else ""
        out.append(f"<tr{css}>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>")
    return "\n".join([*out, "</table>"])


def tune_section(tune: TuneRecord, best_trial: str | None) -> str:
    best = tune.best
    parts = []
    if best:
        params = json.dumps(best.get("params"), sort_keys=True)
        parts.append(f"<p>Best trial <b>{_e(best.get('trial_id'))}</b>: {_e(best.get('metric'))} = "
                     f"{_format(best.get('best_value'))} with <code>{_e(params)}</code>.</p>")
    else:
        parts.append(_note("No best.json yet (the sweep has not finished); "
                           f"best trial so far: {best_trial or 'none'}."))
    parts.append(markdown_table(tune.results_md, best_trial) if tune.results_md else _note("No results.md yet."))
    if tune.space:
        lines = "\n".join(f"{key}: {json.dumps(spec)}" for key, spec in sorted(tune.space.items()))
        parts.append(f"<p>Search space (space.json):</p><pre>{_e(lines)}</pre>")
    parts.append(f"<p>{len(tune.trials)} trial runs in <code>{_e(tune.path / 'runs')}</code>; the curves below "
                 "show every trial, including those ASHA stopped early.</p>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------


STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; color: #1d2430; margin: 0; background: #f6f7f9; }
header { background: #1d2b44; color: #fff; padding: 18px 28px; }
header h1 { margin: 0 0 4px; font-size: 21px; }
header p { margin: 2px 0; color: #c8d2e3; }
nav { padding: 8px 28px; background: #e6eaf0; }
nav a { margin-right: 16px; color: #1d4f91; text-decoration: none; }
section { background: #fff; margin: 16px 28px; padding: 8px 20px 16px; border-radius: 6px;
          box-shadow: 0 1px 2px #0002; }
h2 { font-size: 17px; border-bottom: 1px solid #dde2ea; padding-bottom: 4px; }
table { border-collapse: collapse; margin: 6px 0; font-size: 12.5px; }
th, td { border: 1px solid #dde2ea; padding: 3px 8px; text-align: left; }
td { font-variant-numeric: tabular-nums; }
tr.headline, tr.best { background: #fff5d6; font-weight: 600; }
caption { font-weight: 600; text-align: left; padding: 2px 0; }
.groups { display: flex; flex-wrap: wrap; gap: 14px; align-items: flex-start; }
.note { background: #fdf0f0; border-left: 4px solid #c44; padding: 6px 10px; }
img { max-width: 100%; height: auto; }
code, pre { font: 12px ui-monospace, SFMono-Regular, Menlo, monospace; background: #f0f2f5; padding: 1px 3px; }
pre { padding: 8px; overflow-x: auto; }
"""


def render_page(title: str, facts: list[str], sections: list[tuple[str, str, str]]) -> str:
    """The whole page: a header, links to the sections, and the sections (id, heading, body)."""
    nav = "".join(f'<a href="#{anchor}">{_e(heading)}</a>' for anchor, heading, _ in sections)
    body = "\n".join(f'<section id="{anchor}"><h2>{_e(heading)}</h2>\n{content}\n</section>'
                     for anchor, heading, content in sections)
    generated = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = "".join(f"<p>{_e(fact)}</p>" for fact in [*facts, f"generated by flm report, {generated}"])
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{STYLE}</style></head>\n<body><header><h1>{_e(title)}</h1>{header}</header>"
            f"<nav>{nav}</nav>\n{body}\n</body></html>\n")


def _run_facts(run: RunRecord) -> list[str]:
    facts = [f"{run.kind} run: {run.path.resolve()}"]
    if run.data:
        facts.append(f"data: {run.config.get('data')} ({run.data.get('users')} users, {run.data.get('items')} items, "
                     f"{run.data.get('interactions')} interactions)")
    epochs = max((r.get("epoch", 0) for r in run.history), default=0)
    best = run.best_value()
    facts.append(f"{epochs} epochs trained" + (f"; best {run.monitor} = {best:.4f}" if best is not None else "")
                 + ("" if run.final else "; not finished (no metrics.json)"))
    if run.privacy and "epsilon" in run.privacy:
        facts.append(f"differentially private (user level): epsilon {run.privacy['epsilon']:.4f} spent of "
                     f"{run.privacy.get('plan', {}).get('target_epsilon')}")
    return facts


def privacy_section(run: RunRecord) -> str | None:
    """Differential privacy of a DP fine-tuning run: spent epsilon per epoch and the DP-SGD plan."""
    target = run.config.get("finetune", {}).get("privacy", {}).get("epsilon")
    if target is None:
        return None
    spent = [(r["epoch"], r["privacy/epsilon"]) for r in run.history if _number(r.get("privacy/epsilon"))]
    plan = (run.privacy or {}).get("plan", {})
    epsilon = (run.privacy or {}).get("epsilon", spent[-1][1] if spent else None)
    settings = ", ".join(f"{_e(k.replace('_', ' '))} {_format(plan[k])}" for k in
                         ("noise_multiplier", "max_grad_norm", "sample_rate", "users", "planned_steps") if k in plan)
    rows = "".join(f"<tr><td>{epoch}</td><td>{_format(value)}</td></tr>" for epoch, value in spent)
    return (f"<p>User-level differentially private fine-tuning (DP-SGD with Opacus, one example per sampled user "
            f"per step): epsilon <b>{_format(epsilon)}</b> spent of the target {_format(target)}, at delta "
            f"{_format(plan.get('delta'))} ({_e(plan.get('accountant', '?'))} accountant); {settings}. Pretraining, "
            "the vocabularies and the reported metrics are not covered (docs/guide/privacy.md).</p>"
            f"<table class='metrics'><tr><th>epoch</th><th>epsilon spent</th></tr>{rows}</table>")


def run_page(run: RunRecord, max_users: int) -> str:
    privacy = privacy_section(run)
    sections = [("metrics", "Metrics", _metrics_section(run, run.final)),
                *([("privacy", "Differential privacy", privacy)] if privacy else []),
                *_curve_sections({run.path.name: run.history}, run.monitor, ""),
                ("latent", "Flow latent space of users", latent_section(run, max_users)),
                ("config", "Resolved config", config_section(run.config))]
    return render_page(f"flm report: {run.path.resolve().name}", _run_facts(run), sections)


def tune_page(tune: TuneRecord, max_users: int) -> str:
    best_trial = tune.best_trial()
    facts = [f"tune directory: {tune.path.resolve()} ({len(tune.trials)} trials with runs)"]
    sections = [("tune", "Tune results", tune_section(tune, best_trial))]
    if best_trial is None:
        sections.append(("latent", "Flow latent space of users", _note("No trial has trained an epoch yet.")))
        return render_page(f"flm report: {tune.path.resolve().name}", facts, sections)
    run = tune.trials[best_trial]
    monitor = tune.best.get("metric") or run.monitor
    facts.append(f"best trial {best_trial}: {run.path}")
    losses, validation = _curve_sections({trial: r.history for trial, r in tune.trials.items()}, monitor,
                                         ", one line per trial")
    # The trials' validation curves belong right under the results table: they explain the ranking.
    sections += [validation, losses,
                 ("metrics", f"Metrics of the best trial ({best_trial})",
                  _metrics_section(run, tune.best.get("final") or run.final)),
                 ("latent", f"Flow latent space of users (best trial {best_trial})", latent_section(run, max_users)),
                 ("config", f"Resolved config of the best trial ({best_trial})", config_section(run.config))]
    return render_page(f"flm report: {tune.path.resolve().name}", facts, sections)


@dataclasses.dataclass
class ReportConfig:
    directory: str = ""
    """A pretraining or fine-tuning run directory, or a tune directory."""
    output: str | None = None
    """HTML file to write (default DIRECTORY/report.html)."""
    max_users: int = MAX_USERS
    """Test users drawn (seeded) for the picture of the flow latent space."""

    def __post_init__(self):
        require(bool(self.directory), "directory", "is required (a run or tune directory)")
        require(self.max_users >= 2, "max_users", "must be >= 2 (a 2-D projection needs two users)")


def run_report(config: ReportConfig) -> Path:
    """Write the report of a run or tune directory; returns the page's path."""
    root = Path(config.directory)
    if not root.is_dir():
        raise UserError(f"{config.directory} is not a directory")
    if (root / "best.json").is_file() or (root / "space.json").is_file():
        page = tune_page(read_tune(root), config.max_users)
    else:
        run = read_run(root)
        if run is None:
            raise UserError(f"{config.directory} is neither a run directory (metrics.json or a checkpoint) "
                            "nor a tune directory (best.json)")
        page = run_page(run, config.max_users)
    path = Path(config.output) if config.output else root / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(page, encoding="utf-8")
    os.replace(staging, path)  # a reader never sees half a page
    log.info("report written to %s (%.0f kB)", path, path.stat().st_size / 1024)
    return path
