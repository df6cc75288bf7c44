"""``rankserve report``: every variant side by side, measured on this machine in one run.

Writes ``report.md`` (tables), ``report.json`` (one object per variant) and PNG plots (speed vs
NDCG@10; throughput vs batch size) to ``reports/optimization/``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from rankserve.optimize.gate import passed_gate
from rankserve.optimize.measure import BATCHES, FIXED_LENGTH
from rankserve.train.metrics import evaluate

TARGET_BATCH = 32
LARGE_PARAMETERS = 100e6
"""Above this, each variant is timed with fewer repeats (a 560M ranker scores a few pairs a second here)."""


def gemm_ceilings(n: int = 2048, threads: int = 0) -> dict[str, float]:
    """Measured dense matrix-multiply ceilings in GFLOP/s: the best of PyTorch, OpenVINO (oneDNN) and,
    for INT8, ONNX Runtime's ``MatMulInteger`` (MLAS), best of 7 runs each, for FP32, BF16 and INT8
    where present. PyTorch's BF16 and INT8 products are
    timed only where the CPU has the units for them (AVX512-BF16/AMX, VNNI/AMX): elsewhere PyTorch
    emulates them (measured on an AVX2-only EPYC: 2.5 s for one 1024^3 BF16 product, 1.1 s INT8),
    which is no ceiling and took the report past ten minutes; OpenVINO falls back on its own."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    out = {}
    a = torch.randn(n, n)
    units = native_matrix_units()
    for name, x, mm in (
        ("fp32", a, torch.mm),
        ("bf16", a.bfloat16(), torch.mm),
        ("int8", torch.randint(-64, 64, (n, n), dtype=torch.int8), getattr(torch, "_int_mm", None)),
    ):
        if mm is None or name not in units:
            continue
        try:
            out[name] = _best_gflops(n, lambda: mm(x, x))
        except RuntimeError:
            continue
    for name in ("fp32", "bf16", "int8"):  # oneDNN through OpenVINO often beats PyTorch's GEMM here
        best = _openvino_gemm(n, name, threads)
        if best is not None:
            out[name] = max(out.get(name, 0.0), best)
    best = _onnxruntime_int8_gemm(n, threads)  # the kernel int8_dynamic runs; without VNNI it beat oneDNN's
    if best is not None:
        out["int8"] = max(out.get("int8", 0.0), best)
    return out


def _best_gflops(n: int, run) -> float:
    """GFLOP/s of an ``n``^3 product ``run()``: one warm-up, then the best of 7 (a ceiling on a shared machine)."""
    run()
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times) / 1e9


