"""Load generator for `flm serve`: latency percentiles and requests per second at a concurrency.

    python -m flm_dist.bench.serve --url http://127.0.0.1:8000 --data DIR --clients 1,8,64 \
        --requests 200 --max-seconds 60

Each client is a thread with one keep-alive HTTP connection sending `{"user": ..., "k": K}` for
the data's users in turn, until `requests` in total were sent (bounded also by `max_seconds`).
Prints one JSON line per concurrency level: requests, errors (non-200 or failed), seconds,
requests/s, p50/p90/p99 latency in ms. Latency includes the client's own time (Python threads on
the same cores as the server), so it is an upper bound.
"""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pyarrow.parquet as pq


def load(url: str, user_ids: list[str], clients: int, requests: int, max_seconds: float, k: int = 10) -> dict:
    """Send `requests` recommendation requests from `clients` threads; latency and throughput."""
    target = urlparse(url)
    latencies: list[float] = []
    errors = [0]
    counter = iter(range(requests))
    lock = threading.Lock()
    deadline = time.perf_counter() + max_seconds

    def client() -> None:
        connection = http.client.HTTPConnection(target.hostname, target.port or 80, timeout=60)
        while time.perf_counter() < deadline:
            with lock:
                index = next(counter, None)
            if index is None:
                break
            body = json.dumps({"user": user_ids[index % len(user_ids)], "k": k})
            started = time.perf_counter()
            try:
                connection.request("POST", "/recommend", body, {"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                connection.close()
                connection = http.client.HTTPConnection(target.hostname, target.port or 80, timeout=60)
                ok = False
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed)
                errors[0] += not ok
        connection.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    ms = np.array(latencies) * 1000 if latencies else np.zeros(1)
    return {"clients": clients, "requests": len(latencies), "errors": errors[0], "seconds": round(seconds, 2),
            "requests_per_second": round(len(latencies) / seconds, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2), "p90_ms": round(float(np.percentile(ms, 90)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flm_dist.bench.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--data", required=True, help="prepared data whose users to ask for (vocab/users.parquet)")
    parser.add_argument("--clients", default="1,8,64", help="comma-separated concurrency levels")
    parser.add_argument("--requests", type=int, default=200, help="requests per level")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="time limit per level")
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args(argv)
    users = [str(u) for u in pq.read_table(Path(args.data) / "vocab" / "users.parquet").column("user_id").to_pylist()]
    users = [users[i] for i in np.random.default_rng(0).permutation(len(users))]
    load(args.url, users, 1, min(20, args.requests), args.max_seconds, args.k)  # warm-up
    for clients in (int(c) for c in args.clients.split(",")):
        print(json.dumps(load(args.url, users, clients, args.requests, args.max_seconds, args.k)), flush=True)


if __name__ == "__main__":
    main()
