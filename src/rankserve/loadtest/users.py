"""Locust users over the Python SDK; each request fires a Locust request event.

The scenario (what to send) is :class:`~rankserve.loadtest.workload.Workload`; the transport is
the user class. Settings come from ``RANKSERVE_LOADTEST_*`` environment variables (set by
``rankserve loadtest``) so the same file works with plain ``locust -f loadtest/locustfile.py``.
"""

from __future__ import annotations

import os
import random
import time

import gevent
from locust import User, between, events, task

from rankserve.loadtest.timeline import TimelineWriter
from rankserve.loadtest.workload import Workload, check_response
from rankserve.settings import LoadTestSettings

_workload: Workload | None = None


def _settings() -> LoadTestSettings:
    """The scenario from ``RANKSERVE_LOADTEST_*`` (what ``rankserve loadtest`` sets); the settings'
    own defaults for anything unset."""
    env, d = os.environ, LoadTestSettings()
    return LoadTestSettings(
        model=env.get("RANKSERVE_LOADTEST_MODEL", d.model),
        candidates_mean=float(env.get("RANKSERVE_LOADTEST_CANDIDATES_MEAN", d.candidates_mean)),
        candidates_max=int(env.get("RANKSERVE_LOADTEST_CANDIDATES_MAX", d.candidates_max)),
        candidates_sigma=float(env.get("RANKSERVE_LOADTEST_CANDIDATES_SIGMA", d.candidates_sigma)),
        retries=int(env.get("RANKSERVE_LOADTEST_RETRIES", d.retries)),
        retry_backoff_s=float(env.get("RANKSERVE_LOADTEST_RETRY_BACKOFF", d.retry_backoff_s)),
        scenario=env.get("RANKSERVE_LOADTEST_SCENARIO", d.scenario),
        zipf_s=float(env.get("RANKSERVE_LOADTEST_ZIPF_S", d.zipf_s)),
        seed=int(env.get("RANKSERVE_LOADTEST_SEED", d.seed)),
    )


_timeline: TimelineWriter | None = None


def timeline() -> TimelineWriter | None:
    """The per-request timeline of this Locust process, when ``RANKSERVE_LOADTEST_TIMELINE`` names a folder."""
    global _timeline
    if _timeline is None and os.environ.get("RANKSERVE_LOADTEST_TIMELINE"):
        _timeline = TimelineWriter(os.environ["RANKSERVE_LOADTEST_TIMELINE"])
    return _timeline


def poisson_throughput(rate: float):
    """A Locust ``wait_time``: each user starts requests at the times of a Poisson process of
    ``rate`` per second (exponential gaps between scheduled starts, kept even when a response comes
    late), so the users together send an open-loop Poisson stream. Locust's ``constant_throughput``
    paces users by the clock, and its users drift into step, sending bursts that queue behind each
    other: measured here at 2 requests/s of 83 pairs, p50 140 ms against 71 ms for a lone request."""

    def wait_time(user) -> float:
        now = time.monotonic()
        due = max(getattr(user, "_rankserve_due", now), now - 1.0)  # a user that fell far behind does not burst
        user._rankserve_due = due + random.expovariate(rate)
        return max(0.0, user._rankserve_due - now)

    return wait_time


def _rate_per_user() -> float:
    """Requests per second each user aims at (``RANKSERVE_LOADTEST_RATE_PER_USER``; 0: closed loop)."""
    return float(os.environ.get("RANKSERVE_LOADTEST_RATE_PER_USER", 0))


def _wait_time():
    """Back to back (closed loop), or Poisson arrivals at :func:`_rate_per_user` per user."""
    rate = _rate_per_user()
    return poisson_throughput(rate) if rate > 0 else between(0.0, 0.05)


def workload() -> Workload:
    global _workload
    if _workload is None:
        _workload = Workload.default(_settings(), seed=os.getpid())
    return _workload


class _RankerUser(User):
    abstract = True
    protocol = "http"
    wait_time = _wait_time()

    def on_start(self) -> None:
        from rankserve_client import RankerClient

        rate = _rate_per_user()
        if rate > 0:  # a Poisson user's first request comes after an exponential gap too, not all at once at spawn
            gevent.sleep(random.expovariate(rate))

        host = self.host or ("http://127.0.0.1:8000" if self.protocol == "http" else "grpc://127.0.0.1:8001")
        settings = _settings()
        self.model = settings.model
        self.retries = 0
        self.client = RankerClient(host, self.protocol if "://" not in host else None, model=self.model, timeout=30,
                                   retries=settings.retries, backoff=settings.retry_backoff_s, on_retry=self._count_retry)

    def _count_retry(self, error, attempt, delay) -> None:
        self.retries += 1

    def on_stop(self) -> None:
        self.client.close()

    @task
    def rank(self) -> None:
        query, texts = workload().next_request()
        wall, start = time.time(), time.perf_counter()
        exception = None
        self.retries = 0
        try:
            check_response(texts, self.client.rank(query, texts))
        except Exception as exc:  # noqa: BLE001 - reported to Locust as a failure
            exception = exc
        latency_ms = 1000 * (time.perf_counter() - start)
        # a failure gets its own name, so that Locust's row for the model holds the successes alone (their
        # latency and rate; a refused request answers in 1 ms) and the failures are counted once, in theirs
        name = self.model if exception is None else f"{self.model} (failed)"
        events.request.fire(request_type=self.protocol, name=name, response_time=latency_ms,
                            response_length=len(texts), exception=exception, context={"retries": self.retries})
        if timeline() is not None:
            timeline().write(wall, latency_ms, exception is None, self.retries, len(texts),
                             "" if exception is None else f"{type(exception).__name__}: {exception}")


class RankerHttpUser(_RankerUser):
    protocol = "http"


class RankerGrpcUser(_RankerUser):
    protocol = "grpc"

    def on_start(self) -> None:
        import grpc.experimental.gevent as grpc_gevent

        grpc_gevent.init_gevent()  # gRPC's own threads must cooperate with Locust's gevent loop
        super().on_start()
