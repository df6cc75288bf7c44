"""Transport security for real: both SDKs over HTTPS and gRPC over TLS through the gateway
(deploy/gateway/rankserve.conf.template run by Debian's nginx: TLS and a bearer-token check in
front of the real tritonserver), and Triton's own gRPC TLS with mutual authentication. The
certificates are made by the test (openssl): a CA, a server certificate for 127.0.0.1, a client
certificate, and a CA nobody here trusts."""

import asyncio
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_serve_settings
from rankserve_client import AsyncRankerClient, RankerClient, TlsError, Unauthenticated, Unavailable
from tls_gateway import Nginx, make_certificates

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
                       reason="nginx is not installed (Debian package nginx: `make system`)"),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl CLI is not installed: the test makes its certificates with it"),
]
TS = Path(__file__).resolve().parents[2] / "clients" / "typescript"
TEXTS = ["Larkin Salon Chair | Massage Chairs", "Oak Dining Table | Dining Tables", "Gray Rug | Area Rugs", "salon chair cover"]
ITEMS = [(f"sku-{i}", t) for i, t in enumerate(TEXTS)]


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def token():
    return secrets.token_urlsafe(24)


@pytest.fixture(scope="module")
def gateway(server, certs, token, tmp_path_factory):
    nginx = Nginx(tmp_path_factory.mktemp("nginx"), certs, token, server.http_url, server.grpc_url).start()
    yield nginx
    nginx.stop()


def _tls_triton(tiny_repo, certs, log, mutual: bool):
    """The tiny ranker on a tritonserver whose gRPC endpoint speaks TLS (and with ``mutual`` wants a client certificate)."""
    from rankserve.server.embedded import EmbeddedServer, server_command

    settings = free_serve_settings()
    tls = ["--grpc-use-ssl=true", f"--grpc-server-cert={certs.server_cert}", f"--grpc-server-key={certs.server_key}",
           f"--grpc-root-cert={certs.ca}", *(["--grpc-use-ssl-mutual=true"] if mutual else [])]
    server = EmbeddedServer(tiny_repo, settings, log, argv=lambda install, backends: [
        *server_command(install, Path(tiny_repo).resolve(), backends, settings, server.admin_key), *tls])
    return server


@pytest.fixture(scope="module")
def mtls_server(tiny_repo, certs, tmp_path_factory):
    with _tls_triton(tiny_repo, certs, tmp_path_factory.mktemp("triton_mtls") / "tritonserver.log", mutual=True) as srv:
        yield srv


def test_tritons_own_grpc_tls(server, tiny_repo, certs, tmp_path):
    """Server-side TLS only: the CA is enough; trusting another CA or speaking plain gRPC is not."""
    direct = RankerClient(f"http://{server.http_url}").rank("salon chair", ITEMS)
    with _tls_triton(tiny_repo, certs, tmp_path / "tritonserver.log", mutual=False) as tls_server:
        url = f"grpcs://{tls_server.grpc_url}"
        with RankerClient(url, ca_file=str(certs.ca), headers={"x-request-tag": "tls"}) as client:
            _same_ranking(client.rank("salon chair", ITEMS), direct)
        with RankerClient(tls_server.grpc_url, "grpc", tls=True, ca_file=str(certs.ca)) as bare:  # host:port with tls=True
            _same_ranking(bare.rank("salon chair", ITEMS), direct)
        with pytest.raises(TlsError, match="ca_file"):
            RankerClient(url, ca_file=str(certs.other_ca), timeout=5)
        with pytest.raises(Unavailable):
            RankerClient(f"grpc://{tls_server.grpc_url}", timeout=5, retries=0)


def _gateway_url(gateway, protocol: str) -> str:
    return f"https://127.0.0.1:{gateway.https_port}" if protocol == "http" else f"grpcs://127.0.0.1:{gateway.grpc_port}"


