"""Cross-request batching in the served rank stage, measured with Triton's own counters."""

import re
import shutil
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from rankserve.builder.configs import parse, to_text
from rankserve_client import RankerClient

from conftest import TINY, free_serve_settings

pytestmark = pytest.mark.triton


def _rank_counters(metrics_url: str, since: dict[str, float] | None = None) -> dict[str, float]:
    """The rank model's counters, less ``since`` (Triton counts the model's warmup requests too)."""
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    pattern = r'^nv_inference_(request_success|exec_count|count)\{model="rank",version="1"\} ([0-9.e+]+)$'
    return {name: float(value) - (since or {}).get(name, 0.0) for name, value in re.findall(pattern, text, re.M)}


def test_requests_of_different_lengths_are_scored_in_one_dynamic_batch(tiny_repo, tmp_path, dataset, offline_scorer):
    from rankserve.server.embedded import EmbeddedServer

    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo)
    config = parse(repo / "rank" / "config.pbtxt")
    config.dynamic_batching.max_queue_delay_microseconds = 1_000_000  # hold the first until the others arrive
    (repo / "rank" / "config.pbtxt").write_text(to_text(config))

    texts = [p.text for p in dataset.products.values()]
    queries = [q.text for q in dataset.queries]
    # different list sizes and text lengths: each request is padded to a different token width
    requests = [(queries[i], [t[: 20 + 15 * i] for t in texts[10 * i: 10 * i + 3 + 2 * i]]) for i in range(4)]
    with EmbeddedServer(repo, free_serve_settings(), tmp_path / "tritonserver.log") as server:
        warmup = _rank_counters(server.metrics_url)
        assert warmup["request_success"] == TINY.warmup.pairs  # the warmup ran before the model was ready
        with RankerClient(f"http://{server.http_url}") as client:
            with ThreadPoolExecutor(len(requests)) as pool:
                results = list(pool.map(lambda r: client.rank(*r), requests))
        deadline = time.monotonic() + 10  # statistics land once execute() returns: after the responses went out
        while (counters := _rank_counters(server.metrics_url, warmup)).get("request_success", 0) < len(requests) and time.monotonic() < deadline:
            time.sleep(0.1)

    assert counters["request_success"] == len(requests)
    assert counters["count"] == sum(len(t) for _, t in requests)  # Triton counts pairs: the batch dimension
    assert counters["exec_count"] < len(requests), counters  # at least two requests shared one execution
    for (query, candidates), result in zip(requests, results):
        got = np.array([s for _, s in sorted((r.id, r.score) for r in result)])
        assert np.max(np.abs(got - offline_scorer(query, candidates))) <= 1e-4


def test_a_full_rank_queue_refuses_at_once_as_overloaded_and_the_server_keeps_serving(tiny_repo, tmp_path, dataset):
    from rankserve.server.embedded import EmbeddedServer
    from rankserve_client import Overloaded

    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo)
    config = parse(repo / "rank" / "config.pbtxt")
    config.dynamic_batching.max_queue_delay_microseconds = 800_000  # the first request waits in the queue
    config.dynamic_batching.default_queue_policy.max_queue_size = 1
    (repo / "rank" / "config.pbtxt").write_text(to_text(config))
    texts = [p.text for p in dataset.products.values()][:5]

    def call(client):
        started = time.perf_counter()
        try:
            client.rank("oak table", texts)
            return "ok", time.perf_counter() - started
        except Overloaded as exc:
            assert "maximum queue size" in str(exc)
            return "overloaded", time.perf_counter() - started

    with EmbeddedServer(repo, free_serve_settings(), tmp_path / "tritonserver.log") as server:
        with RankerClient(f"http://{server.http_url}", retries=0) as client:
            with ThreadPoolExecutor(6) as pool:
                outcomes = list(pool.map(lambda _: call(client), range(6)))
            kinds = [k for k, _ in outcomes]
            assert "ok" in kinds and "overloaded" in kinds, outcomes
            assert all(seconds < 0.5 for kind, seconds in outcomes if kind == "overloaded"), outcomes  # refused at once
            assert len(client.rank("oak table", texts)) == len(texts)  # still serving


def test_one_bad_request_in_a_dynamic_batch_fails_alone(tiny_repo, tiny_ranker, tmp_path, dataset, offline_scorer):
    """Tensors sent straight to the rank model (what the ensemble guards against): one request with a
    token id past the vocabulary shares a dynamic batch with good ones; the runtime refuses the
    combined call, and only the bad request gets an error (400), the others their right scores."""
    import tritonclient.http as httpclient
    from transformers import AutoTokenizer
    from tritonclient.utils import InferenceServerException

    from rankserve.server.embedded import EmbeddedServer

    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo)
    config = parse(repo / "rank" / "config.pbtxt")
    config.dynamic_batching.max_queue_delay_microseconds = 1_000_000  # hold the first until the others arrive
    (repo / "rank" / "config.pbtxt").write_text(to_text(config))
    tokenizer = AutoTokenizer.from_pretrained(tiny_ranker)
    texts = [p.text for p in dataset.products.values()]
    requests = [(q.text, texts[5 * i: 5 * i + 3 + i]) for i, q in enumerate(dataset.queries[:4])]
    encoded = [tokenizer([q] * len(t), t, truncation=True, max_length=128, padding=True, return_tensors="np") for q, t in requests]
    bad = 2
    encoded[bad]["input_ids"][1, 1] = len(tokenizer) + 10_000

    def infer(enc):
        inputs = []
        for name in ("input_ids", "attention_mask", "token_type_ids"):
            tensor = httpclient.InferInput(name, list(enc[name].shape), "INT64")
            tensor.set_data_from_numpy(enc[name].astype(np.int64))
            inputs.append(tensor)
        with httpclient.InferenceServerClient(server.http_url) as client:
            try:
                return client.infer("rank", inputs).as_numpy("logits")[:, 0]
            except InferenceServerException as exc:
                return exc

    with EmbeddedServer(repo, free_serve_settings(), tmp_path / "tritonserver.log") as server:
        warmup = _rank_counters(server.metrics_url)
        with ThreadPoolExecutor(len(encoded)) as pool:
            outcomes = list(pool.map(infer, encoded))
        deadline = time.monotonic() + 10
        while (counters := _rank_counters(server.metrics_url, warmup)).get("exec_count", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        with RankerClient(f"http://{server.http_url}") as client:  # still serving
            assert len(client.rank(*requests[0])) == len(requests[0][1])

    assert counters["exec_count"] < len(encoded), counters  # the bad request shared an execution
    error = outcomes[bad]
    assert isinstance(error, InferenceServerException) and str(error.status()) == "400", error
    assert "could not score this request" in error.message() and "Traceback" not in error.message()
    for i, (query, candidates) in enumerate(requests):
        if i != bad:
            assert np.max(np.abs(outcomes[i] - offline_scorer(query, candidates))) <= 1e-4, i
