"""The bench's headline baseline, started for real on the tiny ranker: a FastAPI + PyTorch server with
dynamic batching that scores like the ranker, groups concurrent requests into shared model calls and
answers bad input with a 4xx."""

import http.client
import json
import threading

import numpy as np
import pytest

from conftest import TINY
from rankserve.bench.run import _HttpService
from rankserve.server.embedded import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def service(tiny_ranker):
    port = free_port()
    # a long wait for a full call, so the concurrent requests below are sure to share calls
    argv = ["rankserve.bench.batched_service", str(tiny_ranker), "--port", str(port), "--precision", "fp32",
            "--max-length", str(TINY.tokenize.max_length), "--max-wait-ms", "300"]
    with _HttpService(argv, port) as s:
        yield s


def post(service, body: bytes) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=30)
    try:
        conn.request("POST", "/rank", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def test_it_ranks_like_the_ranker_in_pytorch(service, offline_scorer):
    query = "mid-century walnut dresser"
    texts = ["walnut dresser with six drawers", "outdoor string lights", "dresser", "a long text " * 40]
    answer = service.rank((query, texts))
    expected = offline_scorer(query, texts)
    assert answer["indices"] == np.argsort(-expected, kind="stable").tolist()
    np.testing.assert_allclose(answer["scores"], expected[answer["indices"]], atol=1e-5)
    stats = service.get("/stats")
    assert stats["precision"] == "fp32" and stats["max_pairs"] == 32 and stats["threads"] >= 1
    assert stats["max_length"] == TINY.tokenize.max_length


def test_concurrent_requests_share_model_calls_and_large_ones_are_split(service, offline_scorer):
    before = service.get("/stats")
    requests = [(f"query {k}", [f"product {k} {j}" for j in range(10)]) for k in range(3)] + \
               [("a large request", [f"item {j} " * (j % 7 + 1) for j in range(70)])]
    answers: dict[int, dict] = {}
    barrier = threading.Barrier(len(requests))

    def client(k: int) -> None:
        barrier.wait()
        answers[k] = service.rank(requests[k])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, (q, texts) in enumerate(requests):
        expected = offline_scorer(q, texts)
        np.testing.assert_allclose(np.array(answers[k]["scores"]), np.sort(expected)[::-1], atol=1e-5)
    after = service.get("/stats")
    calls = after["batches"] - before["batches"]
    pairs = after["pairs"] - before["pairs"]
    assert pairs == 100 and after["requests"] - before["requests"] == 4
    # 100 pairs in calls of at most 32: 4 calls when the requests share them (6 if each went alone)
    assert 4 <= calls <= 5
    assert after["multi_request_batches"] - before["multi_request_batches"] >= 1
    assert after["max_requests_per_batch"] >= 2


@pytest.mark.parametrize("body, status, words", [
    (b'{"query": "sofa", "texts": []}', 422, "texts"),
    (b'{"texts": ["a"]}', 422, "query"),
    (b'{"query": "", "texts": ["a"]}', 422, "query"),
    (b'{"query": "   ", "texts": ["a"]}', 400, "empty"),
    (b'{"query": "sofa", "texts": "not a list"}', 422, "texts"),
    (json.dumps({"query": "sofa", "texts": ["a"] * 1001}).encode(), 422, "texts"),
    (b'{"query": "sofa", "texts": [', 422, "json"),
])
def test_bad_input_gets_a_4xx(service, body, status, words):
    got, answer = post(service, body)
    assert got == status
    assert words in json.dumps(answer).lower()
    assert service.rank(("sofa", ["grey sofa"]))["indices"] == [0]  # and the service goes on