def _same_ranking(a, b) -> None:
    assert [r.id for r in a] == [r.id for r in b]
    assert all(abs(x.score - y.score) <= 1e-5 for x, y in zip(a, b))


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_through_the_gateway_with_the_token_both_protocols_rank_as_triton_does_directly(server, gateway, certs, token, protocol):
    direct = RankerClient(f"{protocol}://{getattr(server, protocol + '_url')}").rank("salon chair", ITEMS)
    before = gateway.access_log().count(" 200 ")
    with RankerClient(_gateway_url(gateway, protocol), ca_file=str(certs.ca), headers={"Authorization": f"Bearer {token}"}) as client:
        assert client.is_ready()
        _same_ranking(client.rank("salon chair", ITEMS), direct)
        assert [r.id for r in client.rank("salon chair", ITEMS, top_k=2)] == [r.id for r in direct[:2]]
    assert gateway.access_log().count(" 200 ") >= before + 3  # metadata, ready, 2 x infer went through nginx


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_without_the_token_or_with_a_wrong_one_the_sdk_raises_unauthenticated_at_once(gateway, certs, token, protocol):
    retries = []
    for headers in (None, {"Authorization": "Bearer not-the-token"}, {"Authorization": token}):
        with pytest.raises(Unauthenticated, match="bearer token"):
            RankerClient(_gateway_url(gateway, protocol), ca_file=str(certs.ca), headers=headers,
                         on_retry=lambda *a: retries.append(a))
    assert retries == []  # a refused credential is not retried
    assert " 401 " in gateway.access_log()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_calls_headers_add_to_the_clients_and_replace_the_same_name(server, gateway, certs, token, protocol):
    url, ca = _gateway_url(gateway, protocol), str(certs.ca)
    good = {"Authorization": f"Bearer {token}"}
    with RankerClient(url, ca_file=ca, check_api=False) as anonymous:  # no token of its own: each call brings it
        assert len(anonymous.rank("salon chair", ITEMS, headers=good)) == 4
        with pytest.raises(Unauthenticated):
            anonymous.rank("salon chair", ITEMS)
    with RankerClient(url, ca_file=ca, headers=good) as client:
        assert len(client.rank("salon chair", ITEMS, headers={"X-Request-Tag": "per-call"})) == 4  # adds, keeps the token
        with pytest.raises(Unauthenticated):  # the same header in another case replaces the client's
            client.rank("salon chair", ITEMS, headers={"authorization": "Bearer wrong"})
        assert len(client.rank("salon chair", ITEMS)) == 4


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_the_asyncio_client_through_the_gateway(server, gateway, certs, token, protocol):
    direct = RankerClient(f"http://{server.http_url}").rank("salon chair", ITEMS)

    async def main():
        async with AsyncRankerClient(_gateway_url(gateway, protocol), ca_file=str(certs.ca),
                                     headers={"Authorization": f"Bearer {token}"}, chunk_size=3) as client:
            ranked = await client.rank("salon chair", ITEMS)
        anonymous = AsyncRankerClient(_gateway_url(gateway, protocol), ca_file=str(certs.ca), check_api=False)
        try:
            with pytest.raises(Unauthenticated):
                await anonymous.rank("salon chair", ITEMS)
            per_call = await anonymous.rank("salon chair", ITEMS, headers={"Authorization": f"Bearer {token}"})
        finally:
            await anonymous.close()
        return ranked, per_call

    ranked, per_call = asyncio.run(main())
    _same_ranking(ranked, direct)
    _same_ranking(per_call, direct)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_server_certificate_the_client_does_not_trust_is_a_tls_error_not_retried(gateway, certs, token, protocol):
    retries = []
    headers = {"Authorization": f"Bearer {token}"}
    for ca in (None, str(certs.other_ca)):  # the system's CAs, then an unrelated CA: neither signed the gateway's certificate
        with pytest.raises(TlsError, match="ca_file"):
            RankerClient(_gateway_url(gateway, protocol), ca_file=ca, headers=headers, timeout=5, on_retry=lambda *a: retries.append(a))
    assert retries == []


def test_a_body_over_the_gateways_cap_is_request_too_large_at_once_not_retried(gateway, certs, token):
    """nginx answers a body over its 16 MiB cap with an HTML 413: the SDKs raise RequestTooLarge (a BadRequest), one attempt."""
    from rankserve_client import BadRequest, RequestTooLarge

    huge = [f"{'gray sofa ' * 1800} {i}" for i in range(1000)]  # ~18 MB in one request
    retries = []
    with RankerClient(_gateway_url(gateway, "http"), ca_file=str(certs.ca), headers={"Authorization": f"Bearer {token}"},
                      on_retry=lambda *a: retries.append(a)) as client:
        with pytest.raises(BadRequest, match="HTTP 413") as caught:
            client.rank("sofa", huge)
        assert type(caught.value) is RequestTooLarge and retries == []
        assert len(client.rank("sofa", ["gray sofa"])) == 1

    async def main():
        async with AsyncRankerClient(_gateway_url(gateway, "http"), ca_file=str(certs.ca), headers={"Authorization": f"Bearer {token}"},
                                     on_retry=lambda *a: retries.append(a)) as client:
            with pytest.raises(RequestTooLarge, match="HTTP 413"):
                await client.rank("sofa", huge)

    asyncio.run(main())
    assert retries == []


