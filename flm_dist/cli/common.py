"""What every `flm` command shares: the `--config`/override arguments and building a job's
config from them through the one merge path (`flm_dist.config.merged_settings`).

A bad key stays one line that names where it was written: when the key comes from a preset
(and no flag or override that wins over it sets it), the error names that preset file
(`preset_key_error`); `flm run` job files use the same for a step's `presets:`.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from typing import Any

from flm_dist.config import (
    ConfigKeyError,
    from_dict,
    merged_settings,
    parse_override,
    read_yaml,
)


def add_config_arguments(parser: argparse.ArgumentParser, what: str = "this command's config") -> None:
    parser.add_argument("--config", action="append", metavar="YAML",
                        help=f"YAML preset of {what}; repeat to compose (a dataset file, then a recipe: "
                             "later files win)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def settings_from_args(args: argparse.Namespace, flags: dict[str, Any]) -> dict[str, Any]:
    """defaults <- `--config` presets <- flags (None: not given) <- `key.sub=value` overrides."""
    return merged_settings(getattr(args, "config", None), flags, getattr(args, "overrides", []))


def config_from_args(cls, args: argparse.Namespace, flags: dict[str, Any]):
    """`settings_from_args` validated into the job's config dataclass `cls`; a bad key that came
    from a `--config` preset names the file."""
    try:
        return from_dict(cls, settings_from_args(args, flags))
    except ConfigKeyError as exc:
        given = [key.split(".") for key, value in flags.items() if value is not None]
        raise preset_key_error(exc, getattr(args, "config", None) or [], given=given,
                               overrides=getattr(args, "overrides", None) or []) from None


class PresetKeyError(ConfigKeyError):
    """A bad config key written in a preset file: `preset` names the file."""

    def __init__(self, preset: str, key: str, reason: str):
        super().__init__(key, reason)
        self.preset = preset
        self.args = (f"{preset}: config key '{key}': {reason}",)


def _key_parts(key: str) -> list[str]:
    return re.sub(r"\[\d+\]", "", key).split(".")


def _holds(mapping: Any, parts: list[str]) -> bool:
    node = mapping
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _overlaps(a: list[str], b: list[str]) -> bool:
    shorter = min(len(a), len(b))
    return a[:shorter] == b[:shorter]


def preset_origin(key: str, presets: str | Sequence[str], *, above: Sequence[dict[str, Any]] = (),
                  given: Sequence[list[str]] = (), overrides: Sequence[str] = ()) -> str | None:
    """The preset file that set config `key` (dotted, as in `ConfigKeyError.key`): the last of
    `presets` holding it, unless a layer that wins over the presets sets it too (`above`:
    mappings such as a job step's own settings; `given`: key paths set by flags; `overrides`:
    `key.sub=value` strings). None when no preset is to blame."""
    parts = _key_parts(key)
    if any(_holds(mapping, parts) for mapping in above):
        return None
    if any(_overlaps(path, parts) for path in [*given, *(parse_override(o)[0] for o in overrides)]):
        return None
    for path in reversed([presets] if isinstance(presets, str) else list(presets)):
        if _holds(read_yaml(path), parts):
            return path
    return None


def preset_key_error(exc: ConfigKeyError, presets: str | Sequence[str], **layers) -> ConfigKeyError:
    """`exc` naming the preset file its key came from (see `preset_origin`), else `exc` itself."""
    origin = preset_origin(exc.key, presets, **layers) if presets else None
    return PresetKeyError(origin, exc.key, exc.reason) if origin else exc


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
