"""A small TCP (layer 4) proxy that holds the public ports while the server behind it changes.

``rankserve serve --releases`` keeps the HTTP, gRPC and metrics ports on this proxy and runs
tritonserver on internal loopback ports. :meth:`TcpProxy.set_backend` sends new connections to
another server at once; :meth:`TcpProxy.drain` then closes the connections still going to the old
one, each when it is between requests, and at ``timeout_s`` whatever is left. On the HTTP and
metrics ports "between requests" means every request read so far has been answered in full, from
the HTTP/1.1 framing (:mod:`rankserve.server.http1`); bytes that are not followable HTTP/1.1
fall back to "the backend's bytes came last and nothing moved for ``quiet_s``". A client whose
connection closes gets a connection error that both SDKs retry (ranking is idempotent). Bytes are
copied as they are: TLS, HTTP/1.1 keep-alive and HTTP/2 (gRPC) pass through unchanged.

The gRPC port's connections are HTTP/2: many calls share one connection, which is seldom idle
under load. The proxy reads the frame headers going by (not their contents) to count each
connection's open streams; a drain sends the client a ``GOAWAY`` (the server is going away: finish
the calls already sent, start no new one here) between two frames, and closes the connection once
its open streams have all ended. :meth:`TcpProxy.stop_listening` then :meth:`TcpProxy.drain`
of every connection is how ``rankserve serve`` stops under load: new connections are refused,
calls in flight finish (up to the drain timeout), and no call meets a server that is unloading.
"""

from __future__ import annotations

import asyncio
import struct
import threading
import time
from dataclasses import dataclass, field

from rankserve.server.http1 import H1Messages

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _RST_STREAM, _GOAWAY = 0x0, 0x1, 0x3, 0x7
_END_STREAM = 0x1


def goaway_frame(last_stream_id: int, error_code: int = 0) -> bytes:
    """An HTTP/2 GOAWAY frame (RFC 9113, 6.8): streams up to ``last_stream_id`` finish, no new ones."""
    return struct.pack(">I", 8)[1:] + bytes([_GOAWAY, 0]) + struct.pack(">III", 0, last_stream_id & 0x7FFFFFFF, error_code)


class H2Streams:
    """The open streams of one HTTP/2 connection, from the frame headers of both directions.

    ``feed(data, from_client)`` takes the bytes as they pass; a stream opens with the client's
    HEADERS and ends when the server's HEADERS or DATA carry END_STREAM, or with a RST_STREAM
    from either side. :attr:`at_boundary` says whether the server-to-client bytes so far end
    between two frames (where a frame of the proxy's own may go)."""

    def __init__(self) -> None:
        self.open: set[int] = set()
        self.last_client_stream = 0
        self._preface = len(H2_PREFACE)
        self.readable = True
        """False once the client's first bytes were not HTTP/2's preface (TLS, say): nothing is read or sent then."""
        self._buf = {True: b"", False: b""}
        self._skip = {True: 0, False: 0}

    @property
    def at_boundary(self) -> bool:
        return self._skip[False] == 0 and not self._buf[False]

    def feed(self, data: bytes, from_client: bool) -> None:
        if not self.readable:
            return
        if from_client and self._preface:
            cut = min(self._preface, len(data))
            seen = len(H2_PREFACE) - self._preface
            if data[:cut] != H2_PREFACE[seen:seen + cut]:
                self.readable = False
                return
            data, self._preface = data[cut:], self._preface - cut
        while data:
            if self._skip[from_client]:  # the rest of a frame's payload
                cut = min(self._skip[from_client], len(data))
                data, self._skip[from_client] = data[cut:], self._skip[from_client] - cut
                continue
            buf = self._buf[from_client] + data[:9 - len(self._buf[from_client])]
            data = data[9 - len(self._buf[from_client]):]
            if len(buf) < 9:
                self._buf[from_client] = buf
                return
            self._buf[from_client] = b""
            length = int.from_bytes(buf[:3], "big")
            kind, flags, stream = buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
            self._skip[from_client] = length
            self._frame(kind, flags, stream, from_client)

    def _frame(self, kind: int, flags: int, stream: int, from_client: bool) -> None:
        if not stream:
            return
        if kind == _RST_STREAM:
            self.open.discard(stream)
        elif from_client and kind == _HEADERS and stream > self.last_client_stream:
            self.open.add(stream)
            self.last_client_stream = stream
        elif not from_client and kind in (_HEADERS, _DATA) and flags & _END_STREAM:
            self.open.discard(stream)


