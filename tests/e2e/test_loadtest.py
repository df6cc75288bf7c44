"""Short Locust runs against the real server: reports written, content checked, SLO verdicts."""

import json
import subprocess
import sys

import pytest

from rankserve.loadtest.run import run_locust
from rankserve.settings import LoadTestSettings

pytestmark = [pytest.mark.triton, pytest.mark.slow]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_headless_run_writes_reports_and_passes_its_slo(server, tmp_path, protocol):
    host = f"http://{server.http_url}" if protocol == "http" else f"grpc://{server.grpc_url}"
    settings = LoadTestSettings(users=2, spawn_rate=2, duration_s=4, protocol=protocol, candidates_mean=30)
    summary = run_locust(host, settings, tmp_path, server.metrics_url)
    assert {"p50_ms", "p95_ms", "p99_ms", "requests_per_s", "pairs_per_s", "failures", "requests"} <= set(summary)
    assert summary["requests"] > 5 and summary["failures"] == 0 and summary["slo"]["passed"]
    assert summary["pairs_per_s"] > summary["requests_per_s"] > 0
    assert 10 < summary["mean_candidates"] < 60
    assert summary["triton_steps"]["rank"]["compute_ms"] > 0 and "queue_ms" in summary["triton_steps"]["tokenize"]
    assert json.loads((tmp_path / "summary.json").read_text())["requests"] == summary["requests"]
    assert (tmp_path / "report.html").stat().st_size > 0 and (tmp_path / "locust_stats.csv").exists()


def test_broken_slo_exits_non_zero(server, tmp_path):
    out = subprocess.run([sys.executable, "-m", "rankserve", "loadtest", "--host", f"http://{server.http_url}",
                          "--users", "1", "--duration", "3", "--candidates-mean", "10", "--slo-p95-ms", "0.01",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "SLO broken: p95" in out.stderr
    assert json.loads((tmp_path / "summary.json").read_text())["slo"]["passed"] is False


def test_summary_from_an_existing_csv(server, tmp_path):
    run_locust(f"http://{server.http_url}", LoadTestSettings(users=1, duration_s=2, candidates_mean=5), tmp_path)
    (tmp_path / "summary.json").unlink()
    out = subprocess.run([sys.executable, "-m", "rankserve", "loadtest-summary", "--csv", str(tmp_path / "locust_stats.csv")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "SLO" in out.stdout and (tmp_path / "summary.json").exists()


def test_paced_runs_at_half_of_saturation_report_saturation_zero_load_and_the_tail_per_list_size(server, tmp_path):
    from dataclasses import replace

    from rankserve.loadtest.run import format_summary, run_locust_at_fraction, verdict

    settings = LoadTestSettings(users=2, spawn_rate=2, duration_s=10, candidates_mean=20, slo_max_tail_ratio=1000,
                                runs=2, slo_max_slowdown_p99=1000)
    summary = run_locust_at_fraction(f"http://{server.http_url}", settings, tmp_path, 0.5, server.metrics_url, log=lambda _m: None)
    saturated = summary["saturation"]["requests_per_s"]
    assert summary["load_fraction"] == 0.5 and summary["settings"]["rate_per_s"] == pytest.approx(saturated / 2)
    assert summary["ideal_fifo_p99_over_p50"] >= 1.0
    assert 0.2 * saturated < summary["requests_per_s"] < 0.8 * saturated  # paced, not back to back
    assert summary["failures"] == 0 and summary["slo"]["passed"] and summary["slo"]["max_slowdown_p99"] == 1000
    assert len(summary["runs"]) == 2 and summary["requests"] == sum(r["requests"] for r in summary["runs"])
    for where in ("saturation", "zero_load", "run1", "run2"):
        assert (tmp_path / where / "summary.json").exists()
    z = summary["zero_load"]
    assert z["requests"] >= 4 and z["slope_ms_per_pair"] > 0
    tail = {r["bucket"]: r for r in summary["tail"]}
    # the timeline and Locust's statistics can differ by the few requests in flight as Locust stops its users
    assert 0.8 * summary["requests"] <= tail["all"]["requests"] <= 1.2 * summary["requests"]
    assert sum(tail[b]["requests"] for b in ("1-50", "51-150", "151+")) == tail["all"]["requests"]
    assert tail["all"]["slowdown_p99"] >= tail["all"]["slowdown_p50"] > 0
    assert tail["all"]["ideal_fifo_p99_ms"] > 0
    assert "tail per list size" in format_summary(summary)
    # the same figures against targets no real server meets: the verdict says which bucket missed what
    strict = verdict(dict(summary), replace(settings, slo_max_slowdown_p99=1.0, slo_tail_vs_ideal=True))
    assert not strict["slo"]["passed"] and any("all candidates: slowdown p99" in v for v in strict["slo"]["violations"])
    assert json.loads((tmp_path / "summary.json").read_text())["saturation"]["requests_per_s"] == saturated


def test_a_server_restart_during_a_run_is_ridden_over_by_sdk_retries_and_reported(tiny_repo, tmp_path):
    """``rankserve serve`` restarts a tritonserver killed mid-run; Locust users with SDK retries see
    no failure, and the summary reports the window in which requests needed retries."""
    import os
    import shutil
    import signal
    import threading
    import time

    from conftest import Serve

    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo)
    serve = Serve(repo, "--health-interval", "0.2")
    try:
        serve.wait_for("SIGTERM stops it")
        settings = LoadTestSettings(users=3, spawn_rate=3, duration_s=16, candidates_mean=20, retries=12,
                                    retry_backoff_s=0.2, window_s=4)
        result: dict = {}
        runner = threading.Thread(target=lambda: result.update(run_locust(serve.url, settings, tmp_path / "run")))
        started = time.time()
        runner.start()
        time.sleep(6)
        killed = time.time()
        os.kill(serve.server_pid(), signal.SIGKILL)
        serve.wait_for("ready again", timeout=60)
        runner.join(timeout=120)
    finally:
        serve.stop()
    assert "tritonserver exited (code -9): restarting tritonserver" in serve.output
    window = result["error_window"]
    assert result["failures"] == 0 and result["slo"]["passed"]  # every request got through
    assert window["retried"] > 0 and window["failed"] == 0
    assert killed - started - 1 < window["first_s"] < window["last_s"] < window["first_s"] + 20  # the restart, bounded
    full = [w for w in result["windows"] if w["full"]]  # 16 s in 4 s windows, then the requests started as it ended
    assert len(full) == 4 and all(w["requests"] > 0 and w["failures"] == 0 for w in full)
    assert sum(w["requests"] for w in result["windows"]) == result["requests"]
    assert (tmp_path / "run" / "timeline.png").stat().st_size > 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["error_window"] == window
