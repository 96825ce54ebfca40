"""`flm`: a thin command line over the job modules.

Each command group registers itself from its own module (`stages`, `experiments`, `bench`,
`submit`); each command turns its flags, `--config` presets and `key.sub=value` overrides into the
job's config dataclass (defaults <- YAML presets <- flags <- overrides, `cli.common`) and calls the
job. User mistakes print one line, no traceback, and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from flm_dist.cli import bench, experiments, serve, stages, submit
from flm_dist.errors import UserError
from flm_dist.logs import setup_logging

log = logging.getLogger("flm_dist")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flm", description="Distributed Pretraining-FLM on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)
    for group in (stages, experiments, bench, submit, serve):
        group.add_commands(commands)
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
        # One line whatever the message holds (a YAML parser's, say, spans several).
        print("error: " + " ".join(line.strip() for line in str(exc).splitlines() if line.strip()),
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0

