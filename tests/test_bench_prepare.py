"""The prepare benchmark runs end to end on a small log and prints one JSON line of sane numbers."""

import json
import math

from flm_dist.bench.prepare import run_bench_prepare


def test_bench_prepare_smoke(ray_session, tmp_path, capsys):
    result = run_bench_prepare(20_000, str(tmp_path))
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == result
    assert result["rows"] == 20_000 and result["input_bytes"] > 0 and result["cores"] >= 1
    assert result["prepare_rows_per_s"] > 0 and result["baseline_rows_per_s"] > 0
    assert math.isfinite(result["ratio"]) and result["ratio"] > 0
    assert result["prepare_cpu_s"] > 0 and result["baseline_cpu_s"] > 0 and math.isfinite(result["cpu_ratio"])
    assert result["prepare_peak_bytes"] > 0 and result["baseline_peak_bytes"] > 0
    assert {"parse", "dedup", "build", "total"} <= set(result["stages_s"])
    assert (tmp_path / "prepared-20000" / "manifest.json").exists()