def _onnxruntime_int8_gemm(n: int, threads: int = 0) -> float | None:
    """GFLOP/s of an ``n``^3 ``MatMulInteger`` (MLAS; the kernels ``int8_dynamic`` runs): U8
    activations with S8 and with U8 weights, the faster of the two (without VNNI, U8S8 is the faster
    and the one that saturates: ``QuantSettings.dynamic_weights``)."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, n)).astype(np.uint8)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    best = 0.0
    for w in (rng.integers(-127, 128, (n, n)).astype(np.int8), rng.integers(0, 256, (n, n)).astype(np.uint8)):
        graph = helper.make_graph(
            [helper.make_node("MatMulInteger", ["X", "W"], ["Y"])], "gemm",
            [helper.make_tensor_value_info("X", TensorProto.UINT8, [n, n])],
            [helper.make_tensor_value_info("Y", TensorProto.INT32, [n, n])], [numpy_helper.from_array(w, "W")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        best = max(best, _best_gflops(n, lambda: session.run(None, {"X": x})))
    return best


def _openvino_gemm(n: int, precision: str, threads: int = 0) -> float | None:
    """GFLOP/s of an ``n``^3 MatMul compiled by OpenVINO: FP32, BF16 compute, or INT8 (QDQ)."""
    try:
        import onnx
        import openvino as ov
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32), "W")
    nodes, inits, x_name, w_name = [], [w], "X", "W"
    if precision == "int8":
        inits += [numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")]
        nodes += [helper.make_node("QuantizeLinear", ["X", "s", "z"], ["Xq"]), helper.make_node("DequantizeLinear", ["Xq", "s", "z"], ["Xd"]),
                  helper.make_node("QuantizeLinear", ["W", "s", "z"], ["Wq"]), helper.make_node("DequantizeLinear", ["Wq", "s", "z"], ["Wd"])]
        x_name, w_name = "Xd", "Wd"
    nodes.append(helper.make_node("MatMul", [x_name, w_name], ["Y"]))
    graph = helper.make_graph(nodes, "gemm", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [n, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32", "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    core = ov.Core()
    try:
        request = core.compile_model(core.read_model(model.SerializeToString(), b""), "CPU", config).create_infer_request()
    except Exception:  # noqa: BLE001 - a precision this CPU cannot run
        return None
    x = rng.standard_normal((n, n)).astype(np.float32)
    return _best_gflops(n, lambda: request.infer({0: x}))


def flops_per_pair(config: dict, layers: int, length: float) -> float:
    """Forward FLOPs of one pair at ``length`` tokens: the encoder's matrix products (QKV, output,
    FFN) plus attention scores and weighted sums."""
    h = config.get("hidden_size") or config.get("dim")
    ffn = config.get("intermediate_size") or config.get("hidden_dim")
    per_token = 2 * (4 * h * h + 2 * h * ffn)
    attention = 2 * 2 * length * length * h
    return layers * (per_token * length + attention)


def native_matrix_units(flags: list[str] | None = None) -> set[str]:
    """The precisions this CPU multiplies natively: FP32 always, BF16 with AVX512-BF16 or AMX-BF16,
    INT8 with VNNI (AVX512 or AVX) or AMX-INT8."""
    flags = set(_cpu_flags() if flags is None else flags)
    units = {"fp32"}
    if flags & {"avx512_bf16", "amx_bf16"}:
        units.add("bf16")
    if flags & {"avx512_vnni", "avx_vnni", "amx_int8"}:
        units.add("int8")
    return units


def _cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx512_bf16", "avx512_vnni", "amx", "avx_vnni")) or f == "avx512f")


def _measure(spec: dict) -> dict:
    out = subprocess.run([sys.executable, "-m", "rankserve.optimize.measure", json.dumps(spec)],
                         capture_output=True, text=True, timeout=900, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if out.returncode != 0:
        raise RuntimeError(f"measuring {spec['name']} failed:\n{out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("throughput_workload", "throughput_fixed", "mean_tokens"):  # JSON made the batch sizes strings
        result[key] = {int(b): v for b, v in result[key].items()}
    return result


def run_report(repo: Path, data: Path, out: Path, log=print, heldout_queries: int | None = None) -> dict:
    from rankserve.builder.onnx_files import model_bytes
    from rankserve.builder.repository import verify_repository
    from rankserve.data.catalog import Dataset
    from rankserve.train.finetune import scorer as torch_scorer

    manifest = verify_repository(repo)
    settings = manifest["settings"]
    ranker_dir = Path(manifest["ranker"]["source"])
    config = json.loads((ranker_dir / "config.json").read_text())
    layers = config.get("num_hidden_layers") or config.get("n_layers")
    tokenizer = repo / "tokenize" / "1" / "tokenizer.json"
    large = manifest["ranker"]["parameters"] > LARGE_PARAMETERS
    common = {"tokenizer": str(tokenizer), "data": str(data), "max_length": settings["tokenize"]["max_length"],
              "threads": settings["ort"]["intra_op_threads"], "quick": large}
    if large:
        log(f"a large ranker ({manifest['ranker']['parameters'] / 1e6:.0f}M parameters): fewer timing repeats")
    rows = []

    log("measuring PyTorch FP32 eager (baseline)")
    base = _measure({**common, "name": "pytorch_fp32_eager", "kind": "pytorch", "path": str(ranker_dir)})
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from rankserve.builder.export import load_options

    dataset = Dataset.load(data)
    if heldout_queries:
        dataset = dataset.subset(heldout_queries)
    model = AutoModelForSequenceClassification.from_pretrained(ranker_dir, **load_options(ranker_dir)).eval()
    quality = evaluate(dataset, torch_scorer(model, AutoTokenizer.from_pretrained(ranker_dir, trust_remote_code=False), settings["tokenize"]["max_length"]))
    rows.append({"variant": "pytorch_fp32_eager", "runtime": "pytorch eager", "precision": "fp32", "layers": layers,
                 "file_mb": sum(p.stat().st_size for p in ranker_dir.glob("*.safetensors")) / 2**20,
                 "ndcg@10": quality["ndcg@10"], "mrr": quality["mrr"], "top10_overlap": 1.0, "kendall_tau": 1.0,
                 "gate_passed": None, "gate": "reference", **base})
    for name, v in manifest["variants"].items():
        if not v.get("rank_model"):  # GPU-only, or not loaded by this repository (build --load all)
            continue
        log(f"measuring {name} ({v['runtime']} {v['inference_precision']})")
        path = repo / v["rank_model"] / "1" / "model.onnx"
        m = _measure({**common, "name": name, "kind": "onnx", "path": str(path), "runtime": v["runtime"],
                      "inference_precision": v["inference_precision"]})
        g = v["gate"]
        runtime = v["runtime"] + (" (BF16 compute)" if v["inference_precision"] == "bf16" else "")
        rows.append({"variant": name, "runtime": runtime, "precision": v["precision"],
                     "layers": len(v["kept_layers"]) if "kept_layers" in v else layers,
                     "file_mb": model_bytes(path) / 2**20, "ndcg@10": g["ndcg"], "mrr": g["mrr"],
                     "top10_overlap": g["top_k_overlap"], "kendall_tau": g["kendall_tau"], "gate_passed": g["passed"],
                     "gate": passed_gate(g), **m})
    log("measuring each variant as Triton serves it: ready time (cold: its files evicted from the page cache; warm) and memory")
    from rankserve.builder.memory import estimate_repository
    from rankserve.optimize.readiness import measure_ready

    q = dataset.split("heldout")[0]
    texts = [dataset.products[j.product_id].text for j in dataset.by_query()[q.query_id]][:TARGET_BATCH]
    served = {name: v for name, v in manifest["variants"].items() if v.get("rank_model")}
    ready = measure_ready(repo, served, (q.text, texts), log=log)
    estimate = estimate_repository(repo)
    for r in rows[1:]:
        r.update(ready["variants"][r["variant"]])
        r["estimate_mb"] = estimate.models[served[r["variant"]]["rank_model"]] / 2**20
    log("measuring GEMM ceilings")
    ceilings = gemm_ceilings(threads=settings["ort"]["intra_op_threads"])
    baseline = rows[0]
    for r in rows:
        r["speedup_vs_pytorch_b32_len64"] = r["throughput_fixed"][TARGET_BATCH] / baseline["throughput_fixed"][TARGET_BATCH]
        prec = "int8" if r["precision"].startswith("int8") else ("bf16" if r["precision"] == "bf16" else "fp32")
        gflops = flops_per_pair(config, r["layers"], FIXED_LENGTH) * r["throughput_fixed"][TARGET_BATCH] / 1e9
        r["achieved_gflops_b32_len64"] = gflops
        r["ceiling"] = prec
        r["fraction_of_ceiling"] = gflops / ceilings[prec] if prec in ceilings else None
        real_len = r["mean_tokens"][TARGET_BATCH]
        r["gflop_per_pair_workload"] = flops_per_pair(config, r["layers"], real_len) / 1e9
        r["achieved_gflops_b32_workload"] = r["gflop_per_pair_workload"] * r["throughput_workload"][TARGET_BATCH]
        r["fraction_of_ceiling_workload"] = r["achieved_gflops_b32_workload"] / ceilings[prec] if prec in ceilings else None
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "flags": _cpu_flags(),
                    "gemm_gflops": ceilings},
        "default_variant": manifest["default_variant"],
        "fixed_length": FIXED_LENGTH,
        "variants": rows,
        "gpu_only": {n: v["gate"] for n, v in manifest["variants"].items() if not v["served_on_cpu"]},
        "int8": int8_comparison(manifest),
        "ranker": {k: manifest["ranker"].get(k) for k in ("architecture", "model_type", "family", "parameters", "hidden_size")},
        "server_ready_s": ready["server_ready_s"],
        "page_cache_evicted": ready["page_cache_evicted"],
        "ratios_vs_fp32": ratios_vs_fp32(rows),
    }
    report["pareto"] = pareto_variants(rows)
    for r in rows:
        r["pareto"] = r["variant"] in report["pareto"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(report))
    plot(report, out)
    log(f"wrote {out / 'report.md'}, {out / 'report.json'}, {out / 'speed_vs_ndcg.png'}, {out / 'throughput_vs_batch.png'}")
    return report


READY_KEYS = ("first_s", "cold_s", "warm_s", "stub_rss_mb", "stub_private_mb")


def _rate(x: float) -> str:
    """Pairs per second, with a decimal where the figures are small (large rankers on few cores)."""
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def ratios_vs_fp32(rows: list[dict]) -> dict:
    """Each served variant's ready time (first load, cold, warm) and rank-stub memory as a fraction
    of FP32's, measured in the same run."""
    fp32 = next((r for r in rows if r["variant"] == "fp32"), None)
    if fp32 is None:
        return {}
    return {r["variant"]: {k: r[k] / fp32[k] for k in READY_KEYS if fp32.get(k)}
            for r in rows if r["variant"] not in ("fp32", "pytorch_fp32_eager") and "cold_s" in r}


