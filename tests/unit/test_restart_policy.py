"""The supervisor's restart policy: a crash loop at start spends the budget and gives up; a server
that had taken requests and then broke (a request may have crashed it) restarts with backoff
without spending it, so a client cannot take the service down for good."""

import pytest

from rankserve.errors import ConfigError
from rankserve.server.supervisor import RequestCounter, RestartPolicy, requests_taken
from rankserve.settings import ServeSettings


def test_a_crash_loop_at_start_spends_the_budget_and_gives_up():
    policy = RestartPolicy(max_restarts=2, window_s=600, backoff_s=1, backoff_max_s=30)
    assert policy.after_failure(0, served=False, up_s=0.5) == 1
    assert policy.after_failure(5, served=False, up_s=0.5) == 2
    assert policy.after_failure(10, served=False, up_s=0.5) is None
    assert policy.after_failure(700, served=False, up_s=0.5) is not None  # the window moved on


def test_servers_broken_after_taking_requests_restart_with_backoff_and_never_give_up():
    policy = RestartPolicy(max_restarts=1, window_s=600, backoff_s=1, backoff_max_s=30)
    delays = [policy.after_failure(t, served=True, up_s=2) for t in range(100)]
    assert None not in delays
    assert delays[:7] == [1, 2, 4, 8, 16, 30, 30]  # doubling, capped
    assert policy.after_failure(200, served=True, up_s=30) == 1  # a server that stayed up ends the streak
    assert policy.after_failure(201, served=False, up_s=0) == 2  # the budget is still whole: one restart left
    assert policy.after_failure(202, served=False, up_s=0) is None


def test_no_backoff_when_set_to_zero():
    assert RestartPolicy(1, 600, 0, 0).after_failure(0, served=True, up_s=0) == 0


def test_backoff_settings_are_checked():
    s = ServeSettings()
    assert RestartPolicy.of(s).backoff_s == s.restart_backoff_s == 1.0 and s.restart_backoff_max_s == 30.0
    with pytest.raises(ConfigError):
        ServeSettings(restart_backoff_s=60, restart_backoff_max_s=30)
    with pytest.raises(ConfigError):
        ServeSettings(restart_backoff_s=-1)


METRICS = """# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="rank",version="1"} 4
nv_inference_request_success{model="ranker",version="1"} 2
nv_inference_request_failure{model="ranker",reason="BACKEND",version="1"} 1
nv_inference_pending_request_count{model="tokenize",version="1"} 3
nv_inference_count{model="rank",version="1"} 400
nv_inference_exec_count{model="rank",version="1"} 9
"""


def test_requests_taken_sums_completed_failed_and_queued_requests():
    assert requests_taken(METRICS) == 10
    assert requests_taken("") == 0


def test_a_server_has_served_when_its_count_grew_after_the_first_reading():
    readings = iter([4, None, 4, 5])  # warmup requests already counted at ready; one read failed
    counter = RequestCounter(server=None, read=lambda _s: next(readings))
    counter.read()
    counter.read()
    assert not counter.served and counter.first == 4
    counter.read()
    assert counter.served
    late = iter([None, 7, 7])  # the first reading failed: the next one is the base
    counter = RequestCounter(server=None, read=lambda _s: next(late))
    counter.read()
    counter.read()
    assert not counter.served
