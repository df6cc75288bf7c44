"""``rankserve loadtest``: a headless Locust run with CSV, HTML, ``summary.json`` and an SLO verdict."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np

from rankserve.loadtest.workload import draw_sizes
from rankserve.settings import LoadTestSettings

LOCUSTFILE = Path(__file__).resolve().parents[3] / "loadtest" / "locustfile.py"
_METRIC = re.compile(r'^(nv_inference_(?:queue_duration_us|compute_infer_duration_us|request_success))\{model="([^"]+)",version="[^"]*"\} ([0-9.e+]+)$', re.M)


def scrape(metrics_url: str | None) -> dict[tuple[str, str], float]:
    if not metrics_url:
        return {}
    try:
        with urllib.request.urlopen(metrics_url, timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    return {(name, model): float(value) for name, model, value in _METRIC.findall(text)}


def per_step(before: dict, after: dict) -> dict[str, dict[str, float]]:
    """Mean queue and compute time per request of each model during the run, from Triton's counters."""
    out = {}
    for (name, model), value in after.items():
        if name != "nv_inference_request_success":
            continue
        n = value - before.get((name, model), 0.0)
        if n <= 0:
            continue
        delta = lambda metric: after.get((metric, model), 0.0) - before.get((metric, model), 0.0)  # noqa: E731
        out[model] = {"requests": n, "queue_ms": delta("nv_inference_queue_duration_us") / n / 1000,
                      "compute_ms": delta("nv_inference_compute_infer_duration_us") / n / 1000}
    return out


def summarize(stats_csv: Path, settings: LoadTestSettings, steps: dict) -> dict:
    """``summary.json`` from Locust's aggregated stats row, with the SLO verdict."""
    with stats_csv.open(newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["Name"] == "Aggregated")
    requests = int(row["Request Count"])
    failures = int(row["Failure Count"])
    rps = float(row["Requests/s"])
    summary = {
        "p50_ms": float(row["50%"]), "p95_ms": float(row["95%"]), "p99_ms": float(row["99%"]),
        "requests_per_s": rps, "pairs_per_s": rps * float(row["Average Content Size"]),
        "failures": failures, "requests": requests,
        "mean_candidates": float(row["Average Content Size"]),
        "p99_over_p50": float(row["99%"]) / float(row["50%"]) if float(row["50%"]) > 0 else float("nan"),
        "settings": {"users": settings.users, "spawn_rate": settings.spawn_rate, "duration_s": settings.duration_s,
                     "protocol": settings.protocol, "model": settings.model, "candidates_mean": settings.candidates_mean,
                     "candidates_sigma": settings.candidates_sigma, "rate_per_s": settings.rate_per_s},
        "triton_steps": steps,
    }
    ratio = failures / requests if requests else 1.0
    violations = []
    if requests == 0:
        violations.append("no request completed")
    if ratio > settings.slo_max_failure_ratio:
        violations.append(f"failure ratio {ratio:.4f} > {settings.slo_max_failure_ratio}")
    if summary["p95_ms"] > settings.slo_p95_ms:
        violations.append(f"p95 {summary['p95_ms']:.0f} ms > {settings.slo_p95_ms:.0f} ms")
    if settings.slo_max_tail_ratio and not summary["p99_over_p50"] <= settings.slo_max_tail_ratio:
        violations.append(f"p99/p50 {summary['p99_over_p50']:.2f} > {settings.slo_max_tail_ratio}")
    summary["slo"] = {"p95_ms": settings.slo_p95_ms, "max_failure_ratio": settings.slo_max_failure_ratio,
                      "max_tail_ratio": settings.slo_max_tail_ratio, "passed": not violations, "violations": violations}
    return summary


def run_locust(host: str, settings: LoadTestSettings, out: Path, metrics_url: str | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    user = "RankerHttpUser" if settings.protocol == "http" else "RankerGrpcUser"
    env = {**os.environ, "RANKSERVE_LOADTEST_MODEL": settings.model,
           "RANKSERVE_LOADTEST_CANDIDATES_MEAN": str(settings.candidates_mean),
           "RANKSERVE_LOADTEST_CANDIDATES_MAX": str(settings.candidates_max),
           "RANKSERVE_LOADTEST_CANDIDATES_SIGMA": str(settings.candidates_sigma),
           "RANKSERVE_LOADTEST_RATE_PER_USER": str(settings.rate_per_user)}
    before = scrape(metrics_url)
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), user, "--headless", "--host", host,
           "-u", str(settings.users), "-r", str(settings.spawn_rate), "-t", f"{settings.duration_s}s",
           "--csv", str(out / "locust"), "--html", str(out / "report.html"), "--only-summary", "--stop-timeout", "10"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=settings.duration_s + 120)
    (out / "locust.log").write_text(proc.stdout + proc.stderr)
    if not (out / "locust_stats.csv").exists():
        raise RuntimeError(f"locust produced no statistics:\n{proc.stderr[-2000:]}")
    summary = summarize(out / "locust_stats.csv", settings, per_step(before, scrape(metrics_url)))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def paced(saturated: dict, settings: LoadTestSettings, fraction: float) -> LoadTestSettings:
    """Settings for a run at ``fraction`` of the request rate a closed-loop run reached, with enough
    users that one is rarely still waiting for a response when its next request is due (four times
    Little's law on the saturated p99), so the arrivals stay close to a Poisson stream."""
    rate = fraction * saturated["requests_per_s"]
    users = max(settings.users, math.ceil(4 * rate * saturated["p99_ms"] / 1000))
    return replace(settings, rate_per_s=rate, users=users, spawn_rate=max(settings.spawn_rate, users))


