"""What a hostile or careless caller can do to the real server (issue 17), over real HTTP and gRPC.

- Triton's shared-memory, model-repository, model-config, statistics, trace and logging APIs answer
  only with the embedded server's admin key: registering a Python-backend stub's own IPC region
  (which Triton 2.51 would map) is refused.
"""

from __future__ import annotations

import json
import os
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


# --- Over-size requests (item 2) and the internal models called by name (item 3) -------------------

import numpy as np  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402

from conftest import TINY  # noqa: E402

DTYPES = {np.dtype(object): "BYTES", np.dtype(np.int32): "INT32", np.dtype(np.int64): "INT64", np.dtype(np.float32): "FP32"}
LIMIT = TINY.tokenize.max_candidates


@pytest.fixture(params=["http", "grpc"])
def transport(request, server):
    if request.param == "http":
        client = httpclient.InferenceServerClient(server.http_url, network_timeout=120, connection_timeout=120)
        yield httpclient, client, "400"
    else:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        yield grpcclient, client, "StatusCode.INVALID_ARGUMENT"
    client.close()


def _infer(module, client, model, arrays):
    inputs = []
    for name, value in arrays.items():
        tensor = module.InferInput(name, list(value.shape), DTYPES[value.dtype])
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return client.infer(model, inputs)


def _refused(transport, server, model, arrays, words):
    module, client, invalid = transport
    with pytest.raises(InferenceServerException) as err:
        _infer(module, client, model, arrays)
    message = err.value.message()
    assert str(err.value.status()) == invalid, (err.value.status(), message)
    assert words in message and "Traceback" not in message, message
    # the server keeps serving, every stub alive
    good = {"query": np.array([b"sofa"], dtype=object), "texts": np.array([b"gray sofa", b"oak table"], dtype=object)}
    assert sorted(_infer(module, client, "ranker", good).as_numpy("indices").tolist()) == [0, 1]
    assert server.health_problem() is None


def test_300000_tiny_texts_are_refused_by_count_before_decoding(transport, server):
    texts = np.array([b"ab"] * 300_000, dtype=object)  # 1.8 MB on the wire
    _refused(transport, server, "ranker", {"query": np.array([b"sofa"], dtype=object), "texts": texts}, f"limit of {LIMIT}")


