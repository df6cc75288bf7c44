"""``make gpu-check``: on a GPU host, build the engines, test and measure them in the TensorRT
container, serve them with docker compose and check the TensorRT ensembles against the CPU FP32
ranker served by the same Triton. Writes ``reports/gpu/report.json`` and ``report.md`` (versions,
engine build time and size, Polygraphy and served throughput and latency, agreement with FP32,
the pass/fail table) whatever fails on the way; exits non-zero on a fail."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

REFERENCE = "ranker_fp32"
BUILD = ["docker", "compose", "run", "--rm", "build"]
SERVE = ["docker", "compose", "up", "-d", "--no-deps", "triton"]
"""``--no-deps``: ``triton`` depends on ``build`` (for a plain ``docker compose up``); the engines
were just built by :data:`BUILD`, and without it compose would build them a second time."""
ENGINE_BENCH = "gpu-engines.json"  # written by `rankserve engine-bench` into the build service's /work (./artifacts)


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


def compose_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment for ``docker compose``: the build writes ./model_repository as the caller."""
    return {**environ, "HOST_UID": environ.get("HOST_UID", str(os.getuid())), "HOST_GID": environ.get("HOST_GID", str(os.getgid()))}


class Checker:
    """Collects the steps; a step that raises is a FAIL with the reason, never an escaped traceback."""

    def __init__(self) -> None:
        self.steps: list[Step] = []

    def add(self, name: str, passed: bool, detail: str = "") -> bool:
        self.steps.append(Step(name, passed, detail))
        return passed

    @contextmanager
    def step(self, name: str):
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - every failure becomes a row of the table
            self.add(name, False, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300])

    def run(self, name: str, cmd: list[str], env: Mapping[str, str] | None = None, timeout: float = 3600) -> subprocess.CompletedProcess | None:
        """Run ``cmd`` as one step; its completed process when it passed, else None."""
        with self.step(name):
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
            tail = (out.stderr or out.stdout).strip()[-300:]
            if self.add(name, out.returncode == 0, " ".join(cmd[:5]) + (f": {tail}" if out.returncode else "")):
                return out
        return None


def latency_summary(latencies_ms: list[float], pairs: int, seconds: float) -> dict:
    a = np.asarray(latencies_ms, dtype=float)
    return {"requests": int(a.size), "p50_ms": round(float(np.percentile(a, 50)), 2), "p95_ms": round(float(np.percentile(a, 95)), 2),
            "pairs_per_s": round(pairs / seconds, 1) if seconds > 0 else None}


def agreement(dataset, scores: dict[int, np.ndarray], reference: dict[int, np.ndarray], precision: str, gate_settings) -> dict:
    """A served engine's scores against the served CPU FP32 ranker's on the same held-out requests."""
    from rankserve.optimize.gate import gate

    diff = max(float(np.max(np.abs(scores[q] - reference[q]))) for q in reference)
    result = gate(f"trt_{precision}", dataset, scores, reference, **gate_settings.for_engine(precision))
    return {"max_abs_diff": diff, "ndcg": result.ndcg, "reference_ndcg": result.reference_ndcg, "relative_drop": result.relative_drop,
            "top_k_overlap": result.top_k_overlap, "kendall_tau": result.kendall_tau, "gate_passed": result.passed,
            "gate": result.describe()}


def format_report(report: dict) -> str:
    """``report.md``: what the first GPU run measured, one table per subject, then the verdict."""
    lines = ["# rankserve GPU check", ""]
    versions = report.get("versions", {})
    lines += [f"- {k}: {v}" for k, v in versions.items()] + [""]
    for gpu in report.get("gpus", []):
        lines.append(f"- GPU: {gpu['name']} (compute capability {gpu['compute_capability']}, driver {gpu.get('driver', '?')})")
    engines = report.get("engines", [])
    if engines:
        lines += ["", "## Engines (Polygraphy, in the TensorRT container)", "",
                  "| engine | build s | size MiB | pairs | tokens | profile | p50 ms | pairs/s |", "|---|---|---|---|---|---|---|---|"]
        for e in engines:
            for row in e["grid"]:
                lines.append(f"| {e['plan_file']} | {e.get('build_seconds') or '?'} | {(e.get('plan_bytes') or 0) / 2**20:.1f} | {row['pairs']} | "
                             f"{row['tokens']} | {row['profile']} | {row['p50_ms']} | {row['pairs_per_s']} |")
    served = report.get("served", {})
    if served:
        lines += ["", "## Served ensembles (held-out queries over HTTP)", "",
                  "| model | requests | p50 ms | p95 ms | pairs/s | max abs diff vs FP32 | NDCG@10 | top-10 overlap | Kendall tau | gate |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for model, s in served.items():
            a = s.get("agreement", {})
            lines.append(f"| {model} | {s['requests']} | {s['p50_ms']} | {s['p95_ms']} | {s['pairs_per_s']} | "
                         f"{a.get('max_abs_diff', 0):.3g} | {a.get('ndcg', float('nan')):.4f} | {a.get('top_k_overlap', float('nan')):.3f} | "
                         f"{a.get('kendall_tau', float('nan')):.3f} | {('pass' if a['gate_passed'] else 'FAIL') if a else 'reference'} |")
    lines += ["", "## Verdict", "", format_table([Step(**s) for s in report["steps"]]), ""]
    return "\n".join(lines)


def write_report(out: Path, report: dict) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(format_report(report))
    return out / "report.json", out / "report.md"


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


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


def serve_heldout(url: str, model: str, requests: list[tuple[str, list[str]]], concurrency: int = 4) -> tuple[list[np.ndarray], dict]:
    """Each held-out request once in order (latency), then all of them from ``concurrency`` threads
    (throughput); the scores in candidate order."""
    from rankserve_client import RankerClient

    with RankerClient(url, model=model, timeout=60) as client:
        latencies, scores = [], []
        for query, texts in requests:
            started = time.perf_counter()
            ranked = client.rank(query, texts)
            latencies.append(1000 * (time.perf_counter() - started))
            scores.append(np.array([s for _, s in sorted((int(r.id), r.score) for r in ranked)], dtype=np.float32))
        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(lambda r: client.rank(*r), requests))
        summary = latency_summary(latencies, sum(len(t) for _, t in requests), time.perf_counter() - started)
    return scores, summary


