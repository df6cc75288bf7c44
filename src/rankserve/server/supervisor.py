"""``rankserve serve``: run the embedded tritonserver, watch it, restart it when it breaks.

Triton does not restart a Python-backend stub that died (killed, out of memory, crashed): every
request through that model fails from then on while the model still reports ready. The supervisor
checks the server process and each stub every ``health_interval_s``; when one is gone it stops the
server (``restart_grace_s`` for in-flight requests), waits a backoff, starts a fresh one and waits
until it is ready (:class:`RestartPolicy` decides the wait and when to give up). Before every start
``before_start`` runs (``rankserve serve``: the repository is verified again, so a file changed on
disk between restarts is refused). A stop request (SIGTERM, Ctrl-C) is honoured in every state:
a serving server stops gracefully (in-flight requests finish within the exit timeout), one that
is starting or waiting for readiness is stopped at once (:data:`STARTING_GRACE_S`), a pending
restart is abandoned; no stub or shared-memory region is left behind.

The public ports belong to rankserve's :class:`Front` (a TCP proxy, see ``server/proxy.py``);
tritonserver listens on internal loopback ports behind it. Triton 2.51 drains badly by itself: on
SIGTERM it keeps taking HTTP requests while any is in flight, and once a model has unloaded
answers "unknown model" (not retried) until its endpoints close. So a stop drains in front of it
first (:meth:`Front.drain`): the public ports close (new connections are refused: the SDKs retry
that, a load balancer sees the replica not ready), each open connection is closed once it is
between requests (HTTP/2 clients are sent GOAWAY and their calls in flight finish), the rest at
``drain_timeout_s``; only then is tritonserver stopped, with nothing left in flight.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import urllib.request
from collections import deque
from typing import Callable

from rankserve.errors import ServeError
from rankserve.server.embedded import EmbeddedServer, free_port, require_free_ports, serve_ports
from rankserve.server.proxy import TcpProxy
from rankserve.settings import ServeSettings

STARTING_GRACE_S = 3.0
"""How long a server stopped before it was ready gets after SIGTERM before SIGKILL (no client has
a request in it)."""

REQUEST_COUNTERS = ("nv_inference_request_success", "nv_inference_request_failure", "nv_inference_pending_request_count")
"""Triton's per-model metrics whose sum tells whether a server has taken requests."""


class RestartBudget:
    """At most ``max_restarts`` restarts in any window of ``window_s`` seconds."""

    def __init__(self, max_restarts: int, window_s: float) -> None:
        self.max_restarts, self.window_s = max_restarts, window_s
        self._times: deque[float] = deque()

    def allow(self, now: float) -> bool:
        """Record a restart at ``now`` if the budget allows it."""
        while self._times and now - self._times[0] >= self.window_s:
            self._times.popleft()
        if len(self._times) >= self.max_restarts:
            return False
        self._times.append(now)
        return True


class RestartPolicy:
    """When to restart a broken server, and when to give up.

    A server that broke before it had taken any request (a crash loop at start: it never became
    ready, or broke right after with no request in it) spends the :class:`RestartBudget`; past it,
    serve gives up. A server that had taken requests and then broke (a request may have crashed a
    stub: a client must not be able to take the service down for good) is restarted without
    spending the budget. Either way the restart waits a backoff: ``backoff_s``, doubled with each
    failure in a row up to ``backoff_max_s``; the streak ends once a server stays up for
    ``backoff_max_s``."""

    def __init__(self, max_restarts: int, window_s: float, backoff_s: float, backoff_max_s: float) -> None:
        self.budget = RestartBudget(max_restarts, window_s)
        self.backoff_s, self.backoff_max_s = backoff_s, backoff_max_s
        self.streak = 0

    @classmethod
    def of(cls, s: ServeSettings) -> "RestartPolicy":
        return cls(s.max_restarts, s.restart_window_s, s.restart_backoff_s, s.restart_backoff_max_s)

    def after_failure(self, now: float, served: bool, up_s: float) -> float | None:
        """A server broke at ``now`` after ``up_s`` seconds ready, having taken requests
        (``served``) or not: the seconds to wait before restarting it, or None (give up)."""
        if up_s >= self.backoff_max_s:
            self.streak = 0
        if not served and not self.budget.allow(now):
            return None
        delay = min(self.backoff_s * 2 ** self.streak, self.backoff_max_s) if self.backoff_s > 0 else 0.0
        self.streak += 1
        return delay


