"""The asyncio client."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Iterable, Optional, TypeVar

from rankserve_client import _common as c
from rankserve_client.client import map_error
from rankserve_client.errors import RankerError, Timeout

T = TypeVar("T")


class AsyncRankerClient(c.RetryingClient):
    """The asyncio twin of :class:`RankerClient`: one connection pool shared by all tasks of a loop.

    Create it inside a running loop and ``await client.connect()`` (or use ``async with``), which
    also checks the model's API. Chunks of a long candidate list are sent concurrently, at most
    ``chunk_concurrency`` at a time (default 4). Retries as :class:`RankerClient` does.
    """

    def __init__(self, url: str, protocol: Optional[str] = None, *, model: str = c.DEFAULT_MODEL, timeout: float = 10.0,
                 retries: int = 3, backoff: float = 0.1, overload_retries: Optional[int] = None, overload_backoff: float = 0.5,
                 retry_budget: Any = c.DEFAULT_BUDGET, chunk_size: int = c.DEFAULT_CHUNK,
                 chunk_concurrency: int = c.DEFAULT_CHUNK_CONCURRENCY, check_api: bool = True,
                 on_retry: Optional[c.RetryHook] = None, load_balancing: Optional[str] = None,
                 headers: Optional[c.Headers] = None, tls: Optional[bool] = None, ca_file: Optional[str] = None,
                 cert_file: Optional[str] = None, key_file: Optional[str] = None) -> None:
        self.protocol, self.address, self.tls = c.parse_url(url, protocol, tls)
        self.tls_files = c.tls_files(self.tls, ca_file, cert_file, key_file)
        self.headers = c.merge_headers(self.protocol, headers) or {}
        self.model, self.timeout, self.chunk_size = model, timeout, chunk_size
        if not isinstance(chunk_concurrency, int) or chunk_concurrency < 1:
            raise ValueError(f"chunk_concurrency must be an integer >= 1, got {chunk_concurrency!r}")
        self.chunk_concurrency = chunk_concurrency
        self.retry_policy = c.RetryPolicy(retries, backoff, overload_retries, overload_backoff)
        self.retry_budget = c.make_budget(retry_budget)
        self.check_api_on_connect = check_api
        self.on_retry = on_retry
        self.addresses = c.Addresses(self.address)
        if load_balancing and len(self.addresses) > 1:
            raise ValueError("load_balancing takes one name (or a resolver target such as ipv4:h1:8001,h2:8001), "
                             "not a comma-separated list of addresses")
        self.target, self.channel_args = c.grpc_channel(self.address, load_balancing) if self.protocol == "grpc" else (self.address, None)
        if self.protocol == "grpc":
            import tritonclient.grpc as tc
            import tritonclient.grpc.aio as aio
        else:
            import tritonclient.http as tc
            import tritonclient.http.aio as aio
        self._tc, self._aio, self._client = tc, aio, None
        self._counted: dict[str, bool] = {}  # model -> it has the token_counts output (learnt by check_api)
        self._clients: dict[int, Any] = {}  # address index -> client

    def _client_of(self, index: int):
        """The transport client of address ``index`` (created on first use)."""
        if index not in self._clients:
            address = self.target if self.protocol == "grpc" and len(self.addresses) == 1 else self.addresses.all[index]
            if self.protocol == "grpc":
                client = self._aio.InferenceServerClient(address, channel_args=self.channel_args,
                                                         **c.grpc_tls_kwargs(self.tls, self.tls_files))
            elif self.tls:
                client = c.aio_http_client_class(self._aio.InferenceServerClient)(address, ssl=True,
                                                                                 ssl_context=c.ssl_context(self.tls_files))
            else:
                client = c.aio_http_client_class(self._aio.InferenceServerClient)(address)
            self._clients[index] = client
        return self._clients[index]

    async def connect(self) -> "AsyncRankerClient":
        if self._client is None:
            self._client = self._client_of(0)
        if self.check_api_on_connect:
            try:
                await self.check_api()
            except BaseException:
                await self.close()  # `async with` does not exit what it failed to enter
                raise
        return self

    async def _call(self, fn: Callable[[object], Awaitable[T]], timeout: Optional[float] = None) -> T:
        if self._client is None:
            await self.connect()
        timeout = self.timeout if timeout is None else timeout
        state = c.RetryState(self.retry_policy, self.retry_budget)
        index = self.addresses.first()
        while True:
            seen, token = c.watch_responses()
            try:
                result = await asyncio.wait_for(fn(self._client_of(index)), timeout)
            except asyncio.TimeoutError:
                raise Timeout(f"no answer within {timeout} s") from None
            except Exception as exc:  # noqa: BLE001 - mapped to the SDK's hierarchy below
                error = c.with_retry_after(c.explain(map_error(exc), self.tls, self.tls_files), seen)
                index = self.addresses.after(index, error)
                delay = state.delay_after(error)
                if delay is None:
                    raise error from None
                if self.on_retry is not None:
                    self.on_retry(error, state.attempt, delay)
                await asyncio.sleep(delay)
            else:
                state.succeeded()
                return result
            finally:
                c.unwatch(token)

    def _headers(self, headers: Optional[c.Headers]) -> Optional[dict]:
        return c.merge_headers(self.protocol, self.headers, headers)

    async def is_ready(self, model: Optional[str] = None, headers: Optional[c.Headers] = None) -> bool:
        try:
            return bool(await self._call(lambda cl: cl.is_model_ready(model or self.model, headers=self._headers(headers))))
        except RankerError:
            return False

    async def check_api(self, model: Optional[str] = None, headers: Optional[c.Headers] = None) -> None:
        model = model or self.model
        sent = self._headers(headers)
        if self.protocol == "grpc":
            metadata = await self._call(lambda cl: cl.get_model_metadata(model, as_json=True, headers=sent))
        else:
            metadata = await self._call(lambda cl: cl.get_model_metadata(model, headers=sent))
        self._counted[model] = c.check_metadata(model, metadata)

    async def rank(self, query: str, items: Iterable[c.ItemLike], top_k: Optional[int] = None,
                   model: Optional[str] = None, timeout: Optional[float] = None,
                   headers: Optional[c.Headers] = None) -> c.Ranking:
        """Rank ``items`` for ``query``, best first; see :meth:`RankerClient.rank`."""
        all_items = c.to_items(items)
        c.validate(query, all_items, top_k)
        model = model or self.model
        sent = self._headers(headers)

        slots = asyncio.Semaphore(self.chunk_concurrency)

        async def one(start: int, end: int):
            async with slots:
                return await send(start, end)

        async def send(start: int, end: int):
            texts = [it.text for it in all_items[start:end]]
            k = None if top_k is None else min(top_k, end - start)
            inputs = c.build_inputs(self._tc, query, texts, k)
            outputs = c.requested_outputs(self._tc, counted)
            result = await self._call(lambda cl: cl.infer(model, inputs, outputs=outputs, headers=sent), timeout)
            return (start, result.as_numpy("indices"), result.as_numpy("scores")), result.as_numpy(c.TOKEN_COUNTS) if counted else None

        counted = self._counted.get(model, False)
        done = await asyncio.gather(*(one(s, e) for s, e in c.chunks(len(all_items), self.chunk_size)))
        return c.ranking([part for part, _ in done], all_items, top_k, [counts for _, counts in done])

    async def close(self) -> None:
        clients, self._clients, self._client = list(self._clients.values()), {}, None
        for client in clients:
            await client.close()

    async def __aenter__(self) -> "AsyncRankerClient":
        return await self.connect()

    async def __aexit__(self, *exc) -> None:
        await self.close()
