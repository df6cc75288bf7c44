"""The Python SDK's transport options without a server: URL schemes, TLS files, headers, and the
errors a gateway's refusal or a failed handshake become (the real exchanges: tests/e2e/test_gateway.py)."""

import pytest

from rankserve_client import RankerClient
from rankserve_client import _common as c
from rankserve_client.errors import PermissionDenied, TlsError, Unauthenticated, Unavailable, from_triton


@pytest.mark.parametrize("url, protocol, tls, expected", [
    ("http://h:8000", None, None, ("http", "h:8000", False)),
    ("https://h:8443/", None, None, ("http", "h:8443", True)),
    ("grpc://h:8001", None, None, ("grpc", "h:8001", False)),
    ("grpcs://h:8444", "grpc", True, ("grpc", "h:8444", True)),
    ("h:8444", "grpc", True, ("grpc", "h:8444", True)),
    ("h:8000", None, None, ("http", "h:8000", False)),
])
def test_url_schemes_name_the_protocol_and_tls(url, protocol, tls, expected):
    assert c.parse_url(url, protocol, tls) == expected


@pytest.mark.parametrize("url, protocol, tls, match", [
    ("ftp://h", None, None, "https://"),
    ("https://h", "grpc", None, "contradicts protocol"),
    ("https://h", None, False, "contradicts tls"),
    ("grpc://h", None, True, "grpcs://"),
    ("h:1", "websocket", None, "protocol must be"),
])
def test_contradicting_or_unknown_schemes_are_refused(url, protocol, tls, match):
    with pytest.raises(ValueError, match=match):
        c.parse_url(url, protocol, tls)


def test_tls_files_must_exist_go_in_pairs_and_need_a_tls_url(tmp_path):
    pem = tmp_path / "ca.pem"
    pem.write_text("x")
    with pytest.raises(ValueError, match="not a file"):
        c.tls_files(True, str(tmp_path / "missing.pem"), None, None)
    with pytest.raises(ValueError, match="go together"):
        c.tls_files(True, None, str(pem), None)
    with pytest.raises(ValueError, match="https:// or grpcs://"):
        RankerClient("http://127.0.0.1:1", ca_file=str(pem), check_api=False)
    files = c.tls_files(True, str(pem), str(pem), str(pem))
    assert c.http_ssl_options(files) == {"ca_certs": str(pem), "certfile": str(pem), "keyfile": str(pem)}
    assert c.grpc_tls_kwargs(True, files) == {"ssl": True, "root_certificates": str(pem), "private_key": str(pem),
                                              "certificate_chain": str(pem)}
    assert c.grpc_tls_kwargs(False, c.TlsFiles()) == {} and c.http_ssl_options(c.TlsFiles()) == {}  # system CAs


def test_a_calls_headers_add_to_the_clients_and_replace_a_name_in_any_case():
    client = {"Authorization": "Bearer a", "X-Tenant": "t1"}
    assert c.merge_headers("http", client, {"authorization": "Bearer b", "X-Call": "1"}) == {
        "X-Tenant": "t1", "authorization": "Bearer b", "X-Call": "1"}
    assert c.merge_headers("grpc", client, None) == {"authorization": "Bearer a", "x-tenant": "t1"}  # gRPC metadata keys are lowercase
    assert c.merge_headers("http", None, {}) is None
    for bad in ({"X": "a\r\nInjected: 1"}, {"": "v"}, {"X": 1}):
        with pytest.raises(ValueError):
            c.merge_headers("http", bad)