@dataclass(eq=False)
class _Connection:
    generation: int
    client: asyncio.StreamWriter
    backend: asyncio.StreamWriter | None = None
    last_activity: float = field(default_factory=time.monotonic)
    awaiting_backend: bool = False
    """The client sent bytes the backend has not answered yet (a request in flight)."""
    h2: H2Streams | None = None
    """The gRPC port's connections: their HTTP/2 streams."""
    h1: H1Messages | None = None
    """The other ports' connections (HTTP and metrics): their HTTP/1.1 requests and answers."""
    goaway_wanted: bool = False
    """Being drained: a GOAWAY goes to the client at the next frame boundary."""
    goaway_sent: bool = False

    def close(self) -> None:
        for w in (self.client, self.backend):
            if w is not None and not w.is_closing():
                w.close()

    @property
    def http2(self) -> bool:
        return self.h2 is not None and self.h2.readable

    @property
    def http1(self) -> bool:
        return self.h1 is not None and self.h1.readable

    def send_goaway(self) -> None:
        """Tell an HTTP/2 client to start no new call here, if the server's bytes are between frames now."""
        self.goaway_wanted = True
        if self.http2 and not self.goaway_sent and self.h2.at_boundary and not self.client.is_closing():
            self.client.write(goaway_frame(self.h2.last_client_stream))
            self.goaway_sent = True

    def idle(self, now: float, quiet_s: float) -> bool:
        if self.http2:  # HTTP/2: no call open, and the client was told to go away
            return self.goaway_sent and not self.h2.open and now - self.last_activity >= quiet_s
        if self.http1:  # HTTP/1.1: every request answered in full
            return self.h1.between_messages and now - self.last_activity >= quiet_s
        # bytes the proxy cannot follow: idle once the backend spoke last and nothing moved for quiet_s
        return not self.awaiting_backend and now - self.last_activity >= quiet_s


class TcpProxy:
    """``listen``: role -> public port on ``host`` (e.g. {"http": 8000, "grpc": 8001}); the backend
    gives each role its address. Runs its own event loop in a daemon thread."""

    def __init__(self, host: str, listen: dict[str, int], block_size: int = 1 << 16, http2: tuple[str, ...] = ("grpc",)) -> None:
        """``http2``: the roles whose connections are HTTP/2 (drained with GOAWAY)."""
        self.host, self.listen, self.block_size, self.http2 = host, dict(listen), block_size, tuple(http2)
        self._draining = False
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

    def framing(self) -> dict[str, int]:
        """Open connections by how their boundaries are found: ``http1`` (HTTP/1.1 framing followed),
        ``http2`` (frame headers followed) and ``quiet`` (bytes not followed: idle after a quiet spell)."""
        def count() -> dict[str, int]:
            out = {"http1": 0, "http2": 0, "quiet": 0}
            for c in self._conns:
                out["http2" if c.http2 else "http1" if c.http1 else "quiet"] += 1
            return out
        return self._run(self._call(count))

    def drain(self, before: int, quiet_s: float = 0.02, timeout_s: float = 10.0) -> tuple[int, int]:
        """Close every connection of a generation older than ``before``: idle ones as they become idle,
        the rest at ``timeout_s``; (closed idle, closed at the timeout)."""
        return self._run(self._drain(before, quiet_s, timeout_s), timeout=timeout_s + 10)

    def stop_listening(self) -> None:
        """Refuse new connections from now on (the ports close); open ones carry on until drained."""
        async def close() -> None:
            self._draining = True
            for server in self._servers:
                server.close()
        self._run(close())

    def drain_all(self, quiet_s: float = 0.005, timeout_s: float = 10.0) -> tuple[int, int]:
        """:meth:`drain` every connection (after :meth:`stop_listening`: the stop under load)."""
        return self.drain(self.generation + 1, quiet_s, timeout_s)

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
                c.send_goaway()
                if c.idle(now, quiet_s):
                    c.close()
                    self._conns.discard(c)
                    idle += 1
            await asyncio.sleep(min(quiet_s / 2, 0.005))

    async def _handle(self, role: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        conn = _Connection(self.generation, writer, h2=H2Streams() if role in self.http2 else None,
                           h1=None if role in self.http2 else H1Messages())
        backend = self._backend
        if backend is None or self._draining:
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
                if conn.h2 is not None:
                    conn.h2.feed(data, from_client=to_backend)
                elif conn.h1 is not None:
                    conn.h1.feed(data, from_client=to_backend)
                writer.write(data)
                if not to_backend and conn.goaway_wanted:
                    conn.send_goaway()  # a drain that found the server mid-frame: now, between frames
                await writer.drain()
                conn.last_activity = time.monotonic()
        except (ConnectionError, OSError):
            pass
        finally:
            # one side ended: end the other too (no half-open connections to track)
            conn.close()
