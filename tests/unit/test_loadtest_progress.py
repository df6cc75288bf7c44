"""What a load run shows while it runs: timeline rows read as they are written (whole lines only),
progress lines of the successes, and the decision to stop a run in which every request fails."""

from rankserve.loadtest.progress import Row, TimelineTail, failing_since, parse_row, progress_line
from rankserve.loadtest.run import progress_interval
from rankserve.loadtest.timeline import read_timeline, window_length

HEADER = "start,latency_ms,ok,retries,candidates,error\n"


def test_the_tail_reads_new_whole_lines_only(tmp_path):
    path = tmp_path / "timeline-1.csv"
    path.write_text(HEADER + "100.000,10.0,1,0,5,\n101.000,2.0,0,0,7,Unavailable: down\n102.0")
    tail = TimelineTail(tmp_path)
    first = tail.read()
    assert [(r.start, r.ok, r.candidates, r.error) for r in first] == [(100.0, True, 5, ""), (101.0, False, 7, "Unavailable: down")]
    with path.open("a") as f:
        f.write("00,30.0,1,0,9,\n")  # the cut line completed
    assert [(r.start, r.latency_ms) for r in tail.read()] == [(102.0, 30.0)] and tail.read() == []


def test_a_line_cut_short_by_a_stopped_run_is_skipped(tmp_path):
    (tmp_path / "timeline-1.csv").write_text(HEADER + "100.000,10.0,1,0,5,\n101.000,2")
    assert read_timeline(tmp_path)["start"].tolist() == [100.0]
    assert parse_row(["start", "latency_ms", "ok"]) is None and parse_row(["1.0", "2"]) is None


def test_progress_lines_give_the_successes_rate_and_latency_and_the_failures_so_far():
    rows = [Row(100.0 + i, 100.0 + 10 * i, True, 10, "") for i in range(10)] + [Row(105.0, 1.0, False, 50, "BadRequest: too long")]
    line = progress_line(10.2, 60, rows, 5.0, 3, 40)
    assert line.startswith("[  10/60 s] 2.0 req/s ok, 20 pairs/s, p50 145 ms, p95 186 ms; failures 3 of 40")
    assert "(last: BadRequest: too long)" in line
    assert "no successful request in the last 5 s" in progress_line(5, 60, rows[-1:], 5.0, 1, 1)


def test_a_run_is_stopped_when_every_request_failed_for_the_whole_span():
    failed = [Row(100.0 + i, 1.0, False, 5, "Unavailable: refused") for i in range(20)]
    assert failing_since(failed, now=120.0, run_start=95.0, span_s=10)
    assert not failing_since(failed, now=104.0, run_start=95.0, span_s=10)  # the run is younger than the span
    assert not failing_since(failed + [Row(118.0, 5.0, True, 5, "")], now=120.0, run_start=95.0, span_s=10)
    assert not failing_since([], now=120.0, run_start=95.0, span_s=10)  # nothing answered: not proof of failure
    assert not failing_since(failed, now=120.0, run_start=95.0, span_s=0)  # 0: never stop


def test_short_runs_get_short_windows_and_frequent_progress():
    assert window_length(60, 600) == 60 and window_length(60, 8) == 2 and window_length(60, 3) == 1
    assert progress_interval(600) == 5 and progress_interval(8) == 2 and progress_interval(2) == 1
