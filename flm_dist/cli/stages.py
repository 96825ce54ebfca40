"""`flm synth|prepare|pretrain|finetune|evaluate|compare|export`: the pipeline's stages.

Each command turns its flags, `--config` presets and overrides into the stage's config
(`config_from_args`) and calls the stage. Stage modules are imported inside the commands: they pull
in torch and Ray, which `flm --help` should not wait for.
"""

from __future__ import annotations

import json

from flm_dist.cli.common import add_config_arguments, config_from_args
from flm_dist.eval.tables import final_metrics_table


def cmd_synth(args):
    from flm_dist.data.synth import SynthConfig, run_synth

    config = config_from_args(SynthConfig, args, {"users": args.users, "items": args.items,
                                                  "interactions": args.interactions, "output": args.output,
                                                  "seed": args.seed})
    print(json.dumps(run_synth(config), indent=2))


def cmd_prepare(args):
    from flm_dist.data.prepare import PrepareConfig, run_prepare

    config = config_from_args(PrepareConfig, args, {"input": args.input, "format": args.format,
                                                    "output": args.output, "strict": args.strict or None,
                                                    "item_features.uri": args.item_features})
    manifest = run_prepare(config)
    print(f"prepared {manifest['users']} users, {manifest['items']} items, "
          f"{manifest['interactions']} interactions -> {config.output}")
    if "features" in manifest:
        features = manifest["features"]
        print(f"item features: {features['attributes']} attributes, {features['items_with_features']} items "
              f"with features, {features['cold_items']} cold items, {features['quarantined_rows']} rows quarantined")
    if "cold_holdout" in manifest:
        held = manifest["cold_holdout"]
        print(f"held out as cold: {held['items']} items, {held['interactions']} interactions "
              f"({held['train_interactions_removed']} left training; {held['valid_targets']} valid and "
              f"{held['test_targets']} test targets)")


def cmd_pretrain(args):
    from flm_dist.train.configs import PretrainConfig
    from flm_dist.train.pretrain import run_pretrain

    config = config_from_args(PretrainConfig, args, {"data": args.data, "output": args.output,
                                                     "scaling.workers": args.workers,
                                                     "scaling.gpus_per_worker": args.gpus_per_worker})
    summary = run_pretrain(config)
    print(final_metrics_table(summary["final"]))
    print(f"run directory: {config.output} (metrics.json, best/, tensorboard/)")


def cmd_finetune(args) -> None:
    from flm_dist.train.configs import FinetuneConfig
    from flm_dist.train.finetune import run_finetune

    config = config_from_args(FinetuneConfig, args, {
        "pretrained": args.pretrained, "data": args.data, "output": args.output,
        "scaling.workers": args.workers, "scaling.gpus_per_worker": args.gpus_per_worker})
    summary = run_finetune(config)
    print(final_metrics_table(summary["final"]))
    print(f"vocabulary: {json.dumps(summary['config']['vocabulary'], sort_keys=True)}")
    print(f"run directory: {config.output} (metrics.json, best/, tensorboard/)")


def cmd_evaluate(args):
    from flm_dist.eval.evaluate import EvaluateConfig, run_evaluate

    config = config_from_args(EvaluateConfig, args, {"checkpoint": args.checkpoint, "data": args.data,
                                                     "output": args.output, "scaling.workers": args.workers,
                                                     "baseline": args.baseline})
    print(final_metrics_table(run_evaluate(config)))


def cmd_compare(args):
    from flm_dist.eval.compare import CompareConfig, markdown_table, run_compare

    config = config_from_args(CompareConfig, args, {"a": args.a.split(","), "b": args.b.split(","),
                                                    "data": args.data, "split": args.split, "k": args.k,
                                                    "output": args.output})
    print(markdown_table(run_compare(config)), end="")


def cmd_export(args) -> None:
    from flm_dist.eval.export import ExportConfig, run_export

    config = config_from_args(ExportConfig, args, {
        "checkpoint": args.checkpoint, "data": args.data, "output": args.output, "k": args.k,
        "split": args.split, "workers": args.workers, "gpus_per_worker": args.gpus_per_worker})
    print(json.dumps(run_export(config), indent=2, sort_keys=True))


