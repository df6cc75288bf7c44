"""A newcomer's first hour with the load test (issue 18, items 4-6), as a user runs it: the real
`rankserve loadtest` / `loadtest-summary` commands and `make -n`, against the real tritonserver
(the session's tiny server, or one of our own on a tiny repository that refuses lists of more than
12 candidates). Each asserts on what the user sees: exit code, the cause on screen, no traceback,
and the report files."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import TINY, free_serve_settings

ROOT = Path(__file__).resolve().parents[2]


def loadtest(*args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    started = time.time()
    out = subprocess.run([sys.executable, "-m", "rankserve", *args], capture_output=True, text=True, timeout=timeout)
    return out, time.time() - started


def no_traceback(*texts: str) -> None:
    for text in texts:
        assert "Traceback" not in text, text


@pytest.fixture(scope="module")
def repo12(tiny_ranker, tmp_path_factory) -> Path:
    """The tiny ranker built with a 12-candidate limit: the workload's lists (mean 60) are mostly refused."""
    from rankserve.builder.repository import build_repository

    out = tmp_path_factory.mktemp("repo12")
    build_repository(tiny_ranker, out, dataclasses.replace(TINY, tokenize=dataclasses.replace(TINY.tokenize, max_candidates=12)),
                     log=lambda _m: None)
    return out


