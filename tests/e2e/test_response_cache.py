"""Triton's response cache on the ranker ensembles, against the real tritonserver 2.51.

A server with a cache answers a repeated request from it (the hit counters say so) with exactly the
answer the server without a cache computes; without a cache nothing is cached although the
ensembles are marked cacheable; a tiny cache stays within its size by evicting; a restart (what
``rankserve serve`` does to a broken server) empties it; and a model reloaded under the same
version behind a cached ensemble leaves stale answers (why rankserve only serves with model
control ``none``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import Serve, TINY, make_tiny_ranker
from rankserve.builder import configs
from rankserve.loadtest.cache_compare import METRICS_INTERVAL_S, compare_response_cache, model_counts, scrape_cache
from rankserve.loadtest.timeline import read_timeline
from rankserve.server.embedded import EmbeddedServer, find_triton, free_serve_settings, new_admin_key, server_command
from rankserve.settings import LoadTestSettings
from rankserve_client import RankerClient

pytestmark = pytest.mark.triton


def _texts(dataset, n: int, offset: int = 0) -> list[str]:
    return [p.text for p in dataset.products.values()][offset:offset + n]


def _rank(url: str, query: str, texts: list[str], top_k: int | None = None, model: str = "ranker") -> list[tuple[int, float]]:
    with RankerClient(url, model=model, timeout=60) as client:
        return [(int(r.id), r.score) for r in client.rank(query, texts, top_k)]


def _cached_server(repo: Path, size: int, log: Path, **overrides) -> EmbeddedServer:
    return EmbeddedServer(repo, free_serve_settings(exit_timeout_s=10, response_cache_bytes=size, **overrides), log)


@pytest.fixture(scope="module")
def cached_server(tiny_repo, tmp_path_factory):
    with _cached_server(tiny_repo, 16 * 2**20, tmp_path_factory.mktemp("cached") / "tritonserver.log") as server:
        yield server


def test_a_repeated_request_is_answered_from_the_cache_exactly_as_computed(cached_server, server, dataset):
    texts = _texts(dataset, 40)
    http, grpc = f"http://{cached_server.http_url}", f"grpc://{cached_server.grpc_url}"
    before = scrape_cache(cached_server.metrics_url)
    first = _rank(http, "outdoor welcome rug", texts)
    again = [_rank(http, "outdoor welcome rug", texts), _rank(grpc, "outdoor welcome rug", texts)]  # the key is the tensors, not the protocol
    counts = model_counts(before, scrape_cache(cached_server.metrics_url), "ranker")
    assert (counts["misses"], counts["hits"]) == (1, 2)
    uncached = _rank(f"http://{server.http_url}", "outdoor welcome rug", texts)  # the server without a cache
    assert first == uncached and again == [uncached, uncached]  # ids and float32 scores, bit for bit
    assert len(first) == 40 and sorted(i for i, _ in first) == list(range(40))

    # every input is part of the key: another top_k or another list is a miss, not the cached ranking
    before = scrape_cache(cached_server.metrics_url)
    top = _rank(http, "outdoor welcome rug", texts, top_k=5)
    other = _rank(http, "outdoor welcome rug", texts[:-1])
    counts = model_counts(before, scrape_cache(cached_server.metrics_url), "ranker")
    assert (counts["misses"], counts["hits"]) == (2, 0)
    assert top == uncached[:5] and len(other) == 39
    # each ensemble has its own entries: ranker_fp32 (the same pipeline) computes its own answer once
    before = scrape_cache(cached_server.metrics_url)
    assert _rank(http, "outdoor welcome rug", texts, model="ranker_fp32") == uncached
    counts = model_counts(before, scrape_cache(cached_server.metrics_url), "ranker_fp32")
    assert (counts["misses"], counts["hits"]) == (1, 0)


def test_without_a_cache_nothing_is_cached_although_the_ensembles_are_marked(server, dataset):
    config = configs.parse(Path(server.repo) / "ranker" / "config.pbtxt")
    assert config.response_cache.enable  # marked cacheable by the build ...
    texts = _texts(dataset, 20, offset=100)
    url = f"http://{server.http_url}"
    assert _rank(url, "oak dining table", texts) == _rank(url, "oak dining table", texts)
    metrics = scrape_cache(server.metrics_url)
    assert all(m["hits"] == 0 and m["misses"] == 0 for m in metrics["models"].values())  # ... and never looked up
    assert "util" not in metrics and "num_entries" not in metrics  # no cache in this server at all
    assert re.search(r"\|\s*cache_enabled\s*\|\s*0\s*\|", Path(server.log_path).read_text())
    assert not any("cache" in a for a in server_command(find_triton(), server.repo, server.repo, server.settings, server.admin_key))


def test_a_tiny_cache_stays_within_its_size_by_evicting(tiny_repo, server, dataset, tmp_path):
    size = 4096  # four 100-candidate answers (about 0.9 KB each with the cache's own bookkeeping)
    texts = _texts(dataset, 100)
    queries = [f"query number {i}" for i in range(12)]
    uncached = {q: _rank(f"http://{server.http_url}", q, texts) for q in queries[:3] + queries[-1:]}
    with _cached_server(tiny_repo, size, tmp_path / "tritonserver.log") as tiny:
        url = f"http://{tiny.http_url}"
        before = scrape_cache(tiny.metrics_url)
        answers = {q: _rank(url, q, texts) for q in queries}  # 12 distinct answers into room for ~4
        last = _rank(url, queries[-1], texts)  # the most recent: still there
        first = _rank(url, queries[0], texts)  # the oldest: evicted long ago
        counts = model_counts(before, scrape_cache(tiny.metrics_url), "ranker")
        big = _rank(url, "a long list", _texts(dataset, 1000))  # an answer larger than the whole cache: served, not kept
        big_again = _rank(url, "a long list", _texts(dataset, 1000))
        after_big = model_counts(before, scrape_cache(tiny.metrics_url), "ranker")
        time.sleep(METRICS_INTERVAL_S + 0.5)  # the cache-wide gauges follow Triton's metrics interval
        gauges = scrape_cache(tiny.metrics_url)
    assert (counts["misses"], counts["hits"]) == (13, 1)
    assert (after_big["misses"], after_big["hits"]) == (15, 1) and big == big_again and len(big) == 1000
    assert 1 <= gauges["num_entries"] <= 4 and gauges["num_evictions"] >= 9
    assert 0 < gauges["util"] <= 1.0  # used bytes = util x size: never above the setting
    assert all(answers[q] == uncached[q] for q in uncached) and last == uncached[queries[-1]] and first == uncached[queries[0]]


def test_serve_flag_enables_the_cache_and_a_restart_empties_it(tiny_repo, tmp_path, dataset):
    repo = Path(shutil.copytree(tiny_repo, tmp_path / "repo"))
    serve = Serve(repo, "--response-cache", "8MiB", "--health-interval", "0.2")
    metrics = f"http://127.0.0.1:{serve.settings.metrics_port}/metrics"
    texts = _texts(dataset, 30, offset=200)
    try:
        serve.wait_for("SIGTERM stops it")
        assert "response cache  8 MiB (Triton local cache) for ranker, ranker_fp32" in serve.output
        before = scrape_cache(metrics)
        a, b = _rank(serve.url, "velvet sofa", texts), _rank(serve.url, "velvet sofa", texts)
        counts = model_counts(before, scrape_cache(metrics), "ranker")
        assert a == b and (counts["misses"], counts["hits"]) == (1, 1)
        os.kill(serve.server_pid(), signal.SIGKILL)
        serve.wait_for("ready again", timeout=90)
        before = scrape_cache(metrics)  # a new process: its counters start again
        c = _rank(serve.url, "velvet sofa", texts)
        counts = model_counts(before, scrape_cache(metrics), "ranker")
        assert c == a and (counts["misses"], counts["hits"]) == (1, 0)  # computed again: nothing outlives the process
    finally:
        assert serve.stop() == 0


def test_serve_refuses_a_cache_too_small_to_start(tiny_repo):
    import subprocess

    out = subprocess.run([sys.executable, "-m", "rankserve", "serve", "--model-repository", str(tiny_repo),
                          "--response-cache", "100"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "response_cache_bytes must be 0 (off) or >= 4096" in out.stderr
    out = subprocess.run([sys.executable, "-m", "rankserve", "serve", "--model-repository", str(tiny_repo),
                          "--response-cache", "lots"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--response-cache: not a memory size" in out.stderr


@pytest.mark.slow
def test_a_model_reloaded_behind_a_cached_ensemble_leaves_stale_answers(tiny_repo, tmp_path, dataset):
    """Why rankserve serves with model control ``none`` only: Triton 2.51 keys an ensemble's entries
    by the ensemble's name and version and keeps them when a step is reloaded with other weights
    (or the ensemble itself is unloaded and loaded): the old model's answers keep coming."""
    repo = Path(shutil.copytree(tiny_repo, tmp_path / "repo"))
    other = make_tiny_ranker(tmp_path / "other_ranker", seed=1)
    from rankserve.builder.repository import build_repository

    build_repository(other, tmp_path / "other_repo", TINY, log=lambda _m: None)
    settings = free_serve_settings(exit_timeout_s=10, response_cache_bytes=2**20)

    key = new_admin_key()

    def explicit(install, backends):
        command = [a for a in server_command(install, repo, backends, settings, key) if not a.startswith("--model-control-mode")]
        return command + ["--model-control-mode=explicit", "--load-model=*"]

    texts = _texts(dataset, 20)
    with EmbeddedServer(repo, settings, tmp_path / "tritonserver.log", argv=explicit, admin_key=key) as s:
        url = f"http://{s.http_url}"
        old = _rank(url, "sofa", texts)
        shutil.copy(tmp_path / "other_repo" / "rank" / "1" / "model.onnx", repo / "rank" / "1" / "model.onnx")
        request = urllib.request.Request(f"{url}/v2/repository/models/rank/load", data=b"{}", method="POST", headers=s.admin_headers)
        assert urllib.request.urlopen(request, timeout=120).status == 200
        fresh = _rank(url, "sofa", texts, top_k=3)  # another key: computed by the new weights
        stale = _rank(url, "sofa", texts)  # the cached key: the old model's answer
    assert [sc for _, sc in fresh] != [sc for _, sc in old[:3]]
    assert stale == old


