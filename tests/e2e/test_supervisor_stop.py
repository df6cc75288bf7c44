"""``rankserve serve`` stops promptly in every state and nothing outlives it, against the real
tritonserver: SIGTERM while a server is starting or while a broken one is being replaced returns
within seconds; a SIGKILLed ``rankserve serve`` leaves no tritonserver or stub and frees its ports;
a server broken after taking requests is restarted without spending the restart budget."""

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from conftest import Serve, processes_mentioning
from rankserve.builder.repository import MANIFEST, model_entry
from rankserve.server.embedded import port_free
from rankserve.server.processes import server_pids, stub_processes
from rankserve_client import RankerClient

pytestmark = pytest.mark.triton

STOPPED_WITHIN_S = 8.0


def _slow_repo(tiny_repo: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the tiny repository whose postprocess stub takes 10 minutes to load while the
    returned marker file exists (recorded in the manifest, as a build of that code would)."""
    repo, marker = tmp_path / "repo", tmp_path / "slow"
    shutil.copytree(tiny_repo, repo)
    return _make_slow(repo, marker), marker


def _make_slow(repo: Path, marker: Path) -> Path:
    adapter = repo / "postprocess" / "1" / "model.py"
    adapter.write_text(adapter.read_text() + f"\nimport os as _os, time as _time\nif _os.path.exists({str(marker)!r}):\n"
                                              "    _time.sleep(600)\n")
    manifest = json.loads((repo / MANIFEST).read_text())
    manifest["models"]["postprocess"] = model_entry(repo, "postprocess")
    (repo / MANIFEST).write_text(json.dumps(manifest))
    return repo


def _wait(condition, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"{what} not within {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - started


def _nothing_left(serve: Serve, repo: Path) -> bool:
    s = serve.settings
    return (not server_pids(repo) and not processes_mentioning(str(repo))
            and all(port_free(p) for p in (s.http_port, s.grpc_port, s.metrics_port)))


def _sigterm_and_time(serve: Serve) -> float:
    started = time.monotonic()
    serve.proc.send_signal(signal.SIGTERM)
    code = serve.proc.wait(timeout=30)  # the old supervisor waited for the whole start (up to 180 s)
    took = time.monotonic() - started
    assert code == 0, serve.output
    return took


def test_sigterm_while_the_server_is_starting_stops_within_seconds(tiny_repo, tmp_path):
    repo, marker = _slow_repo(tiny_repo, tmp_path)
    marker.touch()
    serve = Serve(repo)
    try:
        _wait(lambda: server_pids(repo), 60, "a tritonserver")
        time.sleep(1.5)  # loading its models: the postprocess stub sleeps
        took = _sigterm_and_time(serve)
    finally:
        serve.stop()
    print(f"\nstopped {took:.2f} s after SIGTERM while starting")
    assert took < STOPPED_WITHIN_S and "stop requested while tritonserver was starting" in serve.output
    assert _nothing_left(serve, repo) and serve.leftover_shm() == set()


def test_sigterm_while_restarting_stops_within_seconds(tiny_repo, tmp_path):
    repo, marker = _slow_repo(tiny_repo, tmp_path)
    serve = Serve(repo, "--health-interval", "0.2")
    try:
        serve.wait_for("SIGTERM stops it")
        first = serve.server_pid()
        marker.touch()  # the replacement will take 10 minutes to load
        stub = next(s for s in stub_processes(first) if s.model == "tokenize")  # one of the tokenize instances
        os.kill(stub.pid, signal.SIGKILL)
        serve.wait_for("restarting tritonserver", timeout=30)
        _wait(lambda: [p for p in server_pids(repo) if p != first], 30, "the replacement tritonserver")
        time.sleep(1.5)
        took = _sigterm_and_time(serve)
    finally:
        serve.stop()
    print(f"\nstopped {took:.2f} s after SIGTERM while restarting")
    assert took < STOPPED_WITHIN_S and "stop requested while tritonserver was starting" in serve.output
    assert _nothing_left(serve, repo) and serve.leftover_shm() == set()


def test_sigterm_while_the_first_release_server_is_starting_stops_within_seconds(tiny_ranker, dataset, tmp_path):
    """``rankserve serve --releases``: the same while its first server is starting."""
    from rankserve import releases as rel
    from rankserve.builder.repository import build_repository
    from rankserve.settings import PRESETS

    repo, marker, releases = tmp_path / "built", tmp_path / "slow", tmp_path / "releases"
    build_repository(tiny_ranker, repo, PRESETS["tiny"], log=lambda _m: None, dataset=dataset)  # gated: publishable
    _make_slow(repo, marker)
    marker.touch()
    name, _ = rel.publish(repo, releases)
    rel.promote(releases, name)
    served = rel.release_repository(releases, name)
    serve = Serve(None, "--releases", str(releases))
    try:
        _wait(lambda: server_pids(served), 60, "a tritonserver")
        time.sleep(1.5)
        took = _sigterm_and_time(serve)
    finally:
        serve.stop()
    print(f"\n--releases: stopped {took:.2f} s after SIGTERM while starting")
    assert took < STOPPED_WITHIN_S and "stopped while starting" in serve.output
    assert not server_pids(served) and not processes_mentioning(str(releases)) and serve.leftover_shm() == set()
    s = serve.settings
    assert all(port_free(p) for p in (s.http_port, s.grpc_port, s.metrics_port))


def test_a_sigkilled_serve_leaves_no_server_no_stub_and_frees_its_ports(tiny_repo, tmp_path):
    repo, _ = _slow_repo(tiny_repo, tmp_path)
    serve = Serve(repo)
    try:
        serve.wait_for("SIGTERM stops it")
        stubs = stub_processes(serve.server_pid())
        assert len(stubs) == 4  # tokenize (two instances), rank, postprocess
        serve.proc.kill()  # SIGKILL: no handler runs, nothing is stopped by the supervisor
        serve.proc.wait(timeout=10)
        took = _wait(lambda: _nothing_left(serve, repo), 30, "server, stubs and ports gone")
    finally:
        serve.stop()
    print(f"\ntritonserver, its stubs and ports gone {took:.2f} s after `rankserve serve` was SIGKILLed")
    assert took < STOPPED_WITHIN_S
    assert serve.leftover_shm() == set()  # tritonserver stopped gracefully (SIGTERM) and removed its stubs' regions


def test_servers_broken_after_taking_requests_do_not_spend_the_restart_budget(tiny_repo, tmp_path):
    """--max-restarts 1: two servers broken after taking requests are restarted (with backoff)
    and the budget is still whole; a server broken before any request spends it, the next gives up."""
    repo, _ = _slow_repo(tiny_repo, tmp_path)
    serve = Serve(repo, "--health-interval", "0.2", "--max-restarts", "1")

    def kill_a_stub() -> None:
        stub = next(s for s in stub_processes(serve.server_pid()) if s.model == "tokenize")  # one of the tokenize instances
        os.kill(stub.pid, signal.SIGKILL)

    try:
        serve.wait_for("SIGTERM stops it")
        for restart in (1, 2):
            with RankerClient(serve.url, retries=0, check_api=False) as client:
                client.rank("oak table", ["an oak table", "a chair"])
            kill_a_stub()
            serve.wait_for("ready again", timeout=60, count=restart)
        assert serve.output.count("it had taken requests") == 2
        kill_a_stub()  # no request since it became ready: a crash loop at start, as far as anyone can tell
        serve.wait_for("ready again", timeout=60, count=3)
        kill_a_stub()
        assert serve.proc.wait(timeout=60) == 2
    finally:
        serve.stop()
    assert "restarting in 1 s" in serve.output and "restarting in 2 s" in serve.output
    assert serve.output.count("no request had reached it") == 2
    serve.wait_for("gave up: 1 restarts within", timeout=5)
    assert _nothing_left(serve, repo) and serve.leftover_shm() == set()
