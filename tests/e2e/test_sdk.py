"""The Python SDK (rankserve_client) against the real tritonserver: sync and asyncio, HTTP and gRPC."""

import asyncio
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
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


def _connections_to(port: int) -> int:
    import psutil

    return sum(1 for conn in psutil.Process().net_connections(kind="tcp")
               if conn.raddr and conn.raddr.port == port and conn.status == psutil.CONN_ESTABLISHED)


def test_http_connections_stay_bounded_across_timeouts_and_short_lived_threads(server):
    """One HTTP connection per live thread, whatever the calls' timeouts; the connections of threads
    that ended are closed (before: one client per thread per timeout, all kept until close():
    1,000 timeouts and 200 short-lived threads left 1,200 open)."""
    port = int(server.http_url.rsplit(":", 1)[1])
    client = RankerClient(f"http://{server.http_url}", check_api=False)
    for i in range(1000):
        client.rank("oak table", ["Oak Dining Table"], timeout=5 + i / 1000)
    assert _connections_to(port) == 1

    errors = []

    def short_lived(n):
        try:
            client.rank("oak table", ["Oak Dining Table"], timeout=7 + n / 1000)
        except Exception as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    for wave in range(10):  # 200 threads, 20 at a time
        threads = [threading.Thread(target=short_lived, args=(wave * 20 + k,)) for k in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert _connections_to(port) <= 21  # this wave's 20 and ours (earlier waves' are closed when a new thread connects)
    assert errors == []
    time.sleep(1.1)
    client.rank("oak table", ["Oak Dining Table"], timeout=1.5)  # a later call sweeps the connections of ended threads
    assert _connections_to(port) == 1
    with pytest.raises(Timeout):  # the per-call timeout still applies on the kept connection ...
        client.rank("oak table", ["Oak Dining Table"] * 1000, timeout=0.005)
    assert len(client.rank("oak table", ["Oak Dining Table"] * 3, timeout=10)) == 3  # ... and so does the next one's
    client.close()
    assert _connections_to(port) == 0


def test_async_client_sends_a_long_list_a_few_chunks_at_a_time_in_order(server, catalog):
    items = catalog[:300]
    with RankerClient(f"http://{server.http_url}") as sync:
        expected = sync.rank("leather chairs", items, top_k=30)

    async def run():
        async with AsyncRankerClient(f"http://{server.http_url}", chunk_size=25) as client:  # 12 chunks
            running = most = 0
            infer = client._client.infer

            async def counted(*args, **kwargs):
                nonlocal running, most
                running += 1
                most = max(most, running)
                try:
                    return await infer(*args, **kwargs)
                finally:
                    running -= 1

            client._client.infer = counted
            return await client.rank("leather chairs", items, top_k=30), most

    got, most = asyncio.run(run())
    assert most == 4  # the default chunk_concurrency (before: all 12 at once)
    assert [r.id for r in got] == [r.id for r in expected]


def test_a_real_overload_the_retry_budget_stops_the_retry_storm(tiny_repo, tmp_path, dataset):
    """A rank queue of 1 and 12 threads sharing one client with the README's restart advice
    (retries=12, backoff=0.2): the server tokenizes every attempt, and counts them. Shed calls are
    retried at most overload_retries times and only while the budget lasts, so attempts stay close to
    calls (before: each Overloaded was retried up to 12 times)."""
    import re
    import urllib.request

    from conftest import free_serve_settings
    from rankserve.builder.configs import parse, to_text
    from rankserve.server.embedded import EmbeddedServer
    from rankserve_client import Overloaded

    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo)
    config = parse(repo / "rank" / "config.pbtxt")
    config.dynamic_batching.max_queue_delay_microseconds = 300_000
    config.dynamic_batching.default_queue_policy.max_queue_size = 1
    (repo / "rank" / "config.pbtxt").write_text(to_text(config))
    texts = [p.text for p in dataset.products.values()][:5]

    def tokenized(server) -> float:  # every attempt that reached the server went through the tokenize stage
        text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
        return float(re.search(r'^nv_inference_request_success\{model="tokenize",version="1"\} (\S+)$', text, re.M).group(1))

    retried: list = []
    outcomes: list[str] = []
    with EmbeddedServer(repo, free_serve_settings(), tmp_path / "tritonserver.log") as server:
        before = tokenized(server)
        with RankerClient(f"http://{server.http_url}", retries=12, backoff=0.2, check_api=False,
                          on_retry=lambda error, attempt, delay: retried.append(type(error).__name__)) as client:

            def calls(_):
                for _ in range(3):
                    try:
                        client.rank("oak table", texts)
                        outcomes.append("ok")
                    except Overloaded:
                        outcomes.append("overloaded")

            with ThreadPoolExecutor(12) as pool:
                list(pool.map(calls, range(12)))
            time.sleep(0.5)  # Triton's counters land after the responses
            attempts = tokenized(server) - before
            assert len(client.rank("oak table", texts)) == len(texts)  # still serving
    served = outcomes.count("ok")
    print(f"\n{len(outcomes)} calls: {served} served, {outcomes.count('overloaded')} overloaded; {attempts:.0f} attempts "
          f"({attempts / len(outcomes):.2f} per call), {len(retried)} retries, budget {getattr(client, 'retry_budget', None)}")
    assert len(outcomes) == 36 and outcomes.count("overloaded") > 0 and served > 0
    assert set(retried) <= {"Overloaded"}
    assert attempts == len(outcomes) + len(retried)  # every retry reached the server and was tokenized
    assert len(retried) <= 4 + served * 0.1 + 1  # the budget: half of 10 tokens, then one per ten successes
