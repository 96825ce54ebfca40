"""Faults injected into real runs: the outcome each must have (docs/operations.md, "Failure semantics")."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import local_cluster
import pytest
import torch
from local_cluster import started_cluster

from flm_dist.config import load_config
from flm_dist.train.checkpoint import load_checkpoint
from flm_dist.train.configs import PretrainConfig
from flm_dist.train.pretrain import run_pretrain

SMALL = ["model.hidden=16", "model.heads=2", "model.max_len=12", "model.flow_hidden=16", "model.flow_layers=2",
         "train.batch_size=32", "train.warmup_steps=2", "train.epochs=2", "train.checkpoint_every_steps=4",
         "eval.batch_size=128"]


def _final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "best")[0]["model"]


def _kill_a_train_worker_after_first_checkpoint(run_dir: Path, killed: list[int]) -> None:
    import ray
    from ray.util.state import list_actors

    address = ray.get_runtime_context().gcs_address
    # Generous: on a loaded machine Ray Train took over 120 s to write its first checkpoint.
    deadline = time.time() + 600
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
    # The uninterrupted reference runs in-process (one torch thread, like the Ray worker; the
    # training rows are sorted by user, so the batches do not depend on how the data arrived).
    reference = run_pretrain(load_config(PretrainConfig, None, [
        f"data={tiny_data}", f"output={tmp_path / 'reference'}", *SMALL, "scaling.workers=0"]))

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


# ---------------------------------------------------------------------------------------------
# Faults of the whole job and of a node, on a real two-node cluster (head: 2 CPUs, worker0: 1 CPU)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_nodes():
    cluster = started_cluster(head_cpus=2, worker_cpus=(1,))
    try:
        yield cluster
    finally:
        cluster.stop()


def _pretrain_command(data: str, run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "flm_dist.cli", "pretrain", "--data", data, "--output", str(run_dir),
            *SMALL, "train.epochs=6", *overrides]


def _start_driver(cluster, command: list[str], log: Path) -> subprocess.Popen:
    """`flm pretrain` as its own process group: the Ray job's driver, as a user would run it."""
    return subprocess.Popen(command, env=cluster.env | {"RAY_ADDRESS": cluster.gcs_address},
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_checkpoint(run_dir: Path, driver: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 180
    while not any((run_dir / "ray_train").glob("checkpoint_*")):
        assert driver.poll() is None, f"driver exited early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no checkpoint after 180 s:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)


def _assert_no_lost_or_repeated_steps(metrics: dict) -> None:
    steps = [record["step"] for record in metrics["history"]]
    assert len(steps) == 6 and steps == [steps[0] * epoch for epoch in range(1, 7)]
    assert metrics["steps"] == steps[-1]
    assert 0.0 <= metrics["final"]["test/ndcg@10/full"] <= 1.0


@pytest.mark.slow
def test_killed_driver_then_the_same_command_resumes(tiny_data, tmp_path, two_nodes):
    run_dir, log = tmp_path / "run", tmp_path / "driver.log"
    command = _pretrain_command(tiny_data, run_dir, "scaling.workers=1", "scaling.cpus_per_worker=0.5")
    driver = _start_driver(two_nodes, command, log)
    _wait_for_checkpoint(run_dir, driver, log)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and its process group, with no clean-up
    driver.wait()
    assert not (run_dir / "metrics.json").exists(), "the run finished before the driver was killed"

    rerun = _start_driver(two_nodes, command, log)
    assert rerun.wait(timeout=300) == 0, log.read_text()[-4000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["resumed_at_steps"]) == 1 and metrics["resumed_at_steps"][0] > 0
    _assert_no_lost_or_repeated_steps(metrics)


def _train_worker_nodes(cluster) -> set[str]:
    actors = local_cluster.get_json(f"{cluster.address}/api/v0/actors?limit=1000&detail=1")
    return {a["node_id"] for a in actors["data"]["result"]["result"]
            if a.get("state") == "ALIVE" and "TrainWorker" in a.get("class_name", "")}


@pytest.mark.slow
def test_losing_the_node_of_a_worker_mid_run_resumes_on_the_remaining_node(tiny_data, tmp_path, two_nodes):
    run_dir, log = tmp_path / "run", tmp_path / "driver.log"
    # SPREAD: one rank on each node, so losing worker0 loses a rank, not the driver's node.
    driver = _start_driver(two_nodes, _pretrain_command(
        tiny_data, run_dir, "scaling.workers=2", "scaling.cpus_per_worker=0.5", "scaling.placement_strategy=SPREAD",
        "scaling.max_failures=3"), log)
    _wait_for_checkpoint(run_dir, driver, log)
    head = {n["node_id"] for n in two_nodes.nodes() if n.get("is_head_node")}
    assert _train_worker_nodes(two_nodes) - head, "no train worker was placed on the worker node"
    two_nodes.kill_node("worker0")
    assert not (run_dir / "metrics.json").exists(), "the run finished before the node was lost"

    assert driver.wait(timeout=300) == 0, log.read_text()[-4000:]
    assert two_nodes.alive_nodes() == 1
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["resumed_at_steps"] and metrics["resumed_at_steps"][0] > 0
    _assert_no_lost_or_repeated_steps(metrics)
