"""What a training loop needs from its runtime: its data shard, its last checkpoint, a report.

`LocalSession` runs in this process without Ray (tests, debugging, single-device benchmarks);
`flm_dist.ray_seam.RaySession` is the same interface over Ray Train and Ray Data.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from flm_dist.train.checkpoint import newest_valid

log = logging.getLogger("flm_dist")


class Session(Protocol):
    def read_split(self, name: str) -> pa.Table:
        """This worker's disjoint share of split `name` (train, valid, test)."""

    def device(self) -> torch.device: ...

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        """A local directory holding the newest intact checkpoint, or None on a fresh start."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        """Publish metrics (and a checkpoint written by rank 0) to the runtime."""


class LocalSession:
    """One process, no Ray: reads the prepared Parquet directly, keeps checkpoints in RUN_DIR."""

    keep_checkpoints = 2

    def __init__(self, data_dir: str, run_dir: str, device: str | None = None):
        self.data_dir = Path(data_dir)
        self.checkpoint_root = Path(run_dir) / "checkpoints"
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.reports: list[dict[str, Any]] = []

    def read_split(self, name: str) -> pa.Table:
        return pq.read_table(self.data_dir / name)

    def device(self) -> torch.device:
        return self._device

    def _checkpoints(self) -> list[Path]:
        if not self.checkpoint_root.is_dir():
            return []
        return sorted(p for p in self.checkpoint_root.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        yield newest_valid(self._checkpoints())

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is None:
            return
        self.checkpoint_root.mkdir(parents=True, exist_ok=True)
        destination = self.checkpoint_root / f"checkpoint_{metrics['step']:09d}"
        shutil.rmtree(destination, ignore_errors=True)
        shutil.move(str(checkpoint_dir), destination)
        for old in self._checkpoints()[:-self.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
