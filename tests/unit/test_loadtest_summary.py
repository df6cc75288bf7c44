"""The summary of a load run: from Locust's stats CSV (also one in which no request completed) and
from the per-request timeline; successes and failures apart; the verdict; where summaries go."""

import json
import math

import pytest

from rankserve.errors import RankserveError
from rankserve.loadtest.run import (add_timeline, format_summary, protocol_of, summarize, summary_path, timeline_figures,
                                    verdict)
from rankserve.loadtest.timeline import TimelineWriter, read_timeline
from rankserve.settings import LoadTestSettings

HEADER = ("Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,"
          "Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%")


def test_a_run_in_which_nothing_completed_is_a_broken_slo_not_a_crash(tmp_path):
    csv = tmp_path / "locust_stats.csv"
    csv.write_text(HEADER + "\n,Aggregated,0,0,0,0,0,0,0,0.0,0.0,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A\n")
    summary = summarize(csv, LoadTestSettings(), {})
    assert summary["requests"] == 0 and math.isnan(summary["p95_ms"]) and math.isnan(summary["p99_over_p50"])
    assert not summary["slo"]["passed"]


def _stats(tmp_path, *rows):
    csv = tmp_path / "locust_stats.csv"
    csv.write_text(HEADER + "\n" + "\n".join(rows) + "\n")
    return csv


# 8 successes under the model's name, 621 failures under their own (what users.py reports), from a
# real 97%-failing run against a repository that refuses lists of more than 12 candidates
OK_ROW = "http,ranker,8,0,11,12.0,6.7,26.6,10.5,0.89,0.0,11,12,13,14,20,27,27,27,27,27,27"
FAILED_ROW = "http,ranker (failed),621,621,2,2.1,0.7,37.6,60.9,69.11,69.11,2,2,2,2,3,3,5,9,37,37,37"
AGG_ROW = ",Aggregated,629,621,2,2.25,0.7,37.6,60.2,70.0,69.11,2,2,2,2,3,3,5,9,37,37,37"


def test_a_mostly_failing_run_has_the_throughput_and_latency_of_its_successes_only(tmp_path):
    summary = summarize(_stats(tmp_path, OK_ROW, FAILED_ROW, AGG_ROW), LoadTestSettings(), {})
    assert (summary["requests"], summary["successes"], summary["failures"]) == (629, 8, 621)
    assert summary["requests_per_s"] == pytest.approx(0.89) and summary["pairs_per_s"] == pytest.approx(0.89 * 10.5)
    assert (summary["p50_ms"], summary["p95_ms"]) == (11.0, 27.0)  # not the refusals' 2 ms
    assert not summary["slo"]["passed"]
    assert any("621 of 629 requests failed" in v for v in summary["slo"]["violations"])
    assert any("8 successful requests < 10" in v for v in summary["slo"]["violations"])


def test_a_csv_that_mixes_failures_into_one_row_gives_no_latency_of_the_successes(tmp_path):
    mixed = "http,ranker,629,621,2,2.25,0.7,37.6,60.2,70.0,69.11,2,2,2,2,3,3,5,9,37,37,37"
    summary = summarize(_stats(tmp_path, mixed, AGG_ROW), LoadTestSettings(slo_max_failure_ratio=1.0, slo_min_successes=1), {})
    assert summary["requests_per_s"] == pytest.approx(70.0 - 69.11) and math.isnan(summary["p95_ms"])
    assert "share a row" in summary["latency_note"]
    assert any("p95 of the successful requests unknown" in v for v in summary["slo"]["violations"])


def test_na_anywhere_in_the_csv_is_not_a_crash(tmp_path):
    row = "http,ranker,3,0,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A"
    summary = summarize(_stats(tmp_path, row, ",Aggregated,3,0,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A"),
                        LoadTestSettings(), {})
    assert summary["requests"] == 3 and math.isnan(summary["requests_per_s"]) and not summary["slo"]["passed"]


