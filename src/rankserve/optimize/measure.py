"""Measure one variant in a fresh process: load time, peak memory, latency and throughput.

Run as ``python -m rankserve.optimize.measure '<json spec>'``; prints one JSON object. A process of
its own per variant keeps peak-memory figures from mixing.
"""

from __future__ import annotations

import inspect
import json
import resource
import sys
import time

import numpy as np

BATCHES = (8, 32, 64)
FIXED_LENGTH = 64


def _status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, in MiB."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _scorer(spec: dict):
    """(score(feeds) -> np.ndarray, load seconds)."""
    if spec["kind"] == "pytorch":
        import torch
        from transformers import AutoModelForSequenceClassification
        from rankserve.builder.export import load_options

        torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
        t0 = time.perf_counter()
        model = AutoModelForSequenceClassification.from_pretrained(spec["path"], **load_options(spec["path"])).eval()
        load = time.perf_counter() - t0
        accepted = inspect.signature(model.forward).parameters
        names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in accepted]

        def score(feeds):
            with torch.inference_mode():
                return model(**{n: torch.from_numpy(feeds[n]) for n in names}).logits[:, 0].numpy()

        return score, load
    from rankserve.settings import OrtSettings, RuntimeSettings
    from rankserve.stages.rank import create_ranker

    t0 = time.perf_counter()
    ranker = create_ranker(spec["path"], RuntimeSettings(spec["runtime"], spec["inference_precision"]),
                           OrtSettings(intra_op_threads=spec.get("threads", 0)))
    load = time.perf_counter() - t0
    return ranker.score, load


def measure(spec: dict) -> dict:
    from rankserve.data.catalog import Dataset
    from rankserve.optimize.bench import fixed_batch, pairs_per_second, workload_batches
    from rankserve.settings import TokenizeSettings
    from rankserve.stages.tokenize import encode_pairs, load_tokenizer

    tokenizer = load_tokenizer(spec["tokenizer"], TokenizeSettings(max_length=spec["max_length"]))
    dataset = Dataset.load(spec["data"])
    import onnxruntime  # noqa: F401 - runtimes imported before the baseline: the figure is the model's own memory
    import openvino  # noqa: F401

    if spec["kind"] == "pytorch":
        import torch  # noqa: F401
    rss_before = _status_mb("VmRSS")
    score, load_s = _scorer(spec)
    out: dict = {"load_s": load_s}
    quick = spec.get("quick", False)  # a large ranker: fewer requests and repeats
    single = [encode_pairs(tokenizer, q, t) for q, t in workload_batches(dataset, 1, 5 if quick else 20, seed=1)]
    score(single[0])
    latencies = []
    for feeds in single:
        t0 = time.perf_counter()
        score(feeds)
        latencies.append(time.perf_counter() - t0)
    out["latency_b1_ms"] = 1000 * float(np.median(latencies))
    out["throughput_workload"], out["mean_tokens"] = {}, {}
    for b in BATCHES:
        requests = [encode_pairs(tokenizer, q, t) for q, t in workload_batches(dataset, b, 2 if quick else 6, seed=2)]
        out["mean_tokens"][b] = float(np.mean([r["input_ids"].shape[1] for r in requests]))
        out["throughput_workload"][b] = pairs_per_second(lambda: [score(r) for r in requests], b * len(requests), repeats=1 if quick else 3)
    out["throughput_fixed"] = {}
    for b in BATCHES:
        feeds = fixed_batch(b, FIXED_LENGTH)
        out["throughput_fixed"][b] = pairs_per_second(lambda: score(feeds), b, repeats=2 if quick else 5, min_seconds=0.0 if quick else 1.0)
    out["peak_rss_mb"] = _status_mb("VmHWM")
    out["model_peak_mb"] = out["peak_rss_mb"] - rss_before  # weights, session and working memory while serving
    return out


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
