import numpy as np
import pytest

from rankserve.loadtest.workload import Workload, check_response
from rankserve.settings import LoadTestSettings
from rankserve_client import RankedItem


def test_sizes_follow_the_configured_mean_and_bounds(dataset):
    w = Workload(dataset, LoadTestSettings(candidates_mean=100, candidates_max=500), seed=1)
    sizes = np.array([w.size() for _ in range(4000)])
    assert 90 < sizes.mean() < 110 and sizes.min() >= 1 and sizes.max() <= 500 and sizes.std() > 30


def test_requests_use_real_queries_and_catalog_texts(dataset):
    w = Workload(dataset, LoadTestSettings(candidates_mean=20, candidates_max=40), seed=2)
    queries = {q.text for q in dataset.queries}
    texts = {p.text for p in dataset.products.values()}
    for _ in range(50):
        q, t = w.next_request()
        assert q in queries and set(t) <= texts and len(set(t)) == len(t) and 1 <= len(t) <= 40


def test_check_response_rejects_wrong_rankings():
    ok = [RankedItem(1, "a", 2.0, 1), RankedItem(0, "b", 1.0, 2)]
    check_response(["b", "a"], ok)
    with pytest.raises(AssertionError, match="expected 3"):
        check_response(["a", "b", "c"], ok)
    with pytest.raises(AssertionError, match="not sorted"):
        check_response(["b", "a"], ok[::-1])
    with pytest.raises(AssertionError, match="duplicate"):
        check_response(["b", "a"], [ok[0], ok[0]])
