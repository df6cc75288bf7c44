"""Ready time and memory of each variant as Triton serves it: on a new host, cold and warm.

The real tritonserver starts in explicit model-control mode with only ``tokenize`` and
``postprocess``, and with a new, empty runtime cache (``RANKSERVE_CACHE_DIR``, see
:mod:`rankserve.stages.runtime_cache`). Each variant's ensemble is then loaded through the
repository API (its rank model's stub starts, the runtime reads the weights, Triton runs the
model's warmup), timed until Triton answers, three times: ``first``, its files evicted from the
page cache and nothing in the runtime cache (a new host: the runtime optimizes and fills the
cache); ``cold``, its files and its cache entry evicted (a restart after a reboot, or a node
whose cache volume persists); ``warm``, everything in the page cache (a restart). The rank stub's
resident memory is read after a real request, and the variant is unloaded before the next.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path
from typing import Callable

from rankserve import api
from rankserve.builder import onnx_files


def evict(paths) -> bool:
    """Drop the page-cache pages of ``paths`` (``posix_fadvise(DONTNEED)``, no root needed), so the
    next read comes from disk; False where the platform cannot."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def variant_files(repo: Path, rank_model: str) -> list[Path]:
    return onnx_files.model_files(repo / rank_model / "1" / "model.onnx")


def _post(url: str, body: dict | None = None, timeout: float = 900, headers: dict | None = None) -> None:
    request = urllib.request.Request(url, data=json.dumps(body or {}).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(request, timeout=timeout) as r:
        r.read()


def _rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory of ``pid`` in MB (``RssAnon``: only its private pages)."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))


PHASES = ("first", "cold", "warm")


def _cache_files(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.is_file()]


def measure_ready(repo: Path, variants: dict[str, dict], request: tuple[str, list[str]], log: Callable[[str], None] = print,
                  timeout_s: float = 900) -> dict:
    """``variants``: name -> manifest entry (``rank_model``, ``ensemble``). Returns the server's own
    ready time and, per variant, ``first_s``, ``cold_s``, ``warm_s``, the runtime cache's size
    (``cache_mb``), the rank stub's resident memory after a request when loaded through the cache
    (``stub_rss_mb``; ``stub_private_mb`` its pages no other process can share) and on the first
    load (``stub_rss_first_mb``), and the latency of the first request after the first load
    (``first_request_ms``: warmup already paid) and of the next."""
    import tempfile
    from rankserve.server.embedded import EmbeddedServer, free_serve_settings, server_command
    from rankserve.server.processes import stub_processes
    from rankserve_client import RankerClient

    def argv(install, backends):
        command = [a for a in server_command(install, repo, backends, settings, server.admin_key) if not a.startswith("--model-control-mode")]
        return command + ["--model-control-mode=explicit", f"--load-model={api.TOKENIZE_MODEL}",
                          f"--load-model={api.POSTPROCESS_MODEL}"]

    cache_tmp = tempfile.TemporaryDirectory(prefix="rankserve-cache-")
    cache = Path(cache_tmp.name)
    settings = free_serve_settings(ready_timeout_s=timeout_s, cache_dir=str(cache))
    server = EmbeddedServer(repo, settings, argv=argv)
    started = time.perf_counter()
    server.start()
    try:
        while server._get("/v2/health/ready") != 200:
            if server.process.poll() is not None or time.perf_counter() - started > timeout_s:
                raise RuntimeError(f"tritonserver did not become ready:\n{server.log_tail()}")
            time.sleep(0.05)
        out = {"server_ready_s": time.perf_counter() - started, "page_cache_evicted": True, "variants": {}}
        base = f"http://{server.http_url}/v2/repository/models"
        for name, v in variants.items():
            row = {}
            cached_before = set(_cache_files(cache))
            for phase in PHASES:
                if phase != "warm":
                    files = variant_files(repo, v["rank_model"]) + [p for p in _cache_files(cache) if p not in cached_before]
                    out["page_cache_evicted"] &= evict(files)
                t0 = time.perf_counter()
                _post(f"{base}/{v['ensemble']}/load", timeout=timeout_s, headers=server.admin_headers)
                row[f"{phase}_s"] = time.perf_counter() - t0
                with RankerClient(f"http://{server.http_url}", model=v["ensemble"], timeout=timeout_s) as client:
                    t0 = time.perf_counter()
                    client.rank(*request, model=v["ensemble"])
                    first = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    client.rank(*request, model=v["ensemble"])
                    second = time.perf_counter() - t0
                stub = next(s for s in stub_processes(server.process.pid) if s.model == v["rank_model"])
                if phase == "first":
                    row["cache_mb"] = sum(p.stat().st_size for p in _cache_files(cache) if p not in cached_before) / 2**20
                    row["first_request_ms"], row["second_request_ms"] = 1000 * first, 1000 * second
                    row["stub_rss_first_mb"] = _rss_mb(stub.pid)
                if phase == "cold":  # as served from now on: through the runtime cache
                    row["stub_rss_mb"], row["stub_private_mb"] = _rss_mb(stub.pid), _rss_mb(stub.pid, "RssAnon")
                _post(f"{base}/{v['ensemble']}/unload", {"parameters": {"unload_dependents": True}}, headers=server.admin_headers)
                _wait_unloaded(server, v["rank_model"], timeout_s)
            log(f"  {name}: Triton load first {row['first_s']:.1f} s, cold {row['cold_s']:.1f} s, warm {row['warm_s']:.1f} s "
                f"(runtime cache {row['cache_mb']:.0f} MB), rank stub "
                f"{row['stub_rss_mb']:.0f} MB, first request {row['first_request_ms']:.0f} ms (next {row['second_request_ms']:.0f} ms)")
            out["variants"][name] = row
        return out
    finally:
        server.stop()
        cache_tmp.cleanup()


def _wait_unloaded(server, model: str, timeout_s: float) -> None:
    """Until the model's stub has exited (its memory is back) or ``timeout_s``."""
    from rankserve.server.processes import stub_processes

    deadline = time.perf_counter() + timeout_s
    while any(s.model == model for s in stub_processes(server.process.pid)) and time.perf_counter() < deadline:
        time.sleep(0.1)

