"""``rankserve loadtest``: a headless Locust run with CSV, HTML, ``summary.json`` and an SLO verdict."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np

from rankserve.loadtest.policies import ideal_latency_ms
from rankserve.errors import RankserveError
from rankserve.loadtest.progress import TimelineTail, failing_since, progress_line, top_errors
from rankserve.loadtest.tail import ZeroLoad, fit_zero_load, format_tail, ideal_fifo_latency_ms, tail_by_bucket, tail_violations
from rankserve.loadtest.timeline import ResourceSampler, drift, error_window, read_timeline, resource_growth, window_length, windows
from rankserve.loadtest.workload import draw_sizes
from rankserve.settings import BatchingSettings, LoadTestSettings

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


def _num(row: dict, key: str) -> float:
    """A number of Locust's CSV; NaN for its "N/A" (percentiles of a row with no request) or a blank."""
    value = (row.get(key) or "").strip()
    try:
        return float(value)
    except ValueError:
        return float("nan")


def csv_figures(rows: list[dict]) -> dict:
    """Counts, and rates and percentiles of the successful requests, from Locust's stats CSV rows.

    The users report a failed request under its own name (``<model> (failed)``), so a row holds
    either successes or failures and the successes' latency and rate are a row's own. A CSV from a
    locustfile that mixes both in one row gives the successes' rate (``Requests/s - Failures/s``)
    but no latency of their own: the percentiles are NaN and ``latency_note`` says why."""
    agg = next((r for r in rows if r.get("Name") == "Aggregated"), None)
    if agg is None:
        raise ValueError("no 'Aggregated' row: not a Locust *_stats.csv")
    requests, failures = int(_num(agg, "Request Count") or 0), int(_num(agg, "Failure Count") or 0)
    named = [r for r in rows if r is not agg]
    ok_rows = [r for r in named if _num(r, "Failure Count") == 0 and _num(r, "Request Count") > 0]
    mixed = [r for r in named if 0 < _num(r, "Failure Count") < _num(r, "Request Count")]
    out = {"requests": requests, "failures": failures, "successes": requests - failures}
    if mixed:
        rps = max(0.0, _num(agg, "Requests/s") - _num(agg, "Failures/s"))
        size = _num(agg, "Average Content Size")
        out.update(requests_per_s=rps, pairs_per_s=rps * size, mean_candidates=size, p50_ms=float("nan"),
                   p95_ms=float("nan"), p99_ms=float("nan"),
                   latency_note="failed and successful requests share a row of the CSV: no latency of the successes alone")
    else:
        source = ok_rows[0] if len(ok_rows) == 1 else (agg if failures == 0 else None)
        rps = sum(_num(r, "Requests/s") for r in ok_rows)
        pairs = sum(_num(r, "Requests/s") * _num(r, "Average Content Size") for r in ok_rows)
        out.update(requests_per_s=rps, pairs_per_s=pairs, mean_candidates=pairs / rps if rps > 0 else float("nan"),
                   **{f"p{q}_ms": _num(source, f"{q}%") if source else float("nan") for q in (50, 95, 99)})
        if source is None and ok_rows:
            out["latency_note"] = "several request names with failures: no single latency of the successes"
    out["p99_over_p50"] = out["p99_ms"] / out["p50_ms"] if out["p50_ms"] > 0 else float("nan")
    out["failure_ratio"] = failures / requests if requests else float("nan")
    return out


def summarize(stats_csv: Path | None, settings: LoadTestSettings, steps: dict) -> dict:
    """``summary.json`` from Locust's stats CSV (successful requests' rates and latency, failures
    counted apart), with the SLO verdict; ``stats_csv`` None: no CSV (a run stopped before Locust
    wrote one), zero counts until the timeline fills them in."""
    rows = [{"Name": "Aggregated", "Request Count": "0", "Failure Count": "0"}]
    if stats_csv is not None:
        with stats_csv.open(newline="") as f:
            rows = list(csv.DictReader(f))
    summary = {
        **csv_figures(rows), "figures_from": "locust_csv",
        "settings": {"users": settings.users, "spawn_rate": settings.spawn_rate, "duration_s": settings.duration_s,
                     "protocol": settings.protocol, "model": settings.model, "candidates_mean": settings.candidates_mean,
                     "candidates_sigma": settings.candidates_sigma, "rate_per_s": settings.rate_per_s,
                     "retries": settings.retries, "window_s": settings.window_s, "scenario": settings.scenario,
                     **({"zipf_s": settings.zipf_s} if settings.scenario == "zipf" else {})},
        "triton_steps": steps,
    }
    return verdict(summary, settings)


