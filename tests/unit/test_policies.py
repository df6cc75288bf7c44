import numpy as np
import pytest

from rankserve.loadtest.policies import compare, ideal_latency_ms
from rankserve.loadtest.tail import ideal_fifo_latency_ms


def _workload(n=3000, seed=0, load=0.5, speed=200.0):
    rng = np.random.default_rng(seed)
    sizes = np.clip(np.round(rng.lognormal(np.log(100) - 0.18, 0.6, n)), 1, 1000).astype(int)
    starts = np.cumsum(rng.exponential(sizes.mean() / (load * speed), n))
    return starts, sizes, speed


def test_every_policy_does_the_same_work_and_fifo_is_the_tails_reference():
    starts, sizes, speed = _workload()
    np.testing.assert_array_equal(ideal_latency_ms(starts, sizes, speed, "fifo"), ideal_fifo_latency_ms(starts, sizes, speed))
    ends = {p: np.max(starts + ideal_latency_ms(starts, sizes, speed, p) / 1000) for p in ("fifo", "deadline", "srpt")}
    assert ends["deadline"] == pytest.approx(ends["fifo"]) and ends["srpt"] == pytest.approx(ends["fifo"])
    for p in ("deadline", "srpt"):  # nobody finishes faster than alone
        assert np.all(ideal_latency_ms(starts, sizes, speed, p) >= 1000 * sizes / speed - 1e-6)


def test_deadline_trades_the_long_lists_tail_for_the_short_lists_slowdown():
    starts, sizes, speed = _workload(n=20_000)
    rows = {(r["policy"], r["bucket"]): r for r in compare(starts, sizes, speed)}
    assert rows[("deadline", "1-50")]["slowdown_p99"] < rows[("fifo", "1-50")]["slowdown_p99"] / 2
    assert rows[("deadline", "151+")]["p99_ms"] > rows[("fifo", "151+")]["p99_ms"]
    assert rows[("srpt", "1-50")]["slowdown_p99"] <= rows[("deadline", "1-50")]["slowdown_p99"] * 1.2


def test_an_unknown_policy_is_refused():
    with pytest.raises(ValueError):
        ideal_latency_ms(np.array([0.0]), np.array([3]), 10.0, "lifo")