def int8_comparison(manifest: dict) -> list[dict]:
    """The INT8 QDQ variants of a build side by side: which quantizer, how much of the model is INT8,
    and what it keeps of the FP32 ranking (the ONNX Runtime ladder for CPUs, ModelOpt for TensorRT)."""
    return [{"variant": name, "quantizer": v.get("quantizer", "?"), "quantized_matmuls": v.get("quantized_matmuls", "?"),
             "weight_matmuls": v.get("weight_matmuls", "?"), **{k: v["gate"][k] for k in
             ("ndcg", "relative_drop", "max_drop", "top_k_overlap", "kendall_tau", "passed")},
             "min_top_k_overlap": v["gate"].get("min_top_k_overlap", 0.0)}
            for name, v in manifest["variants"].items() if v["precision"] == "int8" and v.get("gate")]


REFERENCE = "pytorch_fp32_eager"
"""The baseline row: measured for comparison, never served, so never on the Pareto front."""


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """The names whose (speed, quality) no other point dominates (as fast or faster and as good or
    better, one of them strictly): the variants worth serving. Equal points are all kept. Sorted
    fastest first."""
    front = [n for n, (x, y) in points.items()
             if not any((ox >= x and oy >= y) and (ox > x or oy > y) for o, (ox, oy) in points.items() if o != n)]
    return sorted(front, key=lambda n: (-points[n][0], -points[n][1], n))


