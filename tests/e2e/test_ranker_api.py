"""The public ``ranker`` API served by the real tritonserver, over HTTP and gRPC."""

import json
import urllib.error
import urllib.request

import numpy as np
import pytest

from rankserve_client import BadRequest, RankerClient

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module", params=["http", "grpc"])
def client(request, server):
    url = server.http_url if request.param == "http" else server.grpc_url
    with RankerClient(f"{request.param}://{url}") as c:
        yield c


@pytest.fixture(scope="module")
def requests_(dataset):
    """(query, candidate texts) for real held-out WANDS queries and their demo candidates."""
    by_query = dataset.by_query()
    return [(q.text, [dataset.products[j.product_id].text for j in by_query[q.query_id]])
            for q in dataset.split("heldout")[:12]]


def _scores_by_index(results):
    return {r.id: r.score for r in results}


def test_scores_equal_offline_pytorch(client, requests_, offline_scorer):
    for query, texts in requests_:
        served = _scores_by_index(client.rank(query, texts))
        expected = offline_scorer(query, texts)
        got = np.array([served[i] for i in range(len(texts))])
        assert np.max(np.abs(got - expected)) <= 1e-4, query


def test_truncated_pairs_score_like_pytorch(client, offline_scorer):
    texts = ["oak dining table " * 40, "gray velvet sofa with ottoman " * 30, "lamp"]
    served = _scores_by_index(client.rank("modern dining table", texts))
    expected = offline_scorer("modern dining table", texts)
    assert np.max(np.abs(np.array([served[i] for i in range(3)]) - expected)) <= 1e-4


def test_indices_are_a_permutation_sorted_by_score(client, requests_):
    query, texts = requests_[0]
    results = client.rank(query, texts)
    assert sorted(r.id for r in results) == list(range(len(texts)))
    scores = [r.score for r in results]
    assert scores == sorted(scores, reverse=True)
    assert [r.rank for r in results] == list(range(1, len(texts) + 1))
    assert all(r.text == texts[r.id] for r in results)


def test_top_k_is_honoured(client, requests_):
    query, texts = requests_[1]
    full = client.rank(query, texts)
    top3 = client.rank(query, texts, top_k=3)
    assert [(r.id, r.score) for r in top3] == [(r.id, r.score) for r in full[:3]]
    assert len(client.rank(query, texts, top_k=len(texts))) == len(texts)
    with pytest.raises(BadRequest, match=f"only {len(texts)} items"):
        client.rank(query, texts, top_k=len(texts) + 1)


def test_one_candidate(client, offline_scorer):
    (only,) = client.rank("salon chair", ["Larkin Salon Chair | Massage Chairs"])
    assert only.id == 0 and abs(only.score - offline_scorer("salon chair", ["Larkin Salon Chair | Massage Chairs"])[0]) <= 1e-4


def test_five_hundred_candidates(client, dataset, offline_scorer):
    texts = [p.text for p in list(dataset.products.values())[:500]]
    results = client.rank("turquoise pillows", texts)
    assert len(results) == 500
    expected = offline_scorer("turquoise pillows", texts)
    got = np.array([_scores_by_index(results)[i] for i in range(500)])
    assert np.max(np.abs(got - expected)) <= 1e-4
    assert [r.id for r in results[:10]] == list(np.argsort(-expected, kind="stable")[:10])


def test_a_pair_scores_the_same_whatever_else_is_in_the_request(client, dataset):
    target = "Ashby Turquoise Velvet Pillows Accent Pillow | Accent Pillows"
    alone = client.rank("turquoise pillows", [target])[0].score
    others = [p.text for p in list(dataset.products.values())[:40]] + ["extra long text " * 50]
    mixed = client.rank("turquoise pillows", others[:20] + [target] + others[20:])
    assert abs(_scores_by_index(mixed)[20] - alone) <= 1e-5


def test_http_and_grpc_agree(server, requests_):
    with RankerClient(f"http://{server.http_url}") as h, RankerClient(f"grpc://{server.grpc_url}") as g:
        for query, texts in requests_[:5]:
            a, b = h.rank(query, texts), g.rank(query, texts)
            assert [r.id for r in a] == [r.id for r in b]
            np.testing.assert_array_equal([r.score for r in a], [r.score for r in b])