def verdict(summary: dict, settings: LoadTestSettings) -> dict:
    """``summary["slo"]``: every SLO of ``settings`` checked against the summary's figures."""
    requests, failures = summary["requests"], summary["failures"]
    successes = summary.get("successes", requests - failures)
    ratio = failures / requests if requests else 1.0
    violations = []
    if requests == 0:
        violations.append("no request completed")
    if requests and ratio > settings.slo_max_failure_ratio:
        violations.append(f"{failures} of {requests} requests failed ({ratio:.2%}) > error budget {settings.slo_max_failure_ratio:.2%}")
    if requests and successes < settings.slo_min_successes:
        violations.append(f"{successes} successful requests < {settings.slo_min_successes}: too few to judge latency and throughput")
    elif requests and not summary["p95_ms"] <= settings.slo_p95_ms:
        violations.append(f"p95 {summary['p95_ms']:.0f} ms > {settings.slo_p95_ms:.0f} ms" if summary["p95_ms"] == summary["p95_ms"]
                          else f"p95 of the successful requests unknown ({summary.get('latency_note', 'no latency')})")
    if summary.get("stopped_early"):
        violations.append(f"stopped early: {summary['stopped_early']}")
    if summary.get("partial"):
        violations.append(f"partial run: {summary['partial']}")
    if settings.slo_max_tail_ratio and not summary["p99_over_p50"] <= settings.slo_max_tail_ratio:
        violations.append(f"p99/p50 {summary['p99_over_p50']:.2f} > {settings.slo_max_tail_ratio}")
    if settings.slo_max_p95_drift:
        d = summary.get("p95_drift")
        if d is None or not abs(d) <= settings.slo_max_p95_drift:
            violations.append(f"p95 drift first -> last window {d if d is None else f'{d:+.1%}'} beyond ±{settings.slo_max_p95_drift:.0%}")
    if settings.slo_tail_vs_ideal or settings.slo_max_slowdown_p99:
        if "tail" not in summary:
            violations.append("tail SLOs need a paced run (--saturation-fraction) with completed requests")
        else:
            violations += tail_violations(summary["tail"], settings.slo_max_slowdown_p99, settings.slo_tail_vs_ideal,
                                          reference=settings.tail_reference)
    for key, limit in (("rss_growth", settings.slo_max_rss_growth), ("shm_growth", settings.slo_max_shm_growth)):
        if limit:
            g = (summary.get("resources") or {}).get(key)
            if g is None or not g <= limit:
                violations.append(f"server {key.replace('_', ' ')} {g if g is None else f'{g:+.1%}'} > {limit:.0%}")
    summary["slo"] = {"p95_ms": settings.slo_p95_ms, "max_failure_ratio": settings.slo_max_failure_ratio,
                      "min_successes": settings.slo_min_successes,
                      "max_tail_ratio": settings.slo_max_tail_ratio, "tail_vs_ideal": settings.slo_tail_vs_ideal,
                      "tail_reference": settings.tail_reference,
                      "max_slowdown_p99": settings.slo_max_slowdown_p99, "max_p95_drift": settings.slo_max_p95_drift,
                      "max_rss_growth": settings.slo_max_rss_growth, "max_shm_growth": settings.slo_max_shm_growth,
                      "passed": not violations, "violations": violations}
    return summary


SUMMARY_KEYS = ("requests", "successes", "failures", "requests_per_s", "pairs_per_s", "p50_ms", "p95_ms", "p99_ms",
                "mean_candidates")
"""The figures of a run that :func:`timeline_figures` derives from the per-request timeline."""


