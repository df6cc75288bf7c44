"""The per-request timeline of a load run, and what it shows over time.

Each Locust process appends one CSV row per request (start time, latency, outcome, SDK retries)
to ``timeline-<pid>.csv``; Locust's own statistics are aggregates over the whole run, which cannot
show an error window (when a restart hurt clients) or drift (whether the last minute of a soak is
slower than the first). The server's memory is sampled next to it (:class:`ResourceSampler`).
"""

from __future__ import annotations

import csv
import os
import threading
import time
from pathlib import Path

import numpy as np

from rankserve.server.processes import group_pids, stub_processes

FIELDS = ("start", "latency_ms", "ok", "retries", "candidates", "error")


class TimelineWriter:
    """Appends rows to ``directory/timeline-<pid>.csv``, one line per request, flushed as written."""

    def __init__(self, directory: str | Path) -> None:
        path = Path(directory) / f"timeline-{os.getpid()}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", newline="", buffering=1)
        self._csv = csv.writer(self._file)
        if path.stat().st_size == 0:
            self._csv.writerow(FIELDS)

    def write(self, start: float, latency_ms: float, ok: bool, retries: int, candidates: int, error: str = "") -> None:
        self._csv.writerow((f"{start:.3f}", f"{latency_ms:.1f}", int(ok), retries, candidates, error[:200]))

    def close(self) -> None:
        self._file.close()


def read_timeline(directory: str | Path) -> dict[str, np.ndarray]:
    """All rows of every ``timeline-*.csv`` in ``directory``, as columns sorted by start time (a line
    cut short, as when a run is stopped while a user writes, is left out)."""
    rows = []
    for path in sorted(Path(directory).glob("timeline-*.csv")):
        with path.open(newline="") as f:
            for r in csv.DictReader(f):
                try:
                    rows.append((float(r["start"]), float(r["latency_ms"]), r["ok"] == "1", int(r["retries"]),
                                 int(r["candidates"]), r["error"] or ""))
                except (TypeError, ValueError):
                    continue
    rows.sort(key=lambda r: r[0])
    return {
        "start": np.array([r[0] for r in rows], dtype=float),
        "latency_ms": np.array([r[1] for r in rows], dtype=float),
        "ok": np.array([r[2] for r in rows], dtype=bool),
        "retries": np.array([r[3] for r in rows], dtype=int),
        "candidates": np.array([r[4] for r in rows], dtype=int),
        "error": np.array([r[5] for r in rows], dtype=object),
    }


def error_window(t: dict[str, np.ndarray], origin: float) -> dict:
    """When requests failed or needed retries: first and last such request (seconds from
    ``origin``, the run's start), counts, and the span between them."""
    hurt = ~t["ok"] | (t["retries"] > 0)
    out = {"failed": int((~t["ok"]).sum()), "retried": int((t["retries"] > 0).sum()), "retries": int(t["retries"].sum())}
    if not hurt.any():
        return {**out, "first_s": None, "last_s": None, "span_s": 0.0}
    starts = t["start"][hurt]
    ends = starts + t["latency_ms"][hurt] / 1000
    return {**out, "first_s": float(starts.min() - origin), "last_s": float(ends.max() - origin),
            "span_s": float(ends.max() - starts.min())}


