"""Checkpoints: full training state in `state.pt`, described and checksummed by `checkpoint.json`.

`checkpoint.json` is written last, so a directory without it is incomplete; its sha256 and byte
count of every file let a torn checkpoint (truncated or missing file) be detected and skipped.
Loading never unpickles arbitrary objects: `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from flm_dist.errors import UserError

log = logging.getLogger("flm_dist")

FORMAT_VERSION = 1
STATE_FILE = "state.pt"
META_FILE = "checkpoint.json"


class CheckpointError(UserError):
    """A checkpoint is missing, incomplete, corrupted or not loadable safely."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(directory: str | Path, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write `state` (tensors, numbers, strings, nested dicts/lists) and its description.

    `meta` should hold at least step, epoch, config and vocab_hash; it is stored in
    checkpoint.json together with the files' checksums.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state_path = directory / STATE_FILE
    torch.save(state, state_path)
    files = {STATE_FILE: {"sha256": _sha256(state_path), "bytes": state_path.stat().st_size}}
    description = {"format": FORMAT_VERSION, **meta, "files": files}
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as handle:
        json.dump(description, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(handle.name, directory / META_FILE)
    return directory


def checkpoint_or_best(path: str | Path) -> Path:
    """`path` itself if it is a checkpoint, else a run directory's `best/` checkpoint."""
    for directory in (Path(path), Path(path) / "best"):
        if (directory / META_FILE).is_file():
            return directory.resolve()
    raise UserError(f"{path} is neither a checkpoint nor a run directory with best/{META_FILE}")


def read_meta(directory: str | Path) -> dict[str, Any]:
    meta_path = Path(directory) / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{directory} is not a complete checkpoint (no {META_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:  # not JSON, or not text at all
        raise CheckpointError(f"{meta_path} is corrupted: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        found = meta.get("format") if isinstance(meta, dict) else f"a JSON {type(meta).__name__}"
        raise CheckpointError(f"{directory}: checkpoint format {found} is not {FORMAT_VERSION}")
    return meta


def verify_checkpoint(directory: str | Path) -> str | None:
    """None if the checkpoint is complete and intact, else the reason it is not."""
    try:
        meta = read_meta(directory)
    except CheckpointError as exc:
        return str(exc)
    for name, expected in meta.get("files", {}).items():
        path = Path(directory) / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{path} has {path.stat().st_size} bytes, expected {expected['bytes']} (truncated)"
        if _sha256(path) != expected["sha256"]:
            return f"{path} fails its sha256 check"
    return None


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, meta) of a verified checkpoint; refuses pickled code (weights_only=True)."""
    problem = verify_checkpoint(directory)
    if problem:
        raise CheckpointError(problem)
    meta = read_meta(directory)
    try:
        state = torch.load(Path(directory) / STATE_FILE, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError subclasses and RuntimeErrors here
        raise CheckpointError(f"{directory}/{STATE_FILE} cannot be loaded safely: {str(exc).splitlines()[0]}") from None
    return state, meta


def first_nonfinite(tensors: dict[str, Any]) -> str | None:
    """The name of the first floating-point tensor of `tensors` (a state dict) holding a NaN or an
    infinity, or None when all are finite."""
    names = [name for name, tensor in tensors.items() if torch.is_tensor(tensor) and tensor.is_floating_point()]
    if not names:
        return None
    # One host sync for the whole state dict, not one per tensor.
    finite = torch.stack([tensors[name].isfinite().all() for name in names]).tolist()
    return next((name for name, ok in zip(names, finite) if not ok), None)


def require_finite_weights(state: dict[str, Any], directory: str | Path) -> None:
    """Refuse the model weights of a run that diverged (NaN or inf), naming the first such tensor."""
    broken = first_nonfinite(state["model"])
    if broken:
        raise CheckpointError(f"{directory} holds non-finite weights (NaN or inf in {broken}): its run "
                              f"diverged; use an earlier checkpoint, or train again with a lower train.lr")


def newest_valid(candidates: list[Path]) -> Path | None:
    """The newest intact checkpoint among `candidates` (sorted oldest first); warns on torn ones."""
    for candidate in reversed(candidates):
        problem = verify_checkpoint(candidate)
        if problem is None:
            return candidate
        log.warning("skipping torn checkpoint %s: %s", candidate, problem)
    return None


def repair_best(best: Path, candidates: list[Path], epoch: int, monitor: str, publish: bool = True) -> None:
    """Publish again a broken `best` checkpoint (torn, truncated or missing) from the newest intact
    checkpoint among `candidates` written at the end of `epoch`, or raise a CheckpointError saying
    how to go on when none is kept.

    best/ is published at the validation of its epoch and that epoch's checkpoint right after,
    from the same weights, optimiser state and metrics; the checkpoint is told from the
    mid-epoch ones of the next epoch (same epoch count) by the validation metric `monitor` in its
    metrics. `publish=False` (every rank but the first) checks without writing.
    """
    problem = verify_checkpoint(best)
    if problem is None:
        return
    intact = {candidate.resolve(): read_meta(candidate) for candidate in candidates
              if verify_checkpoint(candidate) is None}
    holding = sorted((meta["step"], str(path)) for path, meta in intact.items()
                     if meta["epoch"] == epoch and monitor in meta.get("metrics", {}))
    if holding:
        source = Path(holding[-1][1])
        if publish:
            publish_directory(source, best)
            log.warning("%s was broken (%s); published it again from %s, the checkpoint of its epoch %d",
                        best, problem, source, epoch)
        return
    newest = max(intact.items(), key=lambda item: item[1]["step"], default=None)
    instead = (f"the newest intact checkpoint, {newest[0]} (epoch {newest[1]['epoch']}), can be evaluated, "
               f"exported or fine-tuned from in its place" if newest else "no intact checkpoint is kept")
    raise CheckpointError(f"{best} is broken ({problem}) and no kept checkpoint holds its epoch {epoch}, "
                          f"so it cannot be rebuilt; {instead}, or train again with a new --output")


def publish_directory(source: str | Path, destination: str | Path) -> None:
    """Replace `destination` with `source` so readers never see a half-copied directory."""
    destination = Path(destination)
    staging = destination.with_name(destination.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    retired = destination.with_name(destination.name + ".old")
    if destination.exists():
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(destination, retired)
    os.replace(staging, destination)
    shutil.rmtree(retired, ignore_errors=True)