def timeline_figures(t: dict[str, np.ndarray], summary: dict) -> dict:
    """Counts, and the successful requests' rates and percentiles, from the per-request timeline,
    which is complete: Locust rewrites its stats CSV once a second and not at shutdown, so the CSV
    misses the last second and the requests its users finish while stopping (in a 6 s run 159 of
    209). A failed request counts once, as a failure, and in no rate or percentile (a refused request
    answers in 1 ms: counted, it made a 97%-failing run look fast). The rates are over the run's
    span, first start to last answer. Locust's own figures are kept under ``locust_csv``."""
    ok = t["ok"]
    lat = t["latency_ms"][ok]
    span = float((t["start"] + t["latency_ms"] / 1000).max() - t["start"].min()) if t["start"].size else 0.0
    n_ok = int(ok.sum())
    rps = n_ok / span if span > 0 else float("nan")
    p50, p95, p99 = (float(v) for v in np.percentile(lat, [50, 95, 99])) if n_ok else (float("nan"),) * 3
    mean = float(t["candidates"][ok].mean()) if n_ok else float("nan")
    return {"requests": int(t["start"].size), "successes": n_ok, "failures": int((~ok).sum()),
            "failure_ratio": float((~ok).mean()) if t["start"].size else float("nan"),
            "requests_per_s": rps, "pairs_per_s": int(t["candidates"][ok].sum()) / span if span > 0 else float("nan"),
            "p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "mean_candidates": mean, "span_s": span,
            "p99_over_p50": p99 / p50 if p50 > 0 else float("nan"),
            "errors": [{"error": e, "count": c} for e, c in top_errors(t["error"][~ok], 5)],
            "locust_csv": {k: summary[k] for k in SUMMARY_KEYS if k in summary}, "figures_from": "timeline"}


def add_timeline(summary: dict, settings: LoadTestSettings, timeline_dir: Path, origin: float,
                 samples: list | None = None, ran_s: float | None = None) -> dict:
    """The timeline's figures (error window, per-window latency, p95 drift, server memory growth)
    added to ``summary``, and the verdict taken again with them. ``ran_s``: how long a run that was
    stopped before its duration ran. A run shorter than ``settings.window_s`` is cut into shorter
    windows (``window_s`` in the summary)."""
    t = read_timeline(timeline_dir)
    duration = settings.duration_s if ran_s is None else min(ran_s, settings.duration_s)
    window = window_length(settings.window_s, duration)
    summary["window_s"] = window
    if t["start"].size:
        summary.update(timeline_figures(t, summary))
        summary["error_window"] = error_window(t, origin)
        summary["windows"] = windows(t, origin, window, duration)
        full = [w for w in summary["windows"] if w["full"] and w["successes"]]
        summary["p95_drift"] = drift(full[0]["p95_ms"], full[-1]["p95_ms"]) if len(full) >= 2 else None
    if samples:
        summary["resources"] = resource_growth(samples, origin, window, duration)
        if summary["resources"] is not None:
            summary["resources"]["series"] = [[round(t - origin, 1), round(rss / 2**20, 1), round(shm / 2**20, 2)] for t, rss, shm in samples]
    return verdict(summary, settings)


def plot_timeline(summary: dict, path: Path) -> bool:
    """Latency and failures per window, and the server's memory over the run, as a PNG; False (and
    no file) for a run without a request."""
    if not summary.get("windows"):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = (summary.get("resources") or {}).get("series")
    fig, axes = plt.subplots(2 if series else 1, 1, figsize=(9, 6 if series else 3.5), squeeze=False)
    ax = axes[0][0]
    w = summary["windows"]
    window = summary.get("window_s", summary["settings"]["window_s"])
    x = [v["from_s"] for v in w]
    ax.plot(x, [v["p50_ms"] for v in w], "o-", label="p50")
    ax.plot(x, [v["p95_ms"] for v in w], "s-", label="p95")
    ax.set_ylabel("latency, ms (successful requests)")
    ax.set_xlabel(f"window start, s ({window} s windows)")
    failures = [v["failures"] for v in w]
    if any(failures):
        ax.bar(x, failures, width=0.6 * window, alpha=0.3, color="red", label="failures")
    ax.legend()
    ax.set_title(f"{summary['requests']} requests, {summary['failures']} failed, "
                 f"{summary['requests_per_s']:.1f} successful req/s{' (partial run)' if summary.get('partial') else ''}")
    if series:
        ax = axes[1][0]
        ax.plot([r[0] for r in series], [r[1] for r in series], label="server RSS (all processes), MiB")
        ax.plot([r[0] for r in series], [r[2] for r in series], label="/dev/shm, MiB")
        ax.set_xlabel("s since start")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


