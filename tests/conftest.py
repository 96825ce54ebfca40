"""One Ray instance per test session, on loopback, small; tiny data everywhere."""

import os

# Before any `import ray`: bind Ray to 127.0.0.1 and never retry worker-group starts forever.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "120")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray Train's controller takes a worker's report only when it polls (every 2 s by default) and
# a worker's next report waits for that: with tiny data, reports every few steps would spend
# most of a fit waiting. Propagated by Ray Train from each driver to its controller.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Ray Data's Parquet reader starts this many footer-reading actors (32 by default), each a new
# Python process, for every read; tiny test splits need one. Inherited by every Ray process the
# tests start.
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

from pathlib import Path

import pytest
import torch

# Two test processes (pytest and a Ray worker) share 2 cores: one thread each is several times
# faster than both oversubscribing, and makes float reductions the same in every process.
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip, with the reason, where no CUDA device is visible."""
    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_gpu)


@pytest.fixture(autouse=True)
def _flm_logger_reaches_caplog():
    """Tests that go through the CLI call `setup_logging`, which gives the flm_dist logger its own
    handler and stops propagation; restore it so later tests' `caplog` sees its records."""
    yield
    import logging

    logger = logging.getLogger("flm_dist")
    logger.handlers.clear()
    logger.propagate = True
    logger.setLevel(logging.NOTSET)


@pytest.fixture(scope="session")
def ray_session():
    """Start Ray once for the whole session (4-7 s on 2 cores); tests that need it ask for it."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, object_store_memory=256 * 1024**2, include_dashboard=True,
                 log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The public datasets beside the project; tests using them skip if the folder is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, ray_session) -> str:
    """A learnable synthetic log (300 users, 120 items), prepared once for the whole session."""
    from flm_dist.data.prepare import PrepareConfig, run_prepare
    from flm_dist.data.synth import SynthConfig, run_synth

    root = tmp_path_factory.mktemp("tiny")
    run_synth(SynthConfig(output=str(root / "log"), users=300, items=120, interactions=6000, seed=1))
    run_prepare(PrepareConfig(input=str(root / "log"), format="parquet", output=str(root / "data")))
    return str(root / "data")


@pytest.fixture(scope="session")
def tiny_cold_data(tiny_data) -> str:
    """`tiny_data`'s log with item features (two fields of 6 and 4 values, by item id) and a tenth
    of the items held out as cold (issue 32)."""
    import json

    from flm_dist.data.cold_items import ColdItemsConfig
    from flm_dist.data.item_features import ItemFeaturesConfig
    from flm_dist.data.prepare import PrepareConfig, run_prepare

    root = Path(tiny_data).parent
    (root / "item2attributes.json").write_text(json.dumps({str(i): [i % 6, 10 + i % 4] for i in range(1, 121)}))
    run_prepare(PrepareConfig(input=str(root / "log"), format="parquet", output=str(root / "cold_data"),
                              item_features=ItemFeaturesConfig(uri=str(root / "item2attributes.json")),
                              cold_items=ColdItemsConfig(fraction=0.1, seed=0)))
    return str(root / "cold_data")
