"""``make gpu-check``: on a GPU host, build the engines, serve them with docker compose and verify
the TensorRT ensembles against the CPU ranker; prints a pass/fail table, exits non-zero on a fail."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np


@dataclass
class Step:
    name: str
    passed: bool
    detail: str


def format_table(steps: list[Step]) -> str:
    lines = ["| check | result | detail |", "|---|---|---|"]
    lines += [f"| {s.name} | {'PASS' if s.passed else 'FAIL'} | {s.detail} |" for s in steps]
    failed = [s.name for s in steps if not s.passed]
    lines.append("all checks passed" if not failed else f"FAILED: {', '.join(failed)}")
    return "\n".join(lines)


def _run(step: str, cmd: list[str], steps: list[Step]) -> bool:
    out = subprocess.run(cmd, capture_output=True, text=True)
    steps.append(Step(step, out.returncode == 0, " ".join(cmd[:4]) + (f": {out.stderr.strip()[-300:]}" if out.returncode else "")))
    return out.returncode == 0


def _wait_ready(url: str, model: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/v2/models/{model}/ready", timeout=3) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(2)
    return False


def compare_served(scores: dict[str, list[np.ndarray]], reference: str, tolerance: Callable[[str], float]) -> list[Step]:
    """One step per TensorRT ensemble: its scores against the reference ensemble's on the same requests."""
    steps = []
    for model, got in scores.items():
        if model == reference:
            continue
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(got, scores[reference]))
        precision = model.rsplit("_", 1)[-1]
        steps.append(Step(f"{model} vs {reference}", diff <= tolerance(precision), f"max abs diff {diff:.3g} (limit {tolerance(precision):g})"))
    return steps


def run_gpu_check(data: Path, repo: Path, url: str = "http://127.0.0.1:8000", log=print) -> list[Step]:
    from rankserve.data.catalog import Dataset
    from rankserve.settings import EngineSettings
    from rankserve_client import RankerClient

    steps: list[Step] = []
    if not os.environ.get("TRITON_ADMIN_KEY"):
        return [Step("TRITON_ADMIN_KEY set", False, "export TRITON_ADMIN_KEY=<a secret> (the restricted APIs' key)")]
    if not (_run("GPU visible", ["nvidia-smi", "-L"], steps) and _run("engines built (compose service build)",
                                                                 ["docker", "compose", "run", "--rm", "build"], steps)):
        return steps
    try:
        if not _run("triton started", ["docker", "compose", "up", "-d", "triton"], steps):
            return steps
        steps.append(Step("ranker ready", _wait_ready(url, "ranker", 600), f"{url}/v2/models/ranker/ready"))
        manifest = json.loads((repo / "manifest.json").read_text())
        models = ["ranker_fp32"] + [f"ranker_trt_{p}" for p in manifest.get("engines", {})]
        dataset = Dataset.load(data)
        by_query = dataset.by_query()
        requests = [(q.text, [dataset.products[j.product_id].text for j in by_query[q.query_id]]) for q in dataset.split("heldout")]
        scores: dict[str, list[np.ndarray]] = {}
        for model in models:
            ready = _wait_ready(url, model, 60)
            steps.append(Step(f"{model} ready", ready, ""))
            if not ready:
                continue
            with RankerClient(url, model=model) as client:
                started = time.perf_counter()
                results = [client.rank(q, t) for q, t in requests]
                ms = 1000 * (time.perf_counter() - started) / len(requests)
            scores[model] = [np.array([s for _, s in sorted((r.id, r.score) for r in res)]) for res in results]
            steps.append(Step(f"{model} serves", True, f"{len(requests)} held-out requests, mean {ms:.1f} ms"))
        if "ranker_fp32" in scores:
            steps += compare_served(scores, "ranker_fp32", EngineSettings().tolerance)
    finally:
        subprocess.run(["docker", "compose", "down"], capture_output=True, text=True)
    return steps
