"""The Python SDK (rankserve_client) against the real tritonserver: sync and asyncio, HTTP and gRPC."""

import asyncio
import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest

from rankserve.server.embedded import free_port
from rankserve_client import ApiMismatch, AsyncRankerClient, BadRequest, Item, RankerClient, Timeout, Unavailable

pytestmark = pytest.mark.triton
PROTOCOLS = ["http", "grpc"]


def _url(server, protocol):
    return f"{protocol}://{server.http_url if protocol == 'http' else server.grpc_url}"


@pytest.fixture(scope="module")
def catalog(dataset):
    return [p.text for p in dataset.products.values()]


@dataclass
class Product:
    id: str
    text: str


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_ids_are_preserved_for_every_item_form(server, protocol, offline_scorer):
    texts = ["Larkin Salon Chair | Massage Chairs", "Oak Dining Table | Dining Tables", "Gray Rug | Area Rugs"]
    expected = offline_scorer("salon chair", texts)
    forms = [texts, [(f"sku-{i}", t) for i, t in enumerate(texts)], [Item(("a", i), t) for i, t in enumerate(texts)],
             [Product(f"p{i}", t) for i, t in enumerate(texts)]]
    with RankerClient(_url(server, protocol)) as client:
        assert client.is_live() and client.is_ready()
        for items in forms:
            results = client.rank("salon chair", items)
            ids = [it if isinstance(it, str) else (it[0] if isinstance(it, tuple) else it.id) for it in items]
            ids = list(range(len(items))) if isinstance(items[0], str) else ids
            assert [r.rank for r in results] == [1, 2, 3]
            for r in results:
                position = ids.index(r.id)
                assert r.text == texts[position] and abs(r.score - expected[position]) <= 1e-4


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_chunked_ranking_equals_one_call(server, protocol, catalog):
    items = [(f"id{i}", t) for i, t in enumerate(catalog[:1000])]
    with RankerClient(_url(server, protocol)) as whole, RankerClient(_url(server, protocol), chunk_size=130) as chunked:
        one = whole.rank("turquoise pillows", items, top_k=50)
        many = chunked.rank("turquoise pillows", items, top_k=50)
    assert [r.id for r in many] == [r.id for r in one]
    np.testing.assert_allclose([r.score for r in many], [r.score for r in one], atol=1e-5)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_two_thousand_candidates_go_out_in_chunks_the_server_accepts(server, protocol, catalog):
    items = catalog[:2000]
    with RankerClient(_url(server, protocol)) as client:  # default chunk: the server's 1000-candidate limit
        results = client.rank("oak dining table", items)
        with pytest.raises(BadRequest, match="limit of 1000"):
            RankerClient(_url(server, protocol), chunk_size=2000).rank("oak dining table", items)
    assert len(results) == 2000 and sorted(r.id for r in results) == list(range(2000))
    scores = [r.score for r in results]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_async_client_matches_the_sync_client(server, protocol, catalog):
    items = catalog[:300]
    with RankerClient(_url(server, protocol)) as sync:
        expected = sync.rank("leather chairs", items, top_k=20)

    async def run():
        async with AsyncRankerClient(_url(server, protocol), chunk_size=64) as client:
            assert await client.is_ready()
            return await client.rank("leather chairs", items, top_k=20)

    got = asyncio.run(run())
    assert [r.id for r in got] == [r.id for r in expected]
    np.testing.assert_allclose([r.score for r in got], [r.score for r in expected], atol=1e-5)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_concurrent_use_from_threads_shares_one_client(server, protocol, dataset):
    by_query = dataset.by_query()
    requests = [(q.text, [dataset.products[j.product_id].text for j in by_query[q.query_id]]) for q in dataset.split("heldout")[:8]]
    with RankerClient(_url(server, protocol)) as client:
        expected = {q: [r.id for r in client.rank(q, t)] for q, t in requests}
        errors, seen = [], []

        def worker(n):
            try:
                for q, t in requests[n:] + requests[:n]:
                    seen.append([r.id for r in client.rank(q, t)] == expected[q])
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert not errors and len(seen) == 6 * len(requests) and all(seen)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_concurrent_asyncio_tasks(server, protocol, dataset):
    by_query = dataset.by_query()
    requests = [(q.text, [dataset.products[j.product_id].text for j in by_query[q.query_id]]) for q in dataset.split("heldout")[:16]]

    async def run():
        async with AsyncRankerClient(_url(server, protocol)) as client:
            first = [await client.rank(q, t) for q, t in requests]
            again = await asyncio.gather(*(client.rank(q, t) for q, t in requests))
            return first, again

    first, again = asyncio.run(run())
    assert [[r.id for r in x] for x in first] == [[r.id for r in x] for x in again]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_timeout_is_raised_as_timeout(server, protocol, catalog):
    client = RankerClient(_url(server, protocol), check_api=False)
    with pytest.raises(Timeout):
        client.rank("oak dining table", catalog[:1000], timeout=0.005)
    assert len(client.rank("oak dining table", catalog[:3])) == 3  # the client still works afterwards
    client.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_server_down_is_unavailable_after_bounded_retries(protocol):
    start = time.monotonic()
    with pytest.raises(Unavailable):
        RankerClient(f"{protocol}://127.0.0.1:{free_port()}", retries=2, backoff=0.05, timeout=2)
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_api_mismatch_is_reported_at_connect(server, protocol):
    with pytest.raises(ApiMismatch, match="'tokenize' does not speak the ranker API"):
        RankerClient(_url(server, protocol), model="tokenize")


