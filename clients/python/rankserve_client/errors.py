"""The SDK's one exception hierarchy, mapped from Triton's HTTP status and gRPC codes."""

from __future__ import annotations


class RankerError(Exception):
    """Base of every error the SDK raises.

    ``retry_after``: seconds the server or a gateway asked to wait (HTTP ``Retry-After``), else None.
    ``reached``: False when the request never reached a server (connection refused, name not
    resolved): such a failure costs the server nothing and is not counted by the retry budget."""

    retryable = False
    retry_after: "float | None" = None
    reached = True


class BadRequest(RankerError):
    """The server refused the request as malformed (HTTP 400 / INVALID_ARGUMENT). Never retried."""


class Unavailable(RankerError):
    """The server is down, starting, stopping or cannot take the request now. Retried with backoff."""

    retryable = True


class Overloaded(Unavailable):
    """The server or a gateway shed the request under load (queue full, HTTP 429, a gateway's 503).
    Retried at most ``overload_retries`` times, with a longer backoff (or the ``Retry-After`` asked
    for), and only while the client's retry budget allows it."""


class RequestTooLarge(BadRequest):
    """The server or a gateway in front of it refused the body's size (HTTP 413). Never retried:
    send fewer or shorter candidates per request (``chunk_size``)."""


class Timeout(RankerError):
    """No answer within the call's timeout. Not retried: the server may still be working on it."""


class ServerError(RankerError):
    """The server failed while handling the request (HTTP 500 / INTERNAL)."""


class Unauthenticated(RankerError):
    """The server or the gateway in front of it refused the call's credentials (HTTP 401 /
    UNAUTHENTICATED): a missing or wrong token in ``headers``. Never retried."""


class PermissionDenied(RankerError):
    """The credentials were accepted but do not allow this call (HTTP 403 / PERMISSION_DENIED). Never retried."""


class TlsError(RankerError):
    """The TLS handshake failed: the server's certificate is not trusted (pass the CA bundle that
    signed it as ``ca_file``) or does not name the host, or the server wants a client certificate
    (``cert_file`` and ``key_file``) and refused the one sent or its absence. Never retried."""


class ApiMismatch(RankerError):
    """The model on the server does not expose the ranker API this SDK speaks."""


_HTTP = {400: BadRequest, 401: Unauthenticated, 403: PermissionDenied, 404: BadRequest, 408: Timeout, 413: RequestTooLarge,
         429: Overloaded, 502: Unavailable, 503: Unavailable, 504: Timeout}
"""By HTTP status first; 502 is a gateway that cannot reach the server (restarting); 503 is Unavailable
unless the message says the request was shed (below) or the body is not Triton's (a gateway's page)."""
_GRPC = {
    "StatusCode.INVALID_ARGUMENT": BadRequest,
    "StatusCode.NOT_FOUND": BadRequest,
    "StatusCode.UNAUTHENTICATED": Unauthenticated,
    "StatusCode.PERMISSION_DENIED": PermissionDenied,
    "StatusCode.UNAVAILABLE": Unavailable,
    "StatusCode.RESOURCE_EXHAUSTED": Overloaded,
    "StatusCode.DEADLINE_EXCEEDED": Timeout,
    "StatusCode.CANCELLED": Unavailable,
}


TLS_HINT = ("an untrusted server certificate: pass the CA bundle that signed it as ca_file; a server that wants a client "
            "certificate: cert_file and key_file")
_TLS_FAILURES = ("handshake failed", "certificate_verify_failed", "certificate verify failed", "certificate_required")


def tls_error(detail: str) -> TlsError:
    return TlsError(f"TLS handshake failed: {detail} ({TLS_HINT})")


_NOT_JSON = "an exception occurred in the client while decoding the response"  # tritonclient's words for a non-JSON body
_EMPTY = "client received an empty response from the server"  # ... and for an empty one
_NOT_CONNECTED = ("failed to connect", "connection refused", "dns resolution failed", "name resolution")


def from_triton(status: object, message: str) -> RankerError:
    """The SDK error for a tritonclient ``InferenceServerException`` status (HTTP code or gRPC name):
    by the status first, then by what the message says."""
    text = str(status) if status is not None else ""
    if any(k in message.lower() for k in _TLS_FAILURES):  # gRPC reports these as UNAVAILABLE, which would be retried
        return tls_error(message)
    lowered = message.lower()
    if text.isdigit():
        code = int(text)
        cls = _HTTP.get(code, ServerError if code >= 500 else BadRequest)
        if message.startswith((_NOT_JSON, _EMPTY)):  # e.g. a gateway's HTML page: name the status, not the decoding failure
            page = message.partition("response: ")[2].strip().replace("\n", " ")
            message = f"HTTP {code} from the server or a gateway in front of it, with a body that is not Triton's JSON: {page[:200]!r}"
            if code == 503:
                cls = Overloaded  # a gateway's 503: a rate or connection limit (nginx's default status for both)
        if code == 413:
            message = (f"the request is too large for the server or a gateway in front of it (HTTP 413): send fewer or "
                       f"shorter candidates per request (chunk_size) ({message[:300]})")
    else:
        cls = _GRPC.get(text, ServerError)
    if cls in (BadRequest, RequestTooLarge, Unauthenticated, PermissionDenied, Timeout):
        return cls(message)  # the status decides: a refusal is never turned into a retried error by its wording
    if "exceeds maximum queue size" in lowered or "rate limit" in lowered:  # Triton: "Exceeds maximum queue size"
        cls = Overloaded
    elif "is not healthy" in message:  # Triton: "Stub process '<instance>' is not healthy": restarted by rankserve serve
        cls = Unavailable
    error = cls(message)
    if cls is Unavailable and text == "StatusCode.UNAVAILABLE" and any(k in lowered for k in _NOT_CONNECTED):
        error.reached = False  # gRPC never got a connection: nothing reached the server
    return error
