"""A real multi-node Ray cluster on this machine, for tests: `ray start --block` processes on loopback.

Used by the Jobs API test (tests/test_submit.py) and the node-loss and driver-kill tests
(tests/test_faults.py). Never `ray stop`: it would kill every Ray on the machine, the test
session's own included.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest


def _free_ports(count: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
        ports.append(s.getsockname()[1])
    for s in sockets:
        s.close()
    return ports


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


class LocalCluster:
    """`ray start --block` head + worker nodes, each node in its own process group, on loopback.

    Each node gets its own temp dir: on one machine, nodes sharing one would share the runtime-env
    cache, and one node's clean-up of the job's working_dir deletes the other's (the job's cwd).
    Killing a node's process group (`kill_node`) is a node loss: its raylet and every worker
    process on it die at once, as when a machine goes away.
    """

    def __init__(self, head_cpus: int = 2, worker_cpus: tuple[int, ...] = (1,)):
        self.head_cpus, self.worker_cpus = head_cpus, worker_cpus
        self.temp_dir = tempfile.mkdtemp(prefix="flmrc", dir="/tmp")  # short: Ray's socket paths are long
        self.procs: dict[str, subprocess.Popen] = {}
        self.gcs_address = self.address = ""
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 would refuse the second node ("multi-node clusters are
        # not supported"); loopback comes from --node-ip-address=127.0.0.1 on every node instead.
        # A lost node is declared dead after ~3 s of missed health checks instead of ~30 s.
        env.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_AUTH_MODE": "disabled",
                    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "120",
                    "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
                    "RAY_DEDUP_LOGS": "0", "TQDM_DISABLE": "1",
                    "PATH": os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")})
        self.env = env

    def start(self) -> None:
        gcs, dashboard, client, agent_head, *agents = _free_ports(4 + len(self.worker_cpus))
        self.gcs_address = f"127.0.0.1:{gcs}"
        self.address = f"http://127.0.0.1:{dashboard}"
        ray = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--disable-usage-stats",
               "--min-worker-port=0", "--max-worker-port=0", "--node-ip-address=127.0.0.1",
               "--include-log-monitor=false",  # job logs are the driver's output; saves a process per node
               f"--object-store-memory={100 * 1024**2}"]
        self._start(ray + ["--head", f"--temp-dir={self.temp_dir}/head", f"--port={gcs}",
                           f"--num-cpus={self.head_cpus}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                           f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
                           f"--dashboard-agent-listen-port={agent_head}"], "head")
        self._wait(lambda: socket.create_connection(("127.0.0.1", gcs), timeout=1).close() or True, "the GCS", 90)
        for index, (cpus, agent) in enumerate(zip(self.worker_cpus, agents)):
            self._start(ray + [f"--address={self.gcs_address}", f"--temp-dir={self.temp_dir}/worker{index}",
                               f"--num-cpus={cpus}", f"--dashboard-agent-listen-port={agent}"], f"worker{index}")
        self._wait(lambda: get_json(f"{self.address}/api/version"), "the Jobs API", 90)
        nodes = 1 + len(self.worker_cpus)
        self._wait(lambda: self.alive_nodes() >= nodes or None, f"{nodes} nodes", 90)

    def _start(self, command: list[str], name: str) -> None:
        log = open(Path(self.temp_dir) / f"{name}.out", "wb")
        self.procs[name] = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, cwd=self.temp_dir)

    def _wait(self, probe, what: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs.values()):
                raise RuntimeError(f"ray start exited while waiting for {what}: {self.logs()}")
            try:
                if probe():
                    return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(1)
        raise TimeoutError(f"{what} not up after {timeout_s} s: {self.logs()}")

    def nodes(self) -> list[dict]:
        data = get_json(f"{self.address}/api/v0/nodes?limit=100")
        return data["data"]["result"]["result"]

    def alive_nodes(self) -> int:
        return sum(1 for n in self.nodes() if n.get("state") == "ALIVE")

    def kill_node(self, name: str) -> None:
        """SIGKILL every process of node `name` (e.g. "worker0"): a machine lost without warning."""
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def logs(self) -> str:
        return " | ".join(path.read_text(errors="replace")[-1500:] for path in sorted(Path(self.temp_dir).glob("*.out")))

    def stop(self) -> None:
        """SIGTERM each `ray start --block` (it stops its own children), then SIGKILL whatever is left
        in the process groups started here."""
        procs = list(self.procs.values())[::-1]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def started_cluster(**kwargs) -> LocalCluster:
    """A started LocalCluster, or a skip when the `ray` CLI is not installed."""
    if shutil.which("ray") is None and not (Path(sys.executable).parent / "ray").exists():
        pytest.skip("ray CLI not installed")
    cluster = LocalCluster(**kwargs)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster
