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
