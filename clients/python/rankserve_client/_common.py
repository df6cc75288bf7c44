"""What the sync and asyncio clients share: items, URLs, request/response shapes, chunking, retries."""

from __future__ import annotations

import contextvars
import email.utils
import functools
import math
import os
import random
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from rankserve_client.errors import ApiMismatch, BadRequest, Overloaded, RankerError, Unavailable

RetryHook = Callable[[RankerError, int, float], None]
"""``on_retry(error, attempt, delay_s)``: attempt 1 is the first retry."""

DEFAULT_MODEL = "ranker"
DEFAULT_CHUNK = 1000  # the server's default TokenizeSettings.max_candidates
DEFAULT_CHUNK_CONCURRENCY = 4  # chunks of one long list in flight at once (asyncio client)
API_INPUTS = {"query": "BYTES", "texts": "BYTES", "top_k": "INT32"}
API_OUTPUTS = {"indices": "INT32", "scores": "FP32"}
TOKEN_COUNTS = "token_counts"  # an extra output (INT64 [4]) of servers that count unknown tokens
MOSTLY_UNKNOWN = 0.5  # the server's threshold (rankserve.stages.coverage)


@dataclass(frozen=True)
class Item:
    """A candidate: your id (anything hashable) and the text the ranker reads."""

    id: Any
    text: str


@dataclass(frozen=True)
class RankedItem:
    """One result: your id and text, the ranker's score, and the 1-based rank (1 = best)."""

    id: Any
    text: str
    score: float
    rank: int


@dataclass(frozen=True)
class TokenCounts:
    """How much of a request the ranker's vocabulary covers: tokens its tokenizer could only map to the
    unknown token (``[UNK]``) and all tokens, of the query and of the candidate texts, as the ranker read
    them (after truncation; special tokens and padding not counted)."""

    query_unknown: int
    query_tokens: int
    texts_unknown: int
    texts_tokens: int

    @property
    def query_unknown_share(self) -> float:
        return self.query_unknown / self.query_tokens if self.query_tokens else 0.0

    @property
    def texts_unknown_share(self) -> float:
        return self.texts_unknown / self.texts_tokens if self.texts_tokens else 0.0

    @property
    def query_mostly_unknown(self) -> bool:
        """More than half of the query is unknown to the ranker: its scores mean little."""
        return self.query_unknown_share > MOSTLY_UNKNOWN


class Ranking(list):
    """The result of ``rank``: a list of :class:`RankedItem`, best first, with ``token_counts``
    (:class:`TokenCounts`, summed over the chunks; the query counted once), or None when the model
    does not report them (a repository built before they existed, or ``check_api=False``)."""

    token_counts: Optional[TokenCounts] = None


def token_counts(arrays: Sequence[Optional[np.ndarray]]) -> Optional[TokenCounts]:
    """One request's counts from each chunk's ``token_counts`` output (None if any lacks it)."""
    if not arrays or any(a is None for a in arrays):
        return None
    rows = [np.asarray(a, dtype=np.int64).reshape(-1) for a in arrays]
    return TokenCounts(int(rows[0][0]), int(rows[0][1]), sum(int(r[2]) for r in rows), sum(int(r[3]) for r in rows))


ItemLike = Union[str, Tuple[Any, str], Item, Any]


def to_items(items: Iterable[ItemLike]) -> list[Item]:
    """Strings (id = position), ``(id, text)`` pairs, :class:`Item` or objects with ``id`` and ``text``."""
    out = []
    for i, it in enumerate(items):
        if isinstance(it, Item):
            out.append(it)
        elif isinstance(it, str):
            out.append(Item(i, it))
        elif isinstance(it, tuple) and len(it) == 2 and isinstance(it[1], str):
            out.append(Item(it[0], it[1]))
        elif hasattr(it, "id") and isinstance(getattr(it, "text", None), str):
            out.append(Item(it.id, it.text))
        else:
            raise BadRequest(f"item {i} must be a string, an (id, text) pair or have .id and .text, got {type(it).__name__}")
    return out


