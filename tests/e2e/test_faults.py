"""Faults, end to end against ``rankserve serve`` and the real tritonserver: a Python-backend stub
killed under load, SIGTERM with requests in flight, a corrupt model or manifest, a corrupt ranker."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import Serve, free_serve_settings, processes_mentioning
from rankserve.builder.configs import parse, to_text
from rankserve.builder.repository import MANIFEST, model_entry, sha256
from rankserve.server.processes import stub_processes
from rankserve_client import RankerClient, Unavailable

pytestmark = pytest.mark.triton


def _copy(tiny_repo: Path, tmp_path: Path, queue_delay_us: int | None = None) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo)
    if queue_delay_us is not None:
        config = parse(repo / "rank" / "config.pbtxt")
        config.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
        (repo / "rank" / "config.pbtxt").write_text(to_text(config))
        manifest = json.loads((repo / MANIFEST).read_text())
        manifest["models"]["rank"] = model_entry(repo, "rank")  # recorded, as a build with that delay would
        (repo / MANIFEST).write_text(json.dumps(manifest))
    return repo


def _texts(dataset, n=8):
    return [p.text for p in dataset.products.values()][:n]


def test_a_killed_stub_is_detected_and_the_server_restarted_clients_recover(tiny_repo, tmp_path, dataset):
    """Triton 2.51 keeps reporting the model ready after its stub died (every request then fails);
    ``rankserve serve`` sees the dead stub and restarts the server. Clients without retries see a
    bounded window of Unavailable errors; clients with the SDK's retries see none."""
    serve = Serve(_copy(tiny_repo, tmp_path), "--health-interval", "0.2")
    texts = _texts(dataset)
    try:
        serve.wait_for("SIGTERM stops it")
        outcomes: list[tuple[float, str]] = []
        stop = threading.Event()

        def load(retries: int, tag: str) -> None:
            with RankerClient(serve.url, retries=retries, backoff=0.2, check_api=False, timeout=10) as client:
                while not stop.is_set():
                    try:
                        client.rank("oak table", texts)
                        outcomes.append((time.monotonic(), f"{tag} ok"))
                    except Unavailable:
                        outcomes.append((time.monotonic(), f"{tag} unavailable"))
                    except Exception as exc:  # noqa: BLE001 - recorded; the test fails on it below
                        outcomes.append((time.monotonic(), f"{tag} {type(exc).__name__}: {exc}"))
                    time.sleep(0.02)

        with ThreadPoolExecutor(2) as pool:
            workers = [pool.submit(load, 0, "plain"), pool.submit(load, 12, "retrying")]
            time.sleep(1.0)
            (rank_stub,) = [s for s in stub_processes(serve.server_pid()) if s.model == "rank"]
            killed = time.monotonic()
            os.kill(rank_stub.pid, signal.SIGKILL)
            recovery = serve.wait_for("ready again", timeout=60)
            time.sleep(1.0)
            stop.set()
            for w in workers:
                w.result()
        assert "stub died: rank_0_0 (model rank" in serve.output and "restarting tritonserver" in serve.output
        assert "exited with code -9" in serve.output  # Triton 2.51 hangs unloading the dead stub's model: killed after the grace
        kinds = {kind for _, kind in outcomes}
        assert kinds <= {"plain ok", "plain unavailable", "retrying ok"}, kinds  # nothing but Unavailable, then retried
        errors = [t for t, kind in outcomes if kind == "plain unavailable"]
        assert errors and max(errors) - killed < recovery + 1.0  # the error window ends with the restart
        assert any(kind == "plain ok" and t > max(errors) for t, kind in outcomes)  # plain clients recover
        counts = {kind: sum(k == kind for _, k in outcomes) for kind in kinds}
        print(f"\nrestarted {recovery:.2f} s after the kill; plain errors over {max(errors) - min(errors):.2f} s; {counts}")
        assert recovery < 30
        assert serve.stop() == 0
    finally:
        serve.stop()
    assert serve.leftover_shm() == set()  # the killed stub's region too


def test_serve_gives_up_when_the_restart_budget_is_spent(tiny_repo, tmp_path):
    serve = Serve(_copy(tiny_repo, tmp_path), "--health-interval", "0.2", "--max-restarts", "0")
    try:
        serve.wait_for("SIGTERM stops it")
        stub = next(s for s in stub_processes(serve.server_pid()) if s.model == "tokenize")  # one of the tokenize instances
        os.kill(stub.pid, signal.SIGKILL)
        assert serve.proc.wait(timeout=60) == 2
    finally:
        serve.stop()
    serve.wait_for("gave up: 0 restarts within", timeout=5)
    assert "Traceback" not in serve.output and serve.leftover_shm() == set()


