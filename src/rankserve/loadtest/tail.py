"""The tail at a paced load, judged per request rather than by p99/p50.

p99 <= 2.5 x p50 cannot hold for any server under Poisson arrivals with log-normal list sizes
(loadtest/README.md), so the tail is judged against two references that can:

- the **ideal single FIFO server**: the same arrivals (the run's own request start times), the same
  list sizes, and the measured speed (a request of n pairs takes n / saturation pairs/s, no overhead
  at all); its per-request latency comes from Lindley's recursion. Target: measured p99 <= its p99.
- each request's **slowdown**: its latency over its own zero-load latency (the latency a request of
  that size gets alone, fitted on a one-user closed-loop run). Target: p99 of slowdown <= a ceiling.

Both per list-size bucket, since one figure over all sizes hides that small lists wait behind big ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BUCKETS: tuple[tuple[int, int], ...] = ((1, 50), (51, 150), (151, 100_000))
"""List-size buckets (inclusive); the default workload (log-normal, mean 100, sigma 0.6) puts about
a quarter, a half and a quarter of its requests in them."""


def bucket_label(lo: int, hi: int) -> str:
    return f"{lo}+" if hi >= 100_000 else f"{lo}-{hi}"


@dataclass(frozen=True)
class ZeroLoad:
    """Latency of a request alone for a list of n candidates: piecewise linear through ``knots``
    (median size, median latency of each size bin), and beyond the outer knots along the fitted
    line's slope; without knots, ``intercept_ms + slope_ms * n``. The bins matter: per-pair cost
    falls as lists grow (bigger batches), so one line through all sizes (whose intercept came out
    negative here) misjudged small lists' zero-load latency by about 10%."""

    intercept_ms: float
    slope_ms: float
    requests: int
    knots: tuple[tuple[float, float], ...] = ()

    def latency_ms(self, sizes: np.ndarray) -> np.ndarray:
        n = np.asarray(sizes, dtype=float)
        if len(self.knots) < 2:
            return self.intercept_ms + self.slope_ms * n
        x = np.array([k[0] for k in self.knots])
        y = np.array([k[1] for k in self.knots])
        out = np.interp(n, x, y)
        out = np.where(n < x[0], y[0] + self.slope_ms * (n - x[0]), out)
        out = np.where(n > x[-1], y[-1] + self.slope_ms * (n - x[-1]), out)
        return np.maximum(out, 1e-3)

    def to_dict(self) -> dict:
        return {"intercept_ms": self.intercept_ms, "slope_ms_per_pair": self.slope_ms, "requests": self.requests,
                "knots": [list(k) for k in self.knots]}