@pytest.mark.parametrize("query, texts", [("sofa", ["gray sofa", "bad\x00text"]), ("x" * 5000, ["gray sofa"])],
                         ids=["NUL byte", "query too long"])
def test_bad_input_is_a_clear_bad_request_and_the_server_keeps_serving(client, query, texts):
    with pytest.raises(BadRequest, match="NUL|limit of 4096"):
        client.rank(query, texts)
    assert len(client.rank("sofa", ["gray sofa", "oak table"])) == 2


def test_a_one_megabyte_candidate_is_read_up_to_the_byte_limit_not_rejected(client, offline_scorer):
    huge = "grey velvet sofa with oak legs and deep cushions " * 21_400  # ~1 MB
    assert len(huge.encode()) > 1_000_000
    results = client.rank("grey sofa", [huge, "oak table"])
    served = {r.id: r.score for r in results}
    expected = offline_scorer("grey sofa", [huge[:4096], "oak table"])  # the model reads 128 tokens of either
    assert abs(served[0] - expected[0]) <= 1e-4 and abs(served[1] - expected[1]) <= 1e-4


def _post(server, body: bytes, model="ranker"):
    req = urllib.request.Request(f"http://{server.http_url}/v2/models/{model}/infer", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_raw_kserve_v2_json(server):
    body = {"inputs": [
        {"name": "query", "datatype": "BYTES", "shape": [1], "data": ["salon chair"]},
        {"name": "texts", "datatype": "BYTES", "shape": [3], "data": ["oak table", "Salon Chair | Massage Chairs", "rug"]},
        {"name": "top_k", "datatype": "INT32", "shape": [1], "data": [2]}]}
    status, out = _post(server, json.dumps(body).encode())
    assert status == 200
    outputs = {o["name"]: o for o in out["outputs"]}
    assert outputs["indices"]["datatype"] == "INT32" and outputs["indices"]["shape"] == [2]
    assert outputs["scores"]["datatype"] == "FP32" and len(outputs["scores"]["data"]) == 2


def test_raw_http_errors_are_400_with_a_message(server):
    missing_texts = {"inputs": [{"name": "query", "datatype": "BYTES", "shape": [1], "data": ["sofa"]}]}
    status, out = _post(server, json.dumps(missing_texts).encode())
    assert status == 400 and "texts" in out["error"]
    empty_texts = {"inputs": [{"name": "query", "datatype": "BYTES", "shape": [1], "data": ["sofa"]},
                              {"name": "texts", "datatype": "BYTES", "shape": [0], "data": []}]}
    status, out = _post(server, json.dumps(empty_texts).encode())
    assert status == 400 and "'texts' is empty" in out["error"]
    zero_k = {"inputs": [{"name": "query", "datatype": "BYTES", "shape": [1], "data": [" "]},
                         {"name": "texts", "datatype": "BYTES", "shape": [1], "data": ["x"]},
                         {"name": "top_k", "datatype": "INT32", "shape": [1], "data": [0]}]}
    status, out = _post(server, json.dumps(zero_k).encode())
    assert status == 400 and "'query' is empty" in out["error"]
    zero_k["inputs"][0]["data"] = ["sofa"]
    status, out = _post(server, json.dumps(zero_k).encode())
    assert status == 400 and "'top_k' must be >= 1" in out["error"]
    status, out = _post(server, b'{"inputs": [')
    # Triton 2.51's HTTP frontend answers unparsable JSON with 500 (its own code, not a stage's).
    assert status in (400, 500) and "JSON" in out["error"]
    wrong_type = {"inputs": [{"name": "query", "datatype": "BYTES", "shape": [1], "data": ["sofa"]},
                             {"name": "texts", "datatype": "INT32", "shape": [1], "data": [3]}]}
    status, out = _post(server, json.dumps(wrong_type).encode())
    assert status == 400 and "texts" in out["error"]
    assert _post(server, json.dumps({"inputs": [
        {"name": "query", "datatype": "BYTES", "shape": [1], "data": ["sofa"]},
        {"name": "texts", "datatype": "BYTES", "shape": [1], "data": ["gray sofa"]}]}).encode())[0] == 200
