"""What every `flm` command shares: the `--config`/override arguments and building a job's
config from them through the one merge path (`flm_dist.config.merged_settings`)."""

from __future__ import annotations

import argparse
from typing import Any

from flm_dist.config import from_dict, merged_settings


def add_config_arguments(parser: argparse.ArgumentParser, what: str = "this command's config") -> None:
    parser.add_argument("--config", action="append", metavar="YAML",
                        help=f"YAML preset of {what}; repeat to compose (a dataset file, then a recipe: "
                             "later files win)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def settings_from_args(args: argparse.Namespace, flags: dict[str, Any]) -> dict[str, Any]:
    """defaults <- `--config` presets <- flags (None: not given) <- `key.sub=value` overrides."""
    return merged_settings(getattr(args, "config", None), flags, getattr(args, "overrides", []))


def config_from_args(cls, args: argparse.Namespace, flags: dict[str, Any]):
    """`settings_from_args` validated into the job's config dataclass `cls`."""
    return from_dict(cls, settings_from_args(args, flags))


def comma_floats(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def positive_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
