"""The Ray seam: the only module (with the job drivers, and ray_compat.py for Ray's private APIs)
that knows about Ray.

Job code asks it for Ray to be running, to run tasks in parallel (`run_in_parallel`), for this
worker's dataset shard, and to report metrics and checkpoints; model and training-step code never
import Ray.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
from typing import Any, Callable, Hashable

from flm_dist import ray_compat
from flm_dist.errors import UserError

log = logging.getLogger("flm_dist")


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to `address` (or $RAY_ADDRESS), or start a local Ray instance if none is running."""
    import ray
    import ray.data

    # Ray Data's per-operator bars are unreadable in logs; flm_dist prints its own progress.
    ray.data.DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"log_to_driver": True, "configure_logging": False}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=True, **kwargs)


def cluster_cpus() -> int:
    """CPUs of the Ray cluster (at least 1), starting a local Ray instance if none is running."""
    import ray

    ensure_ray()
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def cluster_capacity() -> dict[str, float]:
    """The most of each resource (CPU, GPU, ...) the Ray cluster can give a job: what its nodes
    have now, or its autoscaler's limits where those are larger."""
    import ray

    ensure_ray()
    capacity = {name: float(amount) for name, amount in ray.cluster_resources().items()}
    for name, most in (ray_compat.autoscaling_limits() or {}).items():
        capacity[name] = max(capacity.get(name, 0.0), float(most))
    return capacity


DATA_CPUS = 1.0
"""CPUs a fit leaves free of its workers: Ray Data runs each read task on a whole CPU, and with
none free the workers wait for their data (RAY_NOTES.md; on 2 CPUs, 2 workers of 1 CPU each took
730 s to read what one worker reads in a second)."""


def plan_worker_cpus(capacity: dict[str, float], workers: int, cpus_per_worker: float | None,
                     gpus_per_worker: float) -> float:
    """CPUs per worker for a fit of `workers` on a cluster of `capacity` (`cluster_capacity`):
    `cpus_per_worker` when it leaves Ray Data `DATA_CPUS`, else a one-line UserError naming the
    setting; unset, 1 or as much less as leaves Ray Data its CPU. More GPUs than the cluster
    has are refused the same way (the fit would wait for them for ever)."""
    gpus = capacity.get("GPU", 0.0)
    group = f"{workers} worker{'s' if workers != 1 else ''}"
    if gpus_per_worker > 0 and workers * gpus_per_worker > gpus + 1e-9:
        raise UserError(f"scaling.gpus_per_worker={gpus_per_worker:g} x {group} needs "
                        f"{workers * gpus_per_worker:g} GPUs but the Ray cluster has {gpus:g}; lower "
                        f"scaling.workers or scaling.gpus_per_worker (0 trains on CPU)")
    cpus = capacity.get("CPU", 0.0)
    spare = cpus - DATA_CPUS
    # Ray takes fractional resources in steps of 1e-4.
    fitting = math.floor(spare / workers * 1e4) / 1e4 if spare > 0 else 0.0
    if cpus_per_worker is None:
        if fitting <= 0:
            raise UserError(f"the Ray cluster has {cpus:g} CPU(s): {group} would leave Ray "
                            f"Data none of the {DATA_CPUS:g} it needs to read the data; use --workers 0 (train "
                            f"in this process) or a cluster with more CPUs")
        return min(1.0, fitting)
    if workers * cpus_per_worker > spare + 1e-9:
        hint = f"set scaling.cpus_per_worker <= {fitting:g} or leave it unset" if fitting > 0 else \
            "use --workers 0 (train in this process) or a cluster with more CPUs"
        raise UserError(f"scaling.cpus_per_worker={cpus_per_worker:g} x {group} reserves "
                        f"{workers * cpus_per_worker:g} of the Ray cluster's {cpus:g} CPUs and leaves Ray Data "
                        f"less than the {DATA_CPUS:g} it needs to read the data (the fit would hang); {hint}")
    return cpus_per_worker


def share(value: Any) -> Any:
    """`value` in Ray's object store: calls that pass the result to their tasks ship `value` once,
    not once per task, and each task receives `value` itself."""
    import ray

    return ray.put(value)