SCHEMES = {"http": ("http", False), "https": ("http", True), "grpc": ("grpc", False), "grpcs": ("grpc", True)}


def parse_url(url: str, protocol: str | None = None, tls: bool | None = None) -> tuple[str, str, bool]:
    """``(protocol, host:port, tls)`` from ``http://``, ``https://``, ``grpc://``, ``grpcs://`` (gRPC over
    TLS) or a bare ``h:p`` with ``protocol`` (``http`` or ``grpc``) and ``tls``. The one parser of
    server URLs: the clients, ``rankserve rank`` and ``rankserve health`` all use it. ``host:port`` may be
    several, comma-separated (``http://a:8000,b:8000``: :class:`Addresses`)."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"a server URL is needed (host:port, http://, https://, grpc:// or grpcs://), got {url!r}")
    url = url.strip()
    scheme, sep, rest = url.partition("://")
    if sep:
        if scheme not in SCHEMES:
            raise ValueError(f"unsupported URL scheme {scheme!r}: use http://, https://, grpc:// or grpcs:// (gRPC over TLS)")
        proto, secure = SCHEMES[scheme]
        if protocol and protocol != proto:
            raise ValueError(f"URL scheme {scheme!r} contradicts protocol={protocol!r}")
        if tls is not None and tls != secure:
            raise ValueError(f"URL scheme {scheme!r} contradicts tls={tls!r}: use {'https:// or grpcs://' if tls else 'http:// or grpc://'}")
        return proto, rest.rstrip("/"), secure
    if protocol not in (None, "http", "grpc"):
        raise ValueError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
    return protocol or "http", url.rstrip("/"), bool(tls)


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for TLS: ``ca_file`` the CA bundle that signs the server's certificate (default: the
    system's trust store); ``cert_file`` and ``key_file`` the client's certificate for mutual TLS."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: the client certificate and its private key (mutual TLS)")
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"{name} {path!r} is not a file")

    @property
    def given(self) -> bool:
        return any((self.ca_file, self.cert_file, self.key_file))


def tls_files(tls: bool, ca_file: str | None, cert_file: str | None, key_file: str | None) -> TlsFiles:
    files = TlsFiles(ca_file, cert_file, key_file)
    if files.given and not tls:
        raise ValueError("ca_file, cert_file and key_file are for TLS: use an https:// or grpcs:// URL (or tls=True)")
    return files


def http_ssl_options(files: TlsFiles) -> dict:
    """``ssl_options`` of tritonclient's (geventhttpclient's) HTTP client."""
    options: dict = {}
    if files.ca_file:
        options["ca_certs"] = files.ca_file
    if files.cert_file:
        options.update(certfile=files.cert_file, keyfile=files.key_file)
    return options


def ssl_context(files: TlsFiles) -> ssl.SSLContext:
    """An SSL context verifying the server against ``ca_file`` (or the system's CAs), with the client certificate."""
    context = ssl.create_default_context(cafile=files.ca_file)
    if files.cert_file:
        context.load_cert_chain(files.cert_file, files.key_file)
    return context


def grpc_tls_kwargs(tls: bool, files: TlsFiles) -> dict:
    """The TLS arguments of tritonclient's gRPC clients (paths: it reads the files itself)."""
    if not tls:
        return {}
    return {"ssl": True, "root_certificates": files.ca_file, "private_key": files.key_file, "certificate_chain": files.cert_file}


def explain(error: RankerError, tls: bool, files: TlsFiles) -> RankerError:
    """A closed socket during a TLS handshake without a client certificate: say what it likely means
    (under TLS 1.3 a server that wants mutual TLS just closes the connection)."""
    if tls and not files.cert_file and isinstance(error, Unavailable) and "socket closed" in str(error).lower():
        return type(error)(f"{error} (a server that wants mutual TLS closes the connection of a client without a "
                           f"certificate: pass cert_file and key_file)")
    return error


Headers = Mapping[str, str]


def merge_headers(protocol: str, *layers: Headers | None) -> dict[str, str] | None:
    """The client's headers updated by the call's (later layers win); gRPC metadata keys are lowercase."""
    merged: dict[str, str] = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            if not isinstance(key, str) or not isinstance(value, str) or not key:
                raise ValueError(f"headers must map non-empty strings to strings, got {key!r}: {value!r}")
            if any(ch in key + value for ch in "\r\n"):
                raise ValueError(f"header {key!r} holds a line break")
            key = key.lower() if protocol == "grpc" else key
            merged = {k: v for k, v in merged.items() if k.lower() != key.lower()}
            merged[key] = value
    return merged or None


FAILED_ADDRESS_S = 2.0
"""How long an address whose server refused or dropped a call is tried last (``Addresses``)."""


def split_addresses(address: str) -> list[str]:
    """``a:8000,b:8000`` -> ``["a:8000", "b:8000"]``; a gRPC resolver target (``ipv4:...``, ``dns:...``) stays one."""
    if address.startswith(RESOLVER_SCHEMES):
        return [address]
    parts = [a.strip() for a in address.split(",")]
    if not all(parts):
        raise ValueError(f"empty address in {address!r}: write host:port[,host:port...]")
    return parts


class Addresses:
    """The servers a client calls: one, or several for failover (``http://a:8000,b:8000``, the same
    replicas behind different addresses). Each call starts at the next address in turn, skipping one
    that failed in the last :data:`FAILED_ADDRESS_S` seconds; each retry of a call goes to the next
    address, so a server that is stopping (it refuses connections while it drains), restarting or
    gone costs a retrying client no failed call while another one answers. Thread-safe."""

    def __init__(self, address: str) -> None:
        self.all = split_addresses(address)
        self._turn = 0
        self._failed_at: dict[int, float] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.all)

    def first(self) -> int:
        """The index of the address a new call starts at."""
        if len(self.all) == 1:
            return 0
        with self._lock:
            now = time.monotonic()
            order = [(self._turn + k) % len(self.all) for k in range(len(self.all))]
            self._turn = (self._turn + 1) % len(self.all)
            healthy = [i for i in order if now - self._failed_at.get(i, -math.inf) >= FAILED_ADDRESS_S]
            return (healthy or order)[0]

    def after(self, index: int, error: RankerError) -> int:
        """The index of the address a retry after ``error`` at ``index`` goes to."""
        if len(self.all) == 1:
            return index
        if error.retryable:
            with self._lock:
                self._failed_at[index] = time.monotonic()
        return (index + 1) % len(self.all)


