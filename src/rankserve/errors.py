"""The one place where rankserve's error types are defined and mapped to Triton codes and HTTP status.

Stage adapters raise these from pure functions and turn them into ``pb_utils.TritonError`` with
:func:`triton_error`. Each serving error names the exception the client SDK (``rankserve_client``)
raises for it; a test checks that the SDK maps the HTTP status and the gRPC code back to it.
"""

from __future__ import annotations

from typing import Any


class RankserveError(Exception):
    """Base of every error rankserve raises on purpose."""

    triton_code = "INTERNAL"
    http_status = 500
    sdk_error = "ServerError"


class InvalidInput(RankserveError):
    """The request is malformed: the client must change it. Never retried."""

    triton_code = "INVALID_ARG"
    http_status = 400
    sdk_error = "BadRequest"


class Unavailable(RankserveError):
    """The server cannot take the request now (starting, stopping, overloaded). Retry later."""

    triton_code = "UNAVAILABLE"
    http_status = 503
    sdk_error = "Unavailable"


class ServerError(RankserveError):
    """Something failed inside the server."""

    triton_code = "INTERNAL"
    http_status = 500


class ConfigError(RankserveError):
    """A settings object, a model configuration or a manifest is invalid."""


class UsageError(RankserveError):
    """A command's own input cannot be used (a file that is missing, unreadable or not UTF-8)."""


class BuildError(RankserveError):
    """A build step failed (bad ranker directory, export failure, numeric check failure...)."""


class ServeError(RankserveError):
    """The embedded server could not be started or did not become ready."""


def triton_error(exc: Exception, pb_utils: Any) -> Any:
    """Convert an exception raised while serving into a ``pb_utils.TritonError``.

    Our own errors keep their message and code; anything else is an internal error whose message
    names only the exception type (no traceback or internals reach the client).
    """
    if isinstance(exc, RankserveError):
        code = getattr(pb_utils.TritonError, exc.triton_code)
        return pb_utils.TritonError(str(exc), code)
    return pb_utils.TritonError(f"internal error ({type(exc).__name__})", pb_utils.TritonError.INTERNAL)