class LoadTestInterrupted(Exception):
    """The run was stopped by SIGINT; ``summary`` is the partial run's (written, marked partial)."""

    def __init__(self, summary: dict, out: Path) -> None:
        super().__init__("interrupted")
        self.summary, self.out = summary, out


def protocol_of(host: str, protocol: str | None = None) -> tuple[str, str]:
    """``(url, protocol)``: the transport follows the URL's scheme (``http://``, ``https://``: http;
    ``grpc://``, ``grpcs://``: grpc); a bare ``host:port`` takes ``protocol`` (default http). A
    ``protocol`` that contradicts the scheme is a ValueError."""
    from rankserve_client._common import parse_url

    proto, address, _tls = parse_url(host, protocol)
    return (host.rstrip("/") if "://" in host else f"{proto}://{address}"), proto


def preflight(host: str, model: str, timeout_s: float = 10.0) -> None:
    """What each Locust user does first, once, before Locust starts: connect and check that ``model``
    is a ranker (the SDK's metadata check). Raises RankserveError naming the cause."""
    from rankserve_client import RankerClient
    from rankserve_client.errors import RankerError

    try:
        with RankerClient(host, model=model, timeout=timeout_s, retries=0):
            pass
    except (RankerError, ValueError, OSError) as exc:
        raise RankserveError(f"preflight failed, no load sent: {host} model {model!r}: {type(exc).__name__}: {exc}") from None


def progress_interval(duration_s: float) -> float:
    """Seconds between progress lines: 5, or a quarter of a short run (at least 1)."""
    return max(1.0, min(5.0, duration_s / 4))


def _watch(proc: subprocess.Popen, settings: LoadTestSettings, timeline_dir: Path, origin: float, log,
           stop: threading.Event) -> str | None:
    """Wait for Locust, a progress line every :func:`progress_interval`; stop Locust (SIGINT: it writes
    its reports) when ``stop`` is set or every request failed for ``settings.stop_after_failing_s``.
    Returns why it stopped Locust early, or None."""
    tail, recent = TimelineTail(timeline_dir), []
    requests = failures = 0
    interval = progress_interval(settings.duration_s)
    last = time.time()
    hard_deadline = origin + settings.duration_s + 120
    reason = None
    while proc.poll() is None:
        if stop.wait(0.2):
            reason = reason or "interrupted"
        now = time.time()
        if reason is None and now - last >= interval:
            rows = tail.read()
            requests += len(rows)
            failures += sum(not r.ok for r in rows)
            recent = [r for r in recent + rows if r.end >= now - max(settings.stop_after_failing_s, interval)]
            if log is not None:
                log(progress_line(now - origin, settings.duration_s, rows, now - last, failures, requests))
            last = now
            if failing_since(recent, now, origin, settings.stop_after_failing_s):
                reason = f"every request failed for {settings.stop_after_failing_s:g} s (last: {recent[-1].error[:200]})"
                if log is not None:
                    log(f"stopping early: {reason}")
        if reason is not None or now > hard_deadline:
            proc.send_signal(signal.SIGINT)  # Locust writes its CSVs and report.html on SIGINT
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            return reason or "Locust did not finish in time"
    return None