def run_gpu_check(data: Path, repo: Path, url: str = "http://127.0.0.1:8000", out: Path = Path("reports/gpu"),
                  log: Callable[[str], None] = print) -> list[Step]:
    from rankserve.settings import BuildSettings

    check = Checker()
    report: dict = {"created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": {}, "gpus": []}
    env = compose_env(os.environ)
    try:
        if not check.add("TRITON_ADMIN_KEY set", bool(os.environ.get("TRITON_ADMIN_KEY")),
                         "" if os.environ.get("TRITON_ADMIN_KEY") else "export TRITON_ADMIN_KEY=<a secret> (the restricted APIs' key)"):
            return check.steps
        gpus = check.run("GPU visible", ["nvidia-smi", "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"])
        if gpus is None:
            return check.steps
        for line in gpus.stdout.strip().splitlines():
            name, cc, driver = [x.strip() for x in line.rsplit(",", 2)]
            report["gpus"].append({"name": name, "compute_capability": cc, "driver": driver})
        log("building the engines in the TensorRT container (docker compose run --rm build) ...")
        started = time.perf_counter()
        if not check.run("engines built (compose service build)", BUILD, env):
            return check.steps
        report["build_seconds"] = round(time.perf_counter() - started, 1)
        log("testing and measuring the engines in the TensorRT container ...")
        check.run("engine tests (tests/gpu, every profile)", ["docker", "compose", "run", "--rm", "-e", "RANKSERVE_GPU_TEST_WORK=/work/variants",
                                                              "--entrypoint", "python", "build", "-m", "pytest", "-q", "/opt/rankserve/tests/gpu"], env)
        if check.run("engine benchmark (Polygraphy)", ["docker", "compose", "run", "--rm", "--entrypoint", "rankserve", "build",
                                                       "engine-bench", "--model-repository", "/models", "--out", f"/work/{ENGINE_BENCH}"], env):
            with check.step("engine benchmark report"):
                bench = json.loads((Path("artifacts") / ENGINE_BENCH).read_text())
                report["engines"], report["versions"]["tensorrt"] = bench["engines"], bench["tensorrt"]
        log(f"serving ({' '.join(SERVE)}) ...")
        if not check.run("triton started", SERVE, env):
            return check.steps
        if not check.add("ranker ready", _wait_ready(url, "ranker", 600), f"{url}/v2/models/ranker/ready"):
            return check.steps
        with check.step("server metadata"):
            report["versions"]["triton"] = _get_json(f"{url}/v2")["version"]
        _check_served(check, report, data, repo, url, BuildSettings().gate, log)
    finally:
        if len(check.steps) > 2:
            subprocess.run(["docker", "compose", "down"], capture_output=True, text=True, env=env)
        report["steps"] = [asdict(s) for s in check.steps]
        json_path, md_path = write_report(out, report)
        log(f"report: {md_path} and {json_path}")
    return check.steps


def _check_served(check: Checker, report: dict, data: Path, repo: Path, url: str, gate_settings, log) -> None:
    from rankserve.data.catalog import Dataset

    manifest = json.loads((repo / "manifest.json").read_text())
    dataset = Dataset.load(data)
    by_query = dataset.by_query()
    heldout = dataset.split("heldout")
    requests = [(q.text, [dataset.products[j.product_id].text for j in by_query[q.query_id]]) for q in heldout]
    served: dict[str, dict] = {}
    scores: dict[str, dict[int, np.ndarray]] = {}
    for model in [REFERENCE] + [f"ranker_trt_{p}" for p in sorted(manifest.get("engines", {}))]:
        with check.step(f"{model} serves"):
            if not check.add(f"{model} ready", _wait_ready(url, model, 120)):
                continue
            log(f"  {model}: {len(requests)} held-out requests")
            got, summary = serve_heldout(url, model, requests)
            scores[model] = {q.query_id: s for q, s in zip(heldout, got)}
            served[model] = summary
            check.add(f"{model} serves", True, f"{summary['requests']} requests, p50 {summary['p50_ms']} ms, {summary['pairs_per_s']} pairs/s")
    for model in (m for m in scores if m != REFERENCE):
        with check.step(f"{model} vs {REFERENCE}"):
            if REFERENCE not in scores:
                raise RuntimeError(f"{REFERENCE} did not serve: nothing to compare with")
            precision = model.rsplit("_", 1)[-1]
            a = agreement(dataset, scores[model], scores[REFERENCE], precision, gate_settings)
            served[model]["agreement"] = a
            check.add(f"{model} vs {REFERENCE}", a["gate_passed"], f"max abs diff {a['max_abs_diff']:.3g}; {a['gate']}")
    report["served"] = served
