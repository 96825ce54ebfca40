"""Metric tables for people: the headline metrics of a run per split and protocol."""

from __future__ import annotations


def final_metrics_table(metrics: dict[str, float], ks: tuple[int, ...] = (10,)) -> str:
    """Readable table of the headline metrics per split and protocol."""
    rows = []
    # `full`, ... and with a cold-item hold-out their `/cold` subsets (`full/cold`)
    protocols = sorted({k.split("/", 2)[2] for k in metrics if k.count("/") >= 2 and "@" in k})
    width = max([12, *map(len, protocols)])
    for split in ("valid", "test"):
        for protocol in protocols:
            cells = [f"{metrics.get(f'{split}/{m}@{k}/{protocol}', float('nan')):.4f}"
                     for k in ks for m in ("hr", "ndcg")]
            rows.append(f"{split:<6} {protocol:<{width}} " + " ".join(f"{c:>8}" for c in cells))
    header = f"{'split':<6} {'protocol':<{width}} " + " ".join(f"{m + '@' + str(k):>8}"
                                                             for k in ks for m in ("hr", "ndcg"))
    return "\n".join([header, *rows])

