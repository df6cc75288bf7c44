"""A first client of the ranker's API over HTTP or gRPC (query + candidate texts in, ranking out)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from rankserve import api
from rankserve.errors import InvalidInput, RankserveError, Unavailable, from_status


@dataclass(frozen=True)
class Ranked:
    rank: int  # 1 = best
    index: int  # position in the texts sent
    score: float
    text: str


def _module(protocol: str):
    if protocol == "http":
        import tritonclient.http as module
    elif protocol == "grpc":
        import tritonclient.grpc as module
    else:
        raise InvalidInput(f"protocol must be 'http' or 'grpc', got {protocol!r}")
    return module


class RankerClient:
    """Calls the ``ranker`` ensemble. Not thread-safe: use one client per thread."""

    def __init__(self, url: str, protocol: str = "http", model: str = api.RANKER_MODEL, timeout_s: float = 30.0) -> None:
        self.protocol = protocol
        self.model = model
        self.timeout_s = timeout_s
        self._tc = _module(protocol)
        url = url.split("://", 1)[-1]
        self.url = url
        if protocol == "http":
            self._client = self._tc.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
        else:
            self._client = self._tc.InferenceServerClient(url)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "RankerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def rank(self, query: str, texts: Sequence[str], top_k: int | None = None) -> list[Ranked]:
        """Rank ``texts`` for ``query``; best first, at most ``top_k`` results."""
        tc = self._tc
        inputs = [tc.InferInput(api.QUERY.name, [1], "BYTES"), tc.InferInput(api.TEXTS.name, [len(texts)], "BYTES")]
        inputs[0].set_data_from_numpy(np.array([query.encode("utf-8")], dtype=object))
        inputs[1].set_data_from_numpy(np.array([t.encode("utf-8") for t in texts], dtype=object).reshape(len(texts)))
        if top_k is not None:
            k = tc.InferInput(api.TOP_K.name, [1], "INT32")
            k.set_data_from_numpy(np.array([top_k], dtype=np.int32))
            inputs.append(k)
        outputs = [tc.InferRequestedOutput(t.name) for t in api.RANKER_OUTPUTS]
        try:
            if self.protocol == "grpc":
                result = self._client.infer(self.model, inputs, outputs=outputs, client_timeout=self.timeout_s)
            else:
                result = self._client.infer(self.model, inputs, outputs=outputs)
        except tc.InferenceServerException as exc:
            raise _map(exc) from None
        except OSError as exc:  # connection refused / reset (HTTP)
            raise Unavailable(f"cannot reach {self.url} ({self.protocol}): {exc}") from None
        indices = result.as_numpy(api.INDICES.name)
        scores = result.as_numpy(api.SCORES.name)
        return [Ranked(r + 1, int(i), float(s), texts[int(i)]) for r, (i, s) in enumerate(zip(indices, scores))]


def _map(exc: Exception) -> RankserveError:
    status = exc.status() if hasattr(exc, "status") else None
    message = exc.message() if hasattr(exc, "message") else str(exc)
    if isinstance(status, str) and status.isdigit():
        return from_status(int(status), message)
    return from_status(status, message)