def test_a_request_over_the_total_size_is_refused_before_decoding(transport, server):
    size = TINY.tokenize.max_request_bytes
    texts = np.array([b"x" * (size // 10)] * 11, dtype=object)  # 11 texts, each over max_text_bytes: 1.1 x the total
    _refused(transport, server, "ranker", {"query": np.array([b"sofa"], dtype=object), "texts": texts},
             f"more than the limit of {size}")


def _encoded(pairs=2, width=8, **change):
    arrays = {"input_ids": np.full((pairs, width), 5, np.int64), "attention_mask": np.ones((pairs, width), np.int64),
              "token_type_ids": np.zeros((pairs, width), np.int64)}
    return {**arrays, **change}


LEFT_PADDED = np.array([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8], dtype=np.int64)
RANK_CASES = {
    "wider than max_length": (_encoded(width=20_000), f"limit of {TINY.tokenize.max_length}"),
    "left-padded mask": (_encoded(attention_mask=LEFT_PADDED), "not right-padded"),
    "holed mask": (_encoded(attention_mask=np.array([[1, 0, 1, 1, 0, 0, 0, 0], [1] * 8], np.int64)), "not right-padded"),
    "mask of 2s": (_encoded(attention_mask=np.full((2, 8), 2, np.int64)), "only 0 and 1"),
    "token types of 3s": (_encoded(token_type_ids=np.full((2, 8), 3, np.int64)), "only 0 and 1"),
    "empty row": (_encoded(attention_mask=np.array([[0] * 8, [1] * 8], np.int64)), "at least one token"),
    "negative ids": (_encoded(input_ids=np.full((2, 8), -1, np.int64)), "negative"),
    "shapes disagree": (_encoded(attention_mask=np.ones((2, 7), np.int64)), "disagree"),
    "more pairs than max_candidates": (_encoded(pairs=LIMIT + 1), f"batch-size must be <= {LIMIT}"),
}


@pytest.mark.parametrize("case", list(RANK_CASES))
def test_the_internal_rank_model_called_by_name_has_the_public_limits(transport, server, case):
    arrays, words = RANK_CASES[case]
    _refused(transport, server, "rank", arrays, words)


def test_a_right_padded_rank_request_by_name_is_scored_as_through_the_ranker(transport, server):
    module, client, _ = transport
    arrays = _encoded(attention_mask=np.array([[1, 1, 1, 1, 1, 0, 0, 0], [1] * 8], np.int64))
    logits = _infer(module, client, "rank", arrays).as_numpy("logits")
    alone = _infer(module, client, "rank", {k: v[:1, :5] for k, v in arrays.items()}).as_numpy("logits")
    assert logits.shape == (2, 1) and np.allclose(logits[0], alone[0], atol=1e-5)  # padding is not scored


def test_the_internal_tokenize_and_postprocess_models_called_by_name_have_the_public_limits(transport, server):
    query = np.array([b"sofa"], dtype=object)
    _refused(transport, server, "tokenize", {"query": query, "texts": np.array([b"x"] * (LIMIT + 1), dtype=object)},
             f"limit of {LIMIT}")
    _refused(transport, server, "tokenize", {"query": query, "texts": np.array([b"ab"] * 300_000, dtype=object)},
             f"limit of {LIMIT}")
    _refused(transport, server, "postprocess", {"logits": np.zeros((LIMIT + 1, 1), np.float32)}, f"limit of {LIMIT}")
    _refused(transport, server, "postprocess", {"logits": np.zeros((0, 1), np.float32)}, "empty")


def test_the_tokenize_queue_is_bounded(server):
    status, body = _http(server, "GET", "/v2/models/tokenize/config", headers=server.admin_headers)
    assert status == 200, body
    policy = json.loads(body)["dynamic_batching"]["default_queue_policy"]
    assert int(policy["max_queue_size"]) == TINY.tokenize.queue_size > 0


def test_a_full_tokenize_queue_is_refused_at_once_and_the_server_keeps_serving(tiny_repo, tmp_path):
    """Triton honours the queue policy of a ``max_batch_size: 0`` model (Triton 2.51): with room for
    one waiting request, a burst of concurrent 1000-text requests to tokenize gets some refused with
    "Exceeds maximum queue size" (503 / UNAVAILABLE, the SDK's Overloaded), the others served."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    from rankserve.builder import configs
    from rankserve.server.embedded import EmbeddedServer, free_serve_settings

    repo = Path(shutil.copytree(tiny_repo, tmp_path / "repo"))
    config = configs.parse(repo / "tokenize" / "config.pbtxt")
    config.dynamic_batching.default_queue_policy.max_queue_size = 1
    (repo / "tokenize" / "config.pbtxt").write_text(configs.to_text(config))
    texts = np.array([f"a fairly long product title number {i} with words".encode() for i in range(LIMIT)], dtype=object)

    def call(url):
        with httpclient.InferenceServerClient(url, network_timeout=120, connection_timeout=120) as client:
            try:
                _infer(httpclient, client, "tokenize", {"query": np.array([b"sofa"], dtype=object), "texts": texts})
                return "served"
            except InferenceServerException as exc:
                return f"{exc.status()} {exc.message()}"

    with EmbeddedServer(repo, free_serve_settings(exit_timeout_s=10), tmp_path / "tritonserver.log") as server:
        with ThreadPoolExecutor(16) as pool:
            outcomes = list(pool.map(call, [server.http_url] * 32))
        refused = [o for o in outcomes if o != "served"]
        assert refused and all(o.startswith("503") and "Exceeds maximum queue size" in o for o in refused), set(outcomes)
        assert outcomes.count("served") >= 2
        assert call(server.http_url) == "served" and server.health_problem() is None


@pytest.mark.parametrize("mode", ["repository", "releases"])
def test_rankserve_serve_takes_an_operators_admin_key_from_a_file(tiny_repo, tiny_ranker, dataset, tmp_path, mode):
    import shutil
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path
    from types import SimpleNamespace

    from rankserve.server.embedded import free_serve_settings

    repo = Path(shutil.copytree(tiny_repo, tmp_path / "repo"))
    key_file = tmp_path / "admin_key"
    key_file.write_text("an-operators-key-0123456789\n")
    s = free_serve_settings()
    if mode == "releases":  # every release's server takes the operator's key, not a random one
        import dataclasses

        from conftest import TINY
        from rankserve import releases
        from rankserve.builder.repository import build_repository

        repo = tmp_path / "gated"  # only a gated build is published
        build_repository(tiny_ranker, repo, dataclasses.replace(TINY, variants=("fp32",)), log=lambda _m: None, dataset=dataset)
        name, _ = releases.publish(repo, tmp_path / "releases")
        releases.promote(tmp_path / "releases", name)
        where = ["--releases", str(tmp_path / "releases")]
    else:
        where = ["--model-repository", str(repo)]
    proc = subprocess.Popen([sys.executable, "-m", "rankserve", "serve", *where,
                             "--admin-key-file", str(key_file), "--http-port", str(s.http_port),
                             "--grpc-port", str(s.grpc_port), "--metrics-port", str(s.metrics_port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    ready = "serving release" if mode == "releases" else "tritonserver ready"
    try:
        deadline, lines = time.monotonic() + 120, []
        while time.monotonic() < deadline:
            lines.append(proc.stdout.readline())
            if ready in lines[-1] or not lines[-1]:
                break
        assert ready in "".join(lines), "".join(lines)
        server = SimpleNamespace(http_url=f"127.0.0.1:{s.http_port}")
        assert _http(server, "GET", "/v2/models/stats")[0] == 403
        assert _http(server, "GET", "/v2/models/stats", headers={ADMIN_HEADER: "an-operators-key-0123456789"})[0] == 200
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