def ideal_tail_ratio(rate_per_s: float, pairs_per_s: float, sizes: np.ndarray, seed: int = 0) -> float:
    """p99 / p50 of the time in system at an ideal single first-come-first-served server that scores a
    request of n pairs in n / ``pairs_per_s`` seconds, for Poisson arrivals at ``rate_per_s`` and
    list sizes ``sizes`` (Lindley's recursion): what queueing alone does to the tail at that load,
    with no serving overhead at all. The reference for a measured p99/p50."""
    service = np.asarray(sizes, dtype=float) / pairs_per_s
    gaps = np.random.default_rng(seed).exponential(1 / rate_per_s, len(service))
    wait = np.zeros(len(service))
    for i in range(1, len(service)):
        wait[i] = max(0.0, wait[i - 1] + service[i - 1] - gaps[i])
    p50, p99 = np.percentile(wait + service, [50, 99])
    return float(p99 / p50)


def run_locust_at_fraction(host: str, settings: LoadTestSettings, out: Path, fraction: float,
                           metrics_url: str | None = None, log=print) -> dict:
    """Find saturation with a closed-loop run (``out/saturation``), then run paced at ``fraction``
    of its request rate; the paced run's summary (with the saturation run inside) is the result."""
    saturated = run_locust(host, replace(settings, rate_per_s=0.0, slo_max_tail_ratio=0.0), out / "saturation", metrics_url)
    log(f"saturation: {saturated['requests_per_s']:.2f} req/s, {saturated['pairs_per_s']:.0f} pairs/s, "
        f"p50 {saturated['p50_ms']:.0f} ms, p99 {saturated['p99_ms']:.0f} ms with {settings.users} closed-loop users")
    at = paced(saturated, settings, fraction)
    log(f"paced run: {at.rate_per_s:.2f} req/s ({fraction:.0%} of saturation) from {at.users} users")
    summary = run_locust(host, at, out, metrics_url)
    summary["saturation"] = {k: saturated[k] for k in ("requests_per_s", "pairs_per_s", "p50_ms", "p95_ms", "p99_ms", "requests", "failures")}
    summary["load_fraction"] = fraction
    sizes = draw_sizes(at, np.random.default_rng(settings.seed), 200_000)
    summary["ideal_fifo_p99_over_p50"] = ideal_tail_ratio(at.rate_per_s, saturated["pairs_per_s"], sizes)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def run(settings: LoadTestSettings, out: Path, host: str | None = None, repo: Path | None = None,
        metrics_url: str | None = None, log=print, fraction: float | None = None) -> dict:
    """Run against ``host``, or start the embedded server on ``repo`` for the duration of the run;
    with ``fraction``, a saturation run first and then a run paced at that fraction of it."""
    def go(url: str, metrics: str | None) -> dict:
        if fraction is None:
            return run_locust(url, settings, out, metrics)
        return run_locust_at_fraction(url, settings, out, fraction, metrics, log)

    if host:
        return go(host, metrics_url)
    from rankserve.demo import serve_settings
    from rankserve.server.embedded import EmbeddedServer

    with EmbeddedServer(repo or Path("model_repository"), serve_settings()) as server:
        url = f"http://{server.http_url}" if settings.protocol == "http" else f"grpc://{server.grpc_url}"
        log(f"embedded tritonserver on {url}; {settings.users} users for {settings.duration_s} s")
        return go(url, server.metrics_url)


def format_summary(s: dict) -> str:
    lines = [f"requests {s['requests']} (failures {s['failures']}), {s['requests_per_s']:.1f} req/s, "
             f"{s['pairs_per_s']:.0f} pairs/s, mean {s['mean_candidates']:.0f} candidates",
             f"latency p50 {s['p50_ms']:.0f} ms, p95 {s['p95_ms']:.0f} ms, p99 {s['p99_ms']:.0f} ms (p99/p50 {s['p99_over_p50']:.2f})"]
    if "saturation" in s:
        sat = s["saturation"]
        lines.insert(0, f"Poisson arrivals at {s['load_fraction']:.0%} of saturation ({sat['requests_per_s']:.2f} req/s, "
                        f"{sat['pairs_per_s']:.0f} pairs/s, p50 {sat['p50_ms']:.0f} / p99 {sat['p99_ms']:.0f} ms closed loop)")
        lines.insert(3, f"  an ideal single FIFO server at this load and list-size mix: p99/p50 {s['ideal_fifo_p99_over_p50']:.2f}")
    for model, m in sorted(s["triton_steps"].items()):
        lines.append(f"  {model:<22} queue {m['queue_ms']:7.2f} ms  compute {m['compute_ms']:7.2f} ms  ({m['requests']:.0f} requests)")
    verdict = "PASS" if s["slo"]["passed"] else "FAIL: " + "; ".join(s["slo"]["violations"])
    tail = f", p99/p50 <= {s['slo']['max_tail_ratio']}" if s["slo"].get("max_tail_ratio") else ""
    lines.append(f"SLO (p95 <= {s['slo']['p95_ms']:.0f} ms, failure ratio <= {s['slo']['max_failure_ratio']}{tail}): {verdict}")
    return "\n".join(lines)