@dataclasses.dataclass(frozen=True)
class TaskCall:
    """One call of `run_in_parallel`: `function(*args)` in a Ray task, after the calls `after`."""

    key: Hashable
    label: str
    """How the log names it."""
    function: Callable[..., Any]
    """A module-level function of the installed package (Ray workers import it by name)."""
    args: tuple[Any, ...]
    after: tuple[Hashable, ...] = ()


def run_in_parallel(calls: list[TaskCall], parallel: int, num_cpus: float, num_gpus: float,
                    on_finished: Callable[[Hashable, Any], None], describe: str = "task",
                    address: str | None = None, retries: int = 0, log_level: int = logging.INFO) -> None:
    """Run `calls` as Ray tasks of `num_cpus` CPUs and `num_gpus` GPUs, at most `parallel` at once,
    started in list order as their `after` calls finish; `on_finished(key, result)` runs here as
    each one ends. A task whose worker died (a crash, a memory kill) is rerun at most `retries`
    times; an error raised by the task is not retried: no further call starts, the running ones
    finish (so their work is kept), and the first error is raised, a user's mistake as one line.
    Each start and end is logged at `log_level`."""
    import ray

    ensure_ray(address)
    threads = max(1, int(num_cpus))
    task = ray.remote(_run_task).options(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=retries)
    waiting, running, done = list(calls), {}, set()
    failure: BaseException | None = None
    while waiting or running:
        ready = [c for c in waiting if all(a in done for a in c.after)] if failure is None else []
        for call in ready[: max(0, parallel - len(running))]:
            log.log(log_level, "%s %d/%d started: %s", describe, len(calls) - len(waiting) + 1, len(calls),
                    call.label)
            running[task.remote(call.function, threads, *call.args)] = call
            waiting.remove(call)
        if not running:
            break
        (finished,), _ = ray.wait(list(running), num_returns=1)
        call = running.pop(finished)
        try:
            result = ray.get(finished)
        except Exception as exc:  # Ray wraps the task's error; keep a user mistake one clear line
            if failure is None:
                failure = exc
                log.log(log_level, "%s failed, starting no further %ss: %s", call.label, describe,
                        _user_error_in(exc) or exc)
            else:  # only the first error is raised: the later ones must not go unseen
                log.error("%s failed too: %s", call.label, _user_error_in(exc) or exc)
            continue
        done.add(call.key)
        log.log(log_level, "%s finished: %s (%d of %d done)", describe, call.label, len(done), len(calls))
        on_finished(call.key, result)
    if failure is not None:
        user_error = _user_error_in(failure)
        if user_error:
            raise UserError(user_error) from None
        raise failure


def _run_task(function: Callable[..., Any], threads: int, *args: Any) -> Any:
    from flm_dist.logs import setup_logging

    # Ray forwards the task's stderr to the driver, so its progress lines show there.
    setup_logging()
    # Ray gives a task OMP_NUM_THREADS of its CPUs, which torch reads when first imported; a worker
    # reused from an earlier task may hold torch already, with that task's thread count.
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
    return function(*args)


RUN_NAME = "ray_train"
"""Ray Train's run name under RUN_DIR: its checkpoints are RUN_DIR/ray_train/checkpoint_*."""


class RaySession:
    """The training-loop session inside a Ray Train worker (see `flm_dist.train.session.Session`).

    `run_dir` (the run's storage path) is where `latest_checkpoint` looks for checkpoints.
    """

    def __init__(self, run_dir: str | None = None):
        self.run_dir = run_dir
        ray_compat.quiet_train_report_log()

    def read_split(self, name: str):
        import ray.train

        from flm_dist.data.batches import concat_tables

        shard = ray.train.get_dataset_shard(name)
        table = concat_tables(list(shard.iter_batches(batch_size=65536, batch_format="pyarrow")))
        if table.num_columns == 0:  # an evaluation shard may be empty; keep its columns
            schema = shard.schema()
            table = getattr(schema, "base_schema", schema).empty_table()
        return table

    def device(self):
        import ray.train.torch

        return ray.train.torch.get_device()

    def latest_checkpoint(self):
        return _latest_ray_checkpoint(self.run_dir)

    def report(self, metrics: dict[str, Any], checkpoint_dir=None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)