def fit_zero_load(sizes: np.ndarray, latencies_ms: np.ndarray, bins: int = 8) -> ZeroLoad:
    """Median latency of each size bin (equal-count bins), so a few slow requests (a GC pause, a
    noisy neighbour) move nothing, and a line through those medians (slope > 0, intercept >= 0)."""
    sizes = np.asarray(sizes, dtype=float)
    lat = np.asarray(latencies_ms, dtype=float)
    if sizes.size < 4 or np.unique(sizes).size < 2:
        raise ValueError(f"a zero-load fit needs at least 4 requests of 2 or more sizes, got {sizes.size}")
    order = np.argsort(sizes)
    groups = [g for g in np.array_split(order, min(bins, sizes.size // 2)) if g.size]
    x = np.array([np.median(sizes[g]) for g in groups])
    y = np.array([np.median(lat[g]) for g in groups])
    slope, intercept = np.polyfit(x, y, 1) if np.unique(x).size > 1 else (np.median(lat / sizes), 0.0)
    slope = max(float(slope), 1e-6)
    intercept = max(float(intercept), 0.0)
    knots: list[tuple[float, float]] = []
    for xi, yi in zip(x, y):  # equal median sizes in two bins: one knot at their mean latency
        if knots and xi <= knots[-1][0]:
            knots[-1] = (knots[-1][0], (knots[-1][1] + float(yi)) / 2)
        else:
            knots.append((float(xi), float(yi)))
    return ZeroLoad(intercept, slope, int(sizes.size), tuple(knots) if len(knots) >= 2 else ())


def ideal_fifo_latency_ms(starts_s: np.ndarray, sizes: np.ndarray, pairs_per_s: float) -> np.ndarray:
    """Time in system at the ideal single FIFO server for these arrivals and sizes (Lindley's recursion)."""
    order = np.argsort(starts_s, kind="stable")
    arrivals = np.asarray(starts_s, dtype=float)[order]
    service = np.asarray(sizes, dtype=float)[order] / pairs_per_s
    done = np.empty_like(service)
    free_at = -np.inf
    for i, (a, s) in enumerate(zip(arrivals, service)):
        free_at = max(free_at, a) + s
        done[i] = free_at - a
    out = np.empty_like(done)
    out[order] = done
    return 1000 * out


def tail_by_bucket(sizes: np.ndarray, latency_ms: np.ndarray, ideal_ms: np.ndarray, zero: ZeroLoad,
                   buckets: tuple[tuple[int, int], ...] = BUCKETS, ideal_deadline_ms: np.ndarray | None = None) -> list[dict]:
    """Per bucket and over all requests: count, measured p50/p99, the ideal FIFO server's p99 (and,
    given ``ideal_deadline_ms``, the ideal deadline-scheduled server's), and p50/p99 of slowdown
    (latency / zero-load latency). Successful requests only."""
    sizes = np.asarray(sizes)
    slowdown = np.asarray(latency_ms) / zero.latency_ms(sizes)
    ideal_slowdown = np.asarray(ideal_ms) / zero.latency_ms(sizes)
    rows = []
    for label, inside in [(bucket_label(lo, hi), (sizes >= lo) & (sizes <= hi)) for lo, hi in buckets] + [("all", sizes > 0)]:
        n = int(inside.sum())
        if n == 0:
            rows.append({"bucket": label, "requests": 0})
            continue
        p50, p99 = np.percentile(latency_ms[inside], [50, 99])
        s50, s99 = np.percentile(slowdown[inside], [50, 99])
        rows.append({"bucket": label, "requests": n, "p50_ms": float(p50), "p99_ms": float(p99),
                     "ideal_fifo_p99_ms": float(np.percentile(ideal_ms[inside], 99)),
                     "slowdown_p50": float(s50), "slowdown_p99": float(s99),
                     # the same reference server's slowdown: what waiting in one FIFO queue costs small lists
                     "ideal_fifo_slowdown_p99": float(np.percentile(ideal_slowdown[inside], 99))})
        if ideal_deadline_ms is not None:
            rows[-1]["ideal_deadline_p99_ms"] = float(np.percentile(np.asarray(ideal_deadline_ms)[inside], 99))
    return rows


def tail_violations(rows: list[dict], max_slowdown_p99: float, vs_ideal: bool, min_requests: int = 1,
                    reference: str = "fifo") -> list[str]:
    """The tail targets each bucket misses (buckets with fewer than ``min_requests`` are not judged);
    ``reference``: the ideal server the p99 is compared with (``fifo`` or ``deadline``)."""
    out = []
    key, name = f"ideal_{reference}_p99_ms", "FIFO" if reference == "fifo" else reference
    for r in rows:
        if r["requests"] < min_requests:
            continue
        if vs_ideal and key not in r:
            out.append(f"{r['bucket']} candidates: no ideal {name} reference in this summary")
        elif vs_ideal and not r["p99_ms"] <= r[key]:
            out.append(f"{r['bucket']} candidates: p99 {r['p99_ms']:.0f} ms > ideal {name} p99 {r[key]:.0f} ms")
        if max_slowdown_p99 and not r["slowdown_p99"] <= max_slowdown_p99:
            out.append(f"{r['bucket']} candidates: slowdown p99 {r['slowdown_p99']:.2f} > {max_slowdown_p99}")
    return out


def format_tail(rows: list[dict]) -> list[str]:
    deadline = any("ideal_deadline_p99_ms" in r for r in rows)
    lines = ["  candidates  requests   p50 ms   p99 ms  ideal FIFO p99 ms" + ("  ideal deadline p99 ms" if deadline else "")
             + "  slowdown p50  slowdown p99  ideal FIFO slowdown p99"]
    for r in rows:
        if not r["requests"]:
            lines.append(f"  {r['bucket']:>10}  {0:>8}")
            continue
        lines.append(f"  {r['bucket']:>10}  {r['requests']:>8}  {r['p50_ms']:7.0f}  {r['p99_ms']:7.0f}  {r['ideal_fifo_p99_ms']:17.0f}  "
                     + (f"{r.get('ideal_deadline_p99_ms', float('nan')):21.0f}  " if deadline else "")
                     + f"{r['slowdown_p50']:12.2f}  {r['slowdown_p99']:12.2f}  {r['ideal_fifo_slowdown_p99']:23.2f}")
    return lines
