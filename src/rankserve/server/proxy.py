"""A small TCP (layer 4) proxy that holds the public ports while the server behind it changes.

``rankserve serve --releases`` keeps the HTTP, gRPC and metrics ports on this proxy and runs
tritonserver on internal loopback ports. :meth:`TcpProxy.set_backend` sends new connections to
another server at once; :meth:`TcpProxy.drain` then closes the connections still going to the old
one, each when it is between requests (its last bytes went to the client and nothing moved for
``quiet_s``), and at ``timeout_s`` whatever is left. A client whose connection closes gets a
connection error that both SDKs retry (ranking is idempotent). Bytes are copied as they are: TLS,
HTTP/1.1 keep-alive and HTTP/2 (gRPC) pass through unchanged.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Connection:
    generation: int
    client: asyncio.StreamWriter
    backend: asyncio.StreamWriter | None = None
    last_activity: float = field(default_factory=time.monotonic)
    awaiting_backend: bool = False
    """The client sent bytes the backend has not answered yet (a request in flight)."""

    def close(self) -> None:
        for w in (self.client, self.backend):
            if w is not None and not w.is_closing():
                w.close()

    def idle(self, now: float, quiet_s: float) -> bool:
        return not self.awaiting_backend and now - self.last_activity >= quiet_s


class TcpProxy:
    """``listen``: role -> public port on ``host`` (e.g. {"http": 8000, "grpc": 8001}); the backend
    gives each role its address. Runs its own event loop in a daemon thread."""

    def __init__(self, host: str, listen: dict[str, int], block_size: int = 1 << 16) -> None:
        self.host, self.listen, self.block_size = host, dict(listen), block_size
        self._backend: dict[str, tuple[str, int]] | None = None
        self.generation = 0
        self._conns: set[_Connection] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rankserve-proxy", daemon=True)
        self._servers: list[asyncio.base_events.Server] = []
        self.accepted = 0
        self.refused = 0
        """Connections closed at once because no backend was set or it could not be reached."""

    # -- control (any thread) ---------------------------------------------------------------------
    def start(self) -> "TcpProxy":
        self._thread.start()
        try:
            self._run(self._start_servers())
        except BaseException:
            self.stop()
            raise
        return self

    def set_backend(self, backend: dict[str, tuple[str, int]]) -> int:
        """New connections go to ``backend`` from now on; the new generation (for :meth:`drain`)."""
        missing = set(self.listen) - set(backend)
        if missing:
            raise ValueError(f"backend lacks the roles {sorted(missing)}")

        def swap() -> int:
            self._backend = dict(backend)
            self.generation += 1
            return self.generation
        return self._run(self._call(swap))

    def connections(self, generation: int | None = None) -> int:
        """Open connections (of one backend generation, or all)."""
        return self._run(self._call(lambda: sum(1 for c in self._conns if generation is None or c.generation == generation)))

    def drain(self, before: int, quiet_s: float = 0.02, timeout_s: float = 10.0) -> tuple[int, int]:
        """Close every connection of a generation older than ``before``: idle ones as they become idle,
        the rest at ``timeout_s``; (closed idle, closed at the timeout)."""
        return self._run(self._drain(before, quiet_s, timeout_s), timeout=timeout_s + 10)

    def stop(self) -> None:
        if self._thread.is_alive():
            try:
                self._run(self._stop(), timeout=10)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout=10)
        if not self._loop.is_running():
            self._loop.close()

    def _run(self, coro, timeout: float | None = 30):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @staticmethod
    async def _call(fn):
        return fn()

    # -- the loop -------------------------------------------------------------------------------
    async def _start_servers(self) -> None:
        for role, port in self.listen.items():
            server = await asyncio.start_server(lambda r, w, role=role: self._handle(role, r, w), self.host, port,
                                                reuse_address=True, backlog=1024)
            self._servers.append(server)

    async def _stop(self) -> None:
        for server in self._servers:
            server.close()
        for conn in list(self._conns):
            conn.close()
        for server in self._servers:
            await server.wait_closed()

    async def _drain(self, before: int, quiet_s: float, timeout_s: float) -> tuple[int, int]:
        deadline = time.monotonic() + timeout_s
        idle = 0
        while True:
            old = [c for c in self._conns if c.generation < before]
            now = time.monotonic()
            if not old:
                return idle, 0
            if now >= deadline:
                for c in old:
                    c.close()
                    self._conns.discard(c)
                return idle, len(old)
            for c in old:
                if c.idle(now, quiet_s):
                    c.close()
                    self._conns.discard(c)
                    idle += 1
            await asyncio.sleep(min(quiet_s / 2, 0.005))

    async def _handle(self, role: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        conn = _Connection(self.generation, writer)
        backend = self._backend
        if backend is None:
            self.refused += 1
            writer.close()
            return
        self._conns.add(conn)
        try:
            try:
                b_reader, b_writer = await asyncio.open_connection(*backend[role])
            except OSError:
                self.refused += 1
                return
            conn.backend = b_writer
            if conn not in self._conns:  # drained while connecting
                return
            await asyncio.gather(self._pipe(reader, b_writer, conn, to_backend=True),
                                 self._pipe(b_reader, writer, conn, to_backend=False))
        finally:
            self._conns.discard(conn)
            conn.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Connection, to_backend: bool) -> None:
        try:
            while True:
                data = await reader.read(self.block_size)
                if not data:
                    break
                conn.awaiting_backend = to_backend
                conn.last_activity = time.monotonic()
                writer.write(data)
                await writer.drain()
                conn.last_activity = time.monotonic()
        except (ConnectionError, OSError):
            pass
        finally:
            # one side ended: end the other too (no half-open connections to track)
            conn.close()
