"""Evaluation shared by every stage: full ranking by default, fixed sampled candidates on request.

Protocols, each in the metric name (`test/ndcg@10/full`):
- `full`: the target ranked against every item, the user's earlier items removed;
- `full_nomask`: against every item, nothing removed (comparable with RecBole's setting);
- `full_zeroed`: against every item, the user's earlier items scored 0 instead of removed (the
  S3-Rec code base's masking, which the published BSARec/FMLP-Rec/ICSRec numbers use);
- `sampledN`: against the N negatives fixed on disk by `prepare` (for comparison with papers).
`{split}/top1_in_history/full_nomask` is a diagnostic, not a ranking metric: the share of users
whose best-scoring item, nothing removed, is one of their own history items. Where targets are
never repeats (the Amazon sets), each such user's hit can at best rank second.
Data prepared with a cold-item hold-out (data/cold_items.py) also gets every protocol over the
users whose target is a held-out item, `/cold` appended (`test/ndcg@10/full/cold`), ranked against
the same catalogue; `{split}/users/full/cold` counts them.
Final evaluations (`flm evaluate`, a run's final table) add the top-K lists' catalogue coverage
and mean popularity percentile, `{split}/coverage@K/full` and `{split}/pop_percentile@K/full`
(and `/full_nomask`), see eval/beyond.py.
Each rank scores its own users; sums and counts are all-reduced, never per-rank means.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn

from flm_dist.config import EvalConfig, ScalingConfig, from_dict, require, to_dict
from flm_dist.data.batches import EvalArrays, build_eval_arrays
from flm_dist.errors import UserError
from flm_dist.eval.beyond import BeyondAccuracy, popularity_percentiles, training_item_counts
from flm_dist.eval.metrics import RankingAccumulator, target_ranks
from flm_dist.eval.ranking import candidate_scores, rank_chunk_size, rank_targets
from flm_dist.train import distributed

log = logging.getLogger("flm_dist")


@torch.no_grad()
def evaluate_split(model: nn.Module, arrays: EvalArrays, split: str, config: EvalConfig,
                   num_negatives: int, percentiles: torch.Tensor | None = None) -> dict[str, float]:
    """All protocols' metrics for `split`; every rank must call it (it all-reduces).

    Full ranking scores the items in chunks (`config.max_score_elements`), so the catalog size
    is bounded by the item table, not by users x items scores. With `percentiles` (items' training
    popularity percentiles [N + 1], eval/beyond.py) the top-K lists' coverage and popularity are
    added; they cost a pass over the items per protocol, so only final evaluations ask for them.
    """
    model = distributed.unwrap(model)
    was_training = model.training
    model.eval()
    # Every metric is a sum over users, so the order is free: short histories batch together
    # and run over their own positions only, where the model allows (most users' histories are
    # far shorter than max_len, and encoding is most of a validation's time).
    cut_padding = getattr(model, "left_padding_free", False)
    if cut_padding:
        arrays = arrays.by_input_length()
    device = arrays.user.device
    accumulator = RankingAccumulator(split, config.ks, device)
    sampled = f"sampled{num_negatives}"
    nothing = torch.zeros(0, dtype=torch.long, device=device)
    subsets = ("", "/cold") if arrays.cold is not None else ("",)
    for protocol in ("full", "full_nomask", "full_zeroed", sampled):
        for subset in subsets:  # every rank the same names, whichever users it holds
            accumulator.add(protocol + subset, nothing, 1)
    accumulator.add_mean("top1_in_history", "full_nomask", nothing)
    item_table = model.item_table()
    num_items = item_table.shape[0] - 1
    beyond = BeyondAccuracy(split, config.ks, percentiles) if percentiles is not None else None
    for start in range(0, len(arrays), config.batch_size):
        stop = min(start + config.batch_size, len(arrays))
        width = arrays.input_width(start, stop) if cut_padding else arrays.input.shape[1]
        vectors = model.user_representation(arrays.user[start:stop], arrays.input[start:stop, -width:],
                                            source=config.user_source)
        target = arrays.target[start:stop]
        cold = arrays.cold[start:stop] if arrays.cold is not None else None

        def add(protocol: str, ranks: torch.Tensor, num_candidates: torch.Tensor) -> None:
            accumulator.add(protocol, ranks, num_candidates)
            if cold is not None:
                accumulator.add(f"{protocol}/cold", ranks[cold], num_candidates[cold])

        chunk_size = rank_chunk_size(stop - start, num_items, config.max_score_elements, device)
        ranks = rank_targets(vectors, item_table, target, arrays.history_pairs(start, stop), chunk_size)
        if beyond is not None:
            beyond.add(vectors, item_table, arrays.history_pairs(start, stop), chunk_size)
        add("full_nomask", ranks.unmasked, torch.full_like(ranks.unmasked, num_items))
        accumulator.add_mean("top1_in_history", "full_nomask", ranks.top_in_history)
        add("full", ranks.masked, ranks.candidates)
        add("full_zeroed", ranks.zeroed, torch.full_like(ranks.zeroed, num_items))
        candidates = torch.cat([target.view(-1, 1), arrays.negatives[start:stop]], dim=1)
        add(sampled, target_ranks(candidate_scores(vectors, item_table, candidates), torch.zeros_like(target)),
            1 + (candidates[:, 1:] != 0).sum(dim=1))
    model.train(was_training)
    metrics = accumulator.compute(distributed.all_reduce_sum)
    if beyond is not None:
        metrics.update(beyond.compute(distributed.all_reduce_sum, distributed.all_reduce_max))
    return metrics


@dataclasses.dataclass
class EvaluateConfig:
    checkpoint: str = ""
    """Checkpoint directory to evaluate (a run's `best/`, or any `checkpoint_*`); empty with `baseline`."""
    data: str = ""
    """Prepared data directory; its vocabulary must match the checkpoint's."""
    splits: tuple[str, ...] = ("valid", "test")
    """Splits to evaluate."""
    output: str | None = None
    """Write the metrics as JSON here (default: print only)."""
    eval: EvalConfig | None = None
    """Ranking protocol settings; by default the checkpoint's own (e.g. its `user_source`)."""
    scaling: ScalingConfig = dataclasses.field(default_factory=lambda: ScalingConfig(workers=0))
    """0 workers evaluates in this process; N > 0 on N Ray Train workers."""
    baseline: Literal["none", "popularity", "attribute_popularity"] = "none"
    """Evaluate a non-personalised baseline on `data` instead of a checkpoint, in this process
    (eval/baselines.py): `popularity` (training interactions) or `attribute_popularity` (the
    popularity of an item's attributes; data with item features). What cold items are compared with."""

    def __post_init__(self):
        if self.baseline != "none":
            require(not self.checkpoint, "checkpoint", f"must be empty with baseline={self.baseline}")
        else:
            require(bool(self.checkpoint), "checkpoint", "is required (or baseline=popularity|attribute_popularity)")
        require(bool(self.data), "data", "is required")
        require(all(s in ("valid", "test") for s in self.splits), "splits", "only valid and test")


def evaluate_with_session(config: EvaluateConfig, session) -> dict[str, float]:
    from flm_dist.runs import load_model_for_data

    device = session.device()
    model, manifest, meta = load_model_for_data(config.checkpoint, config.data, device)
    counts = training_item_counts(config.data, manifest["items"])
    percentiles = torch.from_numpy(popularity_percentiles(counts)).to(device)
    max_len = meta["config"]["model"]["max_len"]
    protocol = config.eval or from_dict(EvalConfig, meta["config"]["eval"])
    metrics: dict[str, float] = {}
    for split in config.splits:
        arrays = build_eval_arrays(session.read_split(split), max_len).to(device)
        metrics.update(evaluate_split(model, arrays, split, protocol, manifest["num_negatives"], percentiles))
    return metrics


def evaluate_worker(payload: dict[str, Any]) -> None:
    """Ray Train worker entry point of `flm evaluate`."""
    from flm_dist.ray_seam import RaySession

    config = from_dict(EvaluateConfig, payload["config"])
    session = RaySession()
    metrics = evaluate_with_session(config, session)
    session.report(metrics)
    if distributed.is_main():
        Path(payload["result_path"]).write_text(json.dumps(metrics, indent=2, sort_keys=True))


@torch.no_grad()
def user_ranks(checkpoint: str | Path, data: str, split: str = "test", batch_size: int = 1024) -> dict[str, np.ndarray]:
    """0-based rank of each user's target (users in index order) per full-ranking protocol,
    `full` (history removed) and `full_nomask`: the values behind metrics.json's
    `{split}/*/full` and `{split}/*/full_nomask`, kept per user for paired tests. On data with a
    cold-item hold-out, `cold` marks the users whose target is held out (the `/cold` metrics)."""
    from flm_dist.runs import load_model_for_data

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _, meta = load_model_for_data(str(checkpoint), data, device)
    model.eval()
    arrays = build_eval_arrays(pq.read_table(Path(data) / split), meta["config"]["model"]["max_len"]).to(device)
    protocol = from_dict(EvalConfig, meta["config"]["eval"])
    item_table = model.item_table()
    masked, unmasked = [], []
    for start in range(0, len(arrays), batch_size):
        stop = min(start + batch_size, len(arrays))
        vectors = model.user_representation(arrays.user[start:stop], arrays.input[start:stop],
                                            source=protocol.user_source)
        chunk_size = rank_chunk_size(stop - start, item_table.shape[0] - 1, protocol.max_score_elements,
                                     vectors.device)
        ranks = rank_targets(vectors, item_table, arrays.target[start:stop], arrays.history_pairs(start, stop),
                             chunk_size)
        masked.append(ranks.masked)
        unmasked.append(ranks.unmasked)
    ranks = {"full": torch.cat(masked).cpu().numpy(), "full_nomask": torch.cat(unmasked).cpu().numpy()}
    if arrays.cold is not None:
        ranks["cold"] = arrays.cold.cpu().numpy()
    return ranks


def evaluate_baseline(config: EvaluateConfig) -> dict[str, float]:
    """Every metric of `config.baseline` on `config.data`, in this process, named as a checkpoint's are."""
    from flm_dist.eval.baselines import baseline_model
    from flm_dist.runs import read_manifest

    model = baseline_model(config.baseline, config.data)
    num_negatives = read_manifest(config.data)["num_negatives"]
    metrics: dict[str, float] = {}
    for split in config.splits:
        arrays = build_eval_arrays(pq.read_table(Path(config.data) / split), max_len=1)
        metrics.update(evaluate_split(model, arrays, split, config.eval or EvalConfig(), num_negatives))
    return metrics


def run_evaluate(config: EvaluateConfig) -> dict[str, float]:
    """Re-compute every metric of a checkpoint (or of a `baseline`) on prepared data."""
    from flm_dist.ray_seam import absolute_storage_path
    from flm_dist.train.session import LocalSession

    config = dataclasses.replace(config, checkpoint=config.checkpoint and absolute_storage_path(config.checkpoint),
                                 data=absolute_storage_path(config.data))

    if config.baseline != "none":
        metrics = evaluate_baseline(config)
    elif not Path(config.checkpoint).is_dir():
        raise UserError(f"checkpoint not found: {config.checkpoint}")
    elif config.scaling.workers == 0:
        metrics = evaluate_with_session(config, LocalSession(config.data, run_dir=config.checkpoint))
    else:
        import tempfile

        from flm_dist import ray_seam

        ray_seam.ensure_ray(config.scaling.address)
        with tempfile.TemporaryDirectory() as scratch:
            result_path = Path(scratch) / "metrics.json"
            ray_seam.run_trainer(
                evaluate_worker, {"config": to_dict(config), "result_path": str(result_path)},
                ray_seam.read_parquet_datasets(config.data, list(config.splits)), run_dir=scratch,
                name="evaluate", workers=config.scaling.workers,
                gpus_per_worker=config.scaling.gpus_per_worker,
                cpus_per_worker=config.scaling.cpus_per_worker, max_failures=0)
            metrics = json.loads(result_path.read_text())
    if config.output:
        Path(config.output).parent.mkdir(parents=True, exist_ok=True)
        Path(config.output).write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics
