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


def test_zipf_scenario_follows_zipfs_law_over_the_wands_queries(dataset):
    from rankserve.loadtest.workload import zipf_probabilities

    w = Workload(dataset, LoadTestSettings(scenario="zipf", zipf_s=1.0), seed=3)
    n = len(w.queries)
    draws = np.bincount([w.zipf_query() for _ in range(40_000)], minlength=n)
    by_rank = draws[w.popular] / draws.sum()  # frequency of the k-th most popular query
    expected = zipf_probabilities(n, 1.0)
    assert sorted(w.popular) == list(range(n)) and n > 400  # every WANDS query, each once
    assert by_rank[0] == pytest.approx(expected[0], rel=0.05)  # 1 / H_n: about 15% of the traffic
    assert by_rank[0] / by_rank[1] == pytest.approx(2.0, rel=0.1) and by_rank[0] / by_rank[9] == pytest.approx(10.0, rel=0.2)
    top10, top100 = by_rank[:10].sum(), by_rank[:100].sum()
    assert top10 == pytest.approx(expected[:10].sum(), abs=0.01) and top100 == pytest.approx(expected[:100].sum(), abs=0.01)
    # log-log slope of frequency against rank over the head is -s
    k = np.arange(1, 51)
    assert np.polyfit(np.log(k), np.log(by_rank[:50]), 1)[0] == pytest.approx(-1.0, abs=0.1)
    flat = zipf_probabilities(n, 0.0)
    assert np.allclose(flat, 1 / n)
    steep = Workload(dataset, LoadTestSettings(scenario="zipf", zipf_s=2.0), seed=3)
    assert np.mean([steep.zipf_query() == steep.popular[0] for _ in range(4000)]) == pytest.approx(0.608, abs=0.03)  # 1/zeta(2)


def test_zipf_requests_repeat_exactly_per_query_in_every_process(dataset):
    settings = LoadTestSettings(scenario="zipf", candidates_mean=50, candidates_max=200)
    a, b = Workload(dataset, settings, seed=1), Workload(dataset, settings, seed=99)  # two Locust processes
    assert list(a.popular) == list(b.popular)
    seen: dict[str, list[str]] = {}
    for w in (a, b):
        for _ in range(3000):
            query, texts = w.next_request()
            assert seen.setdefault(query, texts) == texts  # the same query always comes with the same list
    assert len(seen) > 100
    sizes = np.array([len(t) for t in seen.values()])
    assert 40 < sizes.mean() < 60 and sizes.std() > 10 and sizes.max() <= 200  # the usual log-normal sizes
    q = int(a.popular[0])
    assert a.fixed_request(q) == b.fixed_request(q) and a.fixed_request(q, salt=1) != a.fixed_request(q)
    other = Workload(dataset, LoadTestSettings(scenario="zipf", candidates_mean=50, candidates_max=200, seed=6), seed=1)
    assert other.fixed_request(q) != a.fixed_request(q) and list(other.popular) != list(a.popular)  # the seed sets the scenario


def test_random_scenario_stays_the_default_and_zipf_settings_are_validated():
    assert LoadTestSettings().scenario == "random"
    with pytest.raises(ConfigError, match="scenario"):
        LoadTestSettings(scenario="pareto")
    with pytest.raises(ConfigError, match="zipf_s"):
        LoadTestSettings(scenario="zipf", zipf_s=-0.5)