def pareto_variants(rows: list[dict]) -> list[str]:
    """The served variants on the Pareto front of pairs/s (batch 32, length 64) and NDCG@10."""
    return pareto_front({r["variant"]: (r["throughput_fixed"][TARGET_BATCH], r["ndcg@10"]) for r in rows
                         if r["variant"] != REFERENCE})


def render_markdown(report: dict) -> str:
    m = report["machine"]
    ceilings = ", ".join(f"{k.upper()} {v:,.0f} GFLOP/s" for k, v in m["gemm_gflops"].items())
    lines = [
        "# Optimization report", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, flags {' '.join(m['flags']) or 'none of avx512/vnni/amx'}.",
        f"Measured GEMM ceilings (2048^3 matmul, the best of PyTorch, OpenVINO/oneDNN and, for INT8, ONNX Runtime's MatMulInteger; best of 7): {ceilings}.",
        f"Default `ranker` variant: **{report['default_variant']}**. Each variant measured in a fresh process, one after another in one run.",
        "",
        "## Quality and speed", "",
        f"| variant | runtime | precision | layers | file MB | load s | model memory MB | latency b=1 ms | pairs/s b=32 len {report['fixed_length']} | vs PyTorch | NDCG@10 | MRR | top-10 overlap | Kendall tau | gate | Pareto |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    pareto = report.get("pareto") or []
    for r in report["variants"]:
        on_front = "reference" if r["variant"] == REFERENCE else ("**yes**" if r["variant"] in pareto else "dominated")
        lines.append(
            f"| {r['variant']} | {r['runtime']} | {r['precision']} | {r['layers']} | {r['file_mb']:.1f} | {r['load_s']:.2f} | {r['model_peak_mb']:.0f} | "
            f"{r['latency_b1_ms']:.1f} | {_rate(r['throughput_fixed'][TARGET_BATCH])} | {r['speedup_vs_pytorch_b32_len64']:.2f}x | "
            f"{r['ndcg@10']:.4f} | {r['mrr']:.3f} | {r['top10_overlap']:.3f} | {r['kendall_tau']:.3f} | {r.get('gate', '')} | {on_front} |")
    if pareto:
        lines += ["", f"Worth serving (the Pareto front of pairs/s at batch {TARGET_BATCH}, length {report['fixed_length']}, and "
                  f"NDCG@10: no other variant is as fast and as good, one of them strictly), fastest first: "
                  f"{', '.join(pareto)}. The others are dominated; the gate decides which may be the default."]
    ranker = report.get("ranker") or {}
    if "server_ready_s" in report:
        lines += ["", "## Ready time and memory as Triton serves each variant", "",
                  f"Ranker: {ranker.get('architecture')} ({ranker.get('family')}), {(ranker.get('parameters') or 0) / 1e6:.0f}M parameters. "
                  f"tritonserver with tokenize and postprocess ready in {report['server_ready_s']:.1f} s; each variant then loaded "
                  "through the repository API (stub start, weights read, Triton warmup) and timed until Triton answers, "
                  "three times: first = a new host (nothing in the runtime cache, `--cache-dir`: the runtime optimizes the "
                  "model for this CPU and keeps the result); cold = its files and cache entry "
                  f"{'evicted from the page cache' if report.get('page_cache_evicted') else 'NOT evicted (no posix_fadvise)'} "
                  "(a restart after a reboot); warm = loaded again. Memory: the rank stub's resident set after a request of 32 "
                  "pairs, on the first load and through the cache (private: pages no other process shares); estimate: what "
                  "the build and `serve --memory-budget` count for it.", "",
                  "| variant | file MB | ready first s | ready cold s | ready warm s | runtime cache MB | rank stub MB, first load | "
                  "rank stub MB | private MB | estimate MB | first request ms | next request ms |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in report["variants"][1:]:
            lines.append(f"| {r['variant']} | {r['file_mb']:.0f} | {r['first_s']:.1f} | {r['cold_s']:.1f} | {r['warm_s']:.1f} | "
                         f"{r['cache_mb']:.0f} | {r['stub_rss_first_mb']:.0f} | {r['stub_rss_mb']:.0f} | {r['stub_private_mb']:.0f} | "
                         f"{r['estimate_mb']:.0f} | {r['first_request_ms']:.0f} | {r['second_request_ms']:.0f} |")
        if report.get("ratios_vs_fp32"):
            names = {"first_s": "ready first", "cold_s": "cold", "warm_s": "warm", "stub_rss_mb": "memory", "stub_private_mb": "private memory"}
            lines += ["", "Fractions of FP32 (same run): " + "; ".join(
                f"{n}: " + ", ".join(f"{names[k]} {x[k]:.2f}" for k in READY_KEYS if k in x)
                for n, x in report["ratios_vs_fp32"].items()) + "."]
    lines += ["", "## Throughput (pairs/s) by batch size", "",
              "| variant | " + " | ".join(f"b={b} workload ({report['variants'][0]['mean_tokens'][b]:.0f} tok)" for b in BATCHES)
              + " | " + " | ".join(f"b={b} len {report['fixed_length']}" for b in BATCHES) + " |",
              "|---|" + "---|" * (2 * len(BATCHES))]
    for r in report["variants"]:
        lines.append(f"| {r['variant']} | " + " | ".join(_rate(r['throughput_workload'][b]) for b in BATCHES) + " | "
                     + " | ".join(_rate(r['throughput_fixed'][b]) for b in BATCHES) + " |")
    tokens = report["variants"][0]["mean_tokens"][TARGET_BATCH]
    lines += ["", f"## Distance to the hardware ceiling (batch {TARGET_BATCH})", "",
              f"FLOPs of the padded batches actually computed, over the ceiling of the variant's precision: at the workload's "
              f"real lengths (requests of {TARGET_BATCH} real products, padded to their longest pair: {tokens:.0f} tokens on "
              f"average) and at a fixed length of {report['fixed_length']}.", "",
              f"| variant | ceiling | GFLOP/pair ({tokens:.0f} tok) | GFLOP/s, workload | fraction, workload | "
              f"GFLOP/pair (len {report['fixed_length']}) | GFLOP/s, len {report['fixed_length']} | fraction, len {report['fixed_length']} |",
              "|---|---|---|---|---|---|---|---|"]

    def fraction(value):
        return f"{100 * value:.0f}%" if value is not None else "n/a"

    for r in report["variants"]:
        gflop_pair = r["achieved_gflops_b32_len64"] / r["throughput_fixed"][TARGET_BATCH]
        lines.append(f"| {r['variant']} | {r['ceiling']} | {r['gflop_per_pair_workload']:.2f} | {r['achieved_gflops_b32_workload']:.0f} | "
                     f"{fraction(r['fraction_of_ceiling_workload'])} | {gflop_pair:.2f} | {r['achieved_gflops_b32_len64']:.0f} | "
                     f"{fraction(r['fraction_of_ceiling'])} |")
    if report["gpu_only"]:
        lines += ["", "## GPU-only variants (checked on CPU with ONNX Runtime)", ""]
        lines += [f"- {n}: NDCG@10 {g['ndcg']:.4f}, Kendall tau {g['kendall_tau']:.3f}, gate {'passed' if g['passed'] else 'FAILED'}"
                  for n, g in report["gpu_only"].items()]
    if report.get("int8"):
        lines += ["", "## INT8 QDQ models side by side (held-out queries, scored with ONNX Runtime CPU)", "",
                  "| variant | quantizer | weight MatMuls INT8 | NDCG@10 | drop vs FP32 | top-10 overlap | Kendall tau | gate |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in report["int8"]:
            lines.append(f"| {r['variant']} | {r['quantizer']} | {r['quantized_matmuls']}/{r['weight_matmuls']} | {r['ndcg']:.4f} | "
                         f"{100 * r['relative_drop']:.2f}% (limit {100 * r['max_drop']:.1f}%) | {r['top_k_overlap']:.3f}"
                         f"{' (limit %.2f)' % r['min_top_k_overlap'] if r['min_top_k_overlap'] else ''} | {r['kendall_tau']:.3f} | "
                         f"{'passed' if r['passed'] else 'FAILED'} |")
    lines += ["", "![speed vs NDCG](speed_vs_ndcg.png)", "", "![throughput vs batch](throughput_vs_batch.png)", ""]
    return "\n".join(lines)


def plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["variants"]
    fig, _labels = speed_vs_ndcg_figure(report)
    fig.savefig(out / "speed_vs_ndcg.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.plot(BATCHES, [r["throughput_workload"][b] for b in BATCHES], marker="o", label=r["variant"])
    ax.set_xlabel("batch size (candidates per request, workload token lengths)")
    ax.set_ylabel("pairs/s")
    ax.set_xticks(BATCHES)
    ax.set_title("Throughput vs batch size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "throughput_vs_batch.png", dpi=110)
    plt.close(fig)


def speed_vs_ndcg_figure(report: dict):
    """Speed vs NDCG@10: the Pareto front drawn as a staircase through its variants (filled), the
    dominated variants hollow, the PyTorch reference grey; every point labelled, labels placed so
    that no two overlap. Returns the figure and its label texts (drawn on Agg)."""
    import matplotlib.pyplot as plt

    rows = report["variants"]
    points = {r["variant"]: (r["throughput_fixed"][TARGET_BATCH], r["ndcg@10"]) for r in rows}
    front = report.get("pareto") or pareto_variants(rows)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for name, (x, y) in points.items():
        if name == REFERENCE:
            ax.scatter(x, y, s=50, marker="s", color="0.55", zorder=3)
        elif name in front:
            ax.scatter(x, y, s=60, color="C0", zorder=4)
        else:
            ax.scatter(x, y, s=60, facecolors="none", edgecolors="C3", linewidths=1.5, zorder=4)
    steps = sorted(points[n] for n in front)
    if steps:
        xs, ys = zip(*steps)
        ax.step(xs, ys, where="pre", color="C0", alpha=0.6, zorder=2)
    ax.scatter([], [], s=60, color="C0", label="Pareto front: worth serving")
    ax.scatter([], [], s=60, facecolors="none", edgecolors="C3", linewidths=1.5, label="dominated (as fast and as good exists)")
    if REFERENCE in points:
        ax.scatter([], [], s=50, marker="s", color="0.55", label="PyTorch FP32 eager (reference, not served)")
    ax.set_xlabel(f"pairs/s (batch {TARGET_BATCH}, length {report['fixed_length']})")
    ax.set_ylabel("NDCG@10 (held-out queries)")
    ax.set_title("Speed vs ranking quality")
    ax.grid(alpha=0.3)
    ax.margins(x=0.25, y=0.25)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    labels = place_labels(ax, points)
    return fig, labels


_OFFSETS = [(dx * r, dy * r) for r in (8, 16, 26, 38, 52) for dx, dy in
            ((1, 0.6), (1, -1.4), (-1, 0.6), (-1, -1.4), (0, 1.2), (0, -2), (1.4, -0.4), (-1.4, -0.4))]
"""Candidate label offsets from a point, in points: nearest first, around it."""


def place_labels(ax, points: dict[str, tuple[float, float]], fontsize: float = 8):
    """Label each point at the first offset (:data:`_OFFSETS`) where its text overlaps no label
    placed before, no point, no legend and stays inside the axes, measured on the renderer; a
    label moved away from its point gets a thin leader line. Points are labelled top to bottom,
    right to left, so a cluster's labels fan out. Returns the texts."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    pad = 2  # pixels between boxes
    to_px = ax.transData.transform
    marks = [_box(*to_px(xy), 5) for xy in points.values()]
    legend = ax.get_legend()
    taken = [legend.get_window_extent(renderer).padded(pad)] if legend else []
    inside = ax.get_window_extent(renderer)
    texts = []
    for name, xy in sorted(points.items(), key=lambda item: (-item[1][1], -item[1][0])):
        text = None
        for i, (dx, dy) in enumerate(_OFFSETS):
            if text is not None:
                text.remove()
            ha = "left" if dx > 0 else "right" if dx < 0 else "center"
            text = ax.annotate(name, xy, textcoords="offset points", xytext=(dx, dy), fontsize=fontsize, ha=ha, va="center",
                               zorder=5)
            box = text_box(text, renderer).padded(pad)
            clear = (box.x0 >= inside.x0 and box.x1 <= inside.x1 and box.y0 >= inside.y0 and box.y1 <= inside.y1
                     and not any(box.overlaps(other) for other in taken + marks))
            if clear or i == len(_OFFSETS) - 1:
                break
        if abs(dx) > 8 or abs(dy) > 12:
            text.remove()
            text = ax.annotate(name, xy, textcoords="offset points", xytext=(dx, dy), fontsize=fontsize, ha=ha, va="center",
                               zorder=5, arrowprops={"arrowstyle": "-", "color": "0.5", "lw": 0.6, "shrinkA": 0, "shrinkB": 4})
        taken.append(text_box(text, renderer).padded(pad))
        texts.append(text)
    return texts


def text_box(text, renderer):
    """The window extent of a label's text alone (an annotation's own extent includes its leader line)."""
    from matplotlib.text import Text

    if hasattr(text, "update_positions"):  # an annotation places its text from the point at draw time
        text.update_positions(renderer)
    return Text.get_window_extent(text, renderer)


def _box(x: float, y: float, half: float):
    from matplotlib.transforms import Bbox

    return Bbox([[x - half, y - half], [x + half, y + half]])
