"""The summary of a Locust stats CSV, also for a run in which no request completed."""

import math

from rankserve.loadtest.run import summarize
from rankserve.settings import LoadTestSettings

HEADER = ("Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,"
          "Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%")


def test_a_run_in_which_nothing_completed_is_a_broken_slo_not_a_crash(tmp_path):
    csv = tmp_path / "locust_stats.csv"
    csv.write_text(HEADER + "\n,Aggregated,0,0,0,0,0,0,0,0.0,0.0,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A\n")
    summary = summarize(csv, LoadTestSettings(), {})
    assert summary["requests"] == 0 and math.isnan(summary["p95_ms"]) and math.isnan(summary["p99_over_p50"])
    assert not summary["slo"]["passed"]
