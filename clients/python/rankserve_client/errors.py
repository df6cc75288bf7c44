"""The SDK's one exception hierarchy, mapped from Triton's HTTP status and gRPC codes."""

from __future__ import annotations


class RankerError(Exception):
    """Base of every error the SDK raises."""

    retryable = False


class BadRequest(RankerError):
    """The server refused the request as malformed (HTTP 400 / INVALID_ARGUMENT). Never retried."""


class Unavailable(RankerError):
    """The server is down, starting, stopping or cannot take the request now. Retried with backoff."""

    retryable = True


class Overloaded(Unavailable):
    """The server shed the request under load (queue full / rejected). Retried with backoff."""


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


_HTTP = {400: BadRequest, 401: Unauthenticated, 403: PermissionDenied, 404: BadRequest, 429: Overloaded, 503: Unavailable, 504: Timeout}
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


def from_triton(status: object, message: str) -> RankerError:
    """The SDK error for a tritonclient ``InferenceServerException`` status (HTTP code or gRPC name)."""
    text = str(status) if status is not None else ""
    if any(k in message.lower() for k in _TLS_FAILURES):  # gRPC reports these as UNAVAILABLE, which would be retried
        return tls_error(message)
    if text.isdigit():
        cls = _HTTP.get(int(text), ServerError if int(text) >= 500 else BadRequest)
    else:
        cls = _GRPC.get(text, ServerError)
    if "exceeds maximum queue size" in message.lower() or "rate limit" in message.lower():  # Triton: "Exceeds maximum queue size"
        cls = Overloaded
    elif "is not healthy" in message:  # Triton: "Stub process '<instance>' is not healthy": restarted by rankserve serve
        cls = Unavailable
    return cls(message)
