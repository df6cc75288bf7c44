"""rankserve-client: call a rankserve ranker on Triton with queries and candidates, not tensors.

>>> from rankserve_client import RankerClient
>>> with RankerClient("http://127.0.0.1:8000") as client:
...     for r in client.rank("turquoise pillows", ["Turquoise Velvet Pillow", "Oak Dining Table"]):
...         print(r.rank, r.score, r.text)
"""

from rankserve_client._common import Item, RankedItem, Ranking, RetryBudget, TokenCounts, parse_url
from rankserve_client.client import RankerClient
from rankserve_client.errors import (ApiMismatch, BadRequest, Overloaded, PermissionDenied, RankerError, RequestTooLarge, ServerError,
                                     Timeout, TlsError, Unauthenticated, Unavailable)

__all__ = ["RankerClient", "AsyncRankerClient", "Item", "RankedItem", "RankerError", "BadRequest", "Unavailable",
           "Overloaded", "Timeout", "Ranking", "TokenCounts", "ServerError", "ApiMismatch", "Unauthenticated", "PermissionDenied",
           "TlsError", "RequestTooLarge", "RetryBudget", "parse_url"]
__version__ = "0.1.0"


def __getattr__(name):  # the asyncio client imports aiohttp / grpc.aio only when asked for
    if name == "AsyncRankerClient":
        from rankserve_client.aio import AsyncRankerClient

        return AsyncRankerClient
    raise AttributeError(name)