def _latest_ray_checkpoint(run_dir: str | None):
    """Download the newest intact checkpoint of this run; a torn newest one falls back to older ones.

    The run's storage is listed instead of asking `ray.train.get_checkpoint()`: Ray only knows the
    checkpoints its controller registered, and a driver killed right after a worker uploaded one
    leaves it unregistered. Our own manifest and checksums (`newest_valid`) say which are intact.
    """
    import contextlib
    import tempfile
    from pathlib import Path

    import pyarrow.fs
    import ray.train

    from flm_dist.train.checkpoint import newest_valid

    @contextlib.contextmanager
    def context():
        if run_dir is None:
            yield None
            return
        filesystem, parent = pyarrow.fs.FileSystem.from_uri(f"{run_dir.rstrip('/')}/{RUN_NAME}")
        infos = filesystem.get_file_info(pyarrow.fs.FileSelector(parent, allow_not_found=True))
        names = sorted(i.base_name for i in infos
                       if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith("checkpoint_"))
        with tempfile.TemporaryDirectory() as scratch:
            local = []
            for name in names[-3:]:
                destination = Path(scratch) / name
                ray.train.Checkpoint(f"{parent}/{name}", filesystem).to_directory(str(destination))
                local.append(destination)
            yield newest_valid(local)

    return context()


def run_trainer(train_function, payload: dict[str, Any], datasets: dict[str, Any], run_dir: str,
                name: str, workers: int, gpus_per_worker: float, cpus_per_worker: float | None,
                max_failures: int, placement_strategy: str = "PACK") -> None:
    """Fit `train_function(payload)` on `workers` Ray Train workers; resumes a run of the same name.
    Each worker gets the CPUs of `plan_worker_cpus` (None: as many as leave Ray Data its CPU).

    Every split is handed out with `streaming_split(equal=False)`: disjoint and complete, so every
    user is scored exactly once and trained on (Ray's default `equal=True` may drop rows). The
    training loop then deals the training users over the ranks by history length
    (`flm_dist.train.shards`), which balances the ranks' steps where equal row counts did not.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    execution_options = ray_compat.dataset_execution_options()
    planned = plan_worker_cpus(cluster_capacity(), workers, cpus_per_worker, gpus_per_worker)
    if cpus_per_worker is None and planned < 1:
        log.info("scaling.cpus_per_worker unset: %g CPU per worker, so that %d workers leave Ray Data a CPU "
                 "to read with", planned, workers)

    class DisjointSplits(ray.train.DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            output = [{} for _ in range(world_size)]
            for dataset_name, dataset in datasets.items():
                dataset = dataset.copy(dataset)
                dataset.context.execution_options = execution_options(self, dataset_name)
                for index, split in enumerate(dataset.streaming_split(world_size, equal=False)):
                    output[index][dataset_name] = split
            return output

    use_gpu = gpus_per_worker > 0
    resources = {"CPU": planned}
    if use_gpu:
        resources["GPU"] = gpus_per_worker
    trainer = TorchTrainer(
        train_function,
        train_loop_config=payload,
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=placement_strategy),
        datasets=datasets,
        dataset_config=DisjointSplits(),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=absolute_storage_path(run_dir),
            failure_config=ray.train.FailureConfig(max_failures=max_failures, controller_failure_limit=3),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=3),
        ),
    )
    try:
        trainer.fit()
    except Exception as exc:  # Ray wraps worker errors; a user mistake must stay one clear line
        user_error = _user_error_in(exc)
        if user_error:
            raise UserError(user_error) from None
        raise


def _user_error_in(exc: BaseException) -> str | None:
    """The message of a `UserError` raised inside a Ray worker, if that is what `exc` carries."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, UserError):
            # A Ray task's error arrives as a subclass of its own type whose message is the whole
            # traceback; its `cause` is the error the task raised.
            return str(getattr(seen, "cause", None) or seen)
        for line in str(seen).splitlines():
            if "UserError: " in line or "ConfigKeyError: " in line or "CheckpointError: " in line:
                return line.split("Error: ", 1)[1].strip()
        seen = seen.__cause__ or seen.__context__
    return None


def absolute_storage_path(path: str) -> str:
    """Ray needs absolute local storage paths; URIs (s3://, gs://, ...) pass through."""
    import os

    return path if "://" in path else os.path.abspath(path)


def read_parquet_datasets(data_dir: str, splits: list[str]) -> dict[str, Any]:
    """Ray Data datasets over the prepared split directories (local path or any URI)."""
    import ray.data

    return {split: ray.data.read_parquet(f"{data_dir.rstrip('/')}/{split}") for split in splits}