def requests_taken(metrics_text: str) -> int:
    """The sum of :data:`REQUEST_COUNTERS` over every model in Prometheus text from Triton."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(REQUEST_COUNTERS):
            try:
                total += float(line.rsplit(None, 1)[1])
            except (IndexError, ValueError):
                continue
    return int(total)


def read_requests_taken(server: EmbeddedServer) -> int | None:
    """:func:`requests_taken` from the server's metrics endpoint, or None when it does not answer."""
    try:
        with urllib.request.urlopen(server.metrics_url, timeout=2) as r:
            return requests_taken(r.read().decode(errors="replace"))
    except OSError:
        return None


class RequestCounter:
    """Whether a server has taken requests since it became ready (created then), from its metrics:
    completed, failed and queued requests, warmup requests included (so: more than at the first
    reading). :meth:`read` at each health check keeps the answer when the server process dies."""

    def __init__(self, server: EmbeddedServer, read: Callable[[EmbeddedServer], int | None] | None = None) -> None:
        self.server, self._read = server, read or read_requests_taken
        self.first: int | None = None
        self.served = False
        self.read()

    def read(self) -> None:
        n = self._read(self.server)
        if n is None:
            return
        if self.first is None:
            self.first = n
        elif n > self.first:
            self.served = True


def watch(server: EmbeddedServer, stop: threading.Event, interval_s: float,
          on_tick: Callable[[], None] | None = None) -> str | None:
    """Block until ``stop`` is set (None) or the server breaks (the reason); ``on_tick`` runs at
    each healthy check."""
    while not stop.wait(interval_s):
        problem = server.health_problem()
        if problem:
            return problem
        if on_tick is not None:
            on_tick()
    return None


def internal_settings(settings: ServeSettings) -> ServeSettings:
    """``settings`` on three free loopback ports (the proxy holds the public ones)."""
    ports: list[int] = []
    while len(ports) < 3:
        port = free_port()
        if port not in ports and port not in (settings.http_port, settings.grpc_port, settings.metrics_port):
            ports.append(port)
    return dataclasses.replace(settings, host="127.0.0.1", http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2])


def backend_of(server: EmbeddedServer) -> dict[str, tuple[str, int]]:
    s = server.settings
    return {"http": (s.host, s.http_port), "grpc": (s.host, s.grpc_port), "metrics": (s.host, s.metrics_port)}


def stop_notice(settings: ServeSettings) -> str:
    """What a stop does, as ``rankserve serve`` tells it at the start."""
    return (f"Ctrl-C or SIGTERM stops it. New connections are then refused at once, requests in flight finish (at most "
            f"{settings.drain_timeout_s:g} s, --drain-timeout), then tritonserver stops.")


