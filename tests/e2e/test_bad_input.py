"""Malformed requests sent with Triton's own clients (what the SDK would refuse to send): every one
gets a clear per-request error with the right code and no traceback, and the next good request on
the same connection still succeeds."""

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.triton

GOOD = {"query": np.array([b"sofa"], dtype=object), "texts": np.array([b"gray sofa", b"oak table"], dtype=object)}
CASES = {
    "empty query": ({"query": np.array([b"  "], dtype=object)}, "'query' is empty"),
    "no candidates": ({"texts": np.array([], dtype=object)}, "texts"),
    "missing texts": ({"texts": None}, "texts"),
    "wrong dtype": ({"texts": np.array([1, 2], dtype=np.int32)}, "texts"),
    "wrong shape": ({"query": np.array([b"a", b"b"], dtype=object)}, "query"),
    "non-UTF-8 bytes": ({"texts": np.array([b"ok", b"\xff\xfe"], dtype=object)}, "not valid UTF-8"),
    "NUL byte": ({"texts": np.array([b"ok", b"a\x00b"], dtype=object)}, "NUL"),
    "too many candidates": ({"texts": np.array([b"x"] * 1001, dtype=object)}, "limit of 1000"),
    "top_k zero": ({"top_k": np.array([0], dtype=np.int32)}, "'top_k' must be >= 1"),
    "top_k negative": ({"top_k": np.array([-3], dtype=np.int32)}, "'top_k' must be >= 1"),
    "top_k over the list": ({"top_k": np.array([3], dtype=np.int32)}, "only 2 candidates"),
}
DTYPES = {np.dtype(object): "BYTES", np.dtype(np.int32): "INT32"}


def _infer(module, client, arrays, model="ranker"):
    inputs = []
    for name, value in arrays.items():
        if value is None:
            continue
        tensor = module.InferInput(name, list(value.shape), DTYPES[value.dtype])
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return client.infer(model, inputs)


@pytest.fixture(params=["http", "grpc"])
def transport(request, server):
    if request.param == "http":
        client = httpclient.InferenceServerClient(server.http_url)
        yield httpclient, client, "400"
    else:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        yield grpcclient, client, "StatusCode.INVALID_ARGUMENT"
    client.close()


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_a_clear_invalid_argument_and_the_next_request_succeeds(transport, case):
    module, client, invalid = transport
    change, words = CASES[case]
    with pytest.raises(InferenceServerException) as err:
        _infer(module, client, {**GOOD, **change})
    message = err.value.message()
    assert str(err.value.status()) == invalid, (case, err.value.status(), message)
    assert words in message, message
    assert "Traceback" not in message and "/work/" not in message and ".py" not in message
    result = _infer(module, client, GOOD)
    assert sorted(result.as_numpy("indices").tolist()) == [0, 1]


def test_unknown_model_is_refused_clearly(transport):
    module, client, _ = transport
    with pytest.raises(InferenceServerException) as err:
        _infer(module, client, GOOD, model="no_such_ranker")
    assert "no_such_ranker" in err.value.message()
    assert str(err.value.status()) in ("400", "404", "StatusCode.NOT_FOUND", "StatusCode.INVALID_ARGUMENT")
