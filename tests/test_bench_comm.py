import pytest

from flm_dist.bench.comm import run_bench_comm
from flm_dist.config import ConfigKeyError, load_config
from flm_dist.train.configs import PretrainConfig


def test_rows_exchange_reproduces_dense_ddp_on_two_processes(capsys):
    # Two gloo processes train from the same parameters and batches with the whole model
    # all-reduced (dense), then with the item table's touched rows all-gathered (rows).
    result = run_bench_comm(items=2000, dim=16, workers=2, batch_size=16, max_len=8, num_negatives=32,
                            steps=3, warmup=1)
    assert result["rows_vs_dense_max_abs_diff"] < 1e-6
    assert result["rows_max_rank_disagreement"] == 0.0
    # A rank touches at most its 16 x 9 window items and 3 x 32 negatives (seq, cf, fused).
    assert 0 < result["rows_touched_per_rank_per_step"] <= 16 * 9 + 3 * 32
    assert result["item_table_bytes"] == 2001 * 16 * 4
    assert result["rows_total_bytes_per_step"] == (result["dense_allreduce_bytes_per_step"] - result["item_table_bytes"]
                                                   + result["rows_gather_bytes_per_step"])
    assert result["dense_over_rows_bytes"] > 1
    assert '"rows_step_ms"' in capsys.readouterr().out


def test_rows_exchange_needs_sampled_softmax():
    with pytest.raises(ConfigKeyError, match="train.item_grad_exchange"):
        load_config(PretrainConfig, None, ["data=d", "output=o", "train.item_grad_exchange=rows"])
    config = load_config(PretrainConfig, None, ["data=d", "output=o", "train.item_grad_exchange=rows",
                                                "loss.softmax=sampled"])
    assert config.train.item_grad_exchange == "rows"
