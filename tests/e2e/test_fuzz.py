"""A bounded fuzz run of the HTTP inference endpoint: malformed JSON, random binary bodies, valid
JSON of the wrong shape. Nothing may take the server down or hang it; every body gets an answer."""

import http.client
import json
import random

import pytest

from rankserve_client import RankerClient

pytestmark = pytest.mark.triton

VALID = {"inputs": [{"name": "query", "datatype": "BYTES", "shape": [1], "data": ["sofa"]},
                    {"name": "texts", "datatype": "BYTES", "shape": [2], "data": ["gray sofa", "oak table"]}]}


def _bodies(rng: random.Random, n: int):
    valid = json.dumps(VALID).encode()
    junk = [None, True, -1, 2**63, 1.5e308, "", "x" * 1000, [], {}, [[[]]], {"a": {"b": []}}, "\u0000", "\udcff"]
    for i in range(n):
        kind = i % 5
        if kind == 0:  # random bytes, with or without a JSON-looking start
            yield (b"{" if rng.random() < 0.5 else b"") + rng.randbytes(rng.randint(0, 2000))
        elif kind == 1:  # valid JSON cut anywhere
            yield valid[: rng.randint(0, len(valid) - 1)]
        elif kind == 2:  # valid JSON with one byte flipped
            body = bytearray(valid)
            body[rng.randrange(len(body))] = rng.randrange(256)
            yield bytes(body)
        else:  # well-formed JSON with a field replaced by junk
            doc = json.loads(valid)
            target = rng.choice([doc, doc["inputs"][0], doc["inputs"][1]])
            target[rng.choice(list(target))] = rng.choice(junk)
            yield json.dumps(doc).encode("utf-8", "surrogatepass")


def test_fuzzed_http_bodies_never_break_the_server(server):
    host, port = server.http_url.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    statuses = {}
    for body in _bodies(random.Random(7), 250):
        conn.request("POST", "/v2/models/ranker/infer", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        answer = response.read()
        statuses[response.status] = statuses.get(response.status, 0) + 1
        if response.status != 200:  # an error document, never a traceback
            error = json.loads(answer.decode("utf-8", "replace"))["error"]  # Triton may echo the bad bytes
            assert error and "Traceback" not in error and ".py" not in error, error
        if response.will_close:
            conn.close()
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.close()
    # Triton 2.51's HTTP frontend answers JSON it cannot parse with 500 (its own code, before any
    # stage runs); what it parses and our stages refuse is 400. Recorded, not hidden: see README.
    assert sum(statuses.values()) == 250 and set(statuses) <= {200, 400, 500}, statuses
    with RankerClient(f"http://{server.http_url}") as client:  # still serving, right answers
        assert client.is_live() and client.is_ready()
        assert len(client.rank("sofa", ["gray sofa", "oak table"])) == 2
