"""The bench baseline's dynamic batcher: pairs of queued requests scored up to 32 at a time in
arrival order, split and grouped across requests, each request answered with its own scores in its
own order; and its PyTorch scorer is the ranker itself."""

import threading
import time

import numpy as np
import pytest

from rankserve.bench.batched_service import DynamicBatcher, TorchScorer, resolve_precision
from rankserve.errors import ConfigError
from rankserve.settings import BaselineSettings


class Recorder:
    """A scorer whose score tells which pair it was: 1000 x the query's number + the text's length."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.calls: list[list[tuple[str, str]]] = []
        self.delay_s = delay_s

    def __call__(self, queries, texts):
        self.calls.append(list(zip(queries, texts)))
        time.sleep(self.delay_s)
        return np.array([1000 * int(q[1:]) + len(t) for q, t in zip(queries, texts)], dtype=np.float32)


def texts_of(lengths):
    return ["x" * n for n in lengths]


def expected(query, texts):
    return np.array([1000 * int(query[1:]) + len(t) for t in texts], dtype=np.float32)


def test_a_70_pair_request_is_split_into_32_32_6_and_answered_in_its_own_order():
    rng = np.random.default_rng(0)
    texts = texts_of(rng.integers(1, 200, size=70))
    score = Recorder()
    batcher = DynamicBatcher(score, max_pairs=32, max_wait_s=0.0)
    try:
        scores = batcher.submit("q7", texts).result(timeout=10)
    finally:
        batcher.close()
    assert [len(c) for c in score.calls] == [32, 32, 6]
    np.testing.assert_array_equal(scores, expected("q7", texts))
    # queued shortest first, so each call pads to a shorter longest pair than arrival order would
    lengths = [len(t) for call in score.calls for _, t in call]
    assert lengths == sorted(lengths)
    assert batcher.stats()["batches"] == 3 and batcher.stats()["pairs"] == 70


def test_two_queued_10_pair_requests_share_one_call():
    score = Recorder()
    batcher = DynamicBatcher(score, max_pairs=32, max_wait_s=0.0, start=False)
    a = batcher.submit("q1", texts_of(range(1, 11)))
    b = batcher.submit("q2", texts_of(range(20, 10, -1)))
    batcher.start()
    try:
        np.testing.assert_array_equal(a.result(timeout=10), expected("q1", texts_of(range(1, 11))))
        np.testing.assert_array_equal(b.result(timeout=10), expected("q2", texts_of(range(20, 10, -1))))
    finally:
        batcher.close()
    assert [len(c) for c in score.calls] == [20]
    assert [q for q, _ in score.calls[0]] == ["q1"] * 10 + ["q2"] * 10  # arrival order across requests
    stats = batcher.stats()
    assert stats["requests"] == 2 and stats["batches"] == 1 and stats["multi_request_batches"] == 1
    assert stats["max_requests_per_batch"] == 2


def test_requests_are_taken_in_arrival_order_and_fill_each_call():
    score = Recorder()
    batcher = DynamicBatcher(score, max_pairs=32, max_wait_s=0.0, start=False)
    futures = [batcher.submit(q, texts_of([5] * n)) for q, n in (("q1", 40), ("q2", 10), ("q3", 30))]
    batcher.start()
    try:
        for f in futures:
            f.result(timeout=10)
    finally:
        batcher.close()
    assert [[q for q, _ in c] for c in score.calls] == [["q1"] * 32, ["q1"] * 8 + ["q2"] * 10 + ["q3"] * 14, ["q3"] * 16]


def test_a_call_that_is_not_full_waits_for_more_pairs_up_to_max_wait():
    score = Recorder()
    batcher = DynamicBatcher(score, max_pairs=32, max_wait_s=2.0)
    try:
        a = batcher.submit("q1", texts_of([3] * 10))
        time.sleep(0.05)
        b = batcher.submit("q2", texts_of([3] * 10))
        a.result(timeout=10), b.result(timeout=10)
        assert [len(c) for c in score.calls] == [20]
        started = time.monotonic()
        batcher.submit("q3", texts_of([3] * 32)).result(timeout=10)  # a full call does not wait
        assert time.monotonic() - started < 1.5
        started = time.monotonic()
        batcher.submit("q4", texts_of([3] * 5)).result(timeout=10)  # a lone short one waits the full 2 s, no more
        assert 1.5 < time.monotonic() - started < 6
    finally:
        batcher.close()


def test_a_failing_call_fails_its_requests_and_the_batcher_goes_on():
    calls = []

    def score(queries, texts):
        calls.append(list(texts))
        if "boom" in texts:
            raise ValueError("the model refused this call")
        return np.zeros(len(texts), dtype=np.float32)

    batcher = DynamicBatcher(score, max_pairs=4, max_wait_s=0.0, sort_by_length=False, start=False)
    bad = batcher.submit("q1", ["boom", "b", "c", "d", "e", "f"])
    good = batcher.submit("q2", ["a"] * 3)
    batcher.start()
    try:
        with pytest.raises(ValueError, match="refused"):
            bad.result(timeout=10)
        np.testing.assert_array_equal(good.result(timeout=10), np.zeros(3))
    finally:
        batcher.close()
    assert calls == [["boom", "b", "c", "d"], ["a"] * 3]  # the failed request's other pairs are not scored
    assert batcher.stats()["failed_batches"] == 1


def test_concurrent_callers_each_get_their_own_scores():
    score = Recorder(delay_s=0.002)
    batcher = DynamicBatcher(score, max_pairs=32, max_wait_s=0.001)
    rng = np.random.default_rng(1)
    work = [(f"q{i}", texts_of(rng.integers(1, 90, size=int(rng.integers(1, 80))))) for i in range(40)]
    errors = []

    def client(items):
        for q, t in items:
            got = batcher.submit(q, t).result(timeout=30)
            if not np.array_equal(got, expected(q, t)):
                errors.append(q)

    threads = [threading.Thread(target=client, args=(work[k::4],)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    assert not errors
    assert all(len(c) <= 32 for c in score.calls)
    assert sum(len(c) for c in score.calls) == sum(len(t) for _, t in work)


def test_closing_fails_queued_requests():
    batcher = DynamicBatcher(Recorder(), start=False)
    pending = batcher.submit("q1", ["a"])
    batcher.close()
    with pytest.raises(RuntimeError, match="shutting down"):
        pending.result(timeout=1)
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit("q1", ["a"])


def test_precision_follows_the_cpus_bf16_units():
    assert resolve_precision("auto", ["avx2", "fma"]) == "fp32"
    assert resolve_precision("auto", ["avx512f", "avx512_bf16"]) == "bf16"
    assert resolve_precision("auto", ["amx_bf16", "amx_tile"]) == "bf16"
    assert resolve_precision("fp32", ["amx_bf16"]) == "fp32"
    assert resolve_precision("bf16", ["avx2"]) == "bf16"


@pytest.mark.parametrize("kwargs", [{"max_pairs": 0}, {"max_wait_ms": -1}, {"max_length": 4}, {"precision": "fp16"},
                                    {"threads": -1}, {"max_candidates": 0}])
def test_baseline_settings_are_validated(kwargs):
    with pytest.raises(ConfigError):
        BaselineSettings(**kwargs)


def test_the_torch_scorer_is_the_ranker_in_fp32(tiny_ranker, offline_scorer):
    from conftest import TINY

    scorer = TorchScorer(str(tiny_ranker), BaselineSettings(precision="fp32", max_length=TINY.tokenize.max_length))
    query = "modern walnut coffee table"
    texts = ["walnut table", "a very long product description " * 20, "lamp", "oak coffee table with drawers"]
    np.testing.assert_allclose(scorer([query] * len(texts), texts), offline_scorer(query, texts), atol=1e-5)
    batcher = DynamicBatcher(scorer, max_pairs=3, max_wait_s=0.0)  # split over calls, re-padded per call
    try:
        np.testing.assert_allclose(batcher.submit(query, texts).result(timeout=30), offline_scorer(query, texts), atol=1e-5)
    finally:
        batcher.close()


def test_the_bench_tells_the_same_model_from_another():
    from rankserve.bench.run import agreement

    rng = np.random.default_rng(3)
    reference = [rng.normal(size=n).tolist() for n in (100, 40, 7)]
    same = [(np.array(r) + 1e-5).tolist() for r in reference]
    close = [(np.array(r) + rng.normal(scale=0.01, size=len(r))).tolist() for r in reference]  # what BF16 does
    other = [rng.normal(size=len(r)).tolist() for r in reference]
    assert agreement(reference, same, tight=True)["passed"]
    assert not agreement(reference, close, tight=True)["passed"]  # FP32 against FP32 must agree to 1e-3
    loose = agreement(reference, close, tight=False)
    assert loose["passed"] and loose["top10_overlap"] >= 0.8 and loose["min_correlation"] > 0.99
    mismatch = agreement(reference, other, tight=False)
    assert not mismatch["passed"] and mismatch["requests"] == 3


def test_the_bf16_path_really_runs_in_bf16_and_still_ranks_like_fp32(tiny_ranker):
    from conftest import TINY

    from rankserve.bench.run import agreement

    fp32 = TorchScorer(str(tiny_ranker), BaselineSettings(precision="fp32", max_length=TINY.tokenize.max_length))
    bf16 = TorchScorer(str(tiny_ranker), BaselineSettings(precision="bf16", max_length=TINY.tokenize.max_length))
    query = "modern walnut coffee table"
    texts = [f"product {i} " + "oak table lamp sofa chair rug"[: (i * 7) % 29] for i in range(40)]
    x, y = fp32([query] * 40, texts), bf16([query] * 40, texts)
    assert bf16.precision == "bf16" and np.abs(x - y).max() > 1e-4  # autocast took effect (emulated without BF16 units)
    assert agreement([x.tolist()], [y.tolist()], tight=False)["passed"]