def add_commands(commands) -> None:
    """Register the stage commands on the `flm` subparsers."""
    synth = commands.add_parser("synth", help="write a synthetic interaction log (Parquet)")
    synth.add_argument("--users", type=int)
    synth.add_argument("--items", type=int)
    synth.add_argument("--interactions", type=int)
    synth.add_argument("--output")
    synth.add_argument("--seed", type=int)
    add_config_arguments(synth)
    synth.set_defaults(run=cmd_synth)

    prepare = commands.add_parser("prepare", help="interaction logs -> training shards (Ray tasks)")
    prepare.add_argument("--input", help="file, directory or URI (s3://, gs://, ...)")
    prepare.add_argument("--format", default=None,
                         help="auto, parquet, csv, tsv, jsonl, seq-txt, pairs-txt, recbole, movielens")
    prepare.add_argument("--output")
    prepare.add_argument("--strict", action="store_true", help="stop at the first bad row")
    prepare.add_argument("--item-features", metavar="URI",
                         help="item side information: S3-Rec item2attributes JSON, RecBole .item, CSV/TSV or "
                              "Parquet (item_features.* settings; docs/guide/side_information.md)")
    add_config_arguments(prepare)
    prepare.set_defaults(run=cmd_prepare)

    pretrain = commands.add_parser("pretrain", help="joint CF + sequence + flow pretraining (Ray Train)")
    pretrain.add_argument("--data", help="prepared data directory")
    pretrain.add_argument("--output", help="run directory")
    pretrain.add_argument("--workers", type=int, help="Ray Train workers (0: in this process)")
    pretrain.add_argument("--gpus-per-worker", type=float)
    add_config_arguments(pretrain)
    pretrain.set_defaults(run=cmd_pretrain)

    finetune = commands.add_parser("finetune", help="fine-tune a recommender from a pretrained run (Ray Train)")
    finetune.add_argument("--pretrained", help="pretraining run directory (uses best/) or checkpoint")
    finetune.add_argument("--data", help="prepared data to fine-tune on (any vocabulary)")
    finetune.add_argument("--output", help="run directory")
    finetune.add_argument("--workers", type=int, help="Ray Train workers (0: in this process)")
    finetune.add_argument("--gpus-per-worker", type=float)
    add_config_arguments(finetune)
    finetune.set_defaults(run=cmd_finetune)

    evaluate = commands.add_parser("evaluate", help="all metrics of a checkpoint")
    evaluate.add_argument("--checkpoint")
    evaluate.add_argument("--data")
    evaluate.add_argument("--output", help="write metrics JSON here")
    evaluate.add_argument("--workers", type=int)
    evaluate.add_argument("--baseline", choices=("popularity", "attribute_popularity"),
                          help="evaluate a non-personalised baseline on --data instead of a checkpoint")
    add_config_arguments(evaluate)
    evaluate.set_defaults(run=cmd_evaluate)

    compare = commands.add_parser("compare", help="paired per-user test of two checkpoints on the same users")
    compare.add_argument("a", help="checkpoint or run directory (its best/); several runs (seeds) comma-separated")
    compare.add_argument("b", help="checkpoint or run directory (its best/); several runs (seeds) comma-separated")
    compare.add_argument("--data")
    compare.add_argument("--split", choices=["valid", "test"])
    compare.add_argument("--k", type=int)
    compare.add_argument("--output", help="write the comparison JSON here")
    add_config_arguments(compare)
    compare.set_defaults(run=cmd_compare)

    export = commands.add_parser("export", help="embeddings and top-K recommendations as Parquet (Ray Data)")
    export.add_argument("--checkpoint", help="checkpoint directory (pretrained or fine-tuned)")
    export.add_argument("--data", help="prepared data with the checkpoint's vocabulary")
    export.add_argument("--output", help="output directory or URI (replaced atomically)")
    export.add_argument("--k", type=int, help="recommendations per user (default 50)")
    export.add_argument("--split", help="whose histories to recommend after: test (default) or valid")
    export.add_argument("--workers", type=int, help="scoring actors")
    export.add_argument("--gpus-per-worker", type=float)
    add_config_arguments(export)
    export.set_defaults(run=cmd_export)