GRPC_MAX_MESSAGE = 2**31 - 1
RESOLVER_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:")


def grpc_channel(address: str, load_balancing: str | None) -> tuple[str, list | None]:
    """The gRPC target and channel arguments for tritonclient's client.

    A gRPC client keeps one HTTP/2 connection, so behind a plain Kubernetes Service all its
    requests go to one replica. With ``load_balancing="round_robin"`` the client resolves every
    address behind the name (a headless Service: ``rankserve-grpc.<namespace>.svc``) and sends
    each request to the next one. A target that already names a gRPC resolver (``dns:``,
    ``ipv4:127.0.0.1:8001,127.0.0.1:9001``, ...) is used as it is."""
    if load_balancing is None:
        return address, None
    if load_balancing != "round_robin":
        raise ValueError(f"load_balancing must be None or 'round_robin', got {load_balancing!r}")
    target = address if address.startswith(RESOLVER_SCHEMES) else f"dns:///{address}"
    return target, [("grpc.max_send_message_length", GRPC_MAX_MESSAGE), ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE),
                    ("grpc.lb_policy_name", "round_robin")]


def chunks(n: int, size: int) -> list[tuple[int, int]]:
    if size < 1:
        raise ValueError("chunk size must be >= 1")
    return [(start, min(n, start + size)) for start in range(0, n, size)]


