"""Readable logs for flm_dist only (Ray's and other libraries' INFO chatter stays out), and the
TensorBoard scalars of a training run."""

import logging
import time
from pathlib import Path
from typing import Any


def setup_logging(verbose: bool = False) -> None:
    """Log flm_dist's messages (INFO, or DEBUG with `verbose`) to stderr, once per process."""
    logger = logging.getLogger("flm_dist")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


def tensorboard_writer(run_dir: Path):
    """A TensorBoard writer into RUN_DIR/tensorboard."""
    from tensorboardX import SummaryWriter

    return SummaryWriter(logdir=str(Path(run_dir) / "tensorboard"))


def write_scalars(writer, record: dict[str, Any]) -> None:
    """Every number of `record` as a scalar at its epoch (nothing without a writer: ranks > 0)."""
    if writer is None:
        return
    step = int(record.get("epoch", 0))
    for key, value in record.items():
        if isinstance(value, (int, float)) and key != "epoch":
            writer.add_scalar(key.replace("@", "_at_"), value, step)
    writer.flush()


class PhaseClock:
    """Seconds between calls of `lap(phase)`, by phase: the start-up's log line."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now
