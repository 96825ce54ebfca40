import math

import pytest

from flm_dist.bench.train import run_bench_train
from flm_dist.config import load_config
from flm_dist.train.configs import PretrainConfig
from flm_dist.train.flops import matmul_peak_flops, step_flops


def _config(data, output, *overrides):
    return load_config(PretrainConfig, None, [f"data={data}", f"output={output}", "model.hidden=16",
                                              "model.max_len=12", "model.flow_hidden=16",
                                              "train.batch_size=32", *overrides])


@pytest.mark.parametrize("softmax", ["full", "sampled"])
def test_bench_train_prints_sane_numbers(tiny_data, tmp_path, capsys, softmax):
    result = run_bench_train(_config(tiny_data, tmp_path, f"loss.softmax={softmax}",
                                     "loss.num_negatives=16"), steps=3, warmup=1)
    assert result["sequences_per_s"] > 0 and result["items_per_s"] >= result["sequences_per_s"]
    assert math.isclose(result["step_ms"], result["data_ms"] + result["compute_ms"], rel_tol=1e-9)
    assert 0.0 <= result["data_wait_fraction"] < 1.0
    assert result["model_tflops_per_s"] > 0
    assert result["mfu"] is None  # no known peak for a CPU
    assert result["peak_tflops_per_s"] > 0
    assert math.isclose(result["peak_fraction"], result["model_tflops_per_s"] / result["peak_tflops_per_s"])
    assert '"sequences_per_s"' in capsys.readouterr().out


def test_bench_train_profile_names_the_operators_that_take_the_time(tiny_data, tmp_path):
    profile = run_bench_train(_config(tiny_data, tmp_path), steps=1, warmup=1, profile_steps=2,
                              profile_ops=1000)["profile"]
    assert len({row["op"] for row in profile}) == len(profile) > 5
    shares = [row["share"] for row in profile]
    assert shares == sorted(shares, reverse=True) and sum(shares) == pytest.approx(1.0)
    assert all(row["self_ms_per_step"] >= 0 and row["calls_per_step"] > 0 for row in profile)
    assert {"aten::mm", "aten::addmm"} & {row["op"] for row in profile}


def test_step_flops_counts_the_softmax():
    config = load_config(PretrainConfig, None, ["data=d", "output=o", "model.hidden=8", "model.layers=1",
                                                "loss.cf=0", "loss.fused=0", "loss.flow=0"])
    tokens, hidden = 20, 8
    expected = 6 * (tokens * (12 * hidden * hidden + 2 * 5 * hidden) + tokens * 100 * hidden)
    assert step_flops(4, 5, config, num_items=100) == expected


@pytest.mark.parametrize("mixer,last_block", [
    # QKV at every position, output and feed-forward at the last, one query's scores over 5
    ("attention", 20 * 3 * 64 + 4 * (64 + 2 * 5 * 8 + 8 * 64)),
    ("bsarec", 20 * (3 * 64 + 5 * 8) + 4 * (64 + 2 * 5 * 8 + 8 * 64)),
    ("fmlp", 20 * 5 * 8 + 4 * 8 * 64)])
def test_step_flops_of_prefix_windows_count_the_filter_and_the_last_block_at_the_last_position(mixer, last_block):
    config = load_config(PretrainConfig, None, ["data=d", "output=o", "model.hidden=8", "model.layers=2",
                                                "loss.cf=0", "loss.fused=0", "loss.flow=0", f"model.mixer={mixer}",
                                                "train.windows=prefixes"])
    first_block = 20 * {"attention": 12 * 64 + 2 * 5 * 8, "bsarec": 12 * 64 + 2 * 5 * 8 + 5 * 8,
                        "fmlp": 8 * 64 + 5 * 8}[mixer]
    assert step_flops(4, 5, config, num_items=100) == 6 * (first_block + last_block + 4 * 100 * 8)


def test_the_matmul_peak_is_measured_per_precision():
    import torch

    fp32 = matmul_peak_flops(torch.device("cpu"), bf16=False)
    assert fp32 > 1e8  # any CPU multiplies 2048 x 2048 faster than in a minute and a half
    assert matmul_peak_flops(torch.device("cpu"), bf16=False) == fp32  # measured once per process
    assert matmul_peak_flops(torch.device("cpu"), bf16=True) != fp32


def test_gpu_bench_script_runs_its_stages_in_smoke_mode(tiny_data, tiny_cold_data, tmp_path):
    """jobs/bench_gpu.sh is what a lent GPU runs; BENCH_SMOKE=1 runs its quality, presets,
    variants and topk stages for a few steps here so the script cannot rot between GPU sessions.
    The peer is a stand-in that prints RecBole's result line."""
    import json
    import os
    import subprocess
    from pathlib import Path

    import torch

    out, peer = tmp_path / "out", tmp_path / "peer"
    peer.mkdir()
    (peer / "run_recbole.py").write_text(
        "import json, sys\nprint('loading')\n"
        "print(json.dumps({'peer': 'recbole-sasrec', 'dataset': sys.argv[1], 'epochs': sys.argv[2]}))\n")
    env = {**os.environ, "OUT": str(out), "BENCH_SMOKE": "1", "BEAUTY": tiny_data, "OMP_NUM_THREADS": "1",
           "TOYS_ATTRIBUTES": tiny_cold_data, "BEAUTY_ATTRIBUTES": str(tmp_path / "missing"),
           "SPORTS_ATTRIBUTES": str(tmp_path / "missing"), "PEER": str(peer)}
    root = Path(__file__).resolve().parents[1]
    subprocess.run(["bash", "jobs/bench_gpu.sh", "quality", "presets", "variants", "topk"], cwd=root, env=env,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    quality = [json.loads(line) for line in (out / "quality.jsonl").read_text().splitlines()]
    native_bf16 = torch.cpu._is_avx512_bf16_supported()  # else bf16 falls back to fp32
    assert [row["precision"] for row in quality] == ["bf16" if native_bf16 else "fp32", "fp32"]
    for row in quality:
        assert row["epochs"] == 2 and not row["reached"] and row["train_seconds"] > 0
        assert 0.0 <= row["test/ndcg@10/full_nomask"] <= row["test/hr@10/full_nomask"] <= 1.0
    (topk,) = [json.loads(line) for line in (out / "topk.jsonl").read_text().splitlines()]
    assert topk["items"] == 20000 and topk["topk_users_per_s"] > 0
    ours, recbole = [json.loads(line) for line in (out / "presets.jsonl").read_text().splitlines()]
    assert ours["set"] == "toys" and ours["epochs"] == 2 and not ours["reached"]
    assert recbole == {"peer": "recbole-sasrec", "dataset": "Toys_and_Games", "epochs": "1", "set": "toys"}
    assert "skipped beauty" in (out / "presets.log").read_text()
    variants = [json.loads(line) for line in (out / "variants.jsonl").read_text().splitlines()]
    assert [row["variant"] for row in variants] == ["large_batch", "cudnn_attention"]  # compile: not in smoke
    assert all(row["epochs"] == 2 and not row["reached"] for row in variants)
    assert set((out / "stages.txt").read_text().split()[::3]) == {"quality:", "presets:", "variants:", "topk:"}
