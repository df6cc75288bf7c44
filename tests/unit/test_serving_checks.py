"""What ``rankserve serve`` checks before and while starting, and how clients find a second server:
busy ports named with their owner, Triton's own log lines as the proof that a server bound its
ports, the one URL parser, and failover across several addresses."""

import os
import socket

import pytest

from rankserve.errors import ServeError
from rankserve.server.embedded import bind_failure, busy_ports, require_free_ports, started_endpoints
from rankserve.server.health import url_port
from rankserve_client import Unavailable, parse_url
from rankserve_client._common import FAILED_ADDRESS_S, Addresses
from rankserve_client.errors import BadRequest

# Lines of a real tritonserver 2.51 log (a second server on ports already in use, and a normal start).
BUSY_LOG = ('E1201 04:30:21.880894567   26718 chttp2_server.cc:1060]                UNKNOWN:No address added out of total 1 '
            'resolved for \'127.0.0.1:18001\' {children:[UNKNOWN:Address already in use {syscall:"bind", errno:98}]}\n'
            'E1201 04:30:21.886867 26718 main.cc:245] "failed to start GRPC service: Unavailable - Socket \'127.0.0.1:18001\' '
            'already in use "\n')
STARTED_LOG = ('I1201 04:30:17.091481 26282 grpc_server.cc:2558] "Started GRPCInferenceService at 127.0.0.1:18001"\n'
               'I1201 04:30:17.091744 26282 http_server.cc:4713] "Started HTTPService at 127.0.0.1:18000"\n'
               'I1201 04:30:17.133431 26282 http_server.cc:362] "Started Metrics Service at 127.0.0.1:18002"\n')


def test_the_log_says_which_endpoint_could_not_be_opened_and_which_were():
    assert bind_failure(BUSY_LOG) == "tritonserver failed to start its GRPC service: Unavailable - Socket '127.0.0.1:18001' already in use"
    assert bind_failure(STARTED_LOG) is None and started_endpoints(BUSY_LOG) == set()
    assert started_endpoints(STARTED_LOG) == {"HTTP", "gRPC", "metrics"}


def test_busy_ports_are_named_with_the_process_holding_them():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            free_port = free.getsockname()[1]
        lines = busy_ports("127.0.0.1", {"HTTP": free_port, "gRPC": port})
        assert lines == [f"the gRPC port {port} on 127.0.0.1 is already in use by pid {os.getpid()} " + lines[0].split(f"pid {os.getpid()} ")[1]]
        with pytest.raises(ServeError, match=f"gRPC port {port} .* already in use .*--grpc-port"):
            require_free_ports("127.0.0.1", {"HTTP": free_port, "gRPC": port})
    require_free_ports("127.0.0.1", {"gRPC": port})  # free again


@pytest.mark.parametrize("url, parsed, port", [
    ("127.0.0.1:8000", ("http", "127.0.0.1:8000", False), 8000),
    ("http://127.0.0.1:18000/", ("http", "127.0.0.1:18000", False), 18000),
    ("https://ranker.example.com", ("http", "ranker.example.com", True), 443),
    ("grpc://127.0.0.1:8001", ("grpc", "127.0.0.1:8001", False), 8001),
    ("grpcs://ranker.example.com:9443", ("grpc", "ranker.example.com:9443", True), 9443),
])
def test_one_url_parser_for_health_rank_and_the_sdk(url, parsed, port):
    assert parse_url(url) == parsed and url_port(url) == port


def test_a_bad_url_is_a_value_error_naming_the_forms():
    for url in ("", "ftp://h:1"):
        with pytest.raises(ValueError, match="http://"):
            parse_url(url)


def test_calls_take_the_addresses_in_turn_and_a_retry_goes_to_the_next(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("rankserve_client._common.time.monotonic", lambda: now[0])
    a = Addresses("h1:8000, h2:8000")
    assert a.all == ["h1:8000", "h2:8000"]
    assert [a.first() for _ in range(4)] == [0, 1, 0, 1]
    assert a.after(0, Unavailable("refused")) == 1  # the retry goes to the other server ...
    assert [a.first() for _ in range(4)] == [1, 1, 1, 1]  # ... and new calls avoid the one that refused for a while
    now[0] += FAILED_ADDRESS_S
    assert {a.first() for _ in range(4)} == {0, 1}
    assert a.after(1, BadRequest("no")) == 0 and {a.first() for _ in range(4)} == {0, 1}  # not its server's fault
    assert Addresses("ipv4:127.0.0.1:8001,127.0.0.1:9001").all == ["ipv4:127.0.0.1:8001,127.0.0.1:9001"]  # a gRPC resolver target
    with pytest.raises(ValueError, match="empty address"):
        Addresses("h1:8000,,h2:8000")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_each_retry_of_a_call_goes_to_the_next_address(scheme):
    """Real sockets, nothing listening: every attempt is refused, and the attempts alternate."""
    from rankserve_client import RankerClient

    a, b = _closed_port(), _closed_port()
    tried: list[str] = []
    client = RankerClient(f"{scheme}://127.0.0.1:{a},127.0.0.1:{b}", retries=3, backoff=0, check_api=False,
                          on_retry=lambda error, attempt, delay: tried.append(str(error)))
    with client:
        with pytest.raises(Unavailable) as final:
            client.rank("sofa", ["gray sofa"])
        tried.append(str(final.value))
        assert len(tried) == 4 and client.addresses.all == [f"127.0.0.1:{a}", f"127.0.0.1:{b}"]
        if scheme == "grpc":  # gRPC names the address it could not reach
            assert [a if f":{a}:" in t else b if f":{b}:" in t else None for t in tried] == [a, b, a, b]
        else:  # tritonclient's HTTP error does not: one connection per address was opened by this thread
            assert client.open_http_clients == 2
