"""``rankserve serve --releases DIR``: serve the release ``DIR/current`` points at and switch to
another without dropping a request.

The public ports belong to a :class:`~rankserve.server.proxy.TcpProxy`; tritonserver runs on
internal loopback ports. A switch (``rankserve promote`` / ``rollback`` moved the pointer, or the
server broke and is replaced by a fresh one of the same release) takes the same path: check the
release, start a new server on it and wait until it is ready and healthy, send new connections to
it, close the old server's connections as each falls idle (all of them after
``ServeSettings.drain_timeout_s``), then stop the old server gracefully (in-flight requests finish
within its exit timeout). If the new server fails, the old one keeps serving and the error is
reported; a release that failed is not tried again until the pointer moves.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable

from rankserve import releases as rel
from rankserve.errors import RankserveError, ServeError
from rankserve.server.embedded import EmbeddedServer
from rankserve.server.supervisor import STARTING_GRACE_S, Front, RequestCounter, RestartPolicy, backend_of, internal_settings  # noqa: F401
from rankserve.settings import ServeSettings

ROLES = ("http", "grpc", "metrics")


class ReleaseServer:
    """The proxy and the server of the current release; :meth:`run` watches both the pointer and
    the server. ``log_dir``: each server start writes ``tritonserver.<n>.<release>.log`` there."""

    def __init__(self, releases: str | Path, settings: ServeSettings, log_dir: str | Path,
                 log: Callable[[str], None] = print, admin_key: str | None = None) -> None:
        """``admin_key``: the key of every server's restricted APIs (default: a random one per server)."""
        self.releases, self.settings, self.log_dir, self.log = Path(releases), settings, Path(log_dir), log
        self.admin_key = admin_key
        self.front = Front(settings, log)  # the public ports, as plain `rankserve serve` holds them
        self.proxy = self.front.proxy
        self.server: EmbeddedServer | None = None
        self.release: str | None = None
        self.failed: str | None = None
        """The release the pointer names that failed to start (not retried until the pointer moves)."""
        self.starts = 0
        self.switches: list[dict] = []
        self._stop = threading.Event()
        """Set by :meth:`run`'s ``stop``: a server still starting is abandoned at once."""

    # -- steps ----------------------------------------------------------------------------------
    def _start_server(self, name: str) -> EmbeddedServer:
        """A ready, healthy server on release ``name`` (raises, leaving nothing running, when not)."""
        from rankserve.builder.repository import remove_bytecode

        repo = rel.check_release(self.releases, name)
        remove_bytecode(repo)  # the stub would run bytecode found beside model.py (see remove_bytecode)
        self.starts += 1
        self.log_dir.mkdir(parents=True, exist_ok=True)
        server = EmbeddedServer(repo, internal_settings(self.settings), self.log_dir / f"tritonserver.{self.starts}.{name}.log",
                                admin_key=self.admin_key)
        try:
            server.start()
            server.wait_ready(self._stop)
            if self._stop.is_set():
                server.stop(grace_s=STARTING_GRACE_S)
                raise ServeError(f"release {name}: stop requested while its server was starting")
            problem = server.health_problem()
            if problem:
                raise ServeError(f"release {name}: {problem} right after it was ready")
        except BaseException:
            server.stop()
            raise
        return server

    def start(self, stop: threading.Event | None = None) -> "ReleaseServer":
        """Start the proxy and a server on the current release; with ``stop`` set meanwhile, the
        start is abandoned at once and ``server`` stays None."""
        if stop is not None:
            self._stop = stop
        self.front.start()  # the public ports first: names one already taken
        name = rel.current(self.releases)
        if name is None:
            self.front.stop()
            raise ServeError(f"{self.releases} has no current release: `rankserve promote NAME --releases {self.releases}` first "
                             f"(published: {', '.join(rel.list_releases(self.releases)) or 'none'})")
        try:
            self.server = self._start_server(name)
        except BaseException:
            self.proxy.stop()
            if self._stop.is_set():
                return self
            raise
        self.release = name
        self.proxy.set_backend(backend_of(self.server))
        return self

    def switch(self, name: str, why: str, grace_s: float | None = None) -> bool:
        """Serve release ``name`` from a fresh server; False (old server still serving) if it fails."""
        started = time.monotonic()
        self.log(f"{why}: starting a server on release {name}")
        try:
            new = self._start_server(name)
        except Exception as exc:  # noqa: BLE001 - whatever stops the new server, the old one keeps serving
            detail = str(exc) if isinstance(exc, RankserveError) else f"{type(exc).__name__}: {exc}"
            self.log(f"release {name} NOT served, still serving {self.release}: {detail}")
            self.switches.append({"release": name, "ok": False, "error": detail})
            return False
        ready_s = time.monotonic() - started
        old, old_release = self.server, self.release
        generation = self.proxy.set_backend(backend_of(new))
        self.server, self.release = new, name
        idle, forced = self.proxy.drain(generation, timeout_s=self.settings.drain_timeout_s)
        code = old.stop(grace_s=grace_s) if old is not None else None
        self.log(f"now serving release {name} (ready in {ready_s:.1f} s; release {old_release} drained: {idle} idle connections "
                 f"closed, {forced} closed at the {self.settings.drain_timeout_s:g} s drain timeout; its server exited with "
                 f"code {code})")
        self.switches.append({"release": name, "ok": True, "from": old_release, "ready_s": ready_s, "idle": idle, "forced": forced})
        return True

    def run(self, stop: threading.Event) -> int | None:
        """Serve until ``stop`` is set: follow the pointer, replace a broken server; the last server's
        exit code. Raises :class:`ServeError` when the restart policy gives up (the servers and the
        proxy are stopped either way)."""
        self._stop = stop
        try:
            self._follow(stop)
        finally:
            code = self.close()
        return code

    def _follow(self, stop: threading.Event) -> None:
        policy = RestartPolicy.of(self.settings)
        taken = RequestCounter(self.server) if self.server is not None else None
        up_since = time.monotonic()
        while not stop.wait(self.settings.health_interval_s):
            problem = self.server.health_problem() if self.server is not None else "no server"
            if problem:
                if taken is not None:
                    taken.read()
                delay = policy.after_failure(time.monotonic(), taken is not None and taken.served, time.monotonic() - up_since)
                if delay is None:
                    raise ServeError(f"gave up: {self.settings.max_restarts} restarts within {self.settings.restart_window_s:.0f} s "
                                     f"of servers that broke before taking a request (last: {problem}); "
                                     f"see {self.server.log_path if self.server else self.log_dir}")
                if delay and stop.wait(delay):
                    return
                self.switch(self.release, f"{problem}: replacing the server", grace_s=self.settings.restart_grace_s)
                taken, up_since = (RequestCounter(self.server) if self.server is not None else None), time.monotonic()
                continue
            if taken is not None:
                taken.read()
            wanted = rel.current(self.releases)
            if wanted is None or wanted == self.release:
                self.failed = None if wanted == self.release else self.failed
                continue
            if wanted == self.failed:
                continue
            if self.switch(wanted, f"{self.releases}/current -> {wanted}"):
                taken, up_since = RequestCounter(self.server), time.monotonic()
            else:
                self.failed = wanted

    def close(self) -> int | None:
        code = None
        try:
            if self.server is not None:
                self.log(f"draining: new connections refused, requests in flight finish (at most "
                         f"{self.settings.drain_timeout_s:g} s)...")
                self.front.drain()
                self.log("stopping tritonserver...")
                code = self.server.stop()
                self.server = None
        finally:
            self.proxy.stop()
        return code