def merge(parts: Sequence[tuple[int, np.ndarray, np.ndarray]], items: Sequence[Item], top_k: int | None) -> list[RankedItem]:
    """Merge per-chunk (offset, indices, scores) into one ranking: score descending, ties by position."""
    idx = np.concatenate([offset + np.asarray(i, dtype=np.int64) for offset, i, _ in parts]) if parts else np.zeros(0, np.int64)
    sc = np.concatenate([np.asarray(s, dtype=np.float32) for _, _, s in parts]) if parts else np.zeros(0, np.float32)
    order = np.lexsort((idx, -sc))
    if top_k is not None:
        order = order[:top_k]
    return [RankedItem(items[int(idx[o])].id, items[int(idx[o])].text, float(sc[o]), r + 1) for r, o in enumerate(order)]


def check_metadata(model: str, metadata: dict) -> bool:
    """Raise :class:`ApiMismatch` unless ``model`` exposes the ranker API (names and datatypes); True if it
    also has the optional ``token_counts`` output."""
    inputs = {t["name"]: t["datatype"] for t in metadata.get("inputs", [])}
    outputs = {t["name"]: t["datatype"] for t in metadata.get("outputs", [])}
    missing = [f"input {k}:{v}" for k, v in API_INPUTS.items() if inputs.get(k) != v]
    missing += [f"output {k}:{v}" for k, v in API_OUTPUTS.items() if outputs.get(k) != v]
    if missing:
        raise ApiMismatch(f"model {model!r} does not speak the ranker API: lacks or mistypes {', '.join(missing)} "
                          f"(has inputs {inputs}, outputs {outputs})")
    return outputs.get(TOKEN_COUNTS) == "INT64"


def requested_outputs(tc, counted: bool) -> list:
    return [tc.InferRequestedOutput(name) for name in (*API_OUTPUTS, *([TOKEN_COUNTS] if counted else []))]


def ranking(parts: Sequence[tuple[int, np.ndarray, np.ndarray]], items: Sequence[Item], top_k: int | None,
            counts: Sequence[Optional[np.ndarray]]) -> Ranking:
    result = Ranking(merge(parts, items, top_k))
    result.token_counts = token_counts(counts)
    return result


class RetryBudget:
    """Retry throttling as gRPC does it (gRFC A6, "retryThrottling"), shared by every call of a client
    (pass one object to several clients to share it between them).

    The bucket starts full at ``max_tokens``; every attempt that reached a server and failed with a
    retryable error (``Unavailable``, ``Overloaded``) takes one token, every successful call gives back
    ``token_ratio``. ``Overloaded`` is retried only while more than half the bucket is left, so a
    client whose calls keep being shed stops multiplying them: a burst costs the server at most
    ``max_tokens / 2`` extra attempts, and afterwards at most about one retry per ``1 / token_ratio``
    successes. Thread-safe; never blocks."""

    def __init__(self, max_tokens: float = 10, token_ratio: float = 0.1) -> None:
        if not (0 < max_tokens <= 1000) or not (0 < token_ratio <= 1):
            raise ValueError(f"RetryBudget needs 0 < max_tokens <= 1000 and 0 < token_ratio <= 1, got {max_tokens}, {token_ratio}")
        self.max_tokens, self.token_ratio = float(max_tokens), float(token_ratio)
        self.tokens = self.max_tokens
        self.throttled = 0
        """Retries the budget refused so far."""
        self._lock = threading.Lock()

    def record_success(self) -> None:
        with self._lock:
            self.tokens = min(self.max_tokens, self.tokens + self.token_ratio)

    def record_failure(self) -> None:
        with self._lock:
            self.tokens = max(0.0, self.tokens - 1)

    def allows_retry(self) -> bool:
        with self._lock:
            allowed = self.tokens > self.max_tokens / 2
            self.throttled += not allowed
            return allowed

    def __repr__(self) -> str:
        return f"RetryBudget(tokens={self.tokens:.1f}/{self.max_tokens:g}, token_ratio={self.token_ratio:g}, throttled={self.throttled})"


