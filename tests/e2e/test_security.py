"""What a hostile or careless caller can do to the real server (issue 17), over real HTTP and gRPC.

- Triton's shared-memory, model-repository, model-config, statistics, trace and logging APIs answer
  only with the embedded server's admin key: registering a Python-backend stub's own IPC region
  (which Triton 2.51 would map) is refused.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from rankserve.server.embedded import ADMIN_GRPC_METADATA, ADMIN_HEADER
from rankserve.server.processes import SHM_PREFIX

pytestmark = pytest.mark.triton


def _http(server, method: str, path: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, str]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://{server.http_url}{path}", data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def _stub_region(server) -> str:
    regions = sorted({s.shm_region for s in server.stubs})
    assert regions and all(r.startswith(SHM_PREFIX) for r in regions), regions
    return regions[0]


def test_registering_a_stub_region_is_refused_over_http_and_grpc(server):
    region = _stub_region(server)
    try:
        status, body = _http(server, "POST", "/v2/systemsharedmemory/region/stolen/register",
                             {"key": region, "offset": 0, "byte_size": 4096})
        assert status == 403 and ADMIN_HEADER in body, (status, body)
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            with pytest.raises(InferenceServerException) as refused:
                client.register_system_shared_memory("stolen_grpc", region, 4096)
            assert ADMIN_GRPC_METADATA in refused.value.message(), refused.value
            with pytest.raises(InferenceServerException):
                client.get_system_shared_memory_status()
    finally:  # had one been registered (the old server mapped it), leave the server as it was
        for name in ("stolen", "stolen_grpc"):
            _http(server, "POST", f"/v2/systemsharedmemory/region/{name}/unregister", {}, server.admin_headers)
    # nothing was registered, and the server still serves
    status, body = _http(server, "GET", "/v2/systemsharedmemory/status", headers=server.admin_headers)
    assert status == 200 and json.loads(body) == [], body
    status, _ = _http(server, "POST", "/v2/models/ranker/infer", {"inputs": [
        {"name": "query", "shape": [1], "datatype": "BYTES", "data": ["sofa"]},
        {"name": "texts", "shape": [2], "datatype": "BYTES", "data": ["gray sofa", "oak table"]}]})
    assert status == 200


RESTRICTED_HTTP = [
    ("GET", "/v2/systemsharedmemory/status"),
    ("GET", "/v2/cudasharedmemory/status"),
    ("POST", "/v2/repository/index"),
    ("GET", "/v2/models/ranker/config"),
    ("GET", "/v2/models/stats"),
    ("GET", "/v2/trace/setting"),
    ("GET", "/v2/logging"),
]


@pytest.mark.parametrize("method,path", RESTRICTED_HTTP)
def test_restricted_http_apis_answer_only_with_the_admin_key(server, method, path):
    body = {} if method == "POST" else None
    status, text = _http(server, method, path, body)
    assert status == 403 and ADMIN_HEADER in text, (status, text)
    status, text = _http(server, method, path, body, {ADMIN_HEADER: "not-the-key-0123456789"})
    assert status == 403, (status, text)
    status, text = _http(server, method, path, body, server.admin_headers)
    assert status == 200 or (path.startswith("/v2/cuda") and status == 400), (status, text)  # no CUDA in this build


def test_restricted_grpc_apis_answer_only_with_the_admin_key(server):
    calls = {
        "repository index": lambda c, h: c.get_model_repository_index(headers=h),
        "model config": lambda c, h: c.get_model_config("ranker", headers=h),
        "statistics": lambda c, h: c.get_inference_statistics(headers=h),
        "trace": lambda c, h: c.get_trace_settings(headers=h),
        "logging": lambda c, h: c.get_log_settings(headers=h),
        "system shared memory": lambda c, h: c.get_system_shared_memory_status(headers=h),
    }
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        for name, call in calls.items():
            with pytest.raises(InferenceServerException) as refused:
                call(client, None)
            assert ADMIN_GRPC_METADATA in refused.value.message(), (name, refused.value)
            with pytest.raises(InferenceServerException):
                call(client, server.admin_headers)  # the HTTP header's name is not enough over gRPC
            call(client, server.admin_grpc_metadata)  # with the key: answered
        # health, metadata and inference stay open
        assert client.is_server_ready() and client.get_model_metadata("ranker").name == "ranker"


def test_the_admin_key_is_random_per_server(server, tiny_repo):
    from rankserve.server.embedded import EmbeddedServer

    other = EmbeddedServer(tiny_repo)
    assert other.admin_key != server.admin_key and len(server.admin_key) >= 32
