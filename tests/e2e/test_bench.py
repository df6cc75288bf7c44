"""A short bench on the tiny ranker: every setup measured side by side, the baseline shown to be the
same model, ratios, targets and files written."""

import json

import pytest

from rankserve.bench.run import TARGETS, format_bench, run_bench

pytestmark = [pytest.mark.triton, pytest.mark.slow]


def test_bench_measures_every_setup_side_by_side(tiny_repo, tiny_ranker, tmp_path):
    result = run_bench(tiny_repo, tiny_ranker, tmp_path, concurrency=2, duration_s=2, log=lambda _m: None)
    manifest = json.loads((tiny_repo / "manifest.json").read_text())
    triton, in_process, baseline, naive = result["setups"]
    assert triton["name"] == f"triton_ensemble_{manifest['default_variant']}" and triton["model"] == "ranker"
    assert triton["variant"] == manifest["default_variant"] and "reference" not in triton
    assert in_process["name"].startswith("model_alone_in_process_")
    assert baseline["name"] == "pytorch_fastapi_dynamic_batching_" + baseline["precision"]
    assert baseline["precision"] in ("fp32", "bf16") and baseline["max_pairs"] == 32
    assert baseline["max_length"] == 64  # the repository's tokenize.max_length (tiny preset), not the default 128
    assert baseline["model_calls"] > 0 and 1 <= baseline["pairs_per_call"] <= 32
    check = baseline["check"]
    assert check["passed"] and check["requests"] == 5 and check["reference"] == "ranker_fp32"
    if baseline["precision"] == "fp32":
        assert check["max_abs_diff"] <= 1e-3 and check["top10_overlap"] == 1.0
    assert naive["name"] == "naive_fastapi_pytorch_fp32_pad128"
    for s in result["setups"]:
        assert s["requests"] > 0 and s["errors"] == 0 and s["pairs_per_s"] > 0
        assert s["p50_ms"] <= s["p95_ms"] <= s["p99_ms"] and s["rss_mb"] > 0 and s["cpu_percent"] >= 0
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert [s["name"] for s in saved] == [s["name"] for s in result["setups"]]
    ratios = json.loads((tmp_path / "ratios.json").read_text())
    assert set(ratios) == {"triton_vs_baseline", "triton_vs_in_process", "triton_p95_vs_baseline_p95",
                           "triton_vs_naive", "triton_p95_vs_naive_p95"}
    assert ratios["triton_vs_baseline"] == pytest.approx(triton["pairs_per_s"] / baseline["pairs_per_s"])
    targets = json.loads((tmp_path / "targets.json").read_text())
    assert set(targets["targets"]) == set(TARGETS) and targets["baseline_check"]["passed"]
    for key, t in targets["targets"].items():
        assert t["passed"] == (t["value"] >= TARGETS[key])
    text = format_bench(result)
    assert "the same model" in text and "(target >= 3x)" in text and "(target >= 0.9)" in text and "footnote" in text
    assert (tmp_path / "bench.png").stat().st_size > 0
