"""Retry amplification under overload: how many attempts the server takes per client call when its rank
queue sheds load, with the SDK's retry budget and without it (what the SDK did before issue 17).

    python -m rankserve.bench.retry_storm --model-repository R --rate 8 --seconds 10

A copy of the repository gets a rank queue of ``--queue`` requests and a ``--delay-ms`` batching delay, and
calls arrive at ``--rate`` per second whatever happens to earlier ones (open loop, as user traffic does),
all through one client, faster than the server serves them. Every attempt that reaches the server is
tokenized before it is refused, and Triton counts it (``tokenize`` successes): attempts per call is that
count over the calls made. The policies run interleaved, in ``--blocks`` rounds, against one server.
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import statistics
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rankserve.builder.configs import parse, to_text
from rankserve.server.embedded import EmbeddedServer, free_serve_settings

TEXTS = [f"product {i}: a solid oak dining table with {i % 7} matching chairs and a walnut finish" for i in range(20)]
POLICIES = {  # the README's advice for riding over a restart (before: every retry also for Overloaded; its backoff was full
    # jitter capped at 2 s, here half-to-full jitter capped at 8 s: fewer attempts than before, if anything), then the defaults
    "no budget, 12 overload retries (~before)": dict(retries=12, backoff=0.2, overload_retries=12, overload_backoff=0.2, retry_budget=None),
    "budget, retries=12 (now)": dict(retries=12, backoff=0.2),
    "budget, defaults (now)": dict(),
}


def tokenized(metrics_url: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    return float(re.search(r'^nv_inference_request_success\{model="tokenize",version="1"\} (\S+)$', text, re.M).group(1))


def block(server: EmbeddedServer, policy: dict, rate: float, seconds: float) -> dict:
    from rankserve_client import Overloaded, RankerClient

    outcomes: list[tuple[bool, float]] = []
    before, started_block = tokenized(server.metrics_url), time.monotonic()
    with RankerClient(f"http://{server.http_url}", check_api=False, **policy) as client, ThreadPoolExecutor(256) as pool:

        def call() -> None:
            started = time.perf_counter()
            try:
                client.rank("oak dining table", TEXTS)
                outcomes.append((True, time.perf_counter() - started))
            except Overloaded:
                outcomes.append((False, time.perf_counter() - started))

        stop = time.monotonic() + seconds
        while time.monotonic() < stop:  # Poisson arrivals
            pool.submit(call)
            time.sleep(random.expovariate(rate))
    wall = time.monotonic() - started_block  # until the last call ended, retries included
    time.sleep(0.5)  # Triton's counters land after the responses
    served = [s for ok, s in outcomes if ok]
    return {"calls": len(outcomes), "served": len(served), "attempts": tokenized(server.metrics_url) - before,
            "served_s": served, "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--rate", type=float, default=8, help="calls per second (the tiny test ranker serves about 3 with the defaults)")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--queue", type=int, default=1, help="the rank queue's max_queue_size in the copy")
    parser.add_argument("--delay-ms", type=float, default=300, help="the rank stage's max_queue_delay in the copy")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        shutil.copytree(args.model_repository, repo)
        config = parse(repo / "rank" / "config.pbtxt")
        config.dynamic_batching.max_queue_delay_microseconds = int(args.delay_ms * 1000)
        config.dynamic_batching.default_queue_policy.max_queue_size = args.queue
        (repo / "rank" / "config.pbtxt").write_text(to_text(config))
        totals = {name: {"calls": 0, "served": 0, "attempts": 0.0, "served_s": [], "wall": 0.0} for name in POLICIES}
        with EmbeddedServer(repo, free_serve_settings(), Path(tmp) / "tritonserver.log") as server:
            for _ in range(args.blocks):  # interleaved: drift on a shared machine hits every policy alike
                for name, policy in POLICIES.items():
                    got = block(server, policy, args.rate, args.seconds)
                    for key in ("calls", "served", "attempts", "wall"):
                        totals[name][key] += got[key]
                    totals[name]["served_s"] += got["served_s"]
    print(f"{args.rate:g} calls/s (Poisson) through one client per policy, rank queue {args.queue}, {args.blocks} x {args.seconds:g} s per policy")
    print("served/s: over the time until the last call ended (retries included); latency: of the served calls")
    print(f"{'policy':42} {'calls':>6} {'served':>7} {'served/s':>9} {'attempts':>9} {'attempts/call':>14} {'served p50 s':>13}")
    for name, t in totals.items():
        p50 = statistics.median(t["served_s"]) if t["served_s"] else float("nan")
        print(f"{name:42} {t['calls']:>6} {t['served']:>7} {t['served'] / t['wall']:>9.1f} {t['attempts']:>9.0f} "
              f"{t['attempts'] / max(t['calls'], 1):>14.2f} {p50:>13.2f}")


if __name__ == "__main__":
    main()
