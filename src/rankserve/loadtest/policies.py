"""Ideal servers under the load test's arrivals and sizes, one per scheduling policy: what each
policy can reach at best, so a measured tail is read against the right reference.

Every server here works at the measured speed with no overhead (a request of n pairs costs n /
``pairs_per_s``) and is work-conserving; they differ only in which pairs go next:

- ``fifo``: whole requests in arrival order (the reference of ``--slo-tail-vs-ideal``);
- ``deadline``: calls of ``call_pairs`` pairs, earliest deadline first, a request's deadline being
  its arrival + ``slowdown`` x its time alone (what ``scheduling="deadline"`` does in the rank stage);
- ``srpt``: calls of ``call_pairs`` pairs, the request with the fewest pairs left first (best
  possible for mean latency, worst for the longest lists).

``python -m rankserve.loadtest.policies`` prints them side by side per list-size bucket over
200,000 Poisson requests of the default workload at 50% load (loadtest/README.md quotes it).
"""

from __future__ import annotations

import argparse
import heapq

import numpy as np

from rankserve.loadtest.tail import BUCKETS, bucket_label, ideal_fifo_latency_ms

POLICIES = ("fifo", "deadline", "srpt")


def ideal_latency_ms(starts_s: np.ndarray, sizes: np.ndarray, pairs_per_s: float, policy: str = "fifo",
                     call_pairs: int = 32, slowdown: float = 4.0) -> np.ndarray:
    """Each request's time in the ideal ``policy`` server (ms), for these arrivals and list sizes."""
    if policy == "fifo":
        return ideal_fifo_latency_ms(starts_s, sizes, pairs_per_s)
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    order = np.argsort(starts_s, kind="stable")
    arrivals = np.asarray(starts_s, dtype=float)[order]
    left = np.asarray(sizes, dtype=float)[order].copy()
    done = np.empty_like(left)
    heap: list[tuple[float, int]] = []
    t, i, n = 0.0, 0, len(arrivals)
    while i < n or heap:
        if not heap:
            t = max(t, arrivals[i])
        while i < n and arrivals[i] <= t:  # arrivals join at call boundaries
            key = arrivals[i] + slowdown * left[i] / pairs_per_s if policy == "deadline" else left[i]
            heapq.heappush(heap, (key, i))
            i += 1
        budget, finished, back = float(call_pairs), [], []
        while budget > 0 and heap:
            key, r = heapq.heappop(heap)
            take = min(left[r], budget)
            budget -= take
            left[r] -= take
            if left[r] <= 0:
                finished.append(r)
            else:
                back.append((left[r] if policy == "srpt" else key, r))
        for entry in back:
            heapq.heappush(heap, entry)
        t += (call_pairs - budget) / pairs_per_s
        for r in finished:
            done[r] = t - arrivals[r]
    out = np.empty_like(done)
    out[order] = done
    return 1000 * out


def compare(starts_s: np.ndarray, sizes: np.ndarray, pairs_per_s: float, policies=POLICIES, call_pairs: int = 32,
            slowdown: float = 4.0, buckets=BUCKETS) -> list[dict]:
    """Per policy and list-size bucket: p99 latency and p99 slowdown (latency over the request's
    own time alone, n / pairs_per_s)."""
    sizes = np.asarray(sizes)
    alone_ms = 1000 * sizes / pairs_per_s
    rows = []
    for policy in policies:
        latency = ideal_latency_ms(starts_s, sizes, pairs_per_s, policy, call_pairs, slowdown)
        for label, inside in [(bucket_label(lo, hi), (sizes >= lo) & (sizes <= hi)) for lo, hi in buckets] + [("all", sizes > 0)]:
            if inside.any():
                rows.append({"policy": policy, "bucket": label, "requests": int(inside.sum()),
                             "p99_ms": float(np.percentile(latency[inside], 99)),
                             "slowdown_p99": float(np.percentile((latency / alone_ms)[inside], 99))})
    return rows


def main(argv: list[str] | None = None) -> None:
    from rankserve.loadtest.workload import draw_sizes
    from rankserve.settings import LoadTestSettings

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs-per-s", type=float, default=213.0, help="the server's saturated speed (default: measured here)")
    p.add_argument("--load", type=float, default=0.5, help="fraction of saturation")
    p.add_argument("--requests", type=int, default=200_000)
    p.add_argument("--call-pairs", type=int, default=32)
    p.add_argument("--slowdown", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    settings = LoadTestSettings()
    rng = np.random.default_rng(args.seed)
    sizes = draw_sizes(settings, rng, args.requests)
    rate = args.load * args.pairs_per_s / sizes.mean()
    starts = np.cumsum(rng.exponential(1 / rate, args.requests))
    print(f"{args.requests} Poisson requests at {args.load:.0%} of {args.pairs_per_s:.0f} pairs/s ({rate:.2f} requests/s), "
          f"log-normal lists (mean {settings.candidates_mean}, sigma {settings.candidates_sigma}); calls of "
          f"{args.call_pairs} pairs; deadline = arrival + {args.slowdown:g} x time alone")
    print(f"  {'policy':>8}  {'candidates':>10}  {'requests':>8}  {'p99 ms':>7}  {'slowdown p99':>12}")
    for r in compare(starts, sizes, args.pairs_per_s, call_pairs=args.call_pairs, slowdown=args.slowdown):
        print(f"  {r['policy']:>8}  {r['bucket']:>10}  {r['requests']:>8}  {r['p99_ms']:7.0f}  {r['slowdown_p99']:12.2f}")


if __name__ == "__main__":
    main()
