"""Run the bench: a fixed pool of concurrent clients replays the realistic workload against
(a) ``ranker``, the Triton ensemble of the repository's default variant, (b) the same model alone in
process (the pipeline's ceiling), (c) the baseline a team would deploy instead, a FastAPI server over
the PyTorch model with dynamic batching (:mod:`rankserve.bench.batched_service`), and, as a
footnote, (d) the naive FastAPI + PyTorch FP32 service without batching, one after another on this
machine. Targets: ``ranker`` at least 3x the baseline's pairs/s and 0.9 of the model in process."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable

import numpy as np

from rankserve.data.catalog import Dataset
from rankserve.loadtest.workload import Workload
from rankserve.settings import LoadTestSettings, TokenizeSettings

TARGETS = {"triton_vs_baseline": 3.0, "triton_vs_in_process": 0.9}
"""Least ``ranker`` pairs/s relative to the PyTorch dynamic-batching baseline and to the model alone in process."""
CHECK_REQUESTS = 5
"""Requests of the workload both ``ranker``'s FP32 variant and the baseline score before the clock
starts, to show the baseline is the same model on the same inputs."""


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


def _tokenize_settings(repo: Path) -> TokenizeSettings:
    """The served tokenizer's settings (``max_length`` above all), from the repository's tokenize config."""
    from rankserve.builder.configs import parse
    from rankserve.settings import from_parameters

    config = parse(repo / "tokenize" / "config.pbtxt")
    return from_parameters(TokenizeSettings, {k: {"string_value": v.string_value} for k, v in config.parameters.items()})


def _check_requests(dataset: Dataset, seed: int) -> list[tuple[str, list[str]]]:
    workload = Workload(dataset, LoadTestSettings(), seed=seed + 1000)
    return [workload.next_request() for _ in range(CHECK_REQUESTS)]


def bench_triton(repo: Path, dataset: Dataset, concurrency: int, duration_s: float, seed: int,
                 check: list[tuple[str, list[str]]] = ()) -> dict:
    """``ranker``: the ensemble of the repository's default variant (the fastest loaded variant
    passing the strict gate, or the one named at build time). With ``check``, the result's
    ``reference`` holds those requests' scores from the FP32 variant (``ranker`` when none is loaded)."""
    from rankserve.optimize.gate import passed_gate
    from rankserve.server.embedded import EmbeddedServer, free_serve_settings
    from rankserve_client import RankerClient

    manifest = json.loads((repo / "manifest.json").read_text())
    default = manifest["default_variant"]
    reference_model = (manifest["variants"].get("fp32") or {}).get("ensemble") or "ranker"
    with EmbeddedServer(repo, free_serve_settings()) as server:
        # "ranker": the default variant; the same generous timeout as the other setups' clients (a
        # loaded machine's p99 can pass the SDK's 10 s default, which would count as errors here only)
        client = RankerClient(f"http://{server.http_url}", model="ranker", timeout=120.0)
        reference = [_by_index(client.rank(q, t, model=reference_model), len(t)).tolist() for q, t in check]
        call = lambda request: client.rank(*request)  # noqa: E731
        _drive(call, _plan(dataset, concurrency, 3, seed + 100), 3)  # warm-up
        plans = _plan(dataset, concurrency, duration_s, seed)
        result = _process_usage(lambda: _group_pids(server.process.pid), lambda: _drive(call, plans, duration_s))
        client.close()
    gate = (manifest["variants"][default].get("gate") or {})
    out = {"name": f"triton_ensemble_{default}", "model": "ranker", "variant": default,
           "default_rule": manifest.get("default_rule", "not recorded"), "gate": passed_gate(gate) if gate else "none", **result}
    if check:
        out["reference"] = {"model": reference_model,
                            "precision": "fp32" if reference_model != "ranker" or default == "fp32" else default,
                            "scores": reference}
    return out


