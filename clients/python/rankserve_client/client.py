"""The synchronous client."""

from __future__ import annotations

import errno
import http.client
import socket
import ssl
import threading
import time
from typing import Any, Callable, Iterable, Optional, TypeVar

from rankserve_client import _common as c
from rankserve_client.errors import RankerError, Timeout, Unavailable, from_triton, tls_error

T = TypeVar("T")
_NOT_SENT = {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EADDRNOTAVAIL}


def _retime(client: Any, timeout: float) -> bool:
    """Give a thread's HTTP client a new timeout in place (geventhttpclient applies it to each socket it
    opens; the idle one, if any, gets it now). False if that library's insides are not as expected."""
    pool = getattr(getattr(client, "_client_stub", None), "_connection_pool", None)
    idle = getattr(getattr(pool, "_socket_queue", None), "queue", None)
    if pool is None or idle is None or not hasattr(pool, "network_timeout"):
        return False
    pool.connection_timeout = pool.network_timeout = timeout
    for sock in list(idle):
        sock.settimeout(timeout)
    return True


def map_error(exc: BaseException) -> RankerError:
    """Any transport exception as an SDK error."""
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, RankerError):
        return exc
    if isinstance(exc, InferenceServerException):
        return from_triton(exc.status(), exc.message() or str(exc))
    if isinstance(exc, ssl.SSLError) or any(k.__name__ == "ClientSSLError" for k in type(exc).__mro__):
        return tls_error(str(exc))
    if isinstance(exc, (socket.timeout, TimeoutError)) or type(exc).__name__ == "Timeout":
        return Timeout(f"no answer in time: {exc}")
    if isinstance(exc, OSError):
        error = Unavailable(f"cannot reach the server: {exc}")
        # refused, unresolvable or unroutable (aiohttp's ClientConnectorError too): the request never left the client
        error.reached = not (isinstance(exc, (ConnectionRefusedError, socket.gaierror)) or exc.errno in _NOT_SENT
                             or any(k.__name__ == "ClientConnectorError" for k in type(exc).__mro__))
        return error
    if isinstance(exc, http.client.HTTPException) or any(k.__name__ == "ClientConnectionError" for k in type(exc).__mro__):  # e.g. the connection closed by a stopping server; ranking is idempotent
        return Unavailable(f"the server closed the connection: {type(exc).__name__} {exc}")
    return RankerError(f"{type(exc).__name__}: {exc}")


