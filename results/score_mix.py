"""Validation NDCG@10 of a jointly trained checkpoint ranked by its sequence state, its CF vector,
and by the two scores added at ranking time: score = sequence . item + w * CF . item, which is
ranking by the user vector sequence + w * CF, since both score against the shared item table.

    python3 results/score_mix.py CHECKPOINT DATA [W ...]     # default W: 0.1 0.25 0.5 1.0
"""

import dataclasses
import sys
from pathlib import Path

import pyarrow.parquet as pq
import torch

from flm_dist.config import EvalConfig, from_dict
from flm_dist.data.batches import build_eval_arrays
from flm_dist.eval.evaluate import evaluate_split
from flm_dist.runs import load_model_for_data


def main(checkpoint: str, data: str, weights: list[float]) -> None:
    model, manifest, meta = load_model_for_data(checkpoint, data, torch.device("cpu"))
    arrays = build_eval_arrays(pq.read_table(Path(data) / "valid"), meta["config"]["model"]["max_len"])
    protocol = from_dict(EvalConfig, meta["config"]["eval"])
    representation = model.user_representation

    def report(name: str, source: str) -> None:
        metrics = evaluate_split(model, arrays, "valid", dataclasses.replace(protocol, user_source=source),
                                 manifest["num_negatives"])
        print(f"| {name} | {metrics['valid/ndcg@10/full_nomask']:.4f} | {metrics['valid/ndcg@10/full']:.4f} |",
              flush=True)

    print("| ranked by | valid NDCG@10 full_nomask | valid NDCG@10 full |\n| --- | --- | --- |")
    report("sequence state", "sequence")
    report("CF vector", "cf")
    for weight in weights:
        model.user_representation = lambda user, input, source, w=weight: (
            representation(user, input, "sequence") + w * representation(user, input, "cf"))
        report(f"sequence + {weight} x CF", "sequence")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], [float(w) for w in sys.argv[3:]] or [0.1, 0.25, 0.5, 1.0])