def _by_index(items, n: int) -> np.ndarray:
    scores = np.full(n, np.nan, dtype=np.float32)
    for item in items:
        scores[item.id] = item.score
    return scores


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
    from rankserve.settings import BatchingSettings, OrtSettings, RuntimeSettings, from_parameters
    from rankserve.stages.rank import create_ranker
    from rankserve.stages.tokenize import encode_pairs, load_tokenizer

    config = parse(repo / "rank" / "config.pbtxt")
    params = {k: {"string_value": v.string_value} for k, v in config.parameters.items()}
    ranker = create_ranker(repo / "rank" / "1" / "model.onnx", from_parameters(RuntimeSettings, params), from_parameters(OrtSettings, params))
    tokenizer = load_tokenizer(repo / "tokenize" / "1" / "tokenizer.json", _tokenize_settings(repo))
    batcher = InProcessBatcher(ranker, from_parameters(BatchingSettings, params).max_batch_tokens, config.max_batch_size)
    encode = lambda q, t: encode_pairs(tokenizer, q, t)  # noqa: E731
    try:
        _drive(batcher.score, _plan(dataset, concurrency, 3, seed + 100, encode), 3)
        plans = _plan(dataset, concurrency, duration_s, seed, encode)
        result = _process_usage(lambda: [os.getpid()], lambda: _drive(batcher.score, plans, duration_s))
    finally:
        batcher.close()
    return {"name": f"model_alone_in_process_{params['variant']['string_value']}", **result}


class _HttpService:
    """A bench service in its own process (``python -m MODULE ...``), ready once ``/ready`` answers;
    ``rank`` calls keep one connection per client thread."""

    def __init__(self, argv: list[str], port: int, ready_timeout_s: float = 180) -> None:
        self.port = port
        self.log = tempfile.TemporaryFile()  # not a pipe: a service that logs a lot would block on a full one
        self.proc = subprocess.Popen([sys.executable, "-m", *argv], stdout=subprocess.DEVNULL, stderr=self.log)
        self.local = threading.local()
        deadline = time.monotonic() + ready_timeout_s
        try:
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1)
                    return
                except OSError:
                    if self.proc.poll() is not None:
                        self.log.seek(0)
                        raise RuntimeError(f"{argv[0]} exited: {self.log.read().decode(errors='replace')[-2000:]}") from None
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{argv[0]} not ready after {ready_timeout_s:.0f} s") from None
                    time.sleep(0.5)
        except BaseException:
            self.close()
            raise

    def rank(self, request: tuple[str, list[str]]) -> dict:
        q, t = request
        conn = getattr(self.local, "conn", None) or http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        self.local.conn = conn
        try:
            conn.request("POST", "/rank", json.dumps({"query": q, "texts": t}), {"Content-Type": "application/json"})
            response = conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException):
            self.local.conn = None
            conn.close()
            raise
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {body[:200]!r}")
        return json.loads(body)

    def scores(self, query: str, texts: list[str]) -> np.ndarray:
        """One request's scores in the order of its texts."""
        answer = self.rank((query, texts))
        scores = np.full(len(texts), np.nan, dtype=np.float32)
        scores[answer["indices"]] = answer["scores"]
        return scores

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as response:
            return json.loads(response.read())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()

    def __enter__(self) -> "_HttpService":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def agreement(reference: list, scores: list, tight: bool) -> dict:
    """How the baseline's scores of the check requests agree with the served FP32 ranker's: the
    largest absolute difference, the mean top-10 overlap and the smallest per-request correlation.
    ``tight`` (both FP32): the same numbers up to 1e-3; else (BF16, or a reference that is not FP32)
    the same ranking: top-10 overlap >= 0.8 and correlation >= 0.98."""
    from rankserve.optimize.gate import top_k_overlap

    diffs, overlaps, correlations = [], [], []
    for ref, got in zip(reference, scores):
        ref, got = np.asarray(ref, dtype=np.float64), np.asarray(got, dtype=np.float64)
        diffs.append(float(np.max(np.abs(ref - got))))
        overlaps.append(top_k_overlap(ref, got, 10))
        correlations.append(float(np.corrcoef(ref, got)[0, 1]) if len(ref) > 1 and np.std(ref) > 0 and np.std(got) > 0 else 1.0)
    out = {"requests": len(diffs), "max_abs_diff": max(diffs), "top10_overlap": float(np.mean(overlaps)),
           "min_correlation": min(correlations), "tolerance": "max |diff| <= 1e-3" if tight else "top-10 overlap >= 0.8, r >= 0.98"}
    out["passed"] = bool(out["max_abs_diff"] <= 1e-3 if tight else out["top10_overlap"] >= 0.8 and out["min_correlation"] >= 0.98)
    return out