def test_refusals_and_failed_handshakes_map_to_their_own_errors_never_retried():
    assert type(from_triton("401", "missing or invalid bearer token")) is Unauthenticated
    assert type(from_triton("StatusCode.UNAUTHENTICATED", "m")) is Unauthenticated
    assert type(from_triton("403", "m")) is PermissionDenied and type(from_triton("StatusCode.PERMISSION_DENIED", "m")) is PermissionDenied
    grpc_untrusted = ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Tls handshake failed "
                      "(TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: CERTIFICATE_VERIFY_FAILED")
    error = from_triton("StatusCode.UNAVAILABLE", grpc_untrusted)
    assert type(error) is TlsError and "ca_file" in str(error)
    assert not any(e.retryable for e in (error, Unauthenticated("m"), PermissionDenied("m")))
    closed = c.explain(Unavailable("Socket closed"), True, c.TlsFiles())
    assert "cert_file" in str(closed) and closed.retryable
    assert str(c.explain(Unavailable("Socket closed"), False, c.TlsFiles())) == "Socket closed"


# -- retries: the budget, the two kinds of retry, Retry-After, status-first classification (issue 17, items 8-9) --

import asyncio  # noqa: E402
import threading  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402

from rankserve_client import AsyncRankerClient, BadRequest, Overloaded, RequestTooLarge, RetryBudget  # noqa: E402


