"""The TCP proxy of ``rankserve serve --releases`` with real sockets: new connections follow the
backend at once, old ones stay on theirs until drained, a drain waits for an answer in flight and
closes idle connections, and closes the rest at its timeout."""

import socket
import socketserver
import threading
import time

import pytest

from rankserve.server.embedded import free_port
from rankserve.server.proxy import H2_PREFACE, H2Streams, TcpProxy, goaway_frame


class _Backend(socketserver.ThreadingTCPServer):
    """Answers each line ``<seconds>`` after that many seconds with ``<name> <seconds>``."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, name: str) -> None:
        self.name = name

        class Handler(socketserver.StreamRequestHandler):
            def handle(inner) -> None:
                for line in inner.rfile:
                    delay = float(line)
                    time.sleep(delay)
                    inner.wfile.write(f"{name} {delay:g}\n".encode())

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def address(self) -> dict:
        return {"http": ("127.0.0.1", self.server_address[1])}


def _ask(sock_file, delay: float) -> str:
    sock, f = sock_file
    sock.sendall(f"{delay}\n".encode())
    return f.readline().decode().strip()


def _connect(port: int):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock, sock.makefile("rb")


@pytest.fixture
def setup():
    a, b = _Backend("a"), _Backend("b")
    proxy = TcpProxy("127.0.0.1", {"http": free_port()}).start()
    yield proxy, a, b, proxy.listen["http"]
    proxy.stop()
    for backend in (a, b):
        backend.shutdown()
        backend.server_close()


def test_no_backend_refuses_and_new_connections_follow_the_backend(setup):
    proxy, a, b, port = setup
    sock, f = _connect(port)
    assert f.readline() == b""  # closed at once: nothing to send it to
    first = proxy.set_backend(a.address)
    old = _connect(port)
    assert _ask(old, 0) == "a 0"
    second = proxy.set_backend(b.address)
    assert second == first + 1
    new = _connect(port)
    assert _ask(new, 0) == "b 0" and _ask(old, 0) == "a 0"  # the old connection stays on its server until drained
    assert proxy.connections(first) == 1 and proxy.connections(second) == 1


def test_drain_closes_idle_connections_and_waits_for_an_answer_in_flight(setup):
    proxy, a, b, port = setup
    proxy.set_backend(a.address)
    idle, busy = _connect(port), _connect(port)
    assert _ask(idle, 0) == "a 0"
    answer = []
    asker = threading.Thread(target=lambda: answer.append(_ask(busy, 0.5)))
    asker.start()
    time.sleep(0.1)  # the request is at the backend
    generation = proxy.set_backend(b.address)
    started = time.monotonic()
    closed_idle, forced = proxy.drain(generation, quiet_s=0.02, timeout_s=5)
    asker.join()
    assert answer == ["a 0.5"]  # the request in flight got its answer before its connection closed
    assert (closed_idle, forced) == (2, 0) and time.monotonic() - started < 2
    assert idle[1].readline() == b"" and busy[1].readline() == b""  # both closed now
    fresh = _connect(port)
    assert _ask(fresh, 0) == "b 0"
    assert proxy.connections() == proxy.connections(generation) == 1


def test_drain_closes_what_is_still_busy_at_its_timeout(setup):
    proxy, a, b, port = setup
    proxy.set_backend(a.address)
    slow = _connect(port)
    slow[0].sendall(b"3\n")  # an answer that comes after the drain timeout
    time.sleep(0.1)
    generation = proxy.set_backend(b.address)
    started = time.monotonic()
    assert proxy.drain(generation, timeout_s=0.5) == (0, 1)
    assert 0.4 < time.monotonic() - started < 2
    assert slow[1].readline() == b""  # the client sees its connection closed (the SDKs retry that)
    assert proxy.connections() == 0


# -- HTTP/2 (the gRPC port): streams counted from frame headers, drained with GOAWAY ------------------

def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


HEADERS, DATA, RST, SETTINGS = 0x1, 0x0, 0x3, 0x4


def test_h2_streams_open_with_the_clients_headers_and_end_with_the_servers_end_stream():
    h2 = H2Streams()
    client = H2_PREFACE + _frame(SETTINGS, 0, 0, b"\0" * 6) + _frame(HEADERS, 0x4, 1, b"h" * 20) + _frame(DATA, 0x1, 1, b"d" * 50)
    for i in range(0, len(client), 7):  # frames split anywhere across reads
        h2.feed(client[i:i + 7], from_client=True)
    h2.feed(_frame(HEADERS, 0x4, 3, b"h") + _frame(RST, 0, 3, b"\0" * 4), from_client=True)  # opened, then cancelled
    assert h2.open == {1} and h2.last_client_stream == 3
    server = _frame(SETTINGS, 0, 0) + _frame(HEADERS, 0x4, 1, b"h" * 10) + _frame(DATA, 0, 1, b"x" * 100)
    h2.feed(server[:-30], from_client=False)
    assert not h2.at_boundary and h2.open == {1}  # mid-frame: no frame of the proxy's may go in here
    h2.feed(server[-30:], from_client=False)
    assert h2.at_boundary and h2.open == {1}  # the response's data, but no END_STREAM yet
    h2.feed(_frame(HEADERS, 0x5, 1, b"trailers"), from_client=False)
    assert h2.open == set() and h2.at_boundary


def test_bytes_that_are_not_http2_are_left_alone():
    h2 = H2Streams()
    h2.feed(H2_PREFACE[:5], from_client=True)
    h2.feed(b"\x16\x03\x01\x02\x00" + _frame(HEADERS, 0x4, 1), from_client=True)  # a TLS ClientHello, say
    assert not h2.readable and h2.open == set()


def test_goaway_frame_names_the_last_stream_and_no_error():
    assert goaway_frame(7) == bytes([0, 0, 8, 0x7, 0, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0])


class _H2Backend(socketserver.ThreadingTCPServer):
    """Answers each client HEADERS frame after ``delay`` s with trailers ending that stream (frames only)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, delay: float) -> None:
        class Handler(socketserver.BaseRequestHandler):
            def handle(inner) -> None:
                sock = inner.request
                data = b""
                while len(data) < len(H2_PREFACE):
                    data += sock.recv(65536)
                data = data[len(H2_PREFACE):]
                while True:
                    while len(data) >= 9 and len(data) >= 9 + int.from_bytes(data[:3], "big"):
                        n = 9 + int.from_bytes(data[:3], "big")
                        frame, data = data[:n], data[n:]
                        if frame[3] == HEADERS:
                            time.sleep(delay)
                            sock.sendall(_frame(HEADERS, 0x5, int.from_bytes(frame[5:9], "big"), b"trailers"))
                    more = sock.recv(65536)
                    if not more:
                        return
                    data += more

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def _read_frames(sock: socket.socket, timeout: float = 5) -> list[tuple[int, int, int, bytes]]:
    """Every frame until the connection closes: (type, flags, stream, payload)."""
    sock.settimeout(timeout)
    data = b""
    while True:
        more = sock.recv(65536)
        if not more:
            break
        data += more
    frames = []
    while data:
        n = int.from_bytes(data[:3], "big")
        frames.append((data[3], data[4], int.from_bytes(data[5:9], "big"), data[9:9 + n]))
        data = data[9 + n:]
    return frames


