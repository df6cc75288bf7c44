"""The rank stage's deadline scheduling, served by the real tritonserver: a short list sent while a
long one is being scored is answered first (under arrival scheduling it waits), scores stay exact,
bad input is refused at once, overload is refused as Triton refuses it, and the server stops."""

import dataclasses
import shutil
import threading
import time

import numpy as np
import pytest
import tritonclient.http as th

from rankserve.builder.configs import parse, to_text
from rankserve_client import Overloaded, RankerClient

from conftest import TINY, free_serve_settings

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def deadline_repo(tiny_ranker, tmp_path_factory):
    from rankserve.builder.repository import build_repository

    out = tmp_path_factory.mktemp("deadline_repository")
    settings = dataclasses.replace(TINY, batching=dataclasses.replace(TINY.batching, scheduling="deadline"))
    build_repository(tiny_ranker, out, settings, log=lambda _m: None)
    return out


def _long_and_short(dataset):
    texts = [p.text for p in dataset.products.values()]
    long = ("solid wood dining table", [(texts[i % len(texts)] + " ") * 4 for i in range(TINY.tokenize.max_candidates)])
    short = ("outdoor welcome rug", texts[:3])
    return long, short


def _finish_order(url: str, long, short, delay_s: float) -> tuple[list[str], dict]:
    """Send the long request, then the short one while the long one is being scored; the order in
    which they finish, and their results."""
    finished, results = [], {}
    lock = threading.Lock()

    def run(name, request):
        with RankerClient(url, retries=0) as client:
            results[name] = client.rank(*request)
        with lock:
            finished.append(name)

    long_thread = threading.Thread(target=run, args=("long", long))
    long_thread.start()
    time.sleep(delay_s)  # the long request is being scored by now
    run("short", short)
    long_thread.join()
    return finished, results


def test_a_short_list_overtakes_a_long_one_only_under_deadline_scheduling(deadline_repo, tiny_repo, tmp_path, dataset,
                                                                        offline_scorer):
    from rankserve.server.embedded import EmbeddedServer

    params = parse(deadline_repo / "rank" / "config.pbtxt").parameters
    assert params["scheduling"].string_value == "deadline" and parse(tiny_repo / "rank" / "config.pbtxt").parameters[
        "scheduling"].string_value == "arrival"
    long, short = _long_and_short(dataset)
    orders = {}
    for name, repo in (("arrival", tiny_repo), ("deadline", deadline_repo)):
        with EmbeddedServer(repo, free_serve_settings(), tmp_path / f"{name}.log") as server:
            with RankerClient(f"http://{server.http_url}") as client:  # how long the long list takes alone
                started = time.perf_counter()
                client.rank(*long)
                alone = time.perf_counter() - started
            assert alone > 0.25, f"the long request takes {alone:.2f} s alone: too short to send the other one meanwhile"
            orders[name], results = _finish_order(f"http://{server.http_url}", long, short, alone / 3)
            for query, candidates in (long, short):
                key = "long" if candidates is long[1] else "short"
                got = np.array([s for _, s in sorted((r.id, r.score) for r in results[key])])
                assert np.max(np.abs(got - offline_scorer(query, candidates))) <= 1e-4
    assert orders == {"arrival": ["long", "short"], "deadline": ["short", "long"]}


def test_deadline_stage_refuses_bad_input_at_once_overload_as_triton_does_and_keeps_serving(deadline_repo, tmp_path, dataset):
    from rankserve.server.embedded import EmbeddedServer

    repo = tmp_path / "repo"
    shutil.copytree(deadline_repo, repo)
    config = parse(repo / "rank" / "config.pbtxt")
    config.parameters["max_queue_size"].string_value = "4"  # the stage's own bound (the warmup sends 4 requests)
    (repo / "rank" / "config.pbtxt").write_text(to_text(config))
    with EmbeddedServer(repo, free_serve_settings(), tmp_path / "tritonserver.log") as server:
        http = th.InferenceServerClient(server.http_url)
        ids = np.array([[101, -7, 102, 0]], dtype=np.int64)  # a negative token id
        inputs = []
        for name, value in (("input_ids", ids), ("attention_mask", np.array([[1, 1, 1, 0]], dtype=np.int64)),
                            ("token_type_ids", np.zeros_like(ids))):
            tensor = th.InferInput(name, list(value.shape), "INT64")
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        with pytest.raises(th.InferenceServerException) as refused:  # straight to the stage: refused before queueing
            http.infer("rank", inputs)
        assert refused.value.status() == "400"

        long, short = _long_and_short(dataset)
        outcomes = []
        lock = threading.Lock()

        def call():
            with RankerClient(f"http://{server.http_url}", retries=0) as client:
                try:
                    client.rank(*long)
                    outcome = "ok"
                except Overloaded:
                    outcome = "overloaded"
            with lock:
                outcomes.append(outcome)

        threads = [threading.Thread(target=call) for _ in range(14)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert "overloaded" in outcomes and "ok" in outcomes, outcomes
        with RankerClient(f"http://{server.http_url}") as client:
            assert len(client.rank(*short)) == 3