class Gateway:
    """What a gateway in front of the server may answer (no Triton here: these are the gateway's own
    answers): one fixed status, headers and body for every request, counting the requests it got."""

    def __init__(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.requests = 0
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                gateway.requests += 1
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


NGINX_413 = b"<html>\r\n<head><title>413 Request Entity Too Large</title></head>\r\n<body>\r\n<center><h1>413 Request Entity Too Large</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
NGINX_503 = b"<html>\r\n<head><title>503 Service Temporarily Unavailable</title></head>\r\n<body><center><h1>503 Service Temporarily Unavailable</h1></center></body></html>\r\n"


def test_a_gateways_html_413_is_request_too_large_at_once_not_retried():
    with Gateway(413, NGINX_413, {"Content-Type": "text/html"}) as gateway:
        retried = []
        with RankerClient(gateway.url, check_api=False, on_retry=lambda *a: retried.append(a)) as client:
            with pytest.raises(BadRequest, match="too large") as caught:
                client.rank("sofa", ["gray sofa"])
        assert gateway.requests == 1 and retried == []
    assert type(caught.value) is RequestTooLarge and not caught.value.retryable


@pytest.mark.parametrize("status, body, expected", [
    ("413", "an exception occurred in the client while decoding the response: x\nresponse: <html>413</html>", RequestTooLarge),
    ("429", "Too Many Requests", Overloaded),
    ("503", "an exception occurred in the client while decoding the response: x\nresponse: <html>503</html>", Overloaded),
    ("503", "the rank stage is stopping: retry", Unavailable),
    ("502", "an exception occurred in the client while decoding the response: x\nresponse: <html>502 Bad Gateway</html>", Unavailable),
    ("400", "Exceeds maximum queue size", BadRequest),  # the status decides: a 4xx is never turned into a retried error
    ("404", "an exception occurred in the client while decoding the response: x\nresponse: <html>404</html>", BadRequest),
])
def test_http_errors_are_classified_by_status_first(status, body, expected):
    error = from_triton(status, body)
    assert type(error) is expected
    assert "exception occurred in the client" not in str(error)


def test_a_shed_call_is_retried_a_few_times_then_the_budget_stops_retrying():
    """An always-refusing gateway (HTTP 429): each call makes 1 + overload_retries attempts while the
    budget lasts; once half of it is spent, calls are not retried at all (before: 4 attempts per call)."""
    with Gateway(429, b'{"error": "rate limited"}') as gateway:
        with RankerClient(gateway.url, check_api=False, overload_backoff=0.001) as client:
            for _ in range(20):
                with pytest.raises(Overloaded):
                    client.rank("sofa", ["gray sofa"])
        assert gateway.requests <= 20 + 4, gateway.requests  # 10 tokens, retries while above 5: at most 4 retries
    assert client.retry_budget.throttled >= 15


def test_retry_after_is_honoured_and_a_long_one_is_not_waited_for():
    delays = []
    with Gateway(503, b"", {"Retry-After": "0.3"}) as gateway:
        with RankerClient(gateway.url, check_api=False, on_retry=lambda e, n, d: delays.append(d)) as client:
            with pytest.raises(Overloaded) as caught:
                client.rank("sofa", ["gray sofa"])
    assert gateway.requests == 3 and len(delays) == 2 and all(0.3 <= d <= 0.34 for d in delays)
    assert caught.value.retry_after == pytest.approx(0.3)
    with Gateway(429, b'{"error": "slow down"}', {"Retry-After": "3600"}) as gateway:
        with RankerClient(gateway.url, check_api=False) as client:
            with pytest.raises(Overloaded) as caught:
                client.rank("sofa", ["gray sofa"])
        assert gateway.requests == 1 and caught.value.retry_after == 3600


def test_the_asyncio_client_honours_retry_after_and_status_first():
    async def run(url, **kwargs):
        delays = []
        client = AsyncRankerClient(url, check_api=False, on_retry=lambda e, n, d: delays.append(d), **kwargs)
        try:
            await client.rank("sofa", ["gray sofa"])
        except Exception as exc:  # noqa: BLE001 - returned to the test
            return exc, delays
        finally:
            await client.close()

    with Gateway(429, b"", {"Retry-After": "0.2"}) as gateway:
        error, delays = asyncio.run(run(gateway.url, overload_retries=1))
        assert type(error) is Overloaded and gateway.requests == 2 and 0.2 <= delays[0] <= 0.23
    with Gateway(413, NGINX_413) as gateway:
        error, delays = asyncio.run(run(gateway.url))
        assert type(error) is RequestTooLarge and gateway.requests == 1 and delays == []


def test_budget_arithmetic_as_grpc_retry_throttling():
    budget = RetryBudget(max_tokens=10, token_ratio=0.5)
    state = c.RetryState(c.RetryPolicy(retries=0, overload_retries=100, overload_backoff=0), budget)
    allowed = [state.delay_after(Overloaded("shed")) is not None for _ in range(8)]
    assert allowed == [True] * 4 + [False] * 4 and budget.tokens == 2  # retried while tokens > 5
    for _ in range(7):
        budget.record_success()
    assert budget.tokens == 5.5 and budget.allows_retry()
    for _ in range(30):
        budget.record_success()
    assert budget.tokens == 10  # never above max_tokens
    with pytest.raises(ValueError):
        RetryBudget(max_tokens=0)
    with pytest.raises(ValueError):
        c.RetryPolicy(overload_retries=-1)


def test_overload_waits_longer_than_a_transient_error_and_never_reached_failures_cost_nothing():
    policy = c.RetryPolicy()  # the defaults both SDKs share
    assert (policy.retries, policy.backoff, policy.overload_retries, policy.overload_backoff) == (3, 0.1, 2, 0.5)
    assert c.RetryPolicy(retries=0).overload_retries == 0 and c.RetryPolicy(retries=12).overload_retries == 2  # retries=0: none at all
    budget = RetryBudget()
    state = c.RetryState(policy, budget)
    refused = Unavailable("cannot reach the server: [Errno 111] Connection refused")
    refused.reached = False
    transient = [state.delay_after(refused) for _ in range(3)]
    assert all(0 <= d <= 0.4 for d in transient) and state.delay_after(refused) is None  # `retries` spent
    assert budget.tokens == 10  # the server never saw them
    shed = [state.delay_after(Overloaded("Exceeds maximum queue size")) for _ in range(3)]
    assert 0.25 <= shed[0] <= 0.5 and 0.5 <= shed[1] <= 1.0 and shed[2] is None  # overload_retries spent
    assert budget.tokens == 7
    assert type(from_triton("StatusCode.UNAVAILABLE", "failed to connect to all addresses; last error: "
                                                      "Connection refused")).__name__ == "Unavailable"
    assert not from_triton("StatusCode.UNAVAILABLE", "failed to connect to all addresses").reached
    assert c.parse_retry_after("2") == 2 and c.parse_retry_after("soon") is None and c.parse_retry_after(None) is None
    assert 0 <= c.parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0  # a date in the past: now
