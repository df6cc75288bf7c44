"""Versioned releases served by ``rankserve serve --releases``: promote and roll back under real
Locust load over HTTP and gRPC with zero failed requests; each switch serves the promoted release's
scores; the old server and its stubs are gone after it; a release that cannot start leaves the old
one serving."""

import dataclasses
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, Serve, make_tiny_ranker, processes_mentioning
from rankserve import releases as rel
from rankserve.builder.repository import model_entry
from rankserve.loadtest.run import run_locust
from rankserve.settings import LoadTestSettings

pytestmark = [pytest.mark.triton, pytest.mark.slow]

QUERY = "blue velvet sofa"
TEXTS = ["navy blue velvet sofa with wooden legs", "oak dining table", "red wool rug", "blue sofa bed", "floor lamp"]


def _scorer(ranker: Path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(ranker).eval()
    tokenizer = AutoTokenizer.from_pretrained(ranker)
    with torch.inference_mode():
        enc = tokenizer([QUERY] * len(TEXTS), TEXTS, truncation=True, max_length=TINY.tokenize.max_length, padding=True,
                        return_tensors="pt")
        return model(**enc).logits[:, 0].numpy()


@pytest.fixture(scope="module")
def two_releases(tiny_ranker, dataset, tmp_path_factory):
    """Two gated repositories of rankers with different weights, published; their PyTorch scores."""
    from rankserve.builder.repository import build_repository

    root = tmp_path_factory.mktemp("rollout")
    second = make_tiny_ranker(root / "ranker2", seed=1)
    settings = dataclasses.replace(TINY, variants=("fp32",))
    names, expected = [], []
    for i, ranker in enumerate((tiny_ranker, second)):
        build_repository(ranker, root / f"repo{i}", settings, log=lambda _m: None, dataset=dataset)
        names.append(rel.publish(root / f"repo{i}", root / "releases")[0])
        expected.append(_scorer(ranker))
    assert np.max(np.abs(expected[0] - expected[1])) > 0.05  # the two releases are told apart by their scores
    return root, names, expected


def _probe(url: str) -> np.ndarray:
    from rankserve_client import RankerClient

    with RankerClient(url, retries=10, backoff=0.1) as client:
        ranked = client.rank(QUERY, TEXTS)
    return np.array([r.score for r in sorted(ranked, key=lambda r: r.id)])


def _regions(serve: Serve, seen: set[str]) -> set[str]:
    """The /dev/shm regions of the current server's stubs, added to ``seen`` (other test runs on the
    machine create regions too: only these must be gone at the end)."""
    from rankserve.server.processes import stub_processes

    seen |= {s.shm_region for s in stub_processes(serve.server_pid())}
    return seen


def _left(regions: set[str]) -> set[str]:
    return {r for r in regions if Path("/dev/shm", r).exists()}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rankserve", *args], capture_output=True, text=True, timeout=120)


def test_promote_and_rollback_under_load_drop_no_request(two_releases, tmp_path):
    root, (first, second), (scores_first, scores_second) = two_releases
    releases = root / "releases"
    # a release whose model cannot load (a config Triton refuses, recorded in the manifest): published, but no server starts on it
    broken_repo = tmp_path / "broken"
    shutil.copytree(root / "repo1", broken_repo)
    (broken_repo / "rank" / "config.pbtxt").write_text((broken_repo / "rank" / "config.pbtxt").read_text()
                                                       .replace('name: "rank"', 'name: "rank"\nmax_batch_size: -7', 1))
    manifest = json.loads((broken_repo / "manifest.json").read_text())
    manifest["models"]["rank"] = model_entry(broken_repo, "rank")
    (broken_repo / "manifest.json").write_text(json.dumps(manifest))
    broken, _ = rel.publish(broken_repo, releases, "broken")
    assert _cli("promote", first, "--releases", str(releases)).returncode == 0

    serve = Serve(None, "--releases", str(releases), "--health-interval", "0.2", "--drain-timeout", "5",
                  "--log-file", str(tmp_path / "logs" / "tritonserver.log"))
    try:
        serve.wait_for("Ctrl-C or SIGTERM stops it.", timeout=180)
        regions = _regions(serve, set())
        s = serve.settings
        grpc_url = f"grpc://127.0.0.1:{s.grpc_port}"
        assert np.max(np.abs(_probe(serve.url) - scores_first)) <= 1e-3

        settings = LoadTestSettings(users=2, spawn_rate=2, duration_s=40, candidates_mean=20, retries=12, retry_backoff_s=0.1)
        results: dict = {}
        runners = [threading.Thread(target=lambda p=p, host=host: results.update(
                       {p: run_locust(host, dataclasses.replace(settings, protocol=p), tmp_path / p)}))
                   for p, host in (("http", serve.url), ("grpc", grpc_url))]
        for r in runners:
            r.start()
        time.sleep(6)

        old_pid = serve.server_pid()
        assert _cli("promote", second, "--releases", str(releases)).returncode == 0
        serve.wait_for(f"now serving release {second}", timeout=120)
        _regions(serve, regions)
        for url in (serve.url, grpc_url):
            assert np.max(np.abs(_probe(url) - scores_second)) <= 1e-3
        assert not Path(f"/proc/{old_pid}").exists()
        assert processes_mentioning(str(releases / first)) == []  # the old server and its stubs are gone
        time.sleep(3)

        assert _cli("promote", broken, "--releases", str(releases)).returncode == 0
        serve.wait_for(f"release {broken} NOT served, still serving {second}", timeout=120)
        assert "failed to load" in serve.output or "exited" in serve.output
        assert np.max(np.abs(_probe(serve.url) - scores_second)) <= 1e-3
        assert processes_mentioning(str(releases / broken)) == []
        time.sleep(2)
        assert serve.output.count(f"starting a server on release {broken}") == 1  # not retried while the pointer stays

        # back: the pointer returns to the release served (no switch), then to the first one
        assert _cli("rollback", "--releases", str(releases)).returncode == 0 and rel.current(releases) == second
        out = _cli("rollback", "--releases", str(releases))
        assert out.returncode == 0 and f"current -> {first}" in out.stdout
        serve.wait_for(f"now serving release {first}", timeout=120)
        _regions(serve, regions)
        for url in (serve.url, grpc_url):
            assert np.max(np.abs(_probe(url) - scores_first)) <= 1e-3
        assert processes_mentioning(str(releases / second)) == []
        assert serve.output.count("now serving release") == 2

        for r in runners:
            r.join(timeout=180)
        for p in ("http", "grpc"):
            summary = results[p]
            assert summary["requests"] > 50 and summary["failures"] == 0, (p, summary)
        print("".join(line for line in serve.lines if "serving release" in line or "NOT served" in line))
        print({p: (results[p]["requests"], results[p]["failures"]) for p in results})
    finally:
        code = serve.stop()
    assert code == 0, serve.output
    assert processes_mentioning(str(releases)) == []
    assert len(regions) >= 9 and _left(regions) == set()  # three servers' stubs, none left in /dev/shm


def test_a_corrupted_release_is_refused_at_promote(two_releases, tmp_path):
    root, (first, _second), _ = two_releases
    releases = tmp_path / "releases"
    shutil.copytree(root / "releases" / first, releases / first)
    onnx = releases / first / "model_repository" / "rank" / "1" / "model.onnx"
    onnx.chmod(0o644)
    with onnx.open("r+b") as f:
        f.seek(100)
        f.write(b"\0" * 16)
    out = _cli("promote", first, "--releases", str(releases))
    assert out.returncode == 2 and "does not match its checksum" in out.stderr
    assert rel.current(releases) is None


def test_a_broken_server_is_replaced_by_the_same_switch_without_failing_a_retrying_client(two_releases, tmp_path):
    """The supervisor's restart in --releases mode: a killed stub makes serve start a fresh server on
    the same release, switch to it and drain the broken one; SDK clients with retries see no error."""
    import os
    import signal

    from rankserve.server.processes import stub_processes
    from rankserve_client import RankerClient

    root, (first, _second), (scores_first, _) = two_releases
    releases = tmp_path / "releases"
    shutil.copytree(root / "releases" / first, releases / first)
    rel.promote(releases, first)
    serve = Serve(None, "--releases", str(releases), "--health-interval", "0.2", "--drain-timeout", "3")
    outcomes: list[str] = []
    stop = threading.Event()

    def load() -> None:
        with RankerClient(serve.url, retries=12, backoff=0.1, timeout=10) as client:
            while not stop.is_set():
                try:
                    client.rank(QUERY, TEXTS)
                    outcomes.append("ok")
                except Exception as exc:  # noqa: BLE001 - recorded; the test fails on it below
                    outcomes.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.01)

    try:
        serve.wait_for("Ctrl-C or SIGTERM stops it.", timeout=180)
        worker = threading.Thread(target=load)
        worker.start()
        time.sleep(1)
        broken = serve.server_pid()
        regions = _regions(serve, set())
        (stub,) = [s for s in stub_processes(broken) if s.model == "rank"]
        os.kill(stub.pid, signal.SIGKILL)
        serve.wait_for(f"now serving release {first}", timeout=120)
        _regions(serve, regions)
        time.sleep(1)
        stop.set()
        worker.join(timeout=60)
        assert "stub died: rank_0_0" in serve.output and "replacing the server" in serve.output
        assert serve.server_pid() != broken and not Path(f"/proc/{broken}").exists()
        assert outcomes.count("ok") > 20 and set(outcomes) == {"ok"}, {o for o in outcomes if o != "ok"}
        assert np.max(np.abs(_probe(serve.url) - scores_first)) <= 1e-3
    finally:
        stop.set()
        code = serve.stop()
    assert code == 0 and len(regions) >= 6 and _left(regions) == set()  # the killed stub's region too


def test_serve_releases_gives_up_when_the_restart_budget_is_spent_and_leaves_nothing(two_releases, tmp_path):
    import os
    import signal

    from rankserve.server.processes import stub_processes

    root, (first, _second), _ = two_releases
    releases = tmp_path / "releases"
    shutil.copytree(root / "releases" / first, releases / first)
    rel.promote(releases, first)
    serve = Serve(None, "--releases", str(releases), "--health-interval", "0.2", "--max-restarts", "0")
    try:
        serve.wait_for("Ctrl-C or SIGTERM stops it.", timeout=180)
        regions = _regions(serve, set())
        stub = next(s for s in stub_processes(serve.server_pid()) if s.model == "tokenize")  # one of the tokenize instances
        os.kill(stub.pid, signal.SIGKILL)
        assert serve.proc.wait(timeout=60) == 2
    finally:
        serve.stop()
    serve.wait_for("gave up: 0 restarts within", timeout=5)
    assert "Traceback" not in serve.output
    assert processes_mentioning(str(releases)) == [] and _left(regions) == set()
    with socket.socket() as s:  # the proxy let its ports go
        s.bind(("127.0.0.1", serve.settings.http_port))
