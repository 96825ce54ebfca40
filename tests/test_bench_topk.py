import json

from flm_dist.bench.topk import run_bench_topk
from flm_dist.cli.main import main


def test_bench_topk_prints_sane_numbers(capsys):
    result = run_bench_topk(items=3000, users=40, dim=8, k=10, batch_size=16, max_score_elements=16 * 500,
                            history=5)
    assert result["chunk_items"] == 500 and result["chunks_per_batch"] == 6
    assert result["topk_users_per_s"] > 0 and result["rank_users_per_s"] > 0
    assert result["peak_scoring_memory_gb"] >= 0 and result["inputs_gb"] > 0
    assert json.loads(capsys.readouterr().out)["items"] == 3000


def test_bench_topk_command(capsys):
    assert main(["bench", "topk", "--items", "500", "--users", "8", "--dim", "4", "--k", "5"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["chunk_items"] == 500 and result["users"] == 8
