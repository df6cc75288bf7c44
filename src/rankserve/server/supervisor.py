"""``rankserve serve``: run the embedded tritonserver, watch it, restart it when it breaks.

Triton does not restart a Python-backend stub that died (killed, out of memory, crashed): every
request through that model fails from then on while the model still reports ready. The supervisor
checks the server process and each stub every ``health_interval_s``; when one is gone it stops the
server (``restart_grace_s`` for in-flight requests), starts a fresh one and waits until it is ready,
within a restart budget (:class:`RestartBudget`). A stop request (SIGTERM, Ctrl-C) stops the
server gracefully: in-flight requests finish within the exit timeout, no stub or shared-memory
region is left behind.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable

from rankserve.errors import ServeError
from rankserve.server.embedded import EmbeddedServer
from rankserve.settings import ServeSettings


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


def watch(server: EmbeddedServer, stop: threading.Event, interval_s: float) -> str | None:
    """Block until ``stop`` is set (None) or the server breaks (the reason)."""
    while not stop.wait(interval_s):
        problem = server.health_problem()
        if problem:
            return problem
    return None


def supervise(make_server: Callable[[], EmbeddedServer], settings: ServeSettings, stop: threading.Event,
              log: Callable[[str], None] = print, on_ready: Callable[[EmbeddedServer], None] | None = None) -> int | None:
    """Serve until ``stop`` is set, restarting a broken server; the last server's exit code.

    Raises :class:`ServeError` when a server does not become ready or the restart budget is spent."""
    budget = RestartBudget(settings.max_restarts, settings.restart_window_s)
    restarts = 0
    while True:
        server = make_server()
        try:
            started = time.monotonic()
            server.start()
            server.wait_ready()
        except BaseException:
            server.stop()
            raise
        if restarts:
            log(f"restart {restarts}: tritonserver ready again after {time.monotonic() - started:.1f} s")
        if on_ready is not None:
            on_ready(server)
        problem = watch(server, stop, settings.health_interval_s)
        if problem is None:
            log("stopping tritonserver (in-flight requests finish first)...")
            return server.stop()
        log(f"{problem}: restarting tritonserver")
        code = server.stop(grace_s=settings.restart_grace_s)
        log(f"  the broken server exited with code {code}; log: {server.log_path}")
        if not budget.allow(time.monotonic()):
            raise ServeError(f"gave up: {settings.max_restarts} restarts within {settings.restart_window_s:.0f} s "
                             f"(last: {problem}); see {server.log_path}")
        restarts += 1
