import numpy as np
import pytest

from rankserve.errors import ConfigError
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


def test_sigma_zero_gives_fixed_lists_and_sigma_sets_the_spread(dataset):
    fixed = Workload(dataset, LoadTestSettings(candidates_mean=100, candidates_sigma=0.0), seed=1)
    assert {fixed.size() for _ in range(50)} == {100}
    wide = Workload(dataset, LoadTestSettings(candidates_mean=100, candidates_sigma=0.6), seed=1)
    sizes = np.array([wide.size() for _ in range(20000)])
    # log-normal: p99 / p50 = exp(2.326 sigma) = 4.0 at sigma 0.6
    assert np.percentile(sizes, 99) / np.percentile(sizes, 50) == pytest.approx(np.exp(2.326 * 0.6), rel=0.1)


def test_paced_settings_follow_littles_law_on_the_saturated_run():
    from rankserve.loadtest.run import paced

    saturated = {"requests_per_s": 14.0, "p99_ms": 600.0}
    at = paced(saturated, LoadTestSettings(users=4), 0.5)
    assert at.rate_per_s == 7.0 and at.users == 17 and at.rate_per_user == pytest.approx(7 / 17)  # ceil(4 * 7 * 0.6)
    assert paced({"requests_per_s": 2.0, "p99_ms": 100.0}, LoadTestSettings(users=4), 0.5).users == 4
    with pytest.raises(ConfigError, match="rate_per_s"):
        LoadTestSettings(rate_per_s=-1)


def test_ideal_fifo_tail_reference():
    from rankserve.loadtest.run import ideal_tail_ratio
    from rankserve.loadtest.workload import draw_sizes

    fixed = np.full(100_000, 100)
    # M/D/1 at half load: waiting alone puts p99 near 4.3 x p50; at a tiny load there is no queue
    assert ideal_tail_ratio(5.0, 1000.0, fixed) == pytest.approx(4.3, rel=0.1)
    assert ideal_tail_ratio(0.01, 1000.0, fixed) == pytest.approx(1.0, abs=0.01)
    spread = draw_sizes(LoadTestSettings(candidates_sigma=0.6), np.random.default_rng(0), 100_000)
    assert ideal_tail_ratio(0.01, 1000.0, spread) == pytest.approx(np.percentile(spread, 99) / np.percentile(spread, 50), rel=0.02)
