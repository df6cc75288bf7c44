"""The load run's per-request timeline: error window, windows, drift, server memory."""

import math

import numpy as np
import pytest

from rankserve.loadtest.timeline import (TimelineWriter, drift, error_window, read_timeline, resource_growth, rss_bytes,
                                         windows)


def _timeline(tmp_path, rows):
    writer = TimelineWriter(tmp_path)
    for row in rows:
        writer.write(*row)
    writer.close()
    return read_timeline(tmp_path)


def test_rows_come_back_sorted_from_every_process_file(tmp_path):
    _timeline(tmp_path, [(105.0, 10.0, True, 0, 5)])
    (tmp_path / "timeline-1.csv").write_text("start,latency_ms,ok,retries,candidates,error\n100.000,20.0,0,2,5,Unavailable: down\n")
    t = read_timeline(tmp_path)
    assert t["start"].tolist() == [100.0, 105.0] and t["ok"].tolist() == [False, True] and t["retries"].tolist() == [2, 0]


def test_error_window_spans_failed_and_retried_requests(tmp_path):
    t = _timeline(tmp_path, [(100.0, 10, True, 0, 5), (106.0, 2000, True, 3, 5), (107.0, 50, False, 12, 5, "Unavailable: x"),
                             (110.0, 10, True, 0, 5)])
    w = error_window(t, origin=100.0)
    assert (w["failed"], w["retried"], w["retries"]) == (1, 2, 15)
    assert w["first_s"] == pytest.approx(6.0) and w["last_s"] == pytest.approx(8.0) and w["span_s"] == pytest.approx(2.0)
    clean = error_window(_timeline(tmp_path / "b", [(100.0, 10, True, 0, 5)]), 100.0)
    assert clean["first_s"] is None and clean["span_s"] == 0.0


def test_windows_hold_every_request_and_mark_the_partial_last_one(tmp_path):
    rows = [(100.0 + i, 10.0 + i, i != 3, 0, 5) for i in range(25)]  # 25 s of one request per second
    ws = windows(_timeline(tmp_path, rows), origin=100.0, window_s=10, duration_s=25)
    assert [w["requests"] for w in ws] == [10, 10, 5] and [w["failures"] for w in ws] == [1, 0, 0]
    assert [w["full"] for w in ws] == [True, True, False] and [w["successes"] for w in ws] == [9, 10, 5]
    assert ws[1]["p50_ms"] == pytest.approx(np.percentile([10.0 + i for i in range(10, 20)], 50))
    assert drift(100, 120) == pytest.approx(0.2) and math.isnan(drift(0, 5))


def test_resource_growth_compares_medians_of_first_and_last_window():
    samples = [(100.0 + 5 * i, (100 + (i >= 10) * 10) * 2**20, 4 * 2**20) for i in range(20)]  # +10% RSS after 50 s
    g = resource_growth(samples, origin=100.0, window_s=50, duration_s=100)
    assert g["rss_growth"] == pytest.approx(0.10) and g["shm_growth"] == 0.0 and g["samples"] == 20
    assert resource_growth([(100.0, 1, 0), (199.0, 1, 2**20)], 100.0, 50, 100)["shm_growth"] == math.inf
    assert resource_growth(samples, 100.0, 50, 10) is None


def test_rss_of_a_process_group_is_summed_from_proc(tmp_path):
    for pid, pgid, kb in ((10, 10, 1000), (11, 10, 500), (12, 99, 7)):
        d = tmp_path / str(pid)
        d.mkdir()
        (d / "stat").write_text(f"{pid} (x y) S 1 {pgid} {pgid} 0\n")
        (d / "status").write_text(f"Name:\tx\nVmRSS:\t  {kb} kB\n")
    assert rss_bytes(10, tmp_path) == 1500 * 1024