DEFAULT_BUDGET = object()
"""The ``retry_budget`` default: a fresh :class:`RetryBudget` per client."""

DEFAULT_OVERLOAD_RETRIES = 2
BACKOFF_CAP_S = 2.0
OVERLOAD_BACKOFF_CAP_S = 8.0
MAX_RETRY_AFTER_S = 10.0
"""A longer ``Retry-After`` is not waited for: the error is raised with its ``retry_after``."""


@dataclass(frozen=True)
class RetryPolicy:
    """How a client retries. ``retries``: extra attempts after ``Unavailable`` (server down, restarting,
    a dead stub, a closed connection), full-jitter exponential backoff from ``backoff`` s (capped at 2 s).
    ``overload_retries``: extra attempts after ``Overloaded`` (the request was shed: it already cost the
    server its tokenization; default ``min(retries, 2)``), backoff from ``overload_backoff`` s, doubled each time, jittered between
    half and all of it (capped at 8 s), and only while the :class:`RetryBudget` allows. A ``Retry-After``
    the server or a gateway sends replaces the computed wait (up to 10 s; longer: not retried)."""

    retries: int = 3
    backoff: float = 0.1
    overload_retries: Optional[int] = None
    """None: ``min(retries, 2)`` (so ``retries=0`` still means no retry at all)."""
    overload_backoff: float = 0.5

    def __post_init__(self) -> None:
        if self.overload_retries is None and isinstance(self.retries, int):
            object.__setattr__(self, "overload_retries", min(self.retries, DEFAULT_OVERLOAD_RETRIES))
        for name in ("retries", "overload_retries"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        for name in ("backoff", "overload_backoff"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")


class RetryingClient:
    """What the sync and asyncio clients share about retries: their :class:`RetryPolicy` (``retry_policy``)
    and its ``retries`` and ``backoff``, as the clients had them before it."""

    retry_policy: RetryPolicy

    @property
    def retries(self) -> int:
        return self.retry_policy.retries

    @property
    def backoff(self) -> float:
        return self.retry_policy.backoff


def make_budget(retry_budget: Any) -> Optional[RetryBudget]:
    if retry_budget is DEFAULT_BUDGET:
        return RetryBudget()
    if retry_budget is not None and not isinstance(retry_budget, RetryBudget):
        raise ValueError(f"retry_budget must be a RetryBudget or None (no budget), got {retry_budget!r}")
    return retry_budget


class RetryState:
    """One call's retries: how many of each kind so far, and the wait before the next attempt."""

    def __init__(self, policy: RetryPolicy, budget: Optional[RetryBudget]) -> None:
        self.policy, self.budget = policy, budget
        self.unavailable = self.overloaded = 0

    @property
    def attempt(self) -> int:
        """Retries so far (1 after the first)."""
        return self.unavailable + self.overloaded

    def succeeded(self) -> None:
        if self.budget is not None:
            self.budget.record_success()

    def delay_after(self, error: RankerError) -> Optional[float]:
        """Seconds to wait before retrying after ``error``, or None: raise it."""
        if not error.retryable:
            return None
        if self.budget is not None and error.reached:
            self.budget.record_failure()
        overloaded = isinstance(error, Overloaded)
        if overloaded:
            if self.overloaded >= self.policy.overload_retries or (self.budget is not None and not self.budget.allows_retry()):
                return None
        elif self.unavailable >= self.policy.retries:
            return None
        if error.retry_after is not None:
            if error.retry_after > MAX_RETRY_AFTER_S:
                return None
            delay = error.retry_after * random.uniform(1.0, 1.1)  # at least what was asked, not all at the same instant
        elif overloaded:
            top = min(OVERLOAD_BACKOFF_CAP_S, self.policy.overload_backoff * 2**self.overloaded)
            delay = random.uniform(top / 2, top)
        else:
            delay = random.uniform(0, min(BACKOFF_CAP_S, self.policy.backoff * 2**self.unavailable))
        if overloaded:
            self.overloaded += 1
        else:
            self.unavailable += 1
        return delay


def parse_retry_after(value: Optional[str]) -> Optional[float]:
    """HTTP ``Retry-After``: delay-seconds or an HTTP-date, as seconds from now (None if absent or unreadable)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return max(0.0, seconds) if math.isfinite(seconds) else None


_RESPONSE: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("rankserve_response", default=None)


def watch_responses() -> tuple[dict, contextvars.Token]:
    """A dict the HTTP clients below fill with the last response's ``Retry-After``, for this context."""
    seen: dict = {}
    return seen, _RESPONSE.set(seen)


def unwatch(token: contextvars.Token) -> None:
    _RESPONSE.reset(token)


def _remember(retry_after: Optional[str]) -> None:
    seen = _RESPONSE.get()
    if seen is not None:
        seen["retry_after"] = retry_after


@functools.lru_cache(maxsize=None)
def http_client_class(base: type) -> type:
    """tritonclient's (sync) HTTP client that also keeps each response's ``Retry-After`` (tritonclient drops headers)."""

    class HttpClient(base):
        def _get(self, *args, **kwargs):
            response = super()._get(*args, **kwargs)
            _remember(response.get("retry-after"))
            return response

        def _post(self, *args, **kwargs):
            response = super()._post(*args, **kwargs)
            _remember(response.get("retry-after"))
            return response

    return HttpClient


@functools.lru_cache(maxsize=None)
def aio_http_client_class(base: type) -> type:
    """The same for tritonclient's asyncio HTTP client (aiohttp responses)."""

    class AioHttpClient(base):
        async def _get(self, *args, **kwargs):
            response = await super()._get(*args, **kwargs)
            _remember(response.headers.get("Retry-After"))
            return response

        async def _post(self, *args, **kwargs):
            response = await super()._post(*args, **kwargs)
            _remember(response.headers.get("Retry-After"))
            return response

    return AioHttpClient


def with_retry_after(error: RankerError, seen: dict) -> RankerError:
    if error.retryable and seen.get("retry_after"):
        error.retry_after = parse_retry_after(seen["retry_after"])
    return error


def build_inputs(tc, query: str, texts: Sequence[str], top_k: int | None) -> list:
    """tritonclient ``InferInput`` objects for one request (``tc`` is the http or grpc module)."""
    q = tc.InferInput("query", [1], "BYTES")
    q.set_data_from_numpy(np.array([query.encode("utf-8")], dtype=object))
    t = tc.InferInput("texts", [len(texts)], "BYTES")
    t.set_data_from_numpy(np.array([x.encode("utf-8") for x in texts], dtype=object).reshape(len(texts)))
    inputs = [q, t]
    if top_k is not None:
        k = tc.InferInput("top_k", [1], "INT32")
        k.set_data_from_numpy(np.array([top_k], dtype=np.int32))
        inputs.append(k)
    return inputs


def validate(query: str, items: Sequence[Item], top_k: int | None) -> None:
    if not isinstance(query, str) or not query.strip():
        raise BadRequest("query must be a non-empty string")
    if not items:
        raise BadRequest("items is empty: send at least one candidate")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise BadRequest(f"top_k must be a positive integer, got {top_k!r}")
    if top_k is not None and top_k > len(items):
        raise BadRequest(f"top_k is {top_k} but there are only {len(items)} items: send top_k <= {len(items)}, or omit it for all")
