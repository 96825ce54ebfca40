"""The private Ray APIs flm_dist uses, each checked against the Ray release it was written for.

Ray may change or drop a private API in any release, and then fails deep inside a run with an
error that names Ray's internals. So every such use lives here and first compares the installed
Ray with the version pyproject.toml pins: a use a job needs stops it with one line naming the pin;
a cosmetic one (quieter logs) is skipped, with a debug line.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from flm_dist.errors import UserError

log = logging.getLogger("flm_dist")

PINNED_RAY = "2.60.0"
"""The `ray` version in pyproject.toml's dependencies; keep the two equal."""


def _installed_ray() -> str:
    import ray

    return ray.__version__


def require_pinned_ray(needed_for: str) -> None:
    """Raise a one-line UserError unless the installed Ray is the pinned one."""
    installed = _installed_ray()
    if installed != PINNED_RAY:
        raise UserError(f"{needed_for} relies on a private API of Ray {PINNED_RAY} (the version pinned in "
                        f"pyproject.toml), but Ray {installed} is installed; install ray=={PINNED_RAY}")


def quiet_train_report_log() -> None:
    """Ray Train logs every report at INFO with all its metrics, about a hundred per epoch here,
    from a logger named by its module's file. flm_dist logs a readable line per epoch itself, so
    this worker keeps Ray's line for warnings and errors only."""
    installed = _installed_ray()
    if installed != PINNED_RAY:
        log.debug("Ray %s is not the pinned %s: Ray Train's per-report log lines stay on", installed, PINNED_RAY)
        return
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def dataset_execution_options() -> Callable[[Any, str], Any]:
    """`DataConfig._resolve_execution_options(data_config, dataset_name)`: the Ray Data execution
    options Ray Train gives a dataset, which a `DataConfig` that overrides `configure` must apply
    itself (Ray has no public way to read them). Called on the driver, so that another Ray fails
    before any worker starts; the returned function runs in Ray Train's controller."""
    require_pinned_ray("flm_dist's split of evaluation datasets (DataConfig._resolve_execution_options)")
    import ray.train

    return ray.train.DataConfig._resolve_execution_options


def autoscaling_limits() -> dict[str, float] | None:
    """The most of each resource the cluster's autoscaler may start (its node types times their
    maximum counts; sys.maxsize where unbounded), or None for a cluster without one, which has
    what its nodes have now. Ray Train reads the same to refuse a worker group no cluster could
    hold (`GlobalState.get_max_resources_from_cluster_config`); Ray has no public way."""
    require_pinned_ray("flm_dist's check of a job's resources against the cluster's "
                       "(ray._private.state.get_max_resources_from_cluster_config)")
    from ray._private.state import state

    return state.get_max_resources_from_cluster_config()