def test_async_untrusted_certificate_is_a_tls_error(gateway, certs):
    async def main():
        async with AsyncRankerClient(_gateway_url(gateway, "http"), ca_file=str(certs.other_ca)):
            pass

    with pytest.raises(TlsError):
        asyncio.run(main())


def test_tritons_own_grpc_tls_with_mutual_authentication(server, mtls_server, certs):
    direct = RankerClient(f"http://{server.http_url}").rank("salon chair", ITEMS)
    url = f"grpcs://{mtls_server.grpc_url}"
    with RankerClient(url, ca_file=str(certs.ca), cert_file=str(certs.client_cert), key_file=str(certs.client_key),
                      headers={"x-request-tag": "mtls"}) as client:
        _same_ranking(client.rank("salon chair", ITEMS), direct)

    async def main():
        async with AsyncRankerClient(url, ca_file=str(certs.ca), cert_file=str(certs.client_cert), key_file=str(certs.client_key)) as c:
            return await c.rank("salon chair", ITEMS)

    _same_ranking(asyncio.run(main()), direct)
    # no client certificate: Triton closes the connection (TLS 1.3: after the client's half of the handshake), and
    # the error says what that likely means; a client that does not speak TLS gets nowhere either
    with pytest.raises(Unavailable, match="pass cert_file and key_file"):
        RankerClient(url, ca_file=str(certs.ca), timeout=5, retries=0)
    with pytest.raises(Unavailable):
        RankerClient(f"grpc://{mtls_server.grpc_url}", timeout=5, retries=0)


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed: the TypeScript SDK cannot run here")
def test_typescript_sdk_over_https_through_the_gateway(gateway, certs, token):
    assert (TS / "dist" / "test" / "tls.test.js").exists(), "build the SDK first: `make ts` (part of `make test`)"
    out = subprocess.run(["node", "--test", "dist/test/tls.test.js"], cwd=TS, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "RANKSERVE_TLS_URL": f"https://127.0.0.1:{gateway.https_port}", "RANKSERVE_TOKEN": token,
                              "RANKSERVE_CA": str(certs.ca), "RANKSERVE_OTHER_CA": str(certs.other_ca)})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "# pass 4" in out.stdout and "# fail 0" in out.stdout and "# skipped 0" in out.stdout


def test_the_rank_command_through_the_gateway_and_over_mutual_tls(gateway, mtls_server, certs, token, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")

    def rank(*args, **env):
        return subprocess.run([sys.executable, "-m", "rankserve", "rank", "--query", "salon chair", "--texts-file", str(texts),
                               "--top-k", "2", *args], capture_output=True, text=True, timeout=120, env={**os.environ, **env})

    via_gateway = ("--url", f"https://127.0.0.1:{gateway.https_port}", "--ca-file", str(certs.ca))
    out = rank(*via_gateway, "--token-env", "GATEWAY_TOKEN", GATEWAY_TOKEN=token)
    assert out.returncode == 0, out.stderr
    assert "4 candidates" in out.stdout and len(out.stdout.strip().splitlines()) == 3
    out = rank(*via_gateway, "--header", f"Authorization: Bearer {token}", "--header", "X-Request-Tag: cli")
    assert out.returncode == 0, out.stderr
    out = rank(*via_gateway)
    assert out.returncode == 2 and "Unauthenticated" in out.stderr and "Traceback" not in out.stderr
    out = rank("--url", f"grpcs://{mtls_server.grpc_url}", "--ca-file", str(certs.ca), "--cert-file", str(certs.client_cert),
               "--key-file", str(certs.client_key))
    assert out.returncode == 0, out.stderr
    out = rank("--url", f"http://127.0.0.1:{gateway.https_port}", "--ca-file", str(certs.ca))
    assert out.returncode == 2 and "https:// or grpcs://" in out.stderr and "Traceback" not in out.stderr
