"""`flm`: a thin command line over the job modules.

Each command turns its flags, an optional YAML preset (`--config`) and `key.sub=value`
overrides into the job's config dataclass (defaults <- YAML <- flags <- overrides) and calls the
job. User mistakes print one line, no traceback, and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from flm_dist.errors import UserError
from flm_dist.logs import setup_logging

log = logging.getLogger("flm_dist")


def _job_config(cls, args: argparse.Namespace, flags: dict[str, Any]):
    from flm_dist.config import apply_overrides, from_dict, read_yaml

    data = read_yaml(args.config) if getattr(args, "config", None) else {}
    for dotted, value in flags.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    config = from_dict(cls, apply_overrides(data, getattr(args, "overrides", [])))
    return config


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML preset holding this command's config keys")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def cmd_synth(args):
    from flm_dist.synth import SynthConfig, run_synth

    config = _job_config(SynthConfig, args, {"users": args.users, "items": args.items,
                                             "interactions": args.interactions, "output": args.output,
                                             "seed": args.seed})
    print(json.dumps(run_synth(config), indent=2))


def cmd_prepare(args):
    from flm_dist.prepare import PrepareConfig, run_prepare

    config = _job_config(PrepareConfig, args, {"input": args.input, "format": args.format,
                                               "output": args.output, "strict": args.strict or None})
    manifest = run_prepare(config)
    print(f"prepared {manifest['users']} users, {manifest['items']} items, "
          f"{manifest['interactions']} interactions -> {config.output}")


def cmd_pretrain(args):
    from flm_dist.pretrain import PretrainConfig, final_metrics_table, run_pretrain

    config = _job_config(PretrainConfig, args, {"data": args.data, "output": args.output,
                                                "scaling.workers": args.workers,
                                                "scaling.gpus_per_worker": args.gpus_per_worker})
    summary = run_pretrain(config)
    print(final_metrics_table(summary["final"]))
    print(f"run directory: {config.output} (metrics.json, best/, tensorboard/)")


def cmd_compare(args):
    from flm_dist.compare import CompareConfig, markdown_table, run_compare

    config = _job_config(CompareConfig, args, {"a": args.a.split(","), "b": args.b.split(","), "data": args.data,
                                               "split": args.split, "k": args.k, "output": args.output})
    print(markdown_table(run_compare(config)), end="")


def cmd_evaluate(args):
    from flm_dist.evaluate import EvaluateConfig, run_evaluate
    from flm_dist.pretrain import final_metrics_table

    config = _job_config(EvaluateConfig, args, {"checkpoint": args.checkpoint, "data": args.data,
                                                "output": args.output, "scaling.workers": args.workers})
    metrics = run_evaluate(config)
    print(final_metrics_table(metrics))


def cmd_demo(args):
    from flm_dist.demo import DemoOptions, run_demo

    run_demo(DemoOptions(workdir=args.workdir, workers=args.workers, epochs=args.epochs,
                         finetune_epochs=args.finetune_epochs, tune_samples=args.tune_samples,
                         overrides=args.overrides))


def cmd_bench_prepare(args):
    from flm_dist.bench_prepare import run_bench_prepare

    run_bench_prepare(rows=args.rows, workdir=args.workdir, workers=args.workers)


def cmd_bench_train(args):
    from flm_dist.bench_train import run_bench_train
    from flm_dist.pretrain import PretrainConfig

    config = _job_config(PretrainConfig, args, {"data": args.data, "output": args.output})
    run_bench_train(config, steps=args.steps, warmup=args.warmup)


def cmd_bench_topk(args):
    from flm_dist.bench_topk import run_bench_topk

    run_bench_topk(items=args.items, users=args.users, dim=args.dim, k=args.k, device=args.device,
                   batch_size=args.batch_size, max_score_elements=args.max_score_elements,
                   history=args.history)


def cmd_bench_comm(args):
    from flm_dist.bench_comm import run_bench_comm

    run_bench_comm(items=args.items, dim=args.dim, workers=args.workers, batch_size=args.batch_size,
                   max_len=args.max_len, num_negatives=args.num_negatives, steps=args.steps,
                   warmup=args.warmup, device=args.device)


def cmd_bench_optim(args):
    from flm_dist.bench_optim import run_bench_optim

    run_bench_optim(rows=args.rows, dim=args.dim, batch=args.batch, steps=args.steps, warmup=args.warmup,
                    device=args.device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flm", description="Distributed Pretraining-FLM on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    synth = commands.add_parser("synth", help="write a synthetic interaction log (Parquet)")
    synth.add_argument("--users", type=int)
    synth.add_argument("--items", type=int)
    synth.add_argument("--interactions", type=int)
    synth.add_argument("--output", required=True)
    synth.add_argument("--seed", type=int)
    _add_common(synth)
    synth.set_defaults(run=cmd_synth)

    prepare = commands.add_parser("prepare", help="interaction logs -> training shards (on Ray Data)")
    prepare.add_argument("--input", required=True, help="file, directory or URI (s3://, gs://, ...)")
    prepare.add_argument("--format", default=None,
                         help="auto, parquet, csv, tsv, jsonl, seq-txt, pairs-txt, recbole, movielens")
    prepare.add_argument("--output", required=True)
    prepare.add_argument("--strict", action="store_true", help="stop at the first bad row")
    _add_common(prepare)
    prepare.set_defaults(run=cmd_prepare)

    pretrain = commands.add_parser("pretrain", help="joint CF + sequence + flow pretraining (Ray Train)")
    pretrain.add_argument("--data", required=True, help="prepared data directory")
    pretrain.add_argument("--output", required=True, help="run directory")
    pretrain.add_argument("--workers", type=int, help="Ray Train workers (0: in this process)")
    pretrain.add_argument("--gpus-per-worker", type=float)
    _add_common(pretrain)
    pretrain.set_defaults(run=cmd_pretrain)

    evaluate = commands.add_parser("evaluate", help="all metrics of a checkpoint")
    evaluate.add_argument("--checkpoint", required=True)
    evaluate.add_argument("--data", required=True)
    evaluate.add_argument("--output", help="write metrics JSON here")
    evaluate.add_argument("--workers", type=int)
    _add_common(evaluate)
    evaluate.set_defaults(run=cmd_evaluate)

    compare = commands.add_parser("compare", help="paired per-user test of two checkpoints on the same users")
    compare.add_argument("a", help="checkpoint or run directory (its best/); several runs (seeds) comma-separated")
    compare.add_argument("b", help="checkpoint or run directory (its best/); several runs (seeds) comma-separated")
    compare.add_argument("--data", required=True)
    compare.add_argument("--split", choices=["valid", "test"])
    compare.add_argument("--k", type=int)
    compare.add_argument("--output", help="write the comparison JSON here")
    _add_common(compare)
    compare.set_defaults(run=cmd_compare)

    demo = commands.add_parser("demo", help="the whole pipeline on the embedded synthetic log")
    demo.add_argument("--workdir", default="demo")
    demo.add_argument("--workers", type=int, default=1, help="Ray Train workers (0: in this process)")
    demo.add_argument("--epochs", type=int, default=12, help="pretraining epochs")
    demo.add_argument("--finetune-epochs", type=int, default=3, help="epochs of fine-tuning and of each trial")
    demo.add_argument("--tune-samples", type=int, default=4, help="trials of the sweep (2 at a time)")
    demo.add_argument("overrides", nargs="*", metavar="key.sub=value", help="pretrain config overrides")
    demo.set_defaults(run=cmd_demo)

    bench = commands.add_parser("bench", help="benchmarks that print numbers")
    benches = bench.add_subparsers(dest="bench", required=True)
    bench_prepare = benches.add_parser("prepare", help="flm prepare vs a single-process pyarrow pass")
    bench_prepare.add_argument("--rows", type=int, default=10_000_000)
    bench_prepare.add_argument("--workdir", default=".bench/prepare")
    bench_prepare.add_argument("--workers", type=int)
    bench_prepare.set_defaults(run=cmd_bench_prepare)
    bench_train = benches.add_parser("train", help="timed pretraining steps on one device (JSON line)")
    bench_train.add_argument("--data", required=True, help="prepared data directory")
    bench_train.add_argument("--output", default=".bench/train", help="scratch run directory")
    bench_train.add_argument("--steps", type=int, default=50)
    bench_train.add_argument("--warmup", type=int, default=10)
    _add_common(bench_train)
    bench_train.set_defaults(run=cmd_bench_train)
    bench_topk = benches.add_parser("topk", help="chunked full ranking over random embeddings (JSON line)")
    bench_topk.add_argument("--items", type=int, default=1_000_000)
    bench_topk.add_argument("--users", type=int, default=4096)
    bench_topk.add_argument("--dim", type=int, default=64)
    bench_topk.add_argument("--k", type=int, default=50)
    bench_topk.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    bench_topk.add_argument("--batch-size", type=int, default=1024, help="users scored at once")
    bench_topk.add_argument("--max-score-elements", type=int, default=2 ** 26,
                            help="scores alive at once (users x chunk of items)")
    bench_topk.add_argument("--history", type=int, default=50, help="history items masked per user")
    bench_topk.set_defaults(run=cmd_bench_topk)
    bench_comm = benches.add_parser("comm", help="DDP item-table gradient exchange, dense vs rows (JSON line)")
    bench_comm.add_argument("--items", type=int, default=1_000_000)
    bench_comm.add_argument("--dim", type=int, default=64)
    bench_comm.add_argument("--workers", type=int, default=2, help="DDP processes (one GPU each on cuda)")
    bench_comm.add_argument("--batch-size", type=int, default=64, help="windows per rank and step")
    bench_comm.add_argument("--max-len", type=int, default=50)
    bench_comm.add_argument("--num-negatives", type=int, default=256)
    bench_comm.add_argument("--steps", type=int, default=10)
    bench_comm.add_argument("--warmup", type=int, default=2)
    bench_comm.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    bench_comm.set_defaults(run=cmd_bench_comm)
    bench_optim = benches.add_parser("optim", help="user-table step, dense AdamW vs lazy rows (JSON line)")
    bench_optim.add_argument("--rows", type=int, default=10_000_000, help="users in the table")
    bench_optim.add_argument("--dim", type=int, default=64)
    bench_optim.add_argument("--batch", type=int, default=4096, help="rows looked up per step")
    bench_optim.add_argument("--steps", type=int, default=10)
    bench_optim.add_argument("--warmup", type=int, default=2)
    bench_optim.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    bench_optim.set_defaults(run=cmd_bench_optim)

    from flm_dist.submit import add_commands as add_job_commands

    add_job_commands(commands)

    from flm_dist.finetune import add_commands as add_finetune_commands

    add_finetune_commands(commands)

    from flm_dist.tune import add_commands as add_tune_commands

    add_tune_commands(commands)

    from flm_dist.report import add_commands as add_report_commands

    add_report_commands(commands)
    return parser


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a command line. `key.sub=value` overrides may also follow options
    (`flm run --dry-run JOB a.b=1 --steps x c.d=2`): argparse stops collecting positionals at
    the first option, so overrides after one come back unrecognised and are appended in order."""
    parser = build_parser()
    args, unrecognised = parser.parse_known_args(argv)
    late_overrides = [arg for arg in unrecognised if "=" in arg and not arg.startswith("-")]
    if len(late_overrides) < len(unrecognised) or (late_overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unrecognised)}")
    if late_overrides:
        args.overrides = [*args.overrides, *late_overrides]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    setup_logging(args.verbose)
    return run_parsed(args)


def run_parsed(args: argparse.Namespace) -> int:
    """Run a parsed command; a user mistake is one line on stderr and exit status 2."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        args.run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