class Front:
    """The public HTTP, gRPC and metrics ports of ``settings``, held by a :class:`TcpProxy` in
    front of whichever server is current (:meth:`serve`), and drained before a stop (:meth:`drain`)."""

    def __init__(self, settings: ServeSettings, log: Callable[[str], None] = print) -> None:
        self.settings, self.log = settings, log
        self.proxy = TcpProxy(settings.host, {"http": settings.http_port, "grpc": settings.grpc_port,
                                              "metrics": settings.metrics_port})

    def start(self) -> "Front":
        """Listen on the public ports; :class:`ServeError` naming any port already taken."""
        require_free_ports(self.settings.host, serve_ports(self.settings))
        try:
            self.proxy.start()
        except OSError as exc:  # taken between the check and the start
            raise ServeError(f"cannot listen on the public ports of {self.settings.host}: {exc.strerror or exc} "
                             "(choose other ports: --http-port, --grpc-port, --metrics-port)") from None
        return self

    def serve(self, server: EmbeddedServer) -> int:
        """New connections go to ``server`` from now on (the proxy's generation)."""
        return self.proxy.set_backend(backend_of(server))

    def drain(self) -> tuple[int, int]:
        """Refuse new connections, let each open one finish its request in flight (HTTP/2: GOAWAY,
        then its calls in flight), up to ``drain_timeout_s``; (closed when idle, closed at the timeout)."""
        started = time.monotonic()
        self.proxy.stop_listening()
        open_ = self.proxy.connections()
        idle, forced = self.proxy.drain_all(timeout_s=self.settings.drain_timeout_s)
        self.log(f"drained in {time.monotonic() - started:.2f} s: {open_} open connections; {idle} closed by rankserve between "
                 f"requests, {open_ - idle - forced} by their clients (gRPC: told to go away), {forced} at the "
                 f"{self.settings.drain_timeout_s:g} s drain timeout")
        return idle, forced

    def stop(self) -> None:
        self.proxy.stop()


def supervise(make_server: Callable[[], EmbeddedServer], settings: ServeSettings, stop: threading.Event,
              log: Callable[[str], None] = print, on_ready: Callable[[EmbeddedServer], None] | None = None,
              before_start: Callable[[], object] | None = None, front: Front | None = None) -> int | None:
    """Serve until ``stop`` is set, restarting a broken server; the last server's exit code (None
    when stopped before any server ran).

    ``before_start`` runs before every start (e.g. verify the repository); what it raises ends
    supervision. ``front``: the started :class:`Front` on the public ports (``make_server`` then
    makes servers on internal ports, e.g. :func:`internal_settings`): each ready server is put
    behind it, and a stop drains it before the server stops. Raises :class:`ServeError` when a
    server does not become ready or the restart policy gives up."""
    policy = RestartPolicy.of(settings)
    restarts = 0
    code = None
    while not stop.is_set():
        if before_start is not None:
            before_start()
        server = make_server()
        try:
            started = time.monotonic()
            server.start()
            server.wait_ready(stop)
        except BaseException:
            server.stop(grace_s=STARTING_GRACE_S)
            raise
        if stop.is_set():
            log("stop requested while tritonserver was starting: stopping it")
            return server.stop(grace_s=STARTING_GRACE_S)
        ready_at = time.monotonic()
        if restarts:
            log(f"restart {restarts}: tritonserver ready again after {ready_at - started:.1f} s")
        if front is not None:
            front.serve(server)
        if on_ready is not None:
            on_ready(server)
        taken = RequestCounter(server)
        problem = watch(server, stop, settings.health_interval_s, taken.read)
        if problem is None:
            if front is not None:
                log(f"draining: new connections refused, requests in flight finish (at most {settings.drain_timeout_s:g} s)...")
                front.drain()
            log("stopping tritonserver...")
            stopping = time.monotonic()
            code = server.stop()
            log(f"tritonserver stopped in {time.monotonic() - stopping:.2f} s")
            return code
        taken.read()  # the server may still answer (a stub died): its requests up to now
        served = taken.served
        log(f"{problem}: restarting tritonserver ({'it had taken requests' if served else 'no request had reached it'})")
        code = server.stop(grace_s=settings.restart_grace_s)
        log(f"  the broken server exited with code {code}; log: {server.log_path}")
        delay = policy.after_failure(time.monotonic(), served, time.monotonic() - ready_at)
        if delay is None:
            raise ServeError(f"gave up: {settings.max_restarts} restarts within {settings.restart_window_s:.0f} s of servers "
                             f"that broke before taking a request (last: {problem}); see {server.log_path}")
        if delay:
            log(f"  restarting in {delay:g} s")
            if stop.wait(delay):
                break
        restarts += 1
    return code