def test_client_side_validation_and_url_rules():
    with pytest.raises(BadRequest, match="items is empty"):
        RankerClient("http://127.0.0.1:1", check_api=False).rank("sofa", [])
    with pytest.raises(BadRequest, match="top_k"):
        RankerClient("http://127.0.0.1:1", check_api=False).rank("sofa", ["x"], top_k=0)
    with pytest.raises(BadRequest, match="only 1 items"):
        RankerClient("http://127.0.0.1:1", check_api=False).rank("sofa", ["x"], top_k=2)
    with pytest.raises(ValueError, match="contradicts"):
        RankerClient("grpc://127.0.0.1:1", protocol="http", check_api=False)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_async_timeout_and_server_down(server, protocol, catalog):
    async def run():
        client = AsyncRankerClient(_url(server, protocol), check_api=False)
        with pytest.raises(Timeout):
            await client.rank("oak dining table", catalog[:1000], timeout=0.005)
        assert len(await client.rank("oak dining table", catalog[:3])) == 3
        await client.close()
        down = AsyncRankerClient(f"{protocol}://127.0.0.1:{free_port()}", retries=2, backoff=0.05, timeout=2)
        started = time.monotonic()
        with pytest.raises(Unavailable):
            await down.connect()
        await down.close()
        return time.monotonic() - started

    assert asyncio.run(run()) < 10


def test_grpc_round_robin_spreads_requests_over_replicas(tiny_repo, tmp_path, catalog):
    """What a client of a Kubernetes headless Service does, on loopback: two replicas behind one
    gRPC target; with load_balancing="round_robin" both get requests, and the client keeps working
    across a channel refresh."""
    import re
    import urllib.request

    from conftest import free_serve_settings
    from rankserve.server.embedded import EmbeddedServer

    def served(server) -> float:
        text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
        return float(re.search(r'^nv_inference_request_success\{model="ranker",version="1"\} (\S+)$', text, re.M).group(1))

    texts = catalog[:5]
    with EmbeddedServer(tiny_repo, free_serve_settings(), tmp_path / "a.log") as a, \
            EmbeddedServer(tiny_repo, free_serve_settings(), tmp_path / "b.log") as b:
        target = f"grpc://ipv4:127.0.0.1:{a.settings.grpc_port},127.0.0.1:{b.settings.grpc_port}"
        with RankerClient(target, load_balancing="round_robin", refresh_s=0.5) as client:
            for i in range(20):
                assert len(client.rank("oak table", texts)) == len(texts)
                if i == 10:
                    time.sleep(0.6)  # the next call opens a new channel
        assert served(a) >= 5 and served(b) >= 5 and served(a) + served(b) == 20
    with pytest.raises(ValueError, match="for gRPC"):
        RankerClient("http://127.0.0.1:1", load_balancing="round_robin", check_api=False)
