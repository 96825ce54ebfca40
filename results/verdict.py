"""The ablation's answer in one table: every variant of the four full-budget ablations against
SASRec from scratch, from the seed results in this folder alone (no checkpoint needed).

    python3 results/verdict.py

Per set, fraction and protocol: test NDCG@10 averaged over seeds 0-2, and the two-sided Wilcoxon
signed-rank p of the row against SASRec from scratch, paired by user on per-user NDCG@10
averaged over the seeds (as `flm ablate` tests). Prints markdown rows:
variant | fraction | Beauty unmasked / masked | Toys unmasked / masked.
docs/results.md ("The answer in one table") holds these rows verbatim, which tests/test_ablate.py checks.
"""

import functools
from pathlib import Path

import numpy as np

from flm_dist.eval.metrics import ndcg_at, wilcoxon_p_value

RESULTS = Path(__file__).parent
SEEDS = (0, 1, 2)
SETS = ("beauty", "toys")
PROTOCOLS = ("full_nomask", "full")
# label, ablation (seed results folder without the set), variant
ROWS = (
    ("SASRec from scratch", "ablate_{}", "scratch"),
    ("pretrained SASRec, no head", "ablate_{}", "sasrec"),
    ("pretrained SASRec, head", "ablate_{}_head", "sasrec"),
    ("flm_sequence, head", "ablate_{}_head", "flm_sequence"),
    ("flm, head", "ablate_{}_head", "flm"),
    ("flm, no head", "ablate_{}", "flm"),
    ("joint_noflow, no head", "ablate_{}", "joint_noflow"),
    ("whiten, no head", "ablate_{}", "whiten"),
    ("history CF (mf), no head", "ablate_{}", "mf"),
)
BASELINE = ROWS[0]


@functools.cache  # SASRec from scratch is the baseline of every row: read its seeds once
def per_user_ndcg(ablation: str, variant: str, fraction: str, protocol: str) -> np.ndarray:
    runs = []
    for seed in SEEDS:
        with np.load(RESULTS / ablation / f"seed{seed}.npz") as ranks:
            runs.append(ndcg_at(ranks[f"{variant}/{fraction}/{protocol}"], 10))
    return np.mean(runs, axis=0)


def main() -> None:
    print("| variant | fraction | Beauty NDCG@10 unmasked / masked | Toys NDCG@10 unmasked / masked |")
    print("| --- | --- | --- | --- |")
    for fraction in ("1", "0.1"):
        for row in ROWS:
            label, ablation, variant = row
            cells = []
            for data in SETS:
                parts = []
                for protocol in PROTOCOLS:
                    ndcg = per_user_ndcg(ablation.format(data), variant, fraction, protocol)
                    text = f"{ndcg.mean():.4f}"
                    if row != BASELINE:
                        scratch = per_user_ndcg(BASELINE[1].format(data), BASELINE[2], fraction, protocol)
                        p_value = wilcoxon_p_value(ndcg, scratch)
                        text += f" (p {p_value:.2g})" if p_value >= 1e-300 else " (p < 1e-300)"
                    parts.append(text)
                cells.append(" / ".join(parts))
            print(f"| {label} | {float(fraction):g} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