def test_sigterm_finishes_in_flight_requests_refuses_new_ones_and_leaves_nothing(tiny_repo, tmp_path, dataset):
    repo = _copy(tiny_repo, tmp_path, queue_delay_us=3_000_000)  # requests wait 3 s in the rank queue
    serve = Serve(repo)
    texts = _texts(dataset)
    try:
        serve.wait_for("SIGTERM stops it")
        with RankerClient(serve.url, retries=0, timeout=30) as client, ThreadPoolExecutor(3) as pool:
            in_flight = [pool.submit(client.rank, "oak table", texts) for _ in range(3)]
            time.sleep(0.5)
            serve.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with pytest.raises(Unavailable):
                RankerClient(serve.url, retries=0, check_api=False).rank("oak table", texts)
            assert [len(f.result()) for f in in_flight] == [len(texts)] * 3
        assert serve.proc.wait(timeout=60) == 0
    finally:
        serve.stop()
    assert "stopped (exit code 0)" in serve.output
    assert processes_mentioning(str(repo)) == []  # no server or stub left
    assert serve.leftover_shm() == set()


def _rankserve(*args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "rankserve", *args], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **env} if env else None)
    return out, time.monotonic() - started


@pytest.mark.parametrize("fault, message", [
    ("model file corrupted", "does not match its checksum"),
    ("model file missing", "is missing; rebuild"),
    ("manifest not JSON", "not a valid rankserve manifest"),
    ("corrupt model recorded in the manifest", "model 'rank' failed to load"),
])
def test_serve_fails_fast_with_a_clear_message(tiny_repo, tmp_path, fault, message):
    repo = _copy(tiny_repo, tmp_path)
    model = repo / "rank" / "1" / "model.onnx"
    if fault == "model file missing":
        model.unlink()
    elif fault == "manifest not JSON":
        (repo / MANIFEST).write_text("{ not json")
    else:
        model.write_bytes(model.read_bytes()[:1000])
        if fault == "corrupt model recorded in the manifest":  # the checksums pass: Triton itself must refuse it
            manifest = json.loads((repo / MANIFEST).read_text())
            manifest["models"]["rank"]["files"]["rank/1/model.onnx"] = sha256(model)
            (repo / MANIFEST).write_text(json.dumps(manifest))
    s = free_serve_settings()
    out, seconds = _rankserve("serve", "--model-repository", str(repo), "--http-port", str(s.http_port),
                              "--grpc-port", str(s.grpc_port), "--metrics-port", str(s.metrics_port))
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and seconds < 60
    assert processes_mentioning(str(repo)) == []


@pytest.mark.parametrize("fault, message", [
    ("weights truncated", "cannot load the ranker's weights"),
    ("weights missing", "cannot load the ranker's weights"),
    ("classifier missing from the weights", "lack 1 tensors the model needs"),
    ("config.json corrupted", "cannot read"),
])
def test_build_fails_fast_on_a_corrupt_ranker(tiny_ranker, tmp_path, fault, message):
    ranker = tmp_path / "ranker"
    shutil.copytree(tiny_ranker, ranker)
    weights = ranker / "model.safetensors"
    if fault == "weights truncated":
        weights.write_bytes(weights.read_bytes()[:5000])
    elif fault == "weights missing":
        weights.unlink()
    elif fault == "config.json corrupted":
        (ranker / "config.json").write_text('{"architectures": [')
    else:
        from safetensors.numpy import load_file, save_file

        tensors = load_file(weights)
        tensors.pop("classifier.weight")
        save_file(tensors, weights)
    out, seconds = _rankserve("build", "--ranker", str(ranker), "--out", str(tmp_path / "repo"), "--preset", "tiny")
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and seconds < 120
    assert not (tmp_path / "repo" / MANIFEST).exists()


def test_health_probe_sees_a_dead_stub_that_triton_still_reports_ready(tiny_repo, tmp_path):
    """What the Kubernetes liveness probe and the compose health check run next to the server."""
    import urllib.request

    from rankserve.server.embedded import EmbeddedServer

    repo = _copy(tiny_repo, tmp_path)
    with EmbeddedServer(repo, free_serve_settings(), tmp_path / "tritonserver.log") as server:
        url = f"http://{server.http_url}"
        healthy, _ = _rankserve("health", "--url", url, "--model-repository", str(repo))
        assert healthy.returncode == 0 and "4/4 Python-backend stubs running" in healthy.stdout, healthy.stderr
        stub = next(s for s in server.stubs if s.model == "tokenize")  # one of the two tokenize instances
        os.kill(stub.pid, signal.SIGKILL)
        time.sleep(0.5)
        with urllib.request.urlopen(f"{url}/v2/models/ranker/ready", timeout=5) as r:
            assert r.status == 200  # Triton 2.51: still "ready" (measured), hence the stub check
        sick, _ = _rankserve("health", "--url", url, "--model-repository", str(repo))
        # the Kubernetes readiness probe's form (compose's health check): not ready either
        not_ready, _ = _rankserve("health", "--url", url, "--model", "ranker", env={"RANKSERVE_MODEL_REPOSITORY": str(repo)})
    assert not_ready.returncode == 2 and "model tokenize: 1 of 2 Python-backend stubs running" in not_ready.stderr
    assert sick.returncode == 2 and "model tokenize: 1 of 2 Python-backend stubs running" in sick.stderr, sick.stderr
    down, _ = _rankserve("health", "--url", url, "--model-repository", str(repo))
    assert down.returncode == 2 and "is not live" in down.stderr
