"""`flm bench prepare|train|quality|topk|comm|optim`: benchmarks that print numbers (JSON lines)."""

from __future__ import annotations

from flm_dist.cli.common import add_config_arguments, config_from_args


def cmd_bench_prepare(args):
    from flm_dist.bench.prepare import run_bench_prepare

    run_bench_prepare(rows=args.rows, workdir=args.workdir, workers=args.workers)


def cmd_bench_train(args):
    from flm_dist.bench.train import run_bench_train
    from flm_dist.train.configs import PretrainConfig

    config = config_from_args(PretrainConfig, args, {"data": args.data, "output": args.output})
    run_bench_train(config, steps=args.steps, warmup=args.warmup, profile_steps=args.profile)


def cmd_bench_quality(args):
    from flm_dist.bench.quality import run_bench_quality
    from flm_dist.train.configs import PretrainConfig

    config = config_from_args(PretrainConfig, args, {"data": args.data, "output": args.output})
    run_bench_quality(config, target=args.target, budget_minutes=args.budget_minutes)


def cmd_bench_topk(args):
    from flm_dist.bench.topk import run_bench_topk

    run_bench_topk(items=args.items, users=args.users, dim=args.dim, k=args.k, device=args.device,
                   batch_size=args.batch_size, max_score_elements=args.max_score_elements,
                   history=args.history)


def cmd_bench_comm(args):
    from flm_dist.bench.comm import run_bench_comm

    run_bench_comm(items=args.items, dim=args.dim, workers=args.workers, batch_size=args.batch_size,
                   max_len=args.max_len, num_negatives=args.num_negatives, steps=args.steps,
                   warmup=args.warmup, device=args.device)


def cmd_bench_optim(args):
    from flm_dist.bench.optim import run_bench_optim

    run_bench_optim(rows=args.rows, dim=args.dim, batch=args.batch, steps=args.steps, warmup=args.warmup,
                    device=args.device)


def add_commands(commands) -> None:
    """Register `bench` and its benchmarks on the `flm` subparsers."""
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
    bench_train.add_argument("--profile", type=int, default=0, metavar="STEPS",
                             help="then profile this many steps: the operators that take the time")
    add_config_arguments(bench_train)
    bench_train.set_defaults(run=cmd_bench_train)
    bench_quality = benches.add_parser("quality", help="time to a validation target, pretraining from the "
                                                       "prepared data (JSON line)")
    bench_quality.add_argument("--data", help="prepared data directory")
    bench_quality.add_argument("--output", help="run directory; must be new or empty")
    bench_quality.add_argument("--target", required=True,
                               help="valid/<metric>/<full|full_nomask>=<value>, e.g. valid/ndcg@10/full_nomask=0.0517")
    bench_quality.add_argument("--budget-minutes", type=float, default=0.0,
                               help="stop after the epoch that ends past this many minutes (0: no limit)")
    add_config_arguments(bench_quality)
    bench_quality.set_defaults(run=cmd_bench_quality)
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