@contextlib.contextmanager
def _sigint_sets(event: threading.Event):
    """While inside, SIGINT (Ctrl-C) sets ``event`` instead of raising KeyboardInterrupt (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda *_: event.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_locust(host: str, settings: LoadTestSettings, out: Path, metrics_url: str | None = None,
               server_pid: int | None = None, log=None) -> dict:
    """One headless Locust run; with ``server_pid`` (the embedded server, which leads its own process
    group), the memory of the server and its stubs is sampled. The transport and ``protocol`` in the
    report follow ``host``'s scheme. ``log``: where progress lines go (None: nowhere). A run stopped
    by SIGINT writes its partial summary and raises :class:`LoadTestInterrupted`."""
    host, protocol = protocol_of(host, None if "://" in host else settings.protocol)
    settings = replace(settings, protocol=protocol)
    out.mkdir(parents=True, exist_ok=True)
    timeline_dir = out / "timeline"
    shutil.rmtree(timeline_dir, ignore_errors=True)
    for stale in ("summary.json", "timeline.png", "locust_stats.csv", "report.html"):
        (out / stale).unlink(missing_ok=True)
    user = "RankerHttpUser" if settings.protocol == "http" else "RankerGrpcUser"
    env = {**os.environ, "RANKSERVE_LOADTEST_MODEL": settings.model,
           "RANKSERVE_LOADTEST_CANDIDATES_MEAN": str(settings.candidates_mean),
           "RANKSERVE_LOADTEST_CANDIDATES_MAX": str(settings.candidates_max),
           "RANKSERVE_LOADTEST_CANDIDATES_SIGMA": str(settings.candidates_sigma),
           "RANKSERVE_LOADTEST_RATE_PER_USER": str(settings.rate_per_user),
           "RANKSERVE_LOADTEST_RETRIES": str(settings.retries), "RANKSERVE_LOADTEST_RETRY_BACKOFF": str(settings.retry_backoff_s),
           "RANKSERVE_LOADTEST_SCENARIO": settings.scenario, "RANKSERVE_LOADTEST_ZIPF_S": str(settings.zipf_s),
           "RANKSERVE_LOADTEST_SEED": str(settings.seed),
           "RANKSERVE_LOADTEST_TIMELINE": str(timeline_dir)}
    before = scrape(metrics_url)
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), user, "--headless", "--host", host,
           "-u", str(settings.users), "-r", str(settings.spawn_rate), "-t", f"{settings.duration_s}s",
           "--csv", str(out / "locust"), "--html", str(out / "report.html"), "--only-summary", "--stop-timeout", "10"]
    origin = time.time()
    interrupted = threading.Event()
    with contextlib.ExitStack() as stack, (out / "locust.log").open("w") as locust_log:
        stack.enter_context(_sigint_sets(interrupted))
        sampler = stack.enter_context(ResourceSampler(server_pid)) if server_pid else None
        # its own session: a Ctrl-C reaches this process only, which stops Locust so that it writes its reports
        proc = subprocess.Popen(cmd, env=env, stdout=locust_log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            stopped = _watch(proc, settings, timeline_dir, origin, log, interrupted)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stats = out / "locust_stats.csv"
    if not stats.exists() and not interrupted.is_set():
        raise RankserveError(f"locust produced no statistics (see {out / 'locust.log'}):\n"
                             + (out / "locust.log").read_text()[-2000:])
    summary = summarize(stats if stats.exists() else None, settings, per_step(before, scrape(metrics_url)))
    ran_s = None
    if interrupted.is_set() or stopped:
        ran_s = time.time() - origin
        summary["partial" if interrupted.is_set() else "stopped_early"] = (
            f"{'interrupted (SIGINT)' if interrupted.is_set() else stopped}, after {ran_s:.0f} of {settings.duration_s} s")
    summary = add_timeline(summary, settings, timeline_dir, origin, sampler.samples if sampler else None, ran_s)
    summary["timeline_png"] = plot_timeline(summary, out / "timeline.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if interrupted.is_set():
        raise LoadTestInterrupted(summary, out)
    return summary


def summary_path(stats_csv: Path, out: Path | None = None) -> tuple[Path, Path | None]:
    """Where ``rankserve loadtest-summary`` writes, and the run summary it keeps: ``out``, else
    ``summary.json`` next to the CSV, unless that is a ``rankserve loadtest`` summary (figures from the
    timeline, Triton's per-step timings, settings), which it never overwrites: then
    ``summary-from-csv.json`` beside it. Returns ``(path, kept)``."""
    def from_a_run(path: Path) -> bool:
        try:
            return json.loads(path.read_text()).get("figures_from") == "timeline"
        except (OSError, ValueError, AttributeError):
            return False

    own = stats_csv.with_name("summary.json")
    if out is not None:
        if out.exists() and from_a_run(out):
            raise RankserveError(f"--out {out} is a `rankserve loadtest` run's summary: not overwriting it")
        return out, None
    if own.exists() and from_a_run(own):
        return stats_csv.with_name("summary-from-csv.json"), own
    return own, None


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


def zero_load(host: str, settings: LoadTestSettings, out: Path, metrics_url: str | None = None, log=None) -> ZeroLoad:
    """Each list size's latency alone: one closed-loop user (nothing else in the server) for 15 to
    60 s, the same size mix, a line fitted through it (``out/zero_load``)."""
    alone = replace(settings, users=1, spawn_rate=1, rate_per_s=0.0, duration_s=max(15, min(settings.duration_s, 60)),
                    slo_max_tail_ratio=0.0, slo_tail_vs_ideal=False, slo_max_slowdown_p99=0.0,
                    slo_max_p95_drift=0.0, slo_max_rss_growth=0.0, slo_max_shm_growth=0.0)
    run_locust(host, alone, out / "zero_load", metrics_url, log=log)
    t = read_timeline(out / "zero_load" / "timeline")
    return fit_zero_load(t["candidates"][t["ok"]], t["latency_ms"][t["ok"]])


def _pool(runs: list[dict], settings: LoadTestSettings) -> dict:
    """One summary over several paced runs: counts summed, rates and percentiles the median of the
    runs' (each run's own figures under ``runs``)."""
    if len(runs) == 1:
        return dict(runs[0])
    med = lambda key: float(np.median([r[key] for r in runs]))  # noqa: E731
    pooled = {k: med(k) for k in ("p50_ms", "p95_ms", "p99_ms", "requests_per_s", "pairs_per_s", "mean_candidates")}
    pooled.update(requests=sum(r["requests"] for r in runs), failures=sum(r["failures"] for r in runs),
                  p99_over_p50=pooled["p99_ms"] / pooled["p50_ms"] if pooled["p50_ms"] > 0 else float("nan"),
                  successes=sum(r.get("successes", r["requests"] - r["failures"]) for r in runs), figures_from="timeline",
                  settings=runs[0]["settings"], triton_steps=runs[-1]["triton_steps"],
                  runs=[{k: r.get(k) for k in ("requests", "successes", "failures", "requests_per_s", "pairs_per_s", "p50_ms", "p95_ms",
                                                "p99_ms", "p95_drift", "slo")} for r in runs])
    return pooled


def run_locust_at_fraction(host: str, settings: LoadTestSettings, out: Path, fraction: float,
                           metrics_url: str | None = None, log=print, server_pid: int | None = None) -> dict:
    """Find saturation with a closed-loop run (``out/saturation``, at most 60 s), measure zero-load
    latency (``out/zero_load``), then ``settings.runs`` runs paced at ``fraction`` of saturation's
    request rate (``out``, or ``out/run<k>``). The result pools the paced runs, with the tail per
    list-size bucket against the ideal FIFO server and each request's slowdown."""
    closed = replace(settings, rate_per_s=0.0, slo_max_tail_ratio=0.0, duration_s=min(settings.duration_s, 60),
                     slo_tail_vs_ideal=False, slo_max_slowdown_p99=0.0,
                     slo_max_p95_drift=0.0, slo_max_rss_growth=0.0, slo_max_shm_growth=0.0)
    saturated = run_locust(host, closed, out / "saturation", metrics_url, log=log)
    if not saturated.get("successes") or not saturated["p99_ms"] > 0:
        raise RankserveError(f"the saturation run had {saturated.get('successes', 0)} successful requests of "
                             f"{saturated['requests']}: no rate to pace at (see {out / 'saturation' / 'summary.json'})")
    log(f"saturation: {saturated['requests_per_s']:.2f} req/s, {saturated['pairs_per_s']:.0f} pairs/s, "
        f"p50 {saturated['p50_ms']:.0f} ms, p99 {saturated['p99_ms']:.0f} ms with {settings.users} closed-loop users")
    zero = zero_load(host, settings, out, metrics_url, log)
    log(f"zero load (one user, {zero.requests} requests): " + ", ".join(f"{x:.0f} candidates {y:.0f} ms" for x, y in zero.knots))
    at = paced(saturated, settings, fraction)
    runs, sizes, latency, ideal, ideal_deadline = [], [], [], [], []
    for k in range(settings.runs):
        where = out if settings.runs == 1 else out / f"run{k + 1}"
        log(f"paced run {k + 1}/{settings.runs}: {at.rate_per_s:.2f} req/s ({fraction:.0%} of saturation) from "
            f"{at.users} users for {at.duration_s} s")
        runs.append(run_locust(host, at, where, metrics_url, server_pid, log=log))
        t = read_timeline(where / "timeline")
        ok = t["ok"]
        sizes.append(t["candidates"][ok])
        latency.append(t["latency_ms"][ok])
        # the ideal server sees every request that arrived (failed ones took its time too)
        ideal.append(ideal_fifo_latency_ms(t["start"], t["candidates"], saturated["pairs_per_s"])[ok])
        ideal_deadline.append(ideal_latency_ms(t["start"], t["candidates"], saturated["pairs_per_s"], "deadline",
                                               slowdown=BatchingSettings().deadline_slowdown)[ok])
    summary = _pool(runs, at)
    summary["saturation"] = {k: saturated[k] for k in ("requests_per_s", "pairs_per_s", "p50_ms", "p95_ms", "p99_ms", "requests", "failures")}
    summary["load_fraction"] = fraction
    summary["zero_load"] = zero.to_dict()
    sizes_all = draw_sizes(at, np.random.default_rng(settings.seed), 200_000)
    summary["ideal_fifo_p99_over_p50"] = ideal_tail_ratio(at.rate_per_s, saturated["pairs_per_s"], sizes_all)
    if sizes and np.concatenate(sizes).size:
        summary["tail"] = tail_by_bucket(np.concatenate(sizes), np.concatenate(latency), np.concatenate(ideal), zero,
                                         ideal_deadline_ms=np.concatenate(ideal_deadline))
    summary = verdict(summary, at)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def run(settings: LoadTestSettings, out: Path, host: str | None = None, repo: Path | None = None,
        metrics_url: str | None = None, log=print, fraction: float | None = None) -> dict:
    """Run against ``host``, or start the embedded server on ``repo`` for the duration of the run;
    with ``fraction``, a saturation run first and then a run paced at that fraction of it. Before
    Locust starts, :func:`preflight` checks the server and the model (failing in seconds, not after
    the run)."""
    def go(url: str, metrics: str | None, server_pid: int | None = None) -> dict:
        preflight(url, settings.model)
        if fraction is None:
            return run_locust(url, settings, out, metrics, server_pid, log=log)
        return run_locust_at_fraction(url, settings, out, fraction, metrics, log, server_pid)

    if host:
        url, protocol = protocol_of(host, None if "://" in host else settings.protocol)
        log(f"{url} ({protocol}); {settings.users} users for {settings.duration_s} s"
            + ("" if metrics_url else "; no --metrics-url: no per-step Triton timings"))
        return go(url, metrics_url)
    from rankserve.demo import serve_settings
    from rankserve.server.embedded import EmbeddedServer

    with EmbeddedServer(repo or Path("model_repository"), serve_settings()) as server:
        url = f"http://{server.http_url}" if settings.protocol == "http" else f"grpc://{server.grpc_url}"
        log(f"embedded tritonserver on {url}; {settings.users} users for {settings.duration_s} s")
        return go(url, server.metrics_url, server.process.pid)


