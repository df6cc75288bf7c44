"""The tail targets at a paced load: zero-load fit, the ideal FIFO server, per-bucket verdicts."""

from __future__ import annotations

import numpy as np
import pytest

from rankserve.loadtest.tail import (ZeroLoad, bucket_label, fit_zero_load, format_tail, ideal_fifo_latency_ms,
                                     tail_by_bucket, tail_violations)


def test_zero_load_fit_recovers_the_line_despite_slow_outliers():
    rng = np.random.default_rng(0)
    sizes = rng.integers(5, 400, 300)
    lat = 20 + 1.5 * sizes + rng.normal(0, 3, sizes.size)
    lat[:10] += 5000  # a GC pause or a noisy neighbour
    z = fit_zero_load(sizes, lat)
    assert z.intercept_ms == pytest.approx(20, abs=6)
    assert z.slope_ms == pytest.approx(1.5, rel=0.05)
    assert z.requests == 300
    assert z.latency_ms(np.array([100]))[0] == pytest.approx(170, rel=0.05)


def test_zero_load_fit_needs_sizes_that_differ():
    with pytest.raises(ValueError, match="2 or more sizes"):
        fit_zero_load(np.full(10, 50), np.full(10, 80.0))
    with pytest.raises(ValueError):
        fit_zero_load(np.array([1, 2]), np.array([1.0, 2.0]))


def test_ideal_fifo_server_by_hand():
    # 100 pairs/s: each 100-candidate request takes 1 s; the second arrives while the first is served
    starts = np.array([0.0, 0.1, 5.0])
    lat = ideal_fifo_latency_ms(starts, np.array([100, 100, 100]), 100.0)
    assert lat == pytest.approx([1000, 1900, 1000])
    # arrival order, not the order the rows come in, decides who waits
    shuffled = ideal_fifo_latency_ms(starts[[2, 0, 1]], np.array([100, 100, 100]), 100.0)
    assert shuffled == pytest.approx([1000, 1000, 1900])
    # a small request behind a big one waits for it
    small_behind = ideal_fifo_latency_ms(np.array([0.0, 0.01]), np.array([500, 10]), 100.0)
    assert small_behind == pytest.approx([5000, 5090])


def test_tail_by_bucket_slowdown_and_ideal_per_bucket():
    zero = ZeroLoad(intercept_ms=10.0, slope_ms=1.0, requests=50)
    sizes = np.array([10] * 100 + [100] * 100 + [300] * 100)
    alone = zero.latency_ms(sizes)
    latency = alone.copy()
    latency[:100] *= 8  # small lists waited behind big ones: slowdown 8
    ideal = alone * 2
    rows = tail_by_bucket(sizes, latency, ideal, zero)
    by = {r["bucket"]: r for r in rows}
    assert [r["bucket"] for r in rows] == ["1-50", "51-150", "151+", "all"]
    assert by["1-50"]["requests"] == 100 and by["all"]["requests"] == 300
    assert by["1-50"]["slowdown_p99"] == pytest.approx(8)
    assert by["51-150"]["slowdown_p99"] == pytest.approx(1)
    assert by["151+"]["ideal_fifo_p99_ms"] == pytest.approx(2 * 310)
    problems = tail_violations(rows, max_slowdown_p99=5, vs_ideal=True)
    assert any(p.startswith("1-50 candidates: slowdown p99 8.00 > 5") for p in problems)
    assert any(p.startswith("1-50 candidates: p99 160 ms > ideal FIFO p99 40 ms") for p in problems)
    assert not any(p.startswith("51-150") or p.startswith("151+") for p in problems)
    assert tail_violations(rows, max_slowdown_p99=0, vs_ideal=False) == []
    assert len(format_tail(rows)) == 1 + len(rows)


def test_the_tail_is_judged_against_the_ideal_server_of_the_chosen_policy():
    zero = ZeroLoad(intercept_ms=10.0, slope_ms=1.0, requests=50)
    sizes = np.array([10] * 100 + [300] * 100)
    latency = zero.latency_ms(sizes) * 2
    fifo, deadline = latency * 0.5, latency * 1.5  # measured: worse than ideal FIFO, better than ideal deadline
    rows = tail_by_bucket(sizes, latency, fifo, zero, ideal_deadline_ms=deadline)
    assert rows[0]["ideal_deadline_p99_ms"] == pytest.approx(1.5 * rows[0]["p99_ms"])
    assert len(tail_violations(rows, 0, True, reference="fifo")) == 3
    assert tail_violations(rows, 0, True, reference="deadline") == []
    assert "ideal deadline p99 ms" in format_tail(rows)[0]
    without = tail_by_bucket(sizes, latency, fifo, zero)
    assert all("no ideal deadline reference" in p for p in tail_violations(without, 0, True, reference="deadline"))


def test_empty_buckets_are_reported_not_judged():
    zero = ZeroLoad(10.0, 1.0, 10)
    rows = tail_by_bucket(np.array([20, 30]), np.array([300.0, 300.0]), np.array([10.0, 10.0]), zero)
    assert [r["requests"] for r in rows] == [2, 0, 0, 2]
    assert len(tail_violations(rows, 5, True)) == 4  # the 1-50 bucket and "all" both miss both targets
    assert bucket_label(151, 100_000) == "151+"


def test_verdict_applies_the_tail_slos():
    from rankserve.loadtest.run import verdict
    from rankserve.settings import LoadTestSettings

    zero = ZeroLoad(10.0, 1.0, 10)
    base = {"requests": 10, "failures": 0, "p95_ms": 100.0, "p99_over_p50": 2.0}
    settings = LoadTestSettings(slo_tail_vs_ideal=True, slo_max_slowdown_p99=5)
    missing = verdict(dict(base), settings)
    assert not missing["slo"]["passed"] and "need a paced run" in missing["slo"]["violations"][0]
    good = tail_by_bucket(np.array([20, 30]), np.array([35.0, 45.0]), np.array([40.0, 50.0]), zero)
    assert verdict({**base, "tail": good}, settings)["slo"]["passed"]
    bad = tail_by_bucket(np.array([20, 30]), np.array([300.0, 450.0]), np.array([40.0, 50.0]), zero)
    assert not verdict({**base, "tail": bad}, settings)["slo"]["passed"]


def test_settings_validate_the_tail_slos():
    from rankserve.errors import ConfigError
    from rankserve.settings import LoadTestSettings

    with pytest.raises(ConfigError):
        LoadTestSettings(slo_max_slowdown_p99=0.5)
    with pytest.raises(ConfigError):
        LoadTestSettings(runs=0)


def test_zero_load_follows_the_bins_where_per_pair_cost_falls_with_list_size():
    rng = np.random.default_rng(1)
    sizes = rng.integers(5, 300, 400)
    lat = 30 * np.sqrt(sizes)  # concave: bigger lists, cheaper pairs
    z = fit_zero_load(sizes, lat)
    assert len(z.knots) >= 4 and z.to_dict()["knots"]
    inside = np.array([20, 60, 150, 250])
    assert z.latency_ms(inside) == pytest.approx(30 * np.sqrt(inside), rel=0.1)
    line = ZeroLoad(z.intercept_ms, z.slope_ms, z.requests)  # one line misjudges the small lists more
    assert abs(line.latency_ms(np.array([20]))[0] / (30 * np.sqrt(20)) - 1) > 0.15
    # beyond the outer knots: along the line's slope, never below zero
    assert z.latency_ms(np.array([1000]))[0] > z.latency_ms(np.array([290]))[0]
    assert z.latency_ms(np.array([1]))[0] > 0
