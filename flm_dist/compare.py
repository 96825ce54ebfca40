"""`flm compare`: is one model better than another on the same users? A paired per-user test.

Two checkpoints trained on the same prepared data are ranked on one split with full ranking
over all items, under both protocols (`full`, the user's earlier items removed, and
`full_nomask`). Per user, NDCG@k and HR@k of each; reported per metric: both means (equal to
the runs' metrics.json values), their difference, how many users each model ranks better, and
the two-sided Wilcoxon signed-rank p-value paired by user. A difference of means between two
single runs mixes the models with seed noise; the per-user pairing is what makes the p-value
about these two checkpoints on these users (it says nothing about other seeds).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from flm_dist.checkpoint import checkpoint_or_best
from flm_dist.config import require
from flm_dist.evaluate import user_ranks
from flm_dist.metrics import hit_at, ndcg_at, wilcoxon_p_value

PROTOCOLS = ("full", "full_nomask")


@dataclasses.dataclass
class CompareConfig:
    a: str = ""
    """First model: a checkpoint directory, or a run directory (its `best/` is used)."""
    b: str = ""
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
    a, b = str(checkpoint_or_best(config.a)), str(checkpoint_or_best(config.b))
    ranks_a = user_ranks(a, config.data, config.split)
    ranks_b = user_ranks(b, config.data, config.split)
    rows = []
    for protocol in PROTOCOLS:
        for name, per_user in (("ndcg", ndcg_at), ("hr", hit_at)):
            x, y = per_user(ranks_a[protocol], config.k), per_user(ranks_b[protocol], config.k)
            rows.append({"metric": f"{config.split}/{name}@{config.k}/{protocol}", "a": float(x.mean()),
                         "b": float(y.mean()), "difference": float(x.mean() - y.mean()),
                         "a_better_users": int((x > y).sum()), "b_better_users": int((y > x).sum()),
                         "p_value": wilcoxon_p_value(x, y)})
    report = {"a": a, "b": b, "data": config.data, "split": config.split, "users": len(ranks_a["full"]),
              "test": "two-sided Wilcoxon signed-rank, paired by user", "rows": rows}
    if config.output:
        Path(config.output).parent.mkdir(parents=True, exist_ok=True)
        Path(config.output).write_text(json.dumps(report, indent=2))
    return report


def markdown_table(report: dict[str, Any]) -> str:
    lines = [f"a: {report['a']}", f"b: {report['b']}",
             f"{report['users']} {report['split']} users; p: {report['test']}", "",
             "| metric | a | b | a - b | users a better | users b better | p |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in report["rows"]:
        lines.append(f"| {row['metric']} | {row['a']:.4f} | {row['b']:.4f} | {row['difference']:+.4f} | "
                     f"{row['a_better_users']} | {row['b_better_users']} | {row['p_value']:.3g} |")
    return "\n".join(lines) + "\n"