def test_the_error_budget_and_the_fewest_successes_decide_the_verdict():
    base = {"requests": 1000, "failures": 10, "successes": 990, "p95_ms": 100.0, "p99_over_p50": 2.0}
    assert verdict(dict(base), LoadTestSettings(slo_max_failure_ratio=0.01))["slo"]["passed"]
    failed = verdict(dict(base), LoadTestSettings(slo_max_failure_ratio=0.005))["slo"]
    assert not failed["passed"] and failed["violations"] == ["10 of 1000 requests failed (1.00%) > error budget 0.50%"]
    few = {"requests": 5, "failures": 0, "successes": 5, "p95_ms": 100.0, "p99_over_p50": 2.0}
    assert verdict(dict(few), LoadTestSettings())["slo"]["violations"] == [
        "5 successful requests < 10: too few to judge latency and throughput"]
    assert verdict(dict(few), LoadTestSettings(slo_min_successes=5))["slo"]["passed"]
    assert not verdict({**base, "partial": "interrupted (SIGINT)"}, LoadTestSettings(slo_max_failure_ratio=0.01))["slo"]["passed"]


def test_timeline_figures_count_failures_once_and_rate_only_successes(tmp_path):
    writer = TimelineWriter(tmp_path)
    for i in range(100):  # 10 s, 100 requests, 96 refused at once
        writer.write(100.0 + i / 10, 50.0 if i % 33 == 0 else 1.0, i % 33 == 0, 0, 20, "" if i % 33 == 0 else "BadRequest: too many")
    writer.close()
    t = read_timeline(tmp_path)
    f = timeline_figures(t, {"requests": 90, "failures": 88})
    assert (f["requests"], f["successes"], f["failures"]) == (100, 4, 96)
    span = 9.9 + 0.05  # first start to last answer (the last request succeeded, 50 ms)
    assert f["requests_per_s"] == pytest.approx(4 / span) and f["pairs_per_s"] == pytest.approx(80 / span)
    assert f["p50_ms"] == 50.0 and f["errors"] == [{"error": "BadRequest: too many", "count": 96}]
    assert f["locust_csv"] == {"requests": 90, "failures": 88}
    text = format_summary({**f, "settings": {"window_s": 60}, "triton_steps": {},
                           "slo": verdict(dict(f), LoadTestSettings())["slo"]})
    assert "requests 100: 4 succeeded, 96 failed (96.0%)" in text and "throughput (successful requests only): 0.4 req/s" in text
    assert "96 x BadRequest: too many" in text and "FAIL" in text


def test_loadtest_summary_never_overwrites_a_runs_summary(tmp_path):
    csv = _stats(tmp_path, OK_ROW, AGG_ROW)
    assert summary_path(csv) == (tmp_path / "summary.json", None)  # a distributed master's folder: no run summary
    (tmp_path / "summary.json").write_text(json.dumps({"figures_from": "timeline", "triton_steps": {"rank": {}}}))
    assert summary_path(csv) == (tmp_path / "summary-from-csv.json", tmp_path / "summary.json")
    assert summary_path(csv, tmp_path / "x.json") == (tmp_path / "x.json", None)
    with pytest.raises(RankserveError, match="not overwriting"):
        summary_path(csv, tmp_path / "summary.json")


def test_the_transport_follows_the_url_scheme():
    assert protocol_of("grpc://h:8001") == ("grpc://h:8001", "grpc")
    assert protocol_of("https://h/") == ("https://h", "http")
    assert protocol_of("h:8001", "grpc") == ("grpc://h:8001", "grpc") and protocol_of("h:8000") == ("http://h:8000", "http")
    with pytest.raises(ValueError, match="contradicts"):
        protocol_of("grpc://h:8001", "http")


def test_a_run_stopped_after_2_of_30_s_gets_windows_of_the_part_that_ran(tmp_path):
    writer = TimelineWriter(tmp_path / "timeline")
    for i in range(20):
        writer.write(100.0 + i / 10, 5.0, True, 0, 5)
    writer.close()
    base = {"requests": 0, "failures": 0, "p95_ms": float("nan"), "p99_over_p50": float("nan"), "settings": {"window_s": 60},
            "triton_steps": {}, "partial": "interrupted (SIGINT), after 2 of 30 s"}
    s = add_timeline(base, LoadTestSettings(duration_s=30), tmp_path / "timeline", origin=100.0, ran_s=2.0)
    assert s["window_s"] == 1 and [w["requests"] for w in s["windows"]] == [10, 10] and s["successes"] == 20
    assert s["slo"]["violations"] == ["partial run: interrupted (SIGINT), after 2 of 30 s"]
    empty = verdict({"requests": 0, "failures": 0, "p95_ms": float("nan"), "p99_over_p50": float("nan")}, LoadTestSettings())
    assert empty["slo"]["violations"] == ["no request completed"]
