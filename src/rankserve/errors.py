"""The one place where rankserve's error types are defined and mapped to Triton codes and HTTP status.

Stage adapters raise these from pure functions and turn them into ``pb_utils.TritonError`` with
:func:`triton_error`; clients map Triton's status back with :func:`from_status`.
"""

from __future__ import annotations

from typing import Any


class RankserveError(Exception):
    """Base of every error rankserve raises on purpose."""

    triton_code = "INTERNAL"
    http_status = 500


class InvalidInput(RankserveError):
    """The request is malformed: the client must change it. Never retried."""

    triton_code = "INVALID_ARG"
    http_status = 400


class Unavailable(RankserveError):
    """The server cannot take the request now (starting, stopping, overloaded). Retry later."""

    triton_code = "UNAVAILABLE"
    http_status = 503


class ServerError(RankserveError):
    """Something failed inside the server."""

    triton_code = "INTERNAL"
    http_status = 500


class ConfigError(RankserveError):
    """A settings object, a model configuration or a manifest is invalid."""


class BuildError(RankserveError):
    """A build step failed (bad ranker directory, export failure, numeric check failure...)."""


class ServeError(RankserveError):
    """The embedded server could not be started or did not become ready."""


_BY_HTTP_STATUS = {400: InvalidInput, 503: Unavailable, 500: ServerError}
_BY_TRITON_CODE = {
    "INVALID_ARG": InvalidInput,
    "StatusCode.INVALID_ARGUMENT": InvalidInput,
    "UNAVAILABLE": Unavailable,
    "StatusCode.UNAVAILABLE": Unavailable,
}


def triton_error(exc: Exception, pb_utils: Any) -> Any:
    """Convert an exception raised while serving into a ``pb_utils.TritonError``.

    Our own errors keep their message and code; anything else is an internal error whose message
    names only the exception type (no traceback or internals reach the client).
    """
    if isinstance(exc, RankserveError):
        code = getattr(pb_utils.TritonError, exc.triton_code)
        return pb_utils.TritonError(str(exc), code)
    return pb_utils.TritonError(f"internal error ({type(exc).__name__})", pb_utils.TritonError.INTERNAL)


def from_status(status: int | str | None, message: str) -> RankserveError:
    """Map an HTTP status or a gRPC/Triton status name to the matching error type."""
    if isinstance(status, int):
        cls = _BY_HTTP_STATUS.get(status, ServerError)
    else:
        cls = _BY_TRITON_CODE.get(str(status), ServerError)
    return cls(message)
