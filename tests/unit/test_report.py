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
    assert ceilings["int8"] > 1  # ONNX Runtime's MatMulInteger runs on every x86 CPU, VNNI or not


def test_only_native_matrix_units_are_timed_in_pytorch():
    from rankserve.optimize.report import native_matrix_units

    assert native_matrix_units(["avx2", "fma"]) == {"fp32"}  # an AVX2-only CPU: BF16/INT8 would be emulated
    assert native_matrix_units(["avx512f", "avx512_vnni", "avx512_bf16"]) == {"fp32", "bf16", "int8"}
    assert native_matrix_units(["amx_bf16", "amx_int8", "amx_tile"]) == {"fp32", "bf16", "int8"}
    assert native_matrix_units(["avx_vnni"]) == {"fp32", "int8"}


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
    for r in report["variants"]:  # the distance to the ceiling at the workload's real lengths (issue 15's target) and at length 64
        assert r["achieved_gflops_b32_workload"] == pytest.approx(r["gflop_per_pair_workload"] * r["throughput_workload"][32])
        assert r["fraction_of_ceiling_workload"] == pytest.approx(r["achieved_gflops_b32_workload"] / report["machine"]["gemm_gflops"][r["ceiling"]])
    # each variant as Triton serves it: ready on a new host, cold and warm, through the runtime
    # cache its first load filled; the rank stub's memory within its estimate
    assert report["server_ready_s"] > 0 and report["page_cache_evicted"]
    for r in report["variants"][1:]:
        assert r["first_s"] > 0 and r["cold_s"] > 0 and r["warm_s"] > 0 and r["first_request_ms"] > 0 and r["second_request_ms"] > 0
        v = manifest["variants"][r["variant"]]
        if v["runtime"] == "onnxruntime" and not v["cache_optimized_model"]:  # static INT8: loaded as built
            assert r["cache_mb"] == 0 and v["precision"] == "int8", r["variant"]
        else:
            assert r["cache_mb"] > 0, r["variant"]
        assert 0 < r["stub_private_mb"] < r["stub_rss_mb"] <= r["estimate_mb"], r["variant"]
        assert 0 < r["stub_rss_first_mb"] <= r["estimate_mb"], r["variant"]
    assert any(not v["cache_optimized_model"] for v in manifest["variants"].values() if v["precision"] == "int8")
    assert set(report["ratios_vs_fp32"]) == set(served) - {"fp32"}
    for name in ("report.md", "report.json", "speed_vs_ndcg.png", "throughput_vs_batch.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| fraction, workload |" in md and "| pytorch_fp32_eager | fp32 |" in md
    assert "| int8 |" in md and "## Ready time and memory as Triton serves each variant" in md
    # the INT8 QDQ models side by side: the ONNX Runtime ladder (CPU) and ModelOpt's (TensorRT)
    assert [r["variant"] for r in report["int8"]] == [n for n in manifest["variants"] if n in ("int8", "pruned_int8", "int8_trt")]
    assert "| int8_trt | nvidia-modelopt ONNX PTQ |" in md and "| int8 | onnxruntime quantize_static |" in md
