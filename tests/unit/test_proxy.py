"""The TCP proxy of ``rankserve serve --releases`` with real sockets: new connections follow the
backend at once, old ones stay on theirs until drained, a drain waits for an answer in flight and
closes idle connections, and closes the rest at its timeout."""

import socket
import socketserver
import threading
import time

import pytest

from rankserve.server.embedded import free_port
from rankserve.server.proxy import TcpProxy


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
