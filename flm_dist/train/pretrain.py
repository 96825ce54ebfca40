"""`flm pretrain`: joint CF + sequence + flow pretraining.

The recipe is the shared loop (`flm_dist.train.loop`) with the joint model of `PretrainConfig`:
`run_pretrain` (driver) -> `train_loop` on every worker (`train_worker` under Ray Train).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flm_dist.config import from_dict
from flm_dist.logs import setup_logging
from flm_dist.ray_seam import RaySession, absolute_storage_path
from flm_dist.train.configs import PretrainConfig
from flm_dist.train.loop import launch_training, train_loop


def train_worker(payload: dict[str, Any]) -> None:
    """Ray Train entry point: rebuild the config from plain data and run the loop."""
    setup_logging()
    config = from_dict(PretrainConfig, payload["config"])
    train_loop(config, RaySession(config.output))


def resolve(config: PretrainConfig) -> PretrainConfig:
    """`config` as the run records it: absolute paths, since Ray workers do not share the
    driver's working directory."""
    return dataclasses.replace(config, data=absolute_storage_path(config.data),
                               output=absolute_storage_path(config.output))


def run_pretrain(config: PretrainConfig) -> dict[str, Any]:
    """Pretrain on Ray Train (or in this process with `scaling.workers=0`); returns metrics.json."""
    return launch_training(resolve(config), "pretrain", train_loop, train_worker)

