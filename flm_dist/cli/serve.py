"""`flm serve`: a checkpoint's recommendations over HTTP on Ray Serve (see flm_dist.serve)."""

from __future__ import annotations

import json

from flm_dist.cli.common import add_config_arguments, config_from_args


def serve_config(args):
    """The `ServeConfig` of a parsed `flm serve` command line."""
    from flm_dist.serve import ServeConfig

    return config_from_args(ServeConfig, args, {
        "checkpoint": args.checkpoint, "data": args.data, "port": args.port, "host": args.host,
        "replicas": args.replicas, "device": args.device, "name": args.name})


def cmd_serve(args) -> None:
    from flm_dist.serve import run_serve

    print(json.dumps(run_serve(serve_config(args)), indent=2, sort_keys=True))


def add_commands(commands) -> None:
    """Register `flm serve` on the `flm` subparsers."""
    serve = commands.add_parser("serve", help="serve a checkpoint's recommendations over HTTP (Ray Serve)")
    serve.add_argument("checkpoint", help="checkpoint or run directory (its best/), e.g. RUN_DIR/best")
    serve.add_argument("--data", help="prepared data (default: the data the run directory records)")
    serve.add_argument("--port", type=int, help="HTTP port (default 8000)")
    serve.add_argument("--host", help="HTTP address (default 127.0.0.1; 0.0.0.0 for other machines)")
    serve.add_argument("--replicas", type=int, help="model replicas (default 1)")
    serve.add_argument("--device", choices=["cpu", "cuda"], help="where replicas score (default cpu)")
    serve.add_argument("--name", help="Ray Serve application name (default flm); the same name again "
                                      "is a rolling update")
    add_config_arguments(serve)
    serve.set_defaults(run=cmd_serve)