def test_stop_under_load_refuses_new_connections_sends_goaway_and_lets_calls_in_flight_finish():
    backend = _H2Backend(delay=0.6)
    proxy = TcpProxy("127.0.0.1", {"http": free_port(), "grpc": free_port()}).start()
    try:
        proxy.set_backend({"http": ("127.0.0.1", free_port()), "grpc": ("127.0.0.1", backend.server_address[1])})
        sock = socket.create_connection(("127.0.0.1", proxy.listen["grpc"]), timeout=5)
        sock.sendall(H2_PREFACE + _frame(HEADERS, 0x4, 1, b"call 1") + _frame(HEADERS, 0x4, 3, b"call 3"))
        time.sleep(0.2)  # both calls are at the server
        started = time.monotonic()
        proxy.stop_listening()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proxy.listen["grpc"]), timeout=2)
        closed_idle, forced = proxy.drain_all(timeout_s=10)
        took = time.monotonic() - started
        frames = _read_frames(sock)
    finally:
        proxy.stop()
        backend.shutdown()
        backend.server_close()
    assert frames[0][:3] == (0x7, 0, 0) and frames[0][3][:4] == (3).to_bytes(4, "big")  # GOAWAY first: no new call
    assert [(f[0], f[2]) for f in frames[1:]] == [(HEADERS, 1), (HEADERS, 3)]  # both calls answered, then closed
    assert (closed_idle, forced) == (1, 0) and 0.9 < took < 3


# -- HTTP/1.1 (the HTTP and metrics ports): a connection is closed only between messages -----------

class _SlowBodyBackend(socketserver.ThreadingTCPServer):
    """An HTTP/1.1 server that sends each answer's head at once and its body ``pause`` seconds later,
    in two chunks (``Transfer-Encoding: chunked``) or by ``Content-Length``."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, pause: float, chunked: bool) -> None:
        class Handler(socketserver.StreamRequestHandler):
            def handle(inner) -> None:
                while True:
                    line = inner.rfile.readline()
                    if not line:
                        return
                    while inner.rfile.readline() not in (b"\r\n", b""):  # the rest of the head (no body)
                        pass
                    if chunked:
                        inner.wfile.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
                        time.sleep(pause)
                        inner.wfile.write(b"6\r\nsecond\r\n0\r\n\r\n")
                    else:
                        inner.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nfirst")
                        time.sleep(pause)
                        inner.wfile.write(b"second")

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def _read_all(sock: socket.socket) -> bytes:
    sock.settimeout(5)
    data = b""
    while more := sock.recv(65536):
        data += more
    return data


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
def test_a_stop_waits_for_an_http_answer_written_in_pieces_and_then_closes_its_connection(chunked):
    """The proxy used to call an HTTP connection idle 5 ms after the backend's last bytes: an answer
    whose body came 0.3 s after its head was cut at the head."""
    backend = _SlowBodyBackend(pause=0.3, chunked=chunked)
    proxy = TcpProxy("127.0.0.1", {"http": free_port()}).start()
    try:
        proxy.set_backend({"http": ("127.0.0.1", backend.server_address[1])})
        sock = socket.create_connection(("127.0.0.1", proxy.listen["http"]), timeout=5)
        sock.sendall(b"GET /v2/models/ranker HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.1)  # the head has come through; the body has not
        proxy.stop_listening()
        closed_idle, forced = proxy.drain_all(timeout_s=5)
        answer = _read_all(sock)
    finally:
        proxy.stop()
        backend.shutdown()
        backend.server_close()
    assert answer.endswith(b"0\r\n\r\n" if chunked else b"firstsecond"), answer  # whole, then closed
    assert (closed_idle, forced) == (1, 0)