def test_make_passes_metrics_url_and_lets_the_host_scheme_pick_the_transport():
    out = subprocess.run(["make", "-n", "loadtest", "HOST=grpc://10.0.0.5:8001", "METRICS_URL=http://10.0.0.5:8002/metrics"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--host grpc://10.0.0.5:8001" in out.stdout and "--metrics-url http://10.0.0.5:8002/metrics" in out.stdout
    assert "--protocol" not in out.stdout  # before: --protocol http, whatever the host's scheme


@pytest.mark.triton
def test_a_wrong_host_or_model_fails_in_seconds_with_the_cause_on_screen(server, tmp_path):
    from rankserve.server.embedded import free_port

    out, took = loadtest("loadtest", "--host", f"http://127.0.0.1:{free_port()}", "--duration", "60", "--out", str(tmp_path / "a"))
    assert out.returncode == 2 and took < 20, (took, out.stderr)
    assert "preflight failed, no load sent" in out.stderr and "Connection refused" in out.stderr
    no_traceback(out.stdout, out.stderr)
    out, took = loadtest("loadtest", "--host", f"http://{server.http_url}", "--model", "no_such_model", "--duration", "60",
                         "--out", str(tmp_path / "b"))
    assert out.returncode == 2 and took < 20 and "no_such_model" in out.stderr, (took, out.stderr)
    no_traceback(out.stdout, out.stderr)
    out, _ = loadtest("loadtest", "--host", f"grpc://{server.grpc_url}", "--protocol", "http", "--out", str(tmp_path / "c"))
    assert out.returncode == 2 and "contradicts" in out.stderr


@pytest.mark.triton
def test_a_short_grpc_run_is_labelled_grpc_shows_progress_and_draws_its_timeline(server, tmp_path):
    out, _ = loadtest("loadtest", "--host", f"grpc://{server.grpc_url}", "--metrics-url", server.metrics_url, "--users", "2",
                      "--duration", "4", "--candidates-mean", "10", "--out", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    no_traceback(out.stdout, out.stderr)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["settings"]["protocol"] == "grpc"  # before: "http" (the --protocol default)
    with (tmp_path / "locust_stats.csv").open() as f:
        assert {r["Type"] for r in csv.DictReader(f) if r["Name"] != "Aggregated"} == {"grpc"}
    progress = [line for line in out.stdout.splitlines() if line.startswith("[") and "/4 s]" in line]
    assert len(progress) >= 2 and "req/s ok" in progress[0], out.stdout
    # a run shorter than --window (60 s) is cut into 1 s windows, and its timeline.png is written
    assert summary["window_s"] == 1 and len(summary["windows"]) >= 4
    assert sum(w["requests"] for w in summary["windows"]) == summary["requests"]
    assert (tmp_path / "timeline.png").stat().st_size > 0 and f"{tmp_path}/timeline.png" in out.stdout

    # loadtest-summary on this run's folder: the run's summary.json (Triton's per-step timings) stays
    before = (tmp_path / "summary.json").read_text()
    assert json.loads(before)["triton_steps"]["rank"]["compute_ms"] > 0
    again = subprocess.run([sys.executable, "-m", "rankserve", "loadtest-summary", "--csv", str(tmp_path / "locust_stats.csv")],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "summary.json").read_text() == before
    assert f"wrote {tmp_path / 'summary-from-csv.json'} (kept {tmp_path / 'summary.json'}" in again.stdout
    assert json.loads((tmp_path / "summary-from-csv.json").read_text())["figures_from"] == "locust_csv"


@pytest.mark.triton
def test_ctrl_c_writes_a_partial_summary_and_exits_130(server, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "rankserve", "loadtest", "--host", f"http://{server.http_url}", "--users", "1",
                             "--duration", "60", "--candidates-mean", "10", "--out", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 12  # the first progress line (after 5 s), or as long as that takes
        while not any("req/s ok" in line for line in lines) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    stderr = proc.stderr.read()
    stdout = "".join(lines)
    assert code == 130, stdout + stderr
    no_traceback(stdout, stderr)
    assert any("req/s ok" in line for line in lines), lines
    assert "PARTIAL RUN: interrupted (SIGINT)" in stdout and "partial summary in" in stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["partial"].startswith("interrupted (SIGINT)") and summary["successes"] > 0
    assert not summary["slo"]["passed"]
    assert (tmp_path / "report.html").exists()  # Locust stopped by SIGINT writes its report


@pytest.mark.triton
def test_a_mostly_failing_run_reports_the_successes_throughput_and_fails_its_slo(repo12, tmp_path):
    from rankserve.server.embedded import EmbeddedServer

    with EmbeddedServer(repo12, free_serve_settings(), tmp_path / "triton.log") as srv:
        out, _ = loadtest("loadtest", "--host", f"http://{srv.http_url}", "--users", "2", "--duration", "5",
                          "--candidates-mean", "60", "--out", str(tmp_path / "run"))
    assert out.returncode == 2 and "SLO broken" in out.stderr, out.stdout + out.stderr
    no_traceback(out.stdout, out.stderr)
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    # throughput from the successes: before, the refused requests (answered in ~2 ms) made it ~70 req/s
    assert s["requests_per_s"] * 5 < 0.2 * s["requests"]
    assert s["failures"] > 0.8 * s["requests"] and s["successes"] + s["failures"] == s["requests"]
    assert s["requests_per_s"] * s["span_s"] == pytest.approx(s["successes"], abs=0.5)
    assert s["error_window"]["failed"] == s["failures"] == sum(w["failures"] for w in s["windows"])
    assert any("requests failed" in v and "error budget" in v for v in s["slo"]["violations"])
    assert f"{s['failures']} failed" in out.stdout and "throughput (successful requests only)" in out.stdout
    assert "holds more than 12 values" in out.stdout  # the commonest error, on screen


@pytest.mark.triton
def test_a_run_whose_server_goes_away_stops_early_and_says_why(repo12, tmp_path):
    from rankserve.server.embedded import EmbeddedServer

    with EmbeddedServer(repo12, free_serve_settings(), tmp_path / "triton.log") as srv:
        proc = subprocess.Popen([sys.executable, "-m", "rankserve", "loadtest", "--host", f"http://{srv.http_url}", "--users", "1",
                                 "--duration", "120", "--candidates-mean", "3", "--candidates-sigma", "0",
                                 "--stop-after-failing", "4", "--out", str(tmp_path / "run")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(6)
            srv.stop()
            stopped = time.time()
            stdout, stderr = proc.communicate(timeout=90)
        finally:
            if proc.poll() is None:
                proc.kill()
    took = time.time() - stopped
    assert proc.returncode == 2 and took < 40, (took, stdout, stderr)  # not the 120 s asked for
    no_traceback(stdout, stderr)
    assert "stopping early: every request failed for 4 s" in stdout and "STOPPED EARLY" in stdout
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["stopped_early"].startswith("every request failed for 4 s") and s["successes"] > 0 and s["failures"] > 0
    assert any(v.startswith("stopped early") for v in s["slo"]["violations"])
    assert os.path.exists(tmp_path / "run" / "timeline.png")
