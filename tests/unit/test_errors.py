import pytest

import rankserve_client
from rankserve_client.errors import from_triton

from rankserve.errors import InvalidInput, ServerError, Unavailable, triton_error


class FakeCodes:
    """Stands in for the two names ``triton_error`` reads from ``pb_utils`` (the stub's pybind module)."""

    class TritonError:
        INVALID_ARG, UNAVAILABLE, INTERNAL = "INVALID_ARG", "UNAVAILABLE", "INTERNAL"

        def __init__(self, message, code):
            self.message, self.code = message, code


def test_own_errors_keep_message_and_code():
    err = triton_error(InvalidInput("'texts' is empty"), FakeCodes)
    assert (err.message, err.code) == ("'texts' is empty", "INVALID_ARG")
    assert triton_error(Unavailable("busy"), FakeCodes).code == "UNAVAILABLE"


def test_unexpected_errors_leak_no_internals():
    err = triton_error(KeyError("/secret/path"), FakeCodes)
    assert err.code == "INTERNAL"
    assert "secret" not in err.message and "KeyError" in err.message


@pytest.mark.parametrize("server_error", [InvalidInput, Unavailable, ServerError])
def test_the_sdk_maps_each_server_error_back_to_its_declared_exception(server_error):
    """One mapping: the server error's HTTP status and gRPC code both come back as its ``sdk_error``."""
    expected = getattr(rankserve_client, server_error.sdk_error)
    grpc_names = {"INVALID_ARG": "StatusCode.INVALID_ARGUMENT", "UNAVAILABLE": "StatusCode.UNAVAILABLE", "INTERNAL": "StatusCode.INTERNAL"}
    assert type(from_triton(str(server_error.http_status), "m")) is expected
    assert type(from_triton(grpc_names[server_error.triton_code], "m")) is expected


def test_http_status_of_each_type():
    assert (InvalidInput.http_status, Unavailable.http_status, ServerError.http_status) == (400, 503, 500)


def test_tritons_queue_full_message_is_overloaded_over_both_protocols():
    from rankserve_client import Overloaded

    message = "in ensemble 'ranker', [request id: <id_unknown>] Exceeds maximum queue size"  # as Triton 2.51 words it
    assert type(from_triton("503", message)) is Overloaded
    assert type(from_triton("StatusCode.UNAVAILABLE", message)) is Overloaded


def test_a_dead_stub_and_a_closed_connection_are_unavailable_and_retried():
    import http.client

    from rankserve_client import Unavailable as SdkUnavailable
    from rankserve_client.client import map_error

    message = "in ensemble 'ranker', Stub process 'rank_0_0' is not healthy."  # as Triton 2.51 words it (measured)
    assert type(from_triton("500", message)) is SdkUnavailable
    assert type(from_triton("StatusCode.INTERNAL", message)) is SdkUnavailable
    assert map_error(http.client.RemoteDisconnected("closed")).retryable
    assert map_error(http.client.HTTPException("connection closed.")).retryable
