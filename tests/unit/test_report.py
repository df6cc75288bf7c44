"""``rankserve report`` on the tiny ranker's variants: every figure measured, files written."""

import json

import pytest

from rankserve.optimize.report import flops_per_pair, gemm_ceilings, run_report

pytestmark = pytest.mark.slow

MINILM = {"hidden_size": 384, "intermediate_size": 1536}


def test_flops_per_pair_matches_the_hand_count():
    # 6 layers x (2 * (4*384^2 + 2*384*1536) * 64 tokens + 4 * 64^2 * 384) = 1.397 GFLOP (the notes: 1.40)
    assert flops_per_pair(MINILM, 6, 64) == pytest.approx(1.3967e9, rel=1e-3)
    assert flops_per_pair(MINILM, 3, 64) == pytest.approx(flops_per_pair(MINILM, 6, 64) / 2)


def test_gemm_ceilings_are_measured():
    ceilings = gemm_ceilings(n=256)
    assert ceilings["fp32"] > 1 and set(ceilings) <= {"fp32", "bf16", "int8"}


def test_report_measures_every_served_variant_and_the_pytorch_baseline(tiny_variants_repo, dataset, tmp_path):
    dataset.save(tmp_path / "data")
    report = run_report(tiny_variants_repo, tmp_path / "data", tmp_path / "report", log=lambda _m: None)
    manifest = json.loads((tiny_variants_repo / "manifest.json").read_text())
    served = [n for n, v in manifest["variants"].items() if v["served_on_cpu"]]
    assert [r["variant"] for r in report["variants"]] == ["pytorch_fp32_eager"] + served
    for r in report["variants"]:
        assert r["load_s"] > 0 and r["model_peak_mb"] > 0 and r["peak_rss_mb"] > r["model_peak_mb"] and r["latency_b1_ms"] > 0
        assert all(r["throughput_fixed"][b] > 0 and r["throughput_workload"][b] > 0 for b in (8, 32, 64))
    assert report["variants"][0]["speedup_vs_pytorch_b32_len64"] == pytest.approx(1.0)
    for name in ("report.md", "report.json", "speed_vs_ndcg.png", "throughput_vs_batch.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    assert "| int8 |" in (tmp_path / "report" / "report.md").read_text()
