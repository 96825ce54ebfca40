"""`flm serve`: a checkpoint's recommendations over HTTP, on Ray Serve.

    POST /recommend  {"user": "<user id>", "k": 10}  or  {"items": ["<item id>", ...], "k": 10}
                     optional "exclude_history" (default true) and "exclude": [...]
    GET  /healthz    {"status": "ok", "run_id": ...}
    GET  /info       the model, its catalogue and the serving settings

The answers come from `flm_dist.recommend.RecommenderService` (Ray-free; export's scoring and
top-K). This module is its Ray Serve wrapper: one deployment of `replicas` replicas, each holding
one copy of the model; requests that reach a replica within `batch_wait_timeout_s` of each other
are scored together (`@serve.batch`, up to `max_batch_size`) in one forward pass.

Deploying again under the same application `name` with another checkpoint is a rolling update:
Ray Serve starts the new replicas (`max_surge_percent=100`: next to the old ones) and only then
drains and stops the old ones, so no request is dropped; every answer names the `run_id` that
made it. See docs/guide/serve.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import threading
import time
from typing import Any, Literal

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from flm_dist.config import require, to_dict
from flm_dist.errors import UserError
from flm_dist.recommend import RecommenderService, RequestError, resolve_model

log = logging.getLogger("flm_dist")


@dataclasses.dataclass
class ServeConfig:
    checkpoint: str = ""
    """Checkpoint directory or run directory (its best/): pretrained or fine-tuned."""
    data: str = ""
    """Prepared data with the checkpoint's vocabulary and the users' stored histories (default:
    the `data` the run directory's config.json records)."""
    host: str = "127.0.0.1"
    """Address the HTTP proxy listens on (0.0.0.0 to accept other machines)."""
    port: int = 8000
    """HTTP port."""
    replicas: int = 1
    """Replicas of the model (each a Ray actor with one copy of it)."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Where each replica scores; cuda reserves one GPU per replica."""
    cpus_per_replica: float = 1.0
    """CPUs reserved per replica (also its torch threads, at least one)."""
    max_batch_size: int = 32
    """Most requests a replica scores in one forward pass (Ray Serve dynamic batching)."""
    batch_wait_timeout_s: float = 0.005
    """How long a replica waits for more requests to fill a batch before scoring what it has."""
    max_k: int = 100
    """Largest `k` a request may ask for."""
    split: Literal["test", "valid"] = "test"
    """A known user's stored history is their row of DATA/<split> (test: the history `flm export`
    and `flm evaluate` score after); users without one fall back to their training sequence."""
    max_score_elements: int = 2 ** 24
    """At most this many user x item scores exist at once in a replica (items are ranked in chunks)."""
    name: str = "flm"
    """Ray Serve application name; deploying again under the same name is a rolling update."""
    address: str | None = None
    """Ray cluster address (default: $RAY_ADDRESS, else a local instance started here)."""
    block: bool = True
    """Keep running until Ctrl-C, then delete the application; false returns once it is up (on a
    cluster it stays deployed; with a local Ray it lives as long as this process)."""

    def __post_init__(self):
        require(bool(self.checkpoint), "checkpoint", "is required")
        require(bool(self.host), "host", "is required")
        require(1 <= self.port <= 65535, "port", "must be from 1 to 65535")
        require(self.replicas > 0, "replicas", "must be positive")
        require(self.cpus_per_replica > 0, "cpus_per_replica", "must be positive")
        require(self.max_batch_size > 0, "max_batch_size", "must be positive")
        require(self.batch_wait_timeout_s >= 0, "batch_wait_timeout_s", "must be >= 0")
        require(self.max_k > 0, "max_k", "must be positive")
        require(self.max_score_elements >= self.max_batch_size, "max_score_elements",
                f"must be at least max_batch_size={self.max_batch_size} (one item per chunk)")
        require(bool(self.name), "name", "is required")


def _error(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status)


@serve.deployment
class RecommenderDeployment:
    """The Ray Serve replica: HTTP routing around one `RecommenderService`."""

    def __init__(self, settings: dict[str, Any]):
        import torch

        from flm_dist.logs import setup_logging

        setup_logging()
        torch.set_num_threads(max(1, int(settings["cpus_per_replica"])))
        self.service = RecommenderService.load(
            settings["checkpoint"], settings["data"], device=settings["device"], split=settings["split"],
            max_k=settings["max_k"], max_score_elements=settings["max_score_elements"])
        self.settings = settings
        self._recommend_batch.set_max_batch_size(settings["max_batch_size"])
        self._recommend_batch.set_batch_wait_timeout_s(settings["batch_wait_timeout_s"])
        log.info("replica ready: %s", self.service.details.get("run_id"))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _recommend_batch(self, queries: list) -> list[dict[str, Any]]:
        # Scored in a worker thread: the event loop keeps taking requests for the next batch.
        return await asyncio.to_thread(self.service.recommend, queries)

    async def __call__(self, request: Request) -> JSONResponse:
        path = request.url.path.rstrip("/") or "/"
        routes = {"/recommend": "POST", "/healthz": "GET", "/info": "GET"}
        if path not in routes:
            return _error(404, f"no such endpoint {path}; endpoints: POST /recommend, GET /healthz, GET /info")
        if request.method != routes[path]:
            return _error(405, f"{path} takes {routes[path]}, not {request.method}")
        try:
            if path == "/healthz":
                return JSONResponse({"status": "ok", "run_id": self.service.details.get("run_id")})
            if path == "/info":
                settings = {k: v for k, v in self.settings.items() if k not in ("checkpoint", "data")}
                return JSONResponse({**self.service.info(), "serving": settings})
            query = self.service.parse(await request.body())
            return JSONResponse(await self._recommend_batch(query))
        except RequestError as exc:
            return _error(exc.status, exc.reason)
        except Exception as exc:  # a bug, not the request: one line to the client, the traceback to the log
            log.exception("request to %s failed", path)
            return _error(500, f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")


def application(config: ServeConfig):
    """The Ray Serve application of `config` (checkpoint and data already resolved)."""
    settings = to_dict(config)
    return RecommenderDeployment.options(
        num_replicas=config.replicas,
        ray_actor_options={"num_cpus": config.cpus_per_replica, "num_gpus": 1 if config.device == "cuda" else 0},
        # Room for a full batch being scored while the next one fills.
        max_ongoing_requests=2 * config.max_batch_size,
        # Rolling updates start the new replicas before stopping the old ones.
        max_surge_percent=100,
    ).bind(settings)


def run_serve(config: ServeConfig) -> dict[str, Any]:
    """Deploy `config` (a rolling update if application `name` already runs); returns the URL and
    what is served. With `block`, keeps running until Ctrl-C and then deletes the application."""
    from flm_dist import ray_seam

    checkpoint, data = resolve_model(config.checkpoint, config.data)
    config = dataclasses.replace(config, checkpoint=str(checkpoint),
                                 data=ray_seam.absolute_storage_path(data))
    ray_seam.ensure_ray(config.address)
    serve.start(http_options={"host": config.host, "port": config.port})
    started = time.perf_counter()
    try:
        serve.run(application(config), name=config.name, route_prefix="/")
    except RuntimeError as exc:  # a replica failed to start: Serve's message holds its traceback
        lines = [line for line in str(exc).splitlines() if "Error" in line] or str(exc).splitlines()[:1]
        raise UserError(f"deploying {checkpoint} failed: {lines[-1].strip() if lines else exc}") from None
    url = f"http://{config.host}:{config.port}/"
    log.info("serving %s at %s (%d replica(s), %.1f s to deploy): POST %srecommend",
             checkpoint, url, config.replicas, time.perf_counter() - started, url)
    record = {"url": url, "name": config.name, "checkpoint": str(checkpoint), "data": config.data,
              "replicas": config.replicas, "device": config.device}
    if config.block:
        _wait_for_stop()
        log.info("stopping application %s", config.name)
        serve.delete(config.name)
    return record


def _wait_for_stop() -> None:
    """Sleep until Ctrl-C or SIGTERM (how service managers and `kill` stop a process)."""
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
