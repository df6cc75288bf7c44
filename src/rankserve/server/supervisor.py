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
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections import deque
from typing import Callable

from rankserve.errors import ServeError
from rankserve.server.embedded import EmbeddedServer
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


def supervise(make_server: Callable[[], EmbeddedServer], settings: ServeSettings, stop: threading.Event,
              log: Callable[[str], None] = print, on_ready: Callable[[EmbeddedServer], None] | None = None,
              before_start: Callable[[], object] | None = None) -> int | None:
    """Serve until ``stop`` is set, restarting a broken server; the last server's exit code (None
    when stopped before any server ran).

    ``before_start`` runs before every start (e.g. verify the repository); what it raises ends
    supervision. Raises :class:`ServeError` when a server does not become ready or the restart
    policy gives up."""
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
        if on_ready is not None:
            on_ready(server)
        taken = RequestCounter(server)
        problem = watch(server, stop, settings.health_interval_s, taken.read)
        if problem is None:
            log("stopping tritonserver (in-flight requests finish first)...")
            return server.stop()
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
