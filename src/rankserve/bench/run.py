"""Run the bench: a fixed pool of concurrent clients replays the realistic workload against
(a) the Triton ensemble, (b) the model alone in process (the pipeline's ceiling), (c) the naive
FastAPI + PyTorch FP32 service, one after another on this machine."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable

import numpy as np

from rankserve.data.catalog import Dataset
from rankserve.loadtest.workload import Workload
from rankserve.settings import LoadTestSettings


def _plan(dataset: Dataset, concurrency: int, duration_s: float, seed: int,
          prepare: Callable[[str, list[str]], object] = lambda q, t: (q, t)) -> list[list[tuple[object, int]]]:
    """One list of (prepared request, pair count) per client thread, from its own seeded workload,
    drawn before the clock starts, so neither drawing them nor ``prepare`` is timed."""
    per_thread = max(32, int(duration_s * 6))  # more than a thread gets through; a thread that runs out starts over
    plans = []
    for k in range(concurrency):
        workload = Workload(dataset, LoadTestSettings(), seed=seed + k)
        plans.append([(prepare(q, t), len(t)) for q, t in (workload.next_request() for _ in range(per_thread))])
    return plans


def _drive(call: Callable[[object], None], plans: list[list[tuple[object, int]]], duration_s: float) -> dict:
    """One thread per plan calls ``call`` back to back for ``duration_s``; latencies and pair counts."""
    latencies: list[float] = []
    pairs = [0]
    errors = [0]
    lock = threading.Lock()
    stop = time.monotonic() + duration_s

    def worker(plan: list) -> None:
        i = 0
        while time.monotonic() < stop:
            request, n = plan[i % len(plan)]
            i += 1
            t0 = time.perf_counter()
            try:
                call(request)
            except Exception:  # noqa: BLE001 - counted, the bench goes on
                with lock:
                    errors[0] += 1
                continue
            with lock:
                latencies.append(1000 * (time.perf_counter() - t0))
                pairs[0] += n

    started = time.monotonic()
    threads = [threading.Thread(target=worker, args=(plan,)) for plan in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {"requests": len(latencies), "errors": errors[0], "pairs_per_s": pairs[0] / elapsed,
            "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
            "p99_ms": float(np.percentile(lat, 99))}


def _process_usage(pids: Callable[[], list[int]], fn: Callable[[], dict]) -> dict:
    """Run ``fn`` while sampling CPU% and RSS of the processes ``pids()`` returns."""
    import psutil

    samples_cpu, samples_rss = [], []
    done = threading.Event()
    procs = {}

    def sample() -> None:
        while not done.is_set():
            total_cpu, total_rss = 0.0, 0
            for pid in pids():
                try:
                    p = procs.setdefault(pid, psutil.Process(pid))
                    total_cpu += p.cpu_percent(None)
                    total_rss += p.memory_info().rss
                except psutil.Error:
                    continue
            samples_cpu.append(total_cpu)
            samples_rss.append(total_rss)
            done.wait(0.5)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = fn()
    finally:
        done.set()
        sampler.join()
    result["cpu_percent"] = float(np.median(samples_cpu[1:])) if len(samples_cpu) > 1 else float("nan")
    result["rss_mb"] = float(max(samples_rss)) / 2**20 if samples_rss else float("nan")
    return result


def _group_pids(root_pid: int) -> list[int]:
    import psutil

    try:
        root = psutil.Process(root_pid)
        return [root_pid] + [c.pid for c in root.children(recursive=True)]
    except psutil.Error:
        return []


def bench_triton(repo: Path, dataset: Dataset, concurrency: int, duration_s: float, seed: int) -> dict:
    from rankserve.server.embedded import EmbeddedServer, free_serve_settings
    from rankserve_client import RankerClient

    with EmbeddedServer(repo, free_serve_settings()) as server:
        client = RankerClient(f"http://{server.http_url}")
        call = lambda request: client.rank(*request)  # noqa: E731
        _drive(call, _plan(dataset, concurrency, 3, seed + 100), 3)  # warm-up
        plans = _plan(dataset, concurrency, duration_s, seed)
        result = _process_usage(lambda: _group_pids(server.process.pid), lambda: _drive(call, plans, duration_s))
        client.close()
    manifest = json.loads((repo / "manifest.json").read_text())
    return {"name": f"triton_ensemble_{manifest['default_variant']}", **result}


class InProcessBatcher:
    """The served rank stage's batching, in process: callers queue tokenized requests, one scorer
    thread takes what is queued (up to ``max_pairs`` pairs) and scores it with :func:`rank_batch`,
    the function the served stage runs on each dynamic batch, releasing each caller as soon as its
    own pairs are scored."""

    def __init__(self, ranker, max_batch_tokens: int, max_pairs: int) -> None:
        self.ranker, self.max_batch_tokens, self.max_pairs = ranker, max_batch_tokens, max_pairs
        self.cv = threading.Condition()
        self.queue: list[tuple[dict, dict, threading.Event]] = []
        self.closed = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def score(self, encoded: dict):
        slot: dict = {}
        done = threading.Event()
        with self.cv:
            self.queue.append((encoded, slot, done))
            self.cv.notify()
        done.wait()
        if isinstance(slot["out"], Exception):
            raise slot["out"]
        return slot["out"]

    def close(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify()
        self.thread.join()

    def _loop(self) -> None:
        from rankserve.stages.rank import rank_batch

        while True:
            with self.cv:
                while not self.queue and not self.closed:
                    self.cv.wait()
                if self.closed and not self.queue:
                    return
                batch, pairs = [], 0
                while self.queue and (not batch or pairs + len(self.queue[0][0]["input_ids"]) <= self.max_pairs):
                    batch.append(self.queue.pop(0))
                    pairs += len(batch[-1][0]["input_ids"])
            def answer(i: int, outcome, batch=batch) -> None:  # as soon as each request's pairs are scored
                batch[i][1]["out"] = outcome
                batch[i][2].set()

            rank_batch(self.ranker, [encoded for encoded, _, _ in batch], self.max_batch_tokens, self.max_pairs, on_done=answer)


def bench_in_process(repo: Path, dataset: Dataset, concurrency: int, duration_s: float, seed: int) -> dict:
    """The model alone, same variant, runtime, threads and batching as the served rank stage (requests
    that wait are scored together), on pairs tokenized before the clock starts: the pipeline's
    ceiling (the pipeline must also tokenize, move tensors between processes and speak HTTP)."""
    import os

    from rankserve.builder.configs import parse
    from rankserve.settings import BatchingSettings, OrtSettings, RuntimeSettings, TokenizeSettings, from_parameters
    from rankserve.stages.rank import create_ranker
    from rankserve.stages.tokenize import encode_pairs, load_tokenizer

    config = parse(repo / "rank" / "config.pbtxt")
    params = {k: {"string_value": v.string_value} for k, v in config.parameters.items()}
    ranker = create_ranker(repo / "rank" / "1" / "model.onnx", from_parameters(RuntimeSettings, params), from_parameters(OrtSettings, params))
    tokenizer = load_tokenizer(repo / "tokenize" / "1" / "tokenizer.json", TokenizeSettings())
    batcher = InProcessBatcher(ranker, from_parameters(BatchingSettings, params).max_batch_tokens, config.max_batch_size)
    encode = lambda q, t: encode_pairs(tokenizer, q, t)  # noqa: E731
    try:
        _drive(batcher.score, _plan(dataset, concurrency, 3, seed + 100, encode), 3)
        plans = _plan(dataset, concurrency, duration_s, seed, encode)
        result = _process_usage(lambda: [os.getpid()], lambda: _drive(batcher.score, plans, duration_s))
    finally:
        batcher.close()
    return {"name": f"model_alone_in_process_{params['variant']['string_value']}", **result}


def bench_naive(ranker_dir: Path, dataset: Dataset, concurrency: int, duration_s: float, seed: int, port: int) -> dict:
    proc = subprocess.Popen([sys.executable, "-m", "rankserve.bench.naive_service", str(ranker_dir), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(proc.stderr.read().decode()[-2000:])
                time.sleep(0.5)
        local = threading.local()

        def call(request):
            q, t = request
            conn = getattr(local, "conn", None) or http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            local.conn = conn
            conn.request("POST", "/rank", json.dumps({"query": q, "texts": t}), {"Content-Type": "application/json"})
            response = conn.getresponse()
            body = response.read()
            if response.status != 200:
                raise RuntimeError(body[:200])

        _drive(call, _plan(dataset, concurrency, 3, seed + 100), 3)
        plans = _plan(dataset, concurrency, duration_s, seed)
        result = _process_usage(lambda: [proc.pid], lambda: _drive(call, plans, duration_s))
    finally:
        proc.terminate()
        proc.wait(30)
    return {"name": "naive_fastapi_pytorch_fp32_pad128", **result}


def run_bench(repo: Path, ranker_dir: Path, out: Path, concurrency: int = 4, duration_s: float = 30, seed: int = 9, log=print) -> dict:
    from rankserve.data.catalog import generate
    from rankserve.data.wands import load_queries
    from rankserve.server.embedded import free_port

    dataset = generate(load_queries())  # the demo catalog, built once for every setup and client
    setups = []
    log(f"(a) Triton ensemble, {concurrency} concurrent clients, {duration_s:.0f} s")
    setups.append(bench_triton(repo, dataset, concurrency, duration_s, seed))
    log("(b) model alone in process")
    setups.append(bench_in_process(repo, dataset, concurrency, duration_s, seed))
    log("(c) naive FastAPI + PyTorch FP32, padding to 128")
    setups.append(bench_naive(ranker_dir, dataset, concurrency, duration_s, seed, free_port()))
    triton, ceiling, naive = setups
    ratios = {"triton_vs_in_process": triton["pairs_per_s"] / ceiling["pairs_per_s"],
              "triton_vs_naive": triton["pairs_per_s"] / naive["pairs_per_s"],
              "triton_p95_vs_naive_p95": triton["p95_ms"] / naive["p95_ms"]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(setups, indent=2) + "\n")
    (out / "ratios.json").write_text(json.dumps(ratios, indent=2) + "\n")
    _plot(setups, out / "bench.png")
    return {"setups": setups, "ratios": ratios}


def _plot(setups: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    names = [s["name"].replace("_", "\n", 2) for s in setups]
    a.bar(names, [s["pairs_per_s"] for s in setups], color=["#4477aa", "#66ccee", "#ee6677"])
    a.set_ylabel("pairs/s")
    a.set_title("Throughput")
    for i, key in enumerate(("p50_ms", "p95_ms", "p99_ms")):
        b.bar(np.arange(len(setups)) + 0.27 * (i - 1), [s[key] for s in setups], width=0.27, label=key)
    b.set_xticks(range(len(setups)), names)
    b.set_ylabel("ms")
    b.set_title("Latency")
    b.legend()
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_bench(result: dict) -> str:
    lines = ["| setup | pairs/s | p50 ms | p95 ms | p99 ms | CPU % | RSS MB | errors |", "|---|---|---|---|---|---|---|---|"]
    for s in result["setups"]:
        lines.append(f"| {s['name']} | {s['pairs_per_s']:.0f} | {s['p50_ms']:.0f} | {s['p95_ms']:.0f} | {s['p99_ms']:.0f} | "
                     f"{s['cpu_percent']:.0f} | {s['rss_mb']:.0f} | {s['errors']} |")
    r = result["ratios"]
    lines.append(f"Triton / in-process ceiling: {r['triton_vs_in_process']:.2f}; Triton / naive: {r['triton_vs_naive']:.2f}x; "
                 f"Triton p95 / naive p95: {r['triton_p95_vs_naive_p95']:.2f}")
    return "\n".join(lines)