@pytest.mark.slow
def test_compare_runs_both_arms_and_checks_identity_and_bounds(tiny_repo, tmp_path):
    settings = LoadTestSettings(users=2, spawn_rate=2, duration_s=6, scenario="zipf", zipf_s=1.0, candidates_mean=30)
    c = compare_response_cache(settings, tmp_path, tiny_repo, 8 * 2**20, min_speedup=0.0, probes=4, log=lambda _m: None)
    assert c["passed"], c["violations"]
    assert c["checks"]["identical"] and c["checks"]["probes_from_cache"] and c["checks"]["bounded"]
    assert c["probes"]["second_pass"] == {"hits": 4, "misses": 0, "hit_ratio": 1.0}
    assert c["off"]["requests"] > 5 and c["on"]["requests"] > 5
    assert 0 < c["on"]["hit_ratio"] < 1
    sent = read_timeline(tmp_path / "on" / "timeline")["start"].size  # every request (Locust's CSV can lag its last second)
    assert c["on"]["hits"] + c["on"]["misses"] == sent >= c["on"]["requests"]  # one lookup a request
    assert 0 < c["on"]["cache"]["used_bytes"] <= 8 * 2**20 and c["on"]["cache"]["num_entries"] >= 1
    assert c["head"]["same_order"] == 4
    assert c["ratios"]["pairs_per_s"] == pytest.approx(c["on"]["pairs_per_s"] / c["off"]["pairs_per_s"])
    for arm in ("off", "on"):
        assert (tmp_path / arm / "summary.json").exists() and (tmp_path / arm / "tritonserver.log").exists()
    assert "cache_enabled                    | 1" in (tmp_path / "on" / "tritonserver.log").read_text()
    assert (tmp_path / "comparison.json").exists()


def _record(repo: Path, *names: str) -> None:
    """Record the edited models in the manifest, as the build that wrote them did (configs are checksummed)."""
    import json

    from rankserve.builder.repository import MANIFEST, model_entry

    manifest = json.loads((repo / MANIFEST).read_text())
    for name in names:
        manifest["models"][name] = model_entry(repo, name)
    (repo / MANIFEST).write_text(json.dumps(manifest))


def test_serve_refuses_a_cache_no_model_would_use(tiny_repo, tmp_path):
    import subprocess

    repo = Path(shutil.copytree(tiny_repo, tmp_path / "repo"))
    for name in ("ranker", "ranker_fp32"):  # as built before the flag existed
        config = configs.parse(repo / name / "config.pbtxt")
        config.ClearField("response_cache")
        (repo / name / "config.pbtxt").write_text(configs.to_text(config))
    _record(repo, "ranker", "ranker_fp32")
    out = subprocess.run([sys.executable, "-m", "rankserve", "serve", "--model-repository", str(repo),
                          "--response-cache", "8MiB"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "no model of" in out.stderr and "is marked cacheable" in out.stderr
