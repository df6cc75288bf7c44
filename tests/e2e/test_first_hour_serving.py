"""A newcomer's first hour with ``rankserve serve`` and ``rankserve health``, as a user runs them,
against the real tritonserver (issue 18, "Serving"):

- a second ``rankserve serve`` on ports already in use exits at once, non-zero, naming the port and
  its owner, without a traceback, and the first server keeps serving; a server whose port is taken
  after the check (or answered by another process) is never reported ready;
- SIGTERM to one of two servers under Locust (the Python SDK with retries, both addresses): no
  failed request, the stopped server exits within its drain timeout and Triton's exit, and no
  client ever sees "unknown model";
- ``rankserve health`` works on what ``rankserve serve`` started with only a URL, in every URL form.
"""

import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import Serve, free_serve_settings
from rankserve.errors import ServeError
from rankserve.server import embedded
from rankserve.server.embedded import EmbeddedServer
from rankserve.settings import ServeSettings
from rankserve_client import RankerClient

pytestmark = pytest.mark.triton

TEXTS = ["Turquoise Velvet Pillow", "Oak Dining Table", "Sky Blue Throw Pillow"]


def _rankserve(*args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "rankserve", *args], capture_output=True, text=True, timeout=timeout)
    return out, time.monotonic() - started


def test_a_second_serve_on_busy_ports_exits_at_once_naming_the_port_and_the_first_keeps_serving(tiny_repo):
    first = Serve(tiny_repo)
    try:
        first.wait_for("SIGTERM stops it")
        s = first.settings
        second, took = _rankserve("serve", "--model-repository", str(tiny_repo), "--http-port", str(s.http_port),
                                  "--grpc-port", str(s.grpc_port), "--metrics-port", str(s.metrics_port), timeout=60)
        with RankerClient(first.url, retries=0) as client:
            assert len(client.rank("pillow", TEXTS)) == 3  # the first server is untouched
        assert first.proc.poll() is None
    finally:
        first.stop()
    print(f"\nsecond serve exited {second.returncode} after {took:.1f} s: {second.stderr.strip()}")
    assert second.returncode == 2 and took < 15
    assert f"HTTP port {s.http_port}" in second.stderr and "already in use by pid" in second.stderr
    assert f"gRPC port {s.grpc_port}" in second.stderr and "--http-port" in second.stderr
    assert "Traceback" not in second.stderr + second.stdout and "ready" not in second.stdout


def test_serve_releases_on_busy_ports_exits_at_once_naming_the_port(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        s = free_serve_settings()
        (tmp_path / "releases").mkdir()
        out, took = _rankserve("serve", "--releases", str(tmp_path / "releases"), "--http-port", str(s.http_port),
                               "--grpc-port", str(port), "--metrics-port", str(s.metrics_port), timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr and took < 15, out.stderr
    assert f"the gRPC port {port} on 127.0.0.1 is already in use by pid" in out.stderr  # the ports come first


class _AnswersEverything(BaseHTTPRequestHandler):
    """Another HTTP server on the port: 200 to every path (what made the old check say ready)."""

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_readiness_is_the_servers_own_and_a_port_taken_after_the_check_is_reported(tiny_repo, tmp_path, monkeypatch):
    """The port check races with other processes: a port taken between the check and Triton's bind
    must be reported from Triton's log at once, never answered for by the process that took it."""
    monkeypatch.setattr(embedded, "require_free_ports", lambda *a: None, raising=False)  # as if the port was taken just after the check
    settings = free_serve_settings()
    impostor = ThreadingHTTPServer(("127.0.0.1", settings.http_port), _AnswersEverything)
    threading.Thread(target=impostor.serve_forever, daemon=True).start()
    started = time.monotonic()
    try:
        with pytest.raises(ServeError) as error:
            with EmbeddedServer(tiny_repo, settings, tmp_path / "tritonserver.log"):
                pass
    finally:
        impostor.shutdown()
        impostor.server_close()
    took = time.monotonic() - started
    print(f"\n{error.value} ({took:.1f} s)")
    assert "failed to start its HTTP service" in str(error.value) and "--http-port" in str(error.value)
    assert took < 60


def test_serve_on_a_port_taken_after_the_check_gives_up_at_once_instead_of_restarting(tiny_repo, tmp_path, monkeypatch):
    """The supervisor (``rankserve serve``) with a server whose gRPC port another process holds."""
    from rankserve.server.supervisor import supervise

    monkeypatch.setattr(embedded, "require_free_ports", lambda *a: None, raising=False)
    settings = free_serve_settings()
    log: list[str] = []
    with socket.socket() as held:
        held.bind(("127.0.0.1", settings.grpc_port))
        held.listen()
        started = time.monotonic()
        with pytest.raises(ServeError, match="failed to start its GRPC service"):
            supervise(lambda: EmbeddedServer(tiny_repo, settings, tmp_path / "t.log"), settings, threading.Event(), log=log.append)
    assert time.monotonic() - started < 60 and not any("restart" in line for line in log), log


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_sigterm_to_one_of_two_servers_under_locust_fails_no_request(tiny_repo, tmp_path, protocol):
    """Locust (loadtest/locustfile.py: the Python SDK, 3 retries) against two ``rankserve serve``;
    the first gets SIGTERM 6 s into a 20 s run."""
    from rankserve.server.drain_bench import run as drain_run

    drain_timeout = ServeSettings.drain_timeout_s
    result = drain_run(tiny_repo, protocol, retries=3, users=6, seconds=20, stop_after=6, one_server=False,
                       drain_timeout=drain_timeout, src=None, out=tmp_path / "run")
    print(f"\n{result}")
    served = (tmp_path / "run" / "server0.out").read_text()
    assert result["failures"] == 0 and result["requests"] > 200, result
    assert result["exit_code"] == 0 and result["sigterm_to_exit_s"] < drain_timeout + 15, served
    assert "drained in" in served and "at the 10 s drain timeout" in served


def test_health_needs_only_the_url_of_what_serve_started_in_every_url_form(tiny_repo, tmp_path):
    serve = Serve(tiny_repo)
    try:
        serve.wait_for("SIGTERM stops it")
        s = serve.settings
        runs = {url: _rankserve("health", "--url", url, "--model", "ranker")[0] for url in
                (f"127.0.0.1:{s.http_port}", f"http://127.0.0.1:{s.http_port}", f"grpc://127.0.0.1:{s.grpc_port}")}
    finally:
        serve.stop()
    for url, out in runs.items():
        assert out.returncode == 0, f"{url}: {out.stderr}"
        assert "healthy" in out.stdout and str(Path(tiny_repo).resolve()) in out.stdout and "4/4" in out.stdout
    down, _ = _rankserve("health", "--url", f"127.0.0.1:{s.http_port}")
    assert down.returncode == 2 and "is not live" in down.stderr and "Traceback" not in down.stderr
    bad, _ = _rankserve("health", "--url", "ftp://127.0.0.1:1")
    assert bad.returncode == 2 and "unsupported URL scheme" in bad.stderr and "Traceback" not in bad.stderr