def format_summary(s: dict) -> str:
    successes = s.get("successes", s["requests"] - s["failures"])
    share = f" ({s['failures'] / s['requests']:.1%})" if s["requests"] else ""
    lines = [f"requests {s['requests']}: {successes} succeeded, {s['failures']} failed{share}",
             f"throughput (successful requests only): {s['requests_per_s']:.1f} req/s, {s['pairs_per_s']:.0f} pairs/s, "
             f"mean {s['mean_candidates']:.0f} candidates",
             f"latency of successful requests: p50 {s['p50_ms']:.0f} ms, p95 {s['p95_ms']:.0f} ms, p99 {s['p99_ms']:.0f} ms "
             f"(p99/p50 {s['p99_over_p50']:.2f})"]
    if s.get("latency_note"):
        lines.append(f"  ({s['latency_note']})")
    for e in s.get("errors", [])[:3]:
        lines.append(f"  {e['count']} x {e['error']}")
    if s.get("partial"):
        lines.insert(0, f"PARTIAL RUN: {s['partial']}; the figures cover the part that ran")
    if s.get("stopped_early"):
        lines.insert(0, f"STOPPED EARLY: {s['stopped_early']}")
    if "saturation" in s:
        sat = s["saturation"]
        lines.insert(0, f"Poisson arrivals at {s['load_fraction']:.0%} of saturation ({sat['requests_per_s']:.2f} req/s, "
                        f"{sat['pairs_per_s']:.0f} pairs/s, p50 {sat['p50_ms']:.0f} / p99 {sat['p99_ms']:.0f} ms closed loop)")
        lines.insert(3, f"  an ideal single FIFO server at this load and list-size mix: p99/p50 {s['ideal_fifo_p99_over_p50']:.2f}")
    if s.get("runs"):
        lines.append(f"{len(s['runs'])} paced runs (figures above: medians of the runs; the tail below pools their requests):")
        for k, r in enumerate(s["runs"], 1):
            lines.append(f"  run {k}: {r['requests']} requests ({r['failures']} failed), {r['requests_per_s']:.2f} req/s, {r['pairs_per_s']:.0f} pairs/s, "
                         f"p50 {r['p50_ms']:.0f} / p95 {r['p95_ms']:.0f} / p99 {r['p99_ms']:.0f} ms")
    if s.get("tail"):
        z = s["zero_load"]
        knots = ", ".join(f"{x:.0f}: {y:.0f} ms" for x, y in z.get("knots", [])[::2])
        lines.append(f"tail per list size (zero-load latency by list size {knots}; "
                     f"ideal FIFO: same arrivals and sizes at {s['saturation']['pairs_per_s']:.0f} pairs/s):")
        lines += format_tail(s["tail"])
    e = s.get("error_window")
    if e and e["first_s"] is not None:
        lines.append(f"error window: {e['first_s']:.1f} s to {e['last_s']:.1f} s into the run ({e['span_s']:.1f} s): "
                     f"{e['failed']} failed, {e['retried']} needed SDK retries ({e['retries']} retries)")
    elif e:
        lines.append("error window: none (no request failed or needed a retry)")
    if s.get("windows") and len(s["windows"]) > 1:
        lines.append(f"  window ({s.get('window_s', s['settings']['window_s'])} s)  requests  failures   p50 ms   p95 ms  (latency of successes)")
        for w in s["windows"]:
            lines.append(f"  {w['from_s']:>5} s{'' if w.get('full', True) else '*'}      {w['requests']:>8}  {w['failures']:>8}  "
                         f"{w['p50_ms']:7.0f}  {w['p95_ms']:7.0f}")
        if not all(w.get("full", True) for w in s["windows"]):
            lines.append("  * partial window (the run's end)")
        if s.get("p95_drift") is not None:
            lines.append(f"  p95 first -> last window: {s['p95_drift']:+.1%}")
    r = s.get("resources")
    if r:
        lines.append(f"server memory (median of first -> last window): RSS {r['rss_first_mb']:.0f} -> {r['rss_last_mb']:.0f} MiB "
                     f"({r['rss_growth']:+.1%}), /dev/shm {r['shm_first_mb']:.1f} -> {r['shm_last_mb']:.1f} MiB ({r['shm_growth']:+.1%})")
    if not s["triton_steps"] and s.get("figures_from") == "timeline":
        lines.append("per-step Triton timings: none (give --metrics-url, e.g. http://HOST:8002/metrics, with --host)")
    for model, m in sorted(s["triton_steps"].items()):
        lines.append(f"  {model:<22} queue {m['queue_ms']:7.2f} ms  compute {m['compute_ms']:7.2f} ms  ({m['requests']:.0f} requests)")
    slo = s["slo"]
    outcome = "PASS" if slo["passed"] else "FAIL: " + "; ".join(slo["violations"])
    checks = [f"p95 of successes <= {slo['p95_ms']:.0f} ms", f"failures <= {slo['max_failure_ratio']:.2%} of requests",
              f">= {slo.get('min_successes', 1)} successes"]
    if slo.get("max_tail_ratio"):
        checks.append(f"p99/p50 <= {slo['max_tail_ratio']}")
    if slo.get("tail_vs_ideal"):
        checks.append("p99 <= ideal FIFO p99 per list size")
    if slo.get("max_slowdown_p99"):
        checks.append(f"slowdown p99 <= {slo['max_slowdown_p99']} per list size")
    if slo.get("max_p95_drift"):
        checks.append(f"p95 drift within ±{slo['max_p95_drift']:.0%}")
    for key, what in (("max_rss_growth", "RSS"), ("max_shm_growth", "/dev/shm")):
        if slo.get(key):
            checks.append(f"{what} growth <= {slo[key]:.0%}")
    lines.append(f"SLO ({', '.join(checks)}): {outcome}")
    return "\n".join(lines)