def window_length(window_s: int, duration_s: float) -> int:
    """The window the timeline is cut into: ``window_s``, or for a run shorter than that, a quarter of
    the run (at least 1 s), so a short run still shows how it went."""
    return window_s if duration_s >= window_s else max(1, int(duration_s // 4))


def windows(t: dict[str, np.ndarray], origin: float, window_s: float, duration_s: float) -> list[dict]:
    """Requests started in each window of ``window_s`` from ``origin``: count, failures, p50/p95
    latency of those that succeeded. Every request is in one window, so the windows add up to the
    run's counts; the windows after the last full one within ``duration_s`` (requests started as the
    run ended) are marked ``full: False`` and left out of drift figures."""
    full_n = int(duration_s // window_s)
    last = float(t["start"].max() - origin) if t["start"].size else 0.0
    n = max(full_n, int(last // window_s) + 1) if t["start"].size else full_n
    out = []
    for k in range(n):
        lo, hi = origin + k * window_s, origin + (k + 1) * window_s
        inside = (t["start"] >= lo) & (t["start"] < hi)
        if k == 0:
            inside |= t["start"] < lo
        ok = t["latency_ms"][inside & t["ok"]]
        p50, p95 = (np.percentile(ok, [50, 95]) if ok.size else (float("nan"), float("nan")))
        out.append({"window": k, "from_s": k * window_s, "requests": int(inside.sum()), "successes": int(ok.size),
                    "failures": int((inside & ~t["ok"]).sum()), "p50_ms": float(p50), "p95_ms": float(p95),
                    "full": k < full_n})
    return out


def drift(first: float, last: float) -> float:
    """Relative change from ``first`` to ``last`` (0.1: 10% higher)."""
    return float(last / first - 1) if first > 0 else float("nan")


# -- the server's memory -----------------------------------------------------------------------

def process_rss_bytes(pid: int, proc: Path = Path("/proc")) -> int:
    """Resident memory of one process (0 when it is gone)."""
    try:
        status = (proc / str(pid) / "status").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0)


def rss_bytes(pgid: int, proc: Path = Path("/proc")) -> int:
    """Resident memory of every process in group ``pgid`` (the server and its stubs), summed."""
    return sum(process_rss_bytes(pid, proc) for pid in group_pids(pgid, proc))


def shm_bytes(server_pid: int, proc: Path = Path("/proc"), shm: Path = Path("/dev/shm")) -> int:
    """Bytes the server's Python-backend stubs hold in /dev/shm: the sizes of their regions (a
    region grows when a request does not fit; a leak shows as regions that grow or multiply)."""
    total = 0
    for stub in stub_processes(server_pid, proc):
        try:
            total += (shm / stub.shm_region).stat().st_size
        except OSError:
            pass
    return total


class ResourceSampler:
    """Samples the memory of a server that leads its own process group (the embedded server):
    :func:`rss_bytes` of the group and :func:`shm_bytes` of its stubs, every ``interval_s``, in a
    background thread: ``with ResourceSampler(pid) as sampler: ...`` then ``sampler.samples``
    (time, rss, shm)."""

    def __init__(self, server_pid: int, interval_s: float = 5.0) -> None:
        self.server_pid, self.interval_s = server_pid, interval_s
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append((time.time(), rss_bytes(self.server_pid), shm_bytes(self.server_pid)))
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> "ResourceSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def resource_growth(samples: list[tuple[float, int, int]], origin: float, window_s: float, duration_s: float) -> dict | None:
    """Median RSS and /dev/shm in the first and the last full window of the run, and their growth."""
    n = int(duration_s // window_s)
    if n < 1 or not samples:
        return None
    s = np.array(samples, dtype=float)

    def median_in(k: int) -> tuple[float, float]:
        inside = (s[:, 0] >= origin + k * window_s) & (s[:, 0] < origin + (k + 1) * window_s)
        chosen = s[inside] if inside.any() else s[[np.abs(s[:, 0] - origin - (k + 0.5) * window_s).argmin()]]
        return float(np.median(chosen[:, 1])), float(np.median(chosen[:, 2]))

    (rss0, shm0), (rss1, shm1) = median_in(0), median_in(n - 1)
    return {"rss_first_mb": rss0 / 2**20, "rss_last_mb": rss1 / 2**20, "rss_growth": drift(rss0, rss1),
            "shm_first_mb": shm0 / 2**20, "shm_last_mb": shm1 / 2**20, "shm_growth": drift(shm0, shm1) if shm0 else (0.0 if shm1 == 0 else float("inf")),
            "samples": len(samples)}
