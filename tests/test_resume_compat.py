"""A run started before a model option existed still resumes: the missing key means the option
was off, as its default is."""

import json

from flm_dist.config import load_config
from flm_dist.train.configs import PretrainConfig
from flm_dist.train.pretrain import run_pretrain

SMALL = ["model.hidden=16", "model.max_len=12", "model.flow_hidden=16", "train.batch_size=64",
         "scaling.workers=0", "loss.cf=0", "loss.fused=0", "loss.flow=0", "eval.user_source=sequence"]


def test_a_checkpoint_without_newer_model_keys_resumes(tiny_data, tmp_path):
    run = tmp_path / "run"
    run_pretrain(load_config(PretrainConfig, None, [f"data={tiny_data}", f"output={run}", *SMALL, "train.epochs=1"]))
    (checkpoint,) = sorted((run / "checkpoints").glob("checkpoint_*"))
    meta = json.loads((checkpoint / "checkpoint.json").read_text())
    for key in ("mixer", "filter_alpha", "filter_cutoff", "item_features"):
        del meta["config"]["model"][key]
    (checkpoint / "checkpoint.json").write_text(json.dumps(meta))

    summary = run_pretrain(load_config(PretrainConfig, None,
                                       [f"data={tiny_data}", f"output={run}", *SMALL, "train.epochs=2"]))
    assert summary["resumed_at_steps"] == [meta["step"]] and len(summary["history"]) == 2
