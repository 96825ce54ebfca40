"""`flm compare`: is one model better than another on the same users? A paired per-user test.

Two checkpoints trained on the same prepared data are ranked on one split with full ranking
over all items, under both protocols (`full`, the user's earlier items removed, and
`full_nomask`). Per user, NDCG@k and HR@k of each; reported per metric: both means (equal to
the runs' metrics.json values), their difference, how many users each model ranks better, and
the two-sided Wilcoxon signed-rank p-value paired by user. A difference of means between two
single runs mixes the models with seed noise; the per-user pairing is what makes the p-value
about these two checkpoints on these users (it says nothing about other seeds).

Each side may be several runs of one model (seeds). A side's per-user values are then the mean
over its runs, as in `flm ablate`, so the test is about the models rather than one seed's
draw, and each mean comes with the standard deviation of the per-run means.

On data with a cold-item hold-out, every metric is also compared over the users whose target is
a held-out item (`/cold` appended, as in metrics.json).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np

from flm_dist.config import require
from flm_dist.eval.evaluate import user_ranks
from flm_dist.eval.metrics import hit_at, mean_std, ndcg_at, wilcoxon_p_value
from flm_dist.train.checkpoint import checkpoint_or_best

PROTOCOLS = ("full", "full_nomask")


@dataclasses.dataclass
class CompareConfig:
    a: list[str] = dataclasses.field(default_factory=list)
    """First model: checkpoint directories, or run directories (their `best/` is used); several
    runs (seeds) of the model are averaged per user."""
    b: list[str] = dataclasses.field(default_factory=list)
    """Second model, the same way; trained on the same vocabulary as `a`."""
    data: str = ""
    """Prepared data directory both models were trained on."""
    split: str = "test"
    """Split whose users are ranked: `valid` or `test`."""
    k: int = 10
    """Cutoff of NDCG@k and HR@k."""
    output: str | None = None
    """Also write the comparison as JSON here."""

    def __post_init__(self):
        require(bool(self.a), "a", "is required")
        require(bool(self.b), "b", "is required")
        require(bool(self.data), "data", "is required")
        require(self.split in ("valid", "test"), "split", "must be valid or test")
        require(self.k >= 1, "k", "must be >= 1")


def run_compare(config: CompareConfig) -> dict[str, Any]:
    a = [str(checkpoint_or_best(path)) for path in config.a]
    b = [str(checkpoint_or_best(path)) for path in config.b]
    ranks_a = [user_ranks(path, config.data, config.split) for path in a]
    ranks_b = [user_ranks(path, config.data, config.split) for path in b]
    users = len(ranks_a[0]["full"])
    subsets = {"": np.ones(users, dtype=bool)}
    if "cold" in ranks_a[0] and ranks_a[0]["cold"].any():
        subsets["/cold"] = ranks_a[0]["cold"]
    rows = []
    for protocol, (subset, chosen) in itertools.product(PROTOCOLS, subsets.items()):
        for name, per_user in (("ndcg", ndcg_at), ("hr", hit_at)):
            runs_a = np.stack([per_user(ranks[protocol], config.k)[chosen] for ranks in ranks_a])
            runs_b = np.stack([per_user(ranks[protocol], config.k)[chosen] for ranks in ranks_b])
            x, y = runs_a.mean(axis=0), runs_b.mean(axis=0)
            over_a, over_b = mean_std(runs_a.mean(axis=1)), mean_std(runs_b.mean(axis=1))
            rows.append({"metric": f"{config.split}/{name}@{config.k}/{protocol}{subset}", "a": float(x.mean()),
                         "b": float(y.mean()), "a_std": over_a["std"], "b_std": over_b["std"],
                         "a_runs": over_a["per_seed"], "b_runs": over_b["per_seed"],
                         "difference": float(x.mean() - y.mean()),
                         "a_better_users": int((x > y).sum()), "b_better_users": int((y > x).sum()),
                         "p_value": wilcoxon_p_value(x, y)})
    test = "two-sided Wilcoxon signed-rank, paired by user"
    if len(a) > 1 or len(b) > 1:
        test += " (per-user values averaged over each side's runs)"
    report = {"a": a, "b": b, "data": config.data, "split": config.split, "users": users,
              "test": test, "rows": rows}
    if "/cold" in subsets:
        report["cold_users"] = int(subsets["/cold"].sum())
    if len(set(a)) != len(set(b)):
        # A user's mean over 2 runs takes other values than over 3 (HR: 0, 1/2, 1 against 0, 1/3,
        # 2/3, 1), so the per-user differences are rarely zero even between equal models.
        report["warning"] = (f"the sides have {len(set(a))} and {len(set(b))} distinct runs: per-user means over "
                             "different numbers of runs differ by their granularity alone, which biases the "
                             "paired test (most on HR); compare equal numbers of runs")
    if config.output:
        Path(config.output).parent.mkdir(parents=True, exist_ok=True)
        Path(config.output).write_text(json.dumps(report, indent=2))
    return report


def markdown_table(report: dict[str, Any]) -> str:
    several = len(report["a"]) > 1 or len(report["b"]) > 1

    def cell(row: dict[str, Any], side: str) -> str:
        return f"{row[side]:.4f} ± {row[side + '_std']:.4f}" if several else f"{row[side]:.4f}"

    cold = f" ({report['cold_users']} with a held-out target: the /cold rows)" if "cold_users" in report else ""
    lines = [f"a: {', '.join(report['a'])}", f"b: {', '.join(report['b'])}",
             f"{report['users']} {report['split']} users{cold}; p: {report['test']}"
             + ("; ± is the std of the runs' means" if several else ""), "",
             "| metric | a | b | a - b | users a better | users b better | p |", "| --- | --- | --- | --- | --- | --- | --- |"]
    if "warning" in report:
        lines[2:2] = [f"warning: {report['warning']}"]
    for row in report["rows"]:
        lines.append(f"| {row['metric']} | {cell(row, 'a')} | {cell(row, 'b')} | {row['difference']:+.4f} | "
                     f"{row['a_better_users']} | {row['b_better_users']} | {row['p_value']:.3g} |")
    return "\n".join(lines) + "\n"
