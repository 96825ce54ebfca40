"""`flm demo|tune|ablate|report`: experiments built from the stages, and reports of their runs."""

from __future__ import annotations

import json
from pathlib import Path

from flm_dist.cli.common import add_config_arguments, comma_floats, config_from_args, positive_float, settings_from_args


def cmd_demo(args):
    from flm_dist.experiments.demo import DemoOptions, run_demo

    run_demo(DemoOptions(workdir=args.workdir, workers=args.workers, epochs=args.epochs,
                         finetune_epochs=args.finetune_epochs, tune_samples=args.tune_samples,
                         overrides=args.overrides))


def cmd_tune(args) -> None:
    from flm_dist.experiments.tune import TuneOptions, load_space, run_tune

    base = settings_from_args(args, {"pretrained": args.pretrained, "data": args.data})
    options = TuneOptions(output=args.output, space=load_space(args.space, base), base=base,
                          samples=args.samples, concurrent=args.concurrent, cpus_per_trial=args.cpus_per_trial,
                          gpus_per_trial=args.gpus_per_trial, grace_period=args.grace_period,
                          max_failures=args.max_failures, seed=args.seed, resume=args.resume)
    best = run_tune(options)
    print((Path(args.output) / "results.md").read_text())
    print(f"best: {json.dumps(best['params'], sort_keys=True)} {best['metric']}={best['best_value']:.4f}")
    print(f"tune directory: {args.output} (results.md, best.json, curves.png, runs/)")


def cmd_ablate(args) -> None:
    from flm_dist.experiments.ablate import AblateConfig, run_ablation

    config = config_from_args(AblateConfig, args, {
        "data": args.data, "output": args.output, "seeds": args.seeds, "first_seed": args.first_seed,
        "fractions": args.fractions, "parallel": args.parallel, "results": args.results})
    run_ablation(config)
    print((Path(config.output) / "ablation.md").read_text())


def cmd_report(args) -> None:
    from flm_dist.experiments.report import ReportConfig, run_report

    config = config_from_args(ReportConfig, args, {"directory": args.directory, "output": args.output,
                                                   "max_users": args.max_users})
    print(f"report: {run_report(config)}")


def add_commands(commands) -> None:
    """Register the experiment commands on the `flm` subparsers."""
    demo = commands.add_parser("demo", help="the whole pipeline on the embedded synthetic log")
    demo.add_argument("--workdir", default="demo")
    demo.add_argument("--workers", type=int, default=1, help="Ray Train workers (0: in this process)")
    demo.add_argument("--epochs", type=int, default=12, help="pretraining epochs")
    demo.add_argument("--finetune-epochs", type=int, default=3, help="epochs of fine-tuning and of each trial")
    demo.add_argument("--tune-samples", type=int, default=4, help="trials of the sweep (2 at a time)")
    demo.add_argument("overrides", nargs="*", metavar="key.sub=value", help="pretrain config overrides")
    demo.set_defaults(run=cmd_demo)

    tune = commands.add_parser("tune", help="hyper-parameter sweep of fine-tuning (Ray Tune, ASHA)")
    tune.add_argument("--pretrained", help="pretraining run directory (uses best/) or checkpoint")
    tune.add_argument("--data", help="prepared data to fine-tune on")
    tune.add_argument("--space", required=True, help="search-space YAML (e.g. jobs/tune_space.yaml)")
    tune.add_argument("--output", required=True, help="TUNE_DIR")
    tune.add_argument("--samples", type=int, default=8, help="trials drawn (x each grid point)")
    tune.add_argument("--concurrent", type=int, default=1, help="trials at once")
    tune.add_argument("--cpus-per-trial", type=positive_float, default=1.0, help="CPUs per trial (>= 0.01)")
    tune.add_argument("--gpus-per-trial", type=positive_float, default=0.0, help="GPUs per trial (fractions allowed)")
    tune.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before a trial may be stopped")
    tune.add_argument("--max-failures", type=int, default=2,
                      help="restarts of a failed trial before it is reported as errored")
    tune.add_argument("--seed", type=int, default=0, help="seed of the search: the same seed draws the same trials")
    tune.add_argument("--resume", action="store_true", help="resume the experiment in TUNE_DIR")
    add_config_arguments(tune, "the base fine-tuning config")
    tune.set_defaults(run=cmd_tune)

    ablate = commands.add_parser("ablate", help="the Pretraining-FLM ablation on one dataset")
    ablate.add_argument("--data", help="prepared data directory")
    ablate.add_argument("--output", help="directory for runs, ablation.md, ablation.json")
    ablate.add_argument("--seeds", type=int, help="seeds per variant (default 3)")
    ablate.add_argument("--first-seed", type=int, help="the first seed (default 0)")
    ablate.add_argument("--fractions", type=comma_floats,
                        help="fine-tuning user fractions, comma separated (default 1.0,0.1)")
    ablate.add_argument("--parallel", type=int,
                        help="stages at once, as Ray tasks (default 1: one after another here)")
    ablate.add_argument("--results", help="directory of the seed results (default OUTPUT/seeds)")
    add_config_arguments(ablate)
    ablate.set_defaults(run=cmd_ablate)

    report = commands.add_parser("report", help="a self-contained HTML report of a run or tune directory")
    report.add_argument("directory", metavar="RUN_OR_TUNE_DIR", help="a pretrain/finetune run or a tune directory")
    report.add_argument("--output", help="HTML file to write (default RUN_OR_TUNE_DIR/report.html)")
    report.add_argument("--max-users", type=int, help="users drawn for the latent picture (default 5000)")
    report.set_defaults(run=cmd_report)
