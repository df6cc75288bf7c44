import pytest

from rankserve.errors import InvalidInput, ServerError, Unavailable, from_status, triton_error


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


@pytest.mark.parametrize(
    "status, cls",
    [(400, InvalidInput), (503, Unavailable), (500, ServerError), ("StatusCode.INVALID_ARGUMENT", InvalidInput),
     ("StatusCode.UNAVAILABLE", Unavailable), ("StatusCode.INTERNAL", ServerError), (None, ServerError)],
)
def test_status_mapping(status, cls):
    assert type(from_status(status, "m")) is cls


def test_http_status_of_each_type():
    assert (InvalidInput.http_status, Unavailable.http_status, ServerError.http_status) == (400, 503, 500)
