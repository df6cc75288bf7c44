"""The proxy in front of the real tritonserver follows HTTP/1.1 framing of every kind of answer
Triton sends (rankings, refusals, health, metadata, metrics), so a stop closes each HTTP connection
exactly when its last request has been answered, never by a guess from quiet time."""

import re
import threading
import time
import urllib.request

import pytest
import tritonclient.http as th

from rankserve.server.embedded import EmbeddedServer, free_port
from rankserve.server.proxy import TcpProxy
from rankserve_client import BadRequest, RankerClient

from conftest import TINY, free_serve_settings

pytestmark = pytest.mark.triton


def test_every_http_answer_triton_sends_is_followed_and_a_stop_waits_for_the_one_in_flight(tiny_repo, dataset, tmp_path):
    texts = [p.text for p in dataset.products.values()]
    long = ("solid wood dining table", [(texts[i % len(texts)] + " ") * 4 for i in range(TINY.tokenize.max_candidates)])
    with EmbeddedServer(tiny_repo, free_serve_settings(), tmp_path / "tritonserver.log") as server:
        proxy = TcpProxy("127.0.0.1", {"http": free_port(), "metrics": free_port()}, http2=()).start()
        try:
            proxy.set_backend({"http": ("127.0.0.1", server.settings.http_port),
                               "metrics": ("127.0.0.1", server.settings.metrics_port)})
            url = f"http://127.0.0.1:{proxy.listen['http']}"
            with RankerClient(url, retries=0) as client:  # one keep-alive connection, many kinds of answer
                assert len(client.rank("outdoor rug", texts[:5])) == 5
                with pytest.raises(BadRequest):
                    client.rank("outdoor rug", [])
                assert len(client.rank("outdoor rug", texts[:3], top_k=1)) == 1
            raw = th.InferenceServerClient(url.removeprefix("http://"))
            assert raw.is_server_ready() and raw.is_model_ready("ranker") and raw.get_model_metadata("ranker")
            with pytest.raises(th.InferenceServerException):
                raw.get_model_metadata("no_such_model")  # a 400 with a JSON error body
            scrape = urllib.request.urlopen(f"http://127.0.0.1:{proxy.listen['metrics']}/metrics", timeout=5)
            assert b"nv_inference_request_success" in scrape.read()
            assert proxy.framing()["quiet"] == 0, proxy.framing()  # every open connection followed

            # a stop while a long ranking is in flight: it is answered whole, then its connection closes.
            # The client's connection is open and its API checked first, and the drain starts once the
            # request has reached the server (Triton's tokenize counter), so it cannot be refused at the door.
            result, errors = [], []
            client = RankerClient(url, retries=0)
            client.rank("outdoor rug", texts[:2])
            sent = _tokenized(server.metrics_url)

            def rank_long() -> None:
                try:
                    result.append(client.rank(*long, top_k=3))
                except Exception as exc:  # noqa: BLE001 -- reported below
                    errors.append(exc)

            asker = threading.Thread(target=rank_long)
            asker.start()
            deadline = time.monotonic() + 30
            while _tokenized(server.metrics_url) <= sent and time.monotonic() < deadline:
                time.sleep(0.002)
            assert proxy.framing()["quiet"] == 0
            proxy.stop_listening()
            closed_idle, forced = proxy.drain_all(timeout_s=10)
            asker.join(timeout=30)
            client.close()
            assert not errors and len(result[0]) == 3, errors
            assert forced == 0 and closed_idle >= 1 and proxy.connections() == 0
            raw.close()
        finally:
            proxy.stop()


def _tokenized(metrics_url: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    found = re.search(r'^nv_inference_request_success\{model="tokenize",version="1"\} ([0-9.e+]+)$', text, re.M)
    return float(found.group(1)) if found else 0.0
