"""A short bench on the tiny ranker: all three setups measured, ratios and files written."""

import json

import pytest

from rankserve.bench.run import format_bench, run_bench

pytestmark = [pytest.mark.triton, pytest.mark.slow]


def test_bench_measures_three_setups_side_by_side(tiny_repo, tiny_ranker, tmp_path):
    result = run_bench(tiny_repo, tiny_ranker, tmp_path, concurrency=2, duration_s=2, log=lambda _m: None)
    names = [s["name"] for s in result["setups"]]
    assert names[0].startswith("triton_ensemble_") and names[1].startswith("model_alone_in_process_")
    assert names[2] == "naive_fastapi_pytorch_fp32_pad128"
    for s in result["setups"]:
        assert s["requests"] > 0 and s["errors"] == 0 and s["pairs_per_s"] > 0
        assert s["p50_ms"] <= s["p95_ms"] <= s["p99_ms"] and s["rss_mb"] > 0 and s["cpu_percent"] >= 0
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert [s["name"] for s in saved] == names
    assert set(json.loads((tmp_path / "ratios.json").read_text())) == {"triton_vs_in_process", "triton_vs_naive", "triton_p95_vs_naive_p95"}
    assert (tmp_path / "bench.png").stat().st_size > 0 and "Triton / naive" in format_bench(result)
