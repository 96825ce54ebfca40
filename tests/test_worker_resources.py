"""Issue 37, case 8: a fit must leave Ray Data a CPU, and nothing may ask for more GPUs than the
cluster can have. The plans are pure functions of the cluster's capacity, so no Ray is started.

On a 2-CPU machine `--workers 2` with 1 CPU per worker reserved both CPUs, Ray Data's read tasks
never ran and the fit crawled (730 s for a second's reading): unset, `scaling.cpus_per_worker` is
now sized down to fit; set, it is refused with a line naming it.
"""

import logging

import pytest
import ray

from flm_dist import ray_compat, ray_seam
from flm_dist.config import ScalingConfig
from flm_dist.errors import UserError
from flm_dist.experiments.tune import TuneOptions, check_resources

TWO_CPUS = {"CPU": 2.0, "memory": 1e10}


def test_unset_cpus_per_worker_is_sized_down_to_leave_ray_data_a_cpu():
    assert ScalingConfig().cpus_per_worker is None
    assert ray_seam.plan_worker_cpus(TWO_CPUS, 1, None, 0.0) == 1.0
    assert ray_seam.plan_worker_cpus(TWO_CPUS, 2, None, 0.0) == 0.5
    assert ray_seam.plan_worker_cpus(TWO_CPUS, 3, None, 0.0) == 0.3333  # Ray's 1e-4 resource steps
    assert ray_seam.plan_worker_cpus({"CPU": 64.0}, 8, None, 0.0) == 1.0


def test_a_set_cpus_per_worker_that_starves_ray_data_is_refused_naming_the_setting():
    assert ray_seam.plan_worker_cpus(TWO_CPUS, 2, 0.5, 0.0) == 0.5
    with pytest.raises(UserError) as refused:
        ray_seam.plan_worker_cpus(TWO_CPUS, 2, 1.0, 0.0)
    message = str(refused.value)
    assert "\n" not in message and message.startswith("scaling.cpus_per_worker=1 x 2 workers reserves 2")
    assert "set scaling.cpus_per_worker <= 0.5 or leave it unset" in message
    with pytest.raises(UserError, match="use --workers 0"):
        ray_seam.plan_worker_cpus({"CPU": 1.0}, 1, 0.5, 0.0)
    with pytest.raises(UserError, match="has 1 CPU"):
        ray_seam.plan_worker_cpus({"CPU": 1.0}, 1, None, 0.0)


def test_more_gpus_than_the_cluster_has_are_refused_naming_the_setting():
    with pytest.raises(UserError, match=r"scaling.gpus_per_worker=1 x 2 workers needs 2 GPUs but the Ray cluster "
                                        r"has 1"):
        ray_seam.plan_worker_cpus({"CPU": 8.0, "GPU": 1.0}, 2, None, 1.0)
    assert ray_seam.plan_worker_cpus({"CPU": 8.0, "GPU": 2.0}, 4, None, 0.5) == 1.0


def test_the_capacity_is_the_autoscalers_limit_where_it_has_one(monkeypatch):
    monkeypatch.setattr(ray_seam, "ensure_ray", lambda *args, **kwargs: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(ray_compat, "autoscaling_limits", lambda: {"CPU": 66, "GPU": 8})
    capacity = ray_seam.cluster_capacity()
    assert capacity == {"CPU": 66.0, "GPU": 8.0}
    assert ray_seam.plan_worker_cpus(capacity, 4, 1.0, 1.0) == 1.0  # GPU nodes not started yet
    monkeypatch.setattr(ray_compat, "autoscaling_limits", lambda: None)
    assert ray_seam.cluster_capacity() == {"CPU": 2.0}


def test_the_autoscaling_limits_come_only_from_the_pinned_ray(monkeypatch):
    monkeypatch.setattr(ray, "__version__", "2.61.0")
    with pytest.raises(UserError, match="Ray 2.60.0"):
        ray_compat.autoscaling_limits()


def _tune(**kwargs) -> TuneOptions:
    return TuneOptions(output="o", space={}, base={}, **kwargs)


def test_a_tune_trial_the_cluster_cannot_hold_is_refused(caplog):
    with pytest.raises(UserError, match="a trial needs 1 GPUs but the Ray cluster has 0; lower --gpus-per-trial"):
        check_resources(_tune(gpus_per_trial=1.0), TWO_CPUS)
    with pytest.raises(UserError, match="a trial needs 3 CPUs but the Ray cluster has 2"):
        check_resources(_tune(cpus_per_trial=3.0), TWO_CPUS)
    with caplog.at_level(logging.WARNING, logger="flm_dist"):
        check_resources(_tune(cpus_per_trial=1.0, concurrent=4), TWO_CPUS)
    assert "at most 2 trials run at once" in caplog.text
    check_resources(_tune(gpus_per_trial=1.0), {"CPU": 2.0, "GPU": 8.0})
