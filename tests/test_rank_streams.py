"""Each DDP rank draws its own random stream (dropout masks, sampled negatives), and a resumed
DDP run gets every rank's stream back, so it replays the run it continues."""

import json
from pathlib import Path

import numpy as np
import torch
from loopback_ranks import spawn_on_loopback

from flm_dist.config import load_config
from flm_dist.train import distributed
from flm_dist.train.configs import PretrainConfig
from flm_dist.train.loop import prepare_run_dir, train_loop
from flm_dist.train.session import LocalSession
from flm_dist.train.streams import give_ranks_their_own_streams, restore_rng_state, rng_state

WORLD = 2
SEED = 7


def _streams_on_rank(rank: int, world: int, init_method: str, directory: str) -> None:
    torch.set_num_threads(1)
    with distributed.process_group(rank, world, init_method):
        torch.manual_seed(SEED)
        model_init = torch.rand(3)  # what building the model draws: the same on every rank
        give_ranks_their_own_streams(SEED, 0)
        first = torch.rand(5)
        by_rank = distributed.all_gather_objects(rng_state())
        after_checkpoint = torch.rand(4)
        restore_rng_state({"rng": by_rank[0], "rng_by_rank": by_rank}, SEED, 5)
        replayed = torch.rand(4)
        restore_rng_state({"rng": by_rank[0]}, SEED, 5)  # a checkpoint with rank 0's stream only
        old_format = torch.rand(4)
        Path(directory, f"rank{rank}.json").write_text(json.dumps(
            {"model_init": model_init.tolist(), "first": first.tolist(), "after": after_checkpoint.tolist(),
             "replayed": replayed.tolist(), "old_format": old_format.tolist()}))
    distributed.exit_rank_process()


def test_ranks_build_the_same_model_then_draw_their_own_streams_and_resume_them(tmp_path):
    spawn_on_loopback(_streams_on_rank, WORLD, str(tmp_path))
    zero, one = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD))
    torch.manual_seed(SEED)
    torch.rand(3)
    assert zero["first"] == torch.rand(5).tolist()  # rank 0 keeps the stream of a single process
    assert zero["model_init"] == one["model_init"] and zero["first"] != one["first"]
    for rank in (zero, one):
        assert rank["replayed"] == rank["after"]
    # From rank 0's stream alone, rank 0 replays and rank 1 still draws its own.
    assert zero["old_format"] == zero["after"] and one["old_format"] != zero["old_format"]


class _RankSlice(LocalSession):
    """Every other user of each split: what Ray Data would hand one of two ranks."""

    def read_split(self, name):
        table = super().read_split(name)
        return table.take(np.arange(distributed.rank(), table.num_rows, distributed.world_size()))


def _train_on_rank(rank: int, world: int, init_method: str, config: PretrainConfig, weights_path: str) -> None:
    torch.set_num_threads(1)
    with distributed.process_group(rank, world, init_method):
        train_loop(config, _RankSlice(config.data, config.output))
        if rank == 0:
            (checkpoint,) = sorted(Path(config.output, "checkpoints").glob("checkpoint_*"))[-1:]
            torch.save(torch.load(checkpoint / "state.pt", weights_only=True)["model"], weights_path)
    distributed.exit_rank_process()


def _config(tiny_data, output, *overrides) -> PretrainConfig:
    return load_config(PretrainConfig, None, [
        f"data={tiny_data}", f"output={output}", "model.hidden=16", "model.max_len=12", "model.flow_hidden=16",
        "model.dropout=0.3", "train.batch_size=32", "train.epochs=2", "train.warmup_steps=0", "loss.cf=0",
        "loss.fused=0", "loss.flow=0", "eval.user_source=sequence", "scaling.workers=0", *overrides])


def test_a_ddp_run_stopped_and_resumed_ends_with_the_weights_of_one_run_straight_through(tiny_data, tmp_path):
    straight = _config(tiny_data, tmp_path / "straight")
    prepare_run_dir(straight)
    spawn_on_loopback(_train_on_rank, WORLD, straight, str(tmp_path / "straight.pt"))
    # A budget of a millisecond stops the run after its first epoch, with the same LR schedule.
    stopped = _config(tiny_data, tmp_path / "resumed", "train.time_budget_minutes=1e-5")
    prepare_run_dir(stopped)
    spawn_on_loopback(_train_on_rank, WORLD, stopped, str(tmp_path / "stopped.pt"))
    resumed = _config(tiny_data, tmp_path / "resumed")
    spawn_on_loopback(_train_on_rank, WORLD, resumed, str(tmp_path / "resumed.pt"))

    metrics = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert metrics["resumed_at_steps"] and metrics["resumed_at_steps"][0] > 0
    expected, stopped_weights, got = (torch.load(tmp_path / f"{run}.pt", weights_only=True)
                                      for run in ("straight", "stopped", "resumed"))
    assert expected.keys() == got.keys()
    assert any(not torch.equal(expected[k], stopped_weights[k]) for k in expected)  # the second epoch trained
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
