"""reports/optimization/speed_vs_ndcg.png (issue 18, item 11): the Pareto front of speed and NDCG@10,
and labels that do not print over each other, with figures like the real report's, where
pytorch_fp32_eager, fused and fp32 sit almost on one point."""

from __future__ import annotations

import itertools

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

from rankserve.optimize.report import (REFERENCE, pareto_front, pareto_variants, render_markdown,  # noqa: E402
                                       speed_vs_ndcg_figure, text_box)

# pairs/s at batch 32, length 64 and NDCG@10 of the README's demo builds: the AVX2 build log (fp32 156,
# fused 154, int8_dynamic 224 at NDCG@10 0.9853 / 0.9853 / 0.9844) and the AVX512 `make report` table
# for the variants the demo does not build
REAL = {REFERENCE: (150.0, 0.9853), "fp32": (156.0, 0.9853), "fused": (154.0, 0.9853), "int8_dynamic": (224.0, 0.9844),
        "int8": (519.0, 0.9796), "bf16": (568.0, 0.9877), "pruned": (442.0, 0.9719), "pruned_int8": (791.0, 0.9683)}


def _rows(points):
    return [{"variant": n, "throughput_fixed": {32: x}, "ndcg@10": y} for n, (x, y) in points.items()]


def test_the_pareto_front_keeps_only_variants_nothing_beats_on_both():
    assert pareto_front({"a": (1, 0.9), "b": (2, 0.8), "c": (1, 0.8), "d": (2, 0.9)}) == ["d"]
    assert pareto_front({"a": (1, 0.9), "b": (2, 0.8)}) == ["b", "a"]  # a trade-off: both, fastest first
    assert pareto_front({"a": (1, 0.9), "b": (1, 0.9)}) == ["a", "b"]  # equal points: neither dominates the other
    assert pareto_front({"a": (1, 0.9), "b": (1, 0.91)}) == ["b"]  # as fast and better
    assert pareto_front({}) == []


def test_on_the_real_figures_the_front_is_the_variants_worth_serving():
    front = pareto_variants(_rows(REAL))
    assert front == ["pruned_int8", "bf16"]  # bf16 is faster and better than fp32, fused, int8_dynamic, int8 and pruned
    without_bf16 = pareto_variants(_rows({n: p for n, p in REAL.items() if n != "bf16"}))  # a CPU without BF16 units
    assert without_bf16 == ["pruned_int8", "int8", "int8_dynamic", "fp32"]
    assert REFERENCE not in pareto_variants(_rows({REFERENCE: (999.0, 1.0), **REAL}))  # the baseline is never served


def test_the_report_table_says_which_variants_are_on_the_front():
    rows = [{**r, "runtime": "rt", "precision": "fp32", "layers": 6, "file_mb": 1.0, "load_s": 0.1, "model_peak_mb": 1.0,
             "latency_b1_ms": 1.0, "speedup_vs_pytorch_b32_len64": 1.0, "mrr": 0.9, "top10_overlap": 1.0, "kendall_tau": 1.0,
             "throughput_workload": {8: 1.0, 32: 1.0, 64: 1.0}, "throughput_fixed": {8: 1.0, 32: r["throughput_fixed"][32], 64: 1.0},
             "mean_tokens": {8: 40.0, 32: 40.0, 64: 40.0}, "ceiling": "fp32", "gflop_per_pair_workload": 1.0,
             "achieved_gflops_b32_workload": 1.0, "fraction_of_ceiling_workload": 0.5, "achieved_gflops_b32_len64": 1.0,
             "fraction_of_ceiling": 0.5} for r in _rows(REAL)]
    report = {"machine": {"cpu": "x", "cores": 2, "flags": [], "gemm_gflops": {"fp32": 2.0}}, "default_variant": "fp32",
              "fixed_length": 64, "variants": rows, "gpu_only": {}, "pareto": pareto_variants(rows)}
    md = render_markdown(report)
    assert "| bf16 | rt | fp32 | 6 |" in md and md.split("| bf16 |")[1].split("\n")[0].endswith("| **yes** |")
    assert md.split("| fused |")[1].split("\n")[0].endswith("| dominated |")
    assert md.split(f"| {REFERENCE} |")[1].split("\n")[0].endswith("| reference |")
    assert "fastest first: pruned_int8, bf16." in md


@pytest.mark.parametrize("points", [REAL, {n: p for n, p in REAL.items() if n in (REFERENCE, "fp32", "fused")},
                                    {REFERENCE: (131.0, 0.9876), "fp32": (131.5, 0.9876), "fused": (131.2, 0.9876),
                                     "int8_dynamic": (132.0, 0.9875), "bf16": (131.8, 0.9877)}])
def test_no_two_labels_overlap_even_when_points_coincide(points, tmp_path):
    report = {"variants": _rows(points), "fixed_length": 64}
    fig, labels = speed_vs_ndcg_figure(report)
    fig.savefig(tmp_path / "speed_vs_ndcg.png", dpi=110)  # drawn on Agg, as `rankserve report` saves it
    renderer = fig.canvas.get_renderer()
    boxes = {t.get_text(): text_box(t, renderer) for t in labels}
    assert sorted(boxes) == sorted(points)
    for (a, box_a), (b, box_b) in itertools.combinations(boxes.items(), 2):
        assert not box_a.overlaps(box_b), (a, b, box_a, box_b)
    frame = fig.bbox
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in boxes.values())