def bench_baseline(ranker_dir: Path, dataset: Dataset, concurrency: int, duration_s: float, seed: int, port: int,
                   max_length: int = 128, reference: dict | None = None, check: list[tuple[str, list[str]]] = ()) -> dict:
    """The service a team would deploy without Triton: FastAPI over the PyTorch model, a dynamic
    batcher of up to 32 pairs in arrival order, padding per call, BF16 where the CPU has BF16 units.
    With ``reference`` (the served FP32 scores of ``check``), the result's ``check`` says how its
    scores of those requests agree."""
    argv = ["rankserve.bench.batched_service", str(ranker_dir), "--port", str(port), "--max-length", str(max_length)]
    with _HttpService(argv, port) as service:
        info = service.get("/stats")
        agreed = None
        if reference is not None and check:
            scores = [service.scores(q, t).tolist() for q, t in check]
            agreed = agreement(reference["scores"], scores, tight=info["precision"] == reference["precision"] == "fp32")
            agreed["reference"] = reference["model"]
        _drive(service.rank, _plan(dataset, concurrency, 3, seed + 100), 3)
        plans = _plan(dataset, concurrency, duration_s, seed)
        before = service.get("/stats")
        result = _process_usage(lambda: [service.proc.pid], lambda: _drive(service.rank, plans, duration_s))
        after = service.get("/stats")
    calls = after["batches"] - before["batches"]
    out = {"name": f"pytorch_fastapi_dynamic_batching_{info['precision']}", **result,
           "precision": info["precision"], "threads": info["threads"], "max_pairs": info["max_pairs"],
           "max_wait_ms": info["max_wait_ms"], "max_length": info["max_length"], "model_calls": calls,
           "pairs_per_call": (after["pairs"] - before["pairs"]) / calls if calls else float("nan"),
           "calls_spanning_requests": (after["multi_request_batches"] - before["multi_request_batches"]) / calls if calls else float("nan")}
    if agreed is not None:
        out["check"] = agreed
    return out


def bench_naive(ranker_dir: Path, dataset: Dataset, concurrency: int, duration_s: float, seed: int, port: int) -> dict:
    with _HttpService(["rankserve.bench.naive_service", str(ranker_dir), str(port)], port) as service:
        _drive(service.rank, _plan(dataset, concurrency, 3, seed + 100), 3)
        plans = _plan(dataset, concurrency, duration_s, seed)
        result = _process_usage(lambda: [service.proc.pid], lambda: _drive(service.rank, plans, duration_s))
    return {"name": "naive_fastapi_pytorch_fp32_pad128", **result}


def run_bench(repo: Path, ranker_dir: Path, out: Path, concurrency: int = 4, duration_s: float = 30, seed: int = 9,
              log=print, naive: bool = True) -> dict:
    from rankserve.data.catalog import generate
    from rankserve.data.wands import load_queries
    from rankserve.server.embedded import free_port

    dataset = generate(load_queries())  # the demo catalog, built once for every setup and client
    check = _check_requests(dataset, seed)
    log(f"(a) ranker: the Triton ensemble of the default variant, {concurrency} concurrent clients, {duration_s:.0f} s")
    triton = bench_triton(repo, dataset, concurrency, duration_s, seed, check)
    reference = triton.pop("reference")
    log("(b) the same model alone in process")
    ceiling = bench_in_process(repo, dataset, concurrency, duration_s, seed)
    log("(c) the baseline: FastAPI + PyTorch with dynamic batching (up to 32 pairs)")
    baseline = bench_baseline(ranker_dir, dataset, concurrency, duration_s, seed, free_port(),
                              _tokenize_settings(repo).max_length, reference, check)
    setups = [triton, ceiling, baseline]
    ratios = {"triton_vs_baseline": triton["pairs_per_s"] / baseline["pairs_per_s"],
              "triton_vs_in_process": triton["pairs_per_s"] / ceiling["pairs_per_s"],
              "triton_p95_vs_baseline_p95": triton["p95_ms"] / baseline["p95_ms"]}
    if naive:
        log("(d) footnote: naive FastAPI + PyTorch FP32, padding to 128, no batching")
        setups.append(bench_naive(ranker_dir, dataset, concurrency, duration_s, seed, free_port()))
        ratios["triton_vs_naive"] = triton["pairs_per_s"] / setups[-1]["pairs_per_s"]
        ratios["triton_p95_vs_naive_p95"] = triton["p95_ms"] / setups[-1]["p95_ms"]
    targets = {key: {"value": ratios[key], "target": least, "passed": bool(ratios[key] >= least)} for key, least in TARGETS.items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(setups, indent=2) + "\n")
    (out / "ratios.json").write_text(json.dumps(ratios, indent=2) + "\n")
    (out / "targets.json").write_text(json.dumps({"targets": targets, "baseline_check": baseline.get("check")}, indent=2) + "\n")
    _plot(setups, out / "bench.png")
    return {"setups": setups, "ratios": ratios, "targets": targets}


