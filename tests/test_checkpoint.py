import os
import pickle

import pytest
import torch

from flm_dist.train.checkpoint import CheckpointError, load_checkpoint, newest_valid, save_checkpoint, verify_checkpoint


def _save(path, step):
    return save_checkpoint(path, {"model": {"w": torch.arange(4.0) * step}, "step": step},
                           {"step": step, "epoch": 0, "config": {}, "vocab_hash": "h"})


def test_round_trip(tmp_path):
    _save(tmp_path / "c", 3)
    state, meta = load_checkpoint(tmp_path / "c")
    assert torch.equal(state["model"]["w"], torch.arange(4.0) * 3) and meta["step"] == 3


def test_torn_checkpoints_are_detected_and_skipped(tmp_path):
    good, truncated, missing = (_save(tmp_path / f"checkpoint_{i}", i) for i in (1, 2, 3))
    with open(truncated / "state.pt", "r+b") as handle:
        handle.truncate(10)
    os.remove(missing / "state.pt")
    assert "truncated" in verify_checkpoint(truncated)
    assert "missing" in verify_checkpoint(missing)
    assert newest_valid([good, truncated, missing]) == good
    with pytest.raises(CheckpointError):
        load_checkpoint(truncated)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/flm_pwned",))


def test_malicious_pickle_is_refused(tmp_path):
    directory = _save(tmp_path / "c", 1)
    with open(directory / "state.pt", "wb") as handle:
        pickle.dump({"model": _Exploit()}, handle)
    # Re-sign the file so only the unpickling guard stands between the payload and execution.
    import hashlib
    import json
    meta = json.loads((directory / "checkpoint.json").read_text())
    data = (directory / "state.pt").read_bytes()
    meta["files"]["state.pt"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (directory / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_checkpoint(directory)
    assert not os.path.exists("/tmp/flm_pwned")
