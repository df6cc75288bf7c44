"""The rank stage's deadline scheduling, served by the real tritonserver: a short list sent while a
long one is being scored is answered first (under arrival scheduling it waits), scores stay exact,
bad input is refused at once, overload is refused as Triton refuses it, and the server stops."""

import dataclasses
import re
import shutil
import threading
import time
import urllib.request

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


def _tokenized(metrics_url: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    found = re.search(r'^nv_inference_request_success\{model="tokenize",version="1"\} ([0-9.e+]+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


LONG_REQUESTS = 3


def _finish_order(url: str, metrics_url: str, long, short) -> tuple[list[str], dict, dict]:
    """Send three long requests at once, then the short one once all three have left the tokenize
    stage (Triton's counter): the order in which they finish, their results and their latencies.

    They go together because tokenizing a long list takes longer than scoring it (tiny ranker:
    about 0.11 s against 0.085 s here): sent one after another, each long list is scored before the
    next one reaches the rank stage, and the short one then finds at most one long list ahead of
    it, which made the arrival arm's wait as short as 0.07 s on a noisy machine. Sent together,
    the rank stage holds a queue of long lists when the short one arrives. Long requests ask for
    the top 3 only, so answering them costs nothing after scoring."""
    finished, results, latency = [], {}, {}
    lock = threading.Lock()

    def run(name, request, top_k=None):
        with RankerClient(url, retries=0) as client:
            started = time.perf_counter()
            results[name] = client.rank(*request, top_k=top_k)
            latency[name] = time.perf_counter() - started
        with lock:
            finished.append(name)

    before = _tokenized(metrics_url)
    threads = [threading.Thread(target=run, args=(f"long{k}", long, 3)) for k in range(1, LONG_REQUESTS + 1)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while _tokenized(metrics_url) < before + LONG_REQUESTS and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.01)  # past the rank batcher's 2 ms queue delay
    run("short", short)
    for t in threads:
        t.join()
    return finished, results, latency


def test_a_short_list_overtakes_a_long_one_only_under_deadline_scheduling(deadline_repo, tiny_repo, tmp_path, dataset,
                                                                        offline_scorer):
    from rankserve.server.embedded import EmbeddedServer

    params = parse(deadline_repo / "rank" / "config.pbtxt").parameters
    assert params["scheduling"].string_value == "deadline" and parse(tiny_repo / "rank" / "config.pbtxt").parameters[
        "scheduling"].string_value == "arrival"
    long, short = _long_and_short(dataset)
    orders, short_latency, stage_counters = {}, {}, {}
    for name, repo in (("arrival", tiny_repo), ("deadline", deadline_repo)):
        with EmbeddedServer(repo, free_serve_settings(), tmp_path / f"{name}.log") as server:
            with RankerClient(f"http://{server.http_url}") as client:  # how long the long list takes alone
                started = time.perf_counter()
                client.rank(*long)
                alone = time.perf_counter() - started
            assert alone > 0.2, f"the long request takes {alone:.2f} s alone: too short to send the other one meanwhile"
            orders[name], results, latency = _finish_order(f"http://{server.http_url}", server.metrics_url, long, short)
            short_latency[name] = latency["short"]
            stage_counters[name] = _stage_metrics(server.metrics_url)
            got = np.array([s for _, s in sorted((r.id, r.score) for r in results["short"])])
            assert np.max(np.abs(got - offline_scorer(*short))) <= 1e-4
            reference = offline_scorer(*long)
            for key in (f"long{k}" for k in range(1, LONG_REQUESTS + 1)):  # the top 3: the reference's best
                assert np.max(np.abs(np.array([r.score for r in results[key]]) - np.sort(reference)[::-1][:3])) <= 1e-4
    # under arrival the short request waits for every long list queued ahead of it; under deadline
    # it goes into the next call, ahead of the long lists still queued
    assert orders["arrival"][-1] == "short" and orders["deadline"][-1] != "short", orders
    assert short_latency["arrival"] > 3 * short_latency["deadline"], short_latency
    # Triton sees the scheduled stage's execute() return at once; the stage's own counters see the wait
    metrics = stage_counters["deadline"]
    assert stage_counters["arrival"] == {}  # Triton's queue: Triton's counters
    assert metrics["request_success"] == TINY.warmup.pairs + LONG_REQUESTS + 2 and metrics["request_failure"] == 0, metrics
    assert metrics["queue_duration_us"] > 0 and metrics["compute_duration_us"] > 1e5 * 2, metrics


def _stage_metrics(metrics_url: str) -> dict[str, float]:
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    pattern = r'^rankserve_stage_(\w+)\{model="rank",version="1"\} ([0-9.e+]+)$'
    return {name: float(value) for name, value in re.findall(pattern, text, re.M)}


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

        # Overload: 24 requests of the largest accepted size straight to the stage, released together.
        # Through the ranker they would pass the single tokenize instance one by one, and on a busy
        # machine that trickle can be scored as fast as it arrives (seen in make test: no refusal at all).
        _, short = _long_and_short(dataset)
        pairs, width = TINY.tokenize.max_candidates, TINY.tokenize.max_length
        big = {"input_ids": np.full((pairs, width), 1000, dtype=np.int64), "attention_mask": np.ones((pairs, width), dtype=np.int64),
               "token_type_ids": np.zeros((pairs, width), dtype=np.int64)}
        big["input_ids"][:, 0], big["input_ids"][:, -1] = 101, 102
        outcomes = []
        lock = threading.Lock()
        senders = 24
        together = threading.Barrier(senders)

        def call():
            client = th.InferenceServerClient(server.http_url, network_timeout=120, connection_timeout=120)
            tensors = []
            for name, value in big.items():
                tensors.append(th.InferInput(name, list(value.shape), "INT64"))
                tensors[-1].set_data_from_numpy(value)
            together.wait(timeout=30)
            try:
                client.infer("rank", tensors)
                outcome = "ok"
            except th.InferenceServerException as exc:  # 503 "Exceeds maximum queue size" (the SDKs raise Overloaded)
                overloaded = exc.status() == "503" and "Exceeds maximum queue size" in str(exc)
                # from the stage's own bound, or from Triton's queue in front of it (full while the stage is)
                outcome = ("stage" if "the rank stage holds" in str(exc) else "triton") if overloaded else f"error: {exc}"
            finally:
                client.close()
            with lock:
                outcomes.append(outcome)

        threads = [threading.Thread(target=call) for _ in range(senders)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert "stage" in outcomes and "ok" in outcomes and set(outcomes) <= {"ok", "stage", "triton"}, outcomes
        with RankerClient(f"http://{server.http_url}") as client:
            assert len(client.rank(*short)) == 3