def _short_name(name: str) -> str:
    for prefix, label in (("triton_ensemble_", "ranker (Triton)\n"), ("model_alone_in_process_", "model alone\nin process, "),
                          ("pytorch_fastapi_dynamic_batching_", "PyTorch server,\nbatched, "), ("naive_", "naive\n(footnote)")):
        if name.startswith(prefix):
            return label + (name[len(prefix):] if not prefix.startswith("naive") else "")
    return name


def _plot(setups: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = [_short_name(s["name"]) for s in setups]
    bars = a.bar(names, [s["pairs_per_s"] for s in setups], color=["#4477aa", "#66ccee", "#ccbb44", "#ee6677"][:len(setups)])
    a.bar_label(bars, fmt="%.0f", fontsize=8)
    a.set_ylabel("pairs/s")
    a.set_title("Throughput (ranker >= 3x the PyTorch baseline)")
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


LABELS = {"triton_vs_baseline": "ranker / the PyTorch server with dynamic batching",
          "triton_vs_in_process": "ranker / the same model alone in process"}


def format_bench(result: dict) -> str:
    lines = ["| setup | pairs/s | p50 ms | p95 ms | p99 ms | CPU % | RSS MB | errors |", "|---|---|---|---|---|---|---|---|"]
    for s in result["setups"]:
        lines.append(f"| {s['name']} | {s['pairs_per_s']:.0f} | {s['p50_ms']:.0f} | {s['p95_ms']:.0f} | {s['p99_ms']:.0f} | "
                     f"{s['cpu_percent']:.0f} | {s['rss_mb']:.0f} | {s['errors']} |")
    triton, baseline = result["setups"][0], result["setups"][2]
    lines.append(f"ranker = the Triton ensemble of the default variant {triton['variant']} ({triton['default_rule']}, gate: {triton['gate']})")
    lines.append(f"baseline: {baseline['precision'].upper()}, {baseline['threads']} torch threads, calls of up to {baseline['max_pairs']} "
                 f"pairs ({baseline['pairs_per_call']:.1f} on average, {100 * baseline['calls_spanning_requests']:.0f}% spanning requests)")
    check = baseline.get("check")
    if check:
        lines.append(f"baseline vs the served {check['reference']} on {check['requests']} requests: max |diff| {check['max_abs_diff']:.2g}, "
                     f"top-10 overlap {check['top10_overlap']:.2f}, r >= {check['min_correlation']:.4f} "
                     f"({check['tolerance']}): {'the same model' if check['passed'] else 'MISMATCH: the comparison is not of the same model'}")
    for key, t in result["targets"].items():
        unit = "x" if t["target"] > 1 else ""
        lines.append(f"{LABELS[key]}: {t['value']:.2f}{unit} (target >= {t['target']:g}{unit}): {'PASS' if t['passed'] else 'MISS'}")
    r = result["ratios"]
    lines.append(f"ranker p95 / baseline p95: {r['triton_p95_vs_baseline_p95']:.2f}")
    if "triton_vs_naive" in r:
        lines.append(f"footnote, the naive service (FP32, padding to 128, no batching): ranker / naive {r['triton_vs_naive']:.1f}x, "
                     f"p95 ratio {r['triton_p95_vs_naive_p95']:.2f}")
    return "\n".join(lines)