class RankerClient(c.RetryingClient):
    """Ranks candidates with a rankserve ranker over HTTP or gRPC.

    Thread-safe: over gRPC all threads share one channel; over HTTP each thread gets its own
    connection (tritonclient's HTTP client is not thread-safe), reused across its calls whatever
    their timeouts; the connection of a thread that has ended is closed when another thread opens one
    (or by ``close()``), so open connections never outnumber the live threads that used the client.

    >>> client = RankerClient("grpc://127.0.0.1:8001")
    >>> client.rank("turquoise pillows", [("sku-1", "Turquoise Velvet Pillow"), ("sku-2", "Oak Table")], top_k=1)
    """

    def __init__(self, url: str, protocol: Optional[str] = None, *, model: str = c.DEFAULT_MODEL, timeout: float = 10.0,
                 retries: int = 3, backoff: float = 0.1, overload_retries: Optional[int] = None, overload_backoff: float = 0.5,
                 retry_budget: Any = c.DEFAULT_BUDGET, chunk_size: int = c.DEFAULT_CHUNK, check_api: bool = True,
                 on_retry: Optional[c.RetryHook] = None, load_balancing: Optional[str] = None,
                 refresh_s: float = 60.0, headers: Optional[c.Headers] = None, tls: Optional[bool] = None,
                 ca_file: Optional[str] = None, cert_file: Optional[str] = None, key_file: Optional[str] = None) -> None:
        """``url``: ``http://host:8000``, ``grpc://host:8001``, over TLS ``https://host`` or ``grpcs://host:8001``,
        or ``host:port`` with ``protocol`` (and ``tls=True``); several comma-separated addresses
        (``http://a:8000,b:8000``) for failover: calls take them in turn, a retry goes to the next one.
        ``timeout``: seconds per call; ``retries``: extra attempts when the server is unavailable (down,
        restarting: exponential backoff from ``backoff`` s); ``overload_retries`` (default ``min(retries, 2)``):
        extra attempts when it shed the request (``Overloaded``: longer backoff from ``overload_backoff`` s, or the ``Retry-After``
        it sent, and only while ``retry_budget`` allows: a :class:`RetryBudget`, by default one per client,
        ``None`` for none); ``chunk_size``: most candidates per request;
        ``check_api``: fetch the model's metadata now and raise :class:`ApiMismatch` if it is not a ranker;
        ``on_retry(error, attempt, delay_s)``: called before each retry (to count or log them);
        ``load_balancing="round_robin"`` (gRPC): spread requests over every replica behind a headless
        Service name, re-resolving it every ``refresh_s`` seconds so new replicas get traffic.
        ``headers``: sent with every call (HTTP headers, gRPC metadata), e.g. ``{"Authorization": "Bearer <token>"}``
        for a gateway; a call's own ``headers`` add to or replace them. TLS: ``ca_file`` the CA bundle that signed
        the server's certificate (default: the system's), ``cert_file`` and ``key_file`` a client certificate
        (mutual TLS)."""
        self.protocol, self.address, self.tls = c.parse_url(url, protocol, tls)
        self.tls_files = c.tls_files(self.tls, ca_file, cert_file, key_file)
        self.headers = c.merge_headers(self.protocol, headers) or {}
        self.model, self.timeout, self.chunk_size = model, timeout, chunk_size
        self.retry_policy = c.RetryPolicy(retries, backoff, overload_retries, overload_backoff)
        self.retry_budget = c.make_budget(retry_budget)
        self.on_retry = on_retry
        if load_balancing and self.protocol != "grpc":
            raise ValueError("load_balancing is for gRPC; HTTP clients open several connections and a Service spreads them")
        self.addresses = c.Addresses(self.address)
        if load_balancing and len(self.addresses) > 1:
            raise ValueError("load_balancing takes one name (or a resolver target such as ipv4:h1:8001,h2:8001), "
                             "not a comma-separated list of addresses")
        self.target, self.channel_args = c.grpc_channel(self.address, load_balancing) if self.protocol == "grpc" else (self.address, None)
        self.refresh_s = refresh_s if self.channel_args else None
        self._grpc_born: dict[int, float] = {}
        self._retired: list = []
        if self.protocol == "grpc":
            import tritonclient.grpc as tc
        else:
            import tritonclient.http as tc
        self._tc = tc
        self._lock = threading.Lock()
        self._grpc: dict[int, Any] = {}  # address index -> client
        self._http: dict[tuple[int, int], list] = {}  # (thread id, address index) -> [thread, client, its timeout]
        self._swept = time.monotonic()
        self._counted: dict[str, bool] = {}  # model -> it has the token_counts output (learnt by check_api)
        if check_api:
            self.check_api(model)

    # -- transport ---------------------------------------------------------------------------
    def _client(self, timeout: float, index: int = 0):
        """The transport client of address ``index`` (of :attr:`addresses`) for this thread."""
        if self.protocol == "grpc":
            with self._lock:
                now = time.monotonic()
                client = self._grpc.get(index)
                if client is not None and self.refresh_s and now - self._grpc_born.get(index, now) > self.refresh_s:
                    # a new channel resolves the name again (gRPC's DNS resolver does not poll): calls on the
                    # old one finish, it is closed at a later refresh
                    self._retired.append(self._grpc.pop(index))
                    client = None
                if client is None:
                    target = self.target if len(self.addresses) == 1 else self.addresses.all[index]
                    client = self._grpc[index] = self._tc.InferenceServerClient(target, channel_args=self.channel_args,
                                                                                **c.grpc_tls_kwargs(self.tls, self.tls_files))
                    self._grpc_born[index] = now
                    while len(self._retired) > 1:
                        self._retired.pop(0).close()
                return client
        me, ident = threading.current_thread(), (threading.get_ident(), index)
        entry = self._http.get(ident)
        if entry is not None and entry[0] is not me:
            # a thread id is reused only after its thread ended; that thread's client cannot be used from this one
            # (gevent: "cannot switch to a different thread"): close it
            with self._lock:
                if self._http.get(ident) is entry:
                    del self._http[ident]
            entry[1].close()
            entry = None
        if entry is not None:
            if entry[2] != timeout:
                if not _retime(entry[1], timeout):
                    entry[1].close()
                    entry[1] = self._new_http(timeout, index)
                entry[2] = timeout
            if time.monotonic() - self._swept > 1.0:
                self._sweep()
            return entry[1]
        client = self._new_http(timeout, index)
        with self._lock:
            self._http[ident] = [me, client, timeout]
        self._sweep()
        return client

    def _new_http(self, timeout: float, index: int = 0):
        tls = {"ssl": True, "ssl_options": c.http_ssl_options(self.tls_files)} if self.tls else {}
        return c.http_client_class(self._tc.InferenceServerClient)(self.addresses.all[index], connection_timeout=timeout,
                                                                   network_timeout=timeout, **tls)

    def _sweep(self) -> None:
        """Close the HTTP clients of threads that have ended."""
        with self._lock:
            self._swept = time.monotonic()
            dead = [ident for ident, (thread, _, _) in self._http.items() if not thread.is_alive()]
            closing = [self._http.pop(ident)[1] for ident in dead]
        for client in closing:
            client.close()

    @property
    def open_http_clients(self) -> int:
        """HTTP clients (one connection each) open now: at most one per live thread that called (per address)."""
        with self._lock:
            return len(self._http)

    def _call(self, fn: Callable[[object, float], T], timeout: Optional[float] = None) -> T:
        timeout = self.timeout if timeout is None else timeout
        state = c.RetryState(self.retry_policy, self.retry_budget)
        index = self.addresses.first()
        while True:
            seen, token = c.watch_responses()
            try:
                result = fn(self._client(timeout, index), timeout)
            except Exception as exc:  # noqa: BLE001 - mapped to the SDK's hierarchy below
                error = c.with_retry_after(c.explain(map_error(exc), self.tls, self.tls_files), seen)
                index = self.addresses.after(index, error)
                delay = state.delay_after(error)
                if delay is None:
                    raise error from None
                if self.on_retry is not None:
                    self.on_retry(error, state.attempt, delay)
                time.sleep(delay)
            else:
                state.succeeded()
                return result
            finally:
                c.unwatch(token)

    # -- API -----------------------------------------------------------------------------------
    def _headers(self, headers: Optional[c.Headers]) -> Optional[dict]:
        return c.merge_headers(self.protocol, self.headers, headers)

    def is_live(self, headers: Optional[c.Headers] = None) -> bool:
        try:
            return bool(self._client(self.timeout).is_server_live(headers=self._headers(headers)))
        except Exception:  # noqa: BLE001
            return False

    def is_ready(self, model: Optional[str] = None, headers: Optional[c.Headers] = None) -> bool:
        try:
            return bool(self._client(self.timeout).is_model_ready(model or self.model, headers=self._headers(headers)))
        except Exception:  # noqa: BLE001
            return False

    def check_api(self, model: Optional[str] = None, headers: Optional[c.Headers] = None) -> None:
        """Raise :class:`ApiMismatch` unless ``model`` exposes query/texts/top_k -> indices/scores."""
        model = model or self.model
        sent = self._headers(headers)

        def fetch(client, _timeout):
            if self.protocol == "grpc":
                return client.get_model_metadata(model, as_json=True, client_timeout=_timeout, headers=sent)
            return client.get_model_metadata(model, headers=sent)

        self._counted[model] = c.check_metadata(model, self._call(fetch))

    def rank(self, query: str, items: Iterable[c.ItemLike], top_k: Optional[int] = None,
             model: Optional[str] = None, timeout: Optional[float] = None,
             headers: Optional[c.Headers] = None) -> c.Ranking:
        """Rank ``items`` for ``query``, best first; at most ``top_k`` results; ``headers`` add to the client's.
        The list has ``token_counts`` (:class:`TokenCounts`) when the model reports them.

        Items are strings (id = position), ``(id, text)`` pairs or objects with ``id`` and ``text``.
        Lists longer than ``chunk_size`` go out in several requests and are merged by score (each
        pair's score does not depend on the rest of its request)."""
        all_items = c.to_items(items)
        c.validate(query, all_items, top_k)
        model = model or self.model
        sent = self._headers(headers)
        parts, counts = [], []
        counted = self._counted.get(model, False)
        for start, end in c.chunks(len(all_items), self.chunk_size):
            texts = [it.text for it in all_items[start:end]]
            k = None if top_k is None else min(top_k, end - start)
            inputs = c.build_inputs(self._tc, query, texts, k)
            outputs = c.requested_outputs(self._tc, counted)

            def infer(client, t, inputs=inputs, outputs=outputs):
                if self.protocol == "grpc":
                    return client.infer(model, inputs, outputs=outputs, client_timeout=t, headers=sent)
                return client.infer(model, inputs, outputs=outputs, headers=sent)

            result = self._call(infer, timeout)
            parts.append((start, result.as_numpy("indices"), result.as_numpy("scores")))
            counts.append(result.as_numpy(c.TOKEN_COUNTS) if counted else None)
        return c.ranking(parts, all_items, top_k, counts)

    def close(self) -> None:
        with self._lock:
            for _, client, _ in self._http.values():
                client.close()
            self._http.clear()
            for client in self._grpc.values():
                client.close()
            self._grpc.clear()
            for client in self._retired:
                client.close()
            self._retired.clear()

    def __enter__(self) -> "RankerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
