"""Faults injected into real runs: the outcome each must have (README, "Failure semantics")."""

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from flm_dist.checkpoint import load_checkpoint
from flm_dist.config import load_config
from flm_dist.pretrain import PretrainConfig, run_pretrain

SMALL = ["model.hidden=16", "model.heads=2", "model.max_len=12", "model.flow_hidden=16", "model.flow_layers=2",
         "train.batch_size=32", "train.warmup_steps=2", "train.epochs=2", "train.checkpoint_every_steps=4",
         "eval.batch_size=128"]


def _final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "best")[0]["model"]


def _kill_a_train_worker_after_first_checkpoint(run_dir: Path, killed: list[int]) -> None:
    import ray
    from ray.util.state import list_actors

    address = ray.get_runtime_context().gcs_address
    deadline = time.time() + 120
    while time.time() < deadline and not any((run_dir / "ray_train").glob("checkpoint_*")):
        time.sleep(0.2)
    for actor in list_actors(address=address, filters=[("state", "=", "ALIVE")], detail=True):
        if "TrainWorker" in actor.class_name and actor.pid:
            os.kill(actor.pid, signal.SIGKILL)
            killed.append(actor.pid)
            return


@pytest.mark.slow
def test_worker_sigkill_restarts_and_resumes_without_lost_steps(tiny_data, tmp_path):
    on_one_ray_worker = ["scaling.workers=1", "scaling.cpus_per_worker=0.5", "scaling.max_failures=2", *SMALL]
    # The reference runs on the same runtime (a Ray worker: one torch thread), uninterrupted.
    reference = run_pretrain(load_config(PretrainConfig, None, [
        f"data={tiny_data}", f"output={tmp_path / 'reference'}", *on_one_ray_worker]))

    run_dir = tmp_path / "crashed"
    killed: list[int] = []
    killer = threading.Thread(target=_kill_a_train_worker_after_first_checkpoint, args=(run_dir, killed))
    killer.start()
    crashed = run_pretrain(load_config(PretrainConfig, None, [f"data={tiny_data}", f"output={run_dir}",
                                                              *on_one_ray_worker]))
    killer.join()
    assert killed, "no train worker was found to kill"
    # Same number of optimiser steps and epochs as the uninterrupted run: none lost, none repeated.
    assert crashed["steps"] == reference["steps"]
    assert [r["step"] for r in crashed["history"]] == [r["step"] for r in reference["history"]]
    for name, tensor in _final_model(tmp_path / "reference").items():
        torch.testing.assert_close(_final_model(run_dir)[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    for name in ("test/ndcg@10/full", "test/hr@10/full"):
        assert crashed["final"][name] == pytest.approx(reference["final"][name], abs=1e-6)
