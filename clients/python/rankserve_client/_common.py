"""What the sync and asyncio clients share: items, URLs, request/response shapes, chunking, retries."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence, Tuple, Union

import numpy as np

from rankserve_client.errors import ApiMismatch, BadRequest, RankerError

RetryHook = Callable[[RankerError, int, float], None]
"""``on_retry(error, attempt, delay_s)``: attempt 1 is the first retry."""

DEFAULT_MODEL = "ranker"
DEFAULT_CHUNK = 1000  # the server's default TokenizeSettings.max_candidates
API_INPUTS = {"query": "BYTES", "texts": "BYTES", "top_k": "INT32"}
API_OUTPUTS = {"indices": "INT32", "scores": "FP32"}


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


def parse_url(url: str, protocol: str | None) -> tuple[str, str]:
    """``(protocol, host:port)`` from ``http://h:p``, ``grpc://h:p`` or ``h:p`` plus ``protocol``."""
    scheme, sep, rest = url.partition("://")
    if sep:
        if scheme not in ("http", "grpc"):
            raise ValueError(f"unsupported URL scheme {scheme!r}: use http:// or grpc://")
        if protocol and protocol != scheme:
            raise ValueError(f"URL scheme {scheme!r} contradicts protocol={protocol!r}")
        return scheme, rest.rstrip("/")
    return protocol or "http", url.rstrip("/")


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


def check_metadata(model: str, metadata: dict) -> None:
    """Raise :class:`ApiMismatch` unless ``model`` exposes the ranker API (names and datatypes)."""
    inputs = {t["name"]: t["datatype"] for t in metadata.get("inputs", [])}
    outputs = {t["name"]: t["datatype"] for t in metadata.get("outputs", [])}
    missing = [f"input {k}:{v}" for k, v in API_INPUTS.items() if inputs.get(k) != v]
    missing += [f"output {k}:{v}" for k, v in API_OUTPUTS.items() if outputs.get(k) != v]
    if missing:
        raise ApiMismatch(f"model {model!r} does not speak the ranker API: lacks or mistypes {', '.join(missing)} "
                          f"(has inputs {inputs}, outputs {outputs})")


def backoff_delays(retries: int, base: float, cap: float = 2.0) -> list[float]:
    """Exponential backoff with full jitter: up to base, 2*base, 4*base... capped."""
    return [random.uniform(0, min(cap, base * 2**i)) for i in range(retries)]


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
