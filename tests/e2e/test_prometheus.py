"""The monitoring rules on real metrics: the embedded tritonserver serves the tiny repository under
load (accepted, refused at a full rank queue, bad input), a real Prometheus (Debian's binary)
scrapes it every half second and evaluates deploy/monitoring/rules.yml, and every number the HPA,
the alerts and the dashboard read is checked against Triton's own counters. Then a Python-backend
stub is killed and the server restarted: the stub-health, down and restart alerts go off."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import free_serve_settings
from rankserve.builder.configs import parse, to_text
from rankserve.server.embedded import free_port

pytestmark = pytest.mark.triton

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
PROMETHEUS = shutil.which("prometheus")
SCRAPE_S = 0.5
WINDOW_S = 120  # the rules' [2m]
LABELS = {"namespace": "rankserve", "pod": "rankserve-triton-0"}  # what the operator adds on Kubernetes
QUEUE_BOUND = 2
TEXTS = ["gray sofa with oak legs", "round oak table", "blue rug", "floor lamp", "bed frame"]


class Prometheus:
    """A real Prometheus scraping ``target`` every SCRAPE_S and evaluating the rankserve rules."""

    def __init__(self, directory: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": f"{int(SCRAPE_S * 1000)}ms", "evaluation_interval": f"{int(SCRAPE_S * 1000)}ms"},
            "rule_files": [str(MONITORING / "rules.yml")],
            "scrape_configs": [{"job_name": "rankserve-triton", "static_configs": [{"targets": [target], "labels": LABELS}]}],
        }
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = (directory / "prometheus.log").open("wb")
        self.process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={directory / 'prometheus.yml'}", f"--storage.tsdb.path={directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while not self._ready():
            assert self.process.poll() is None and time.monotonic() < deadline, (directory / "prometheus.log").read_text()[-2000:]
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            return urllib.request.urlopen(f"{self.url}/-/ready", timeout=2).status == 200
        except OSError:
            return False

    def api(self, path: str, **params) -> dict:
        url = f"{self.url}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        body = json.loads(urllib.request.urlopen(url, timeout=10).read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[tuple[dict, float]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return [(r["metric"], float(r["value"][1])) for r in data["result"]]

    def value(self, expr: str) -> float:
        (result,) = self.query(expr)
        return result[1]

    def alerts(self) -> dict[str, list[dict]]:
        alerts: dict[str, list[dict]] = {}
        for a in self.api("alerts")["alerts"]:
            alerts.setdefault(a["labels"]["alertname"], []).append(a)
        return alerts

    def wait_for(self, condition, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while not (result := condition()):
            assert time.monotonic() < deadline, f"timed out waiting for {condition.__doc__ or condition}"
            time.sleep(SCRAPE_S)
        return result

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.log.close()


def triton_counters(metrics_url: str) -> dict[tuple[str, str], float]:
    """Triton's counters by (metric, model), summed over the other labels (failure reasons)."""
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    counters: dict[tuple[str, str], float] = {}
    for name, labels, value in re.findall(r"^(nv_inference_\w+)\{([^}]*)\} (\S+)$", text, re.M):
        model = re.search(r'model="([^"]+)"', labels)
        if model and "quantile" not in labels:
            key = (name, model.group(1))
            counters[key] = counters.get(key, 0.0) + float(value)
    return counters


def summary_quantiles(metrics_url: str, model: str) -> dict[str, float]:
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    pattern = rf'^nv_inference_request_summary_us\{{model="{model}",version="1",quantile="([0-9.]+)"\}} (\S+)$'
    return {q: float(v) for q, v in re.findall(pattern, text, re.M)}


def _repo(tiny_repo: Path, tmp_path: Path) -> Path:
    """The tiny repository with a rank queue of QUEUE_BOUND requests held up to 20 ms to batch:
    bursts queue (a measurable queue time) and overflow (refusals)."""
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo)
    config = parse(repo / "rank" / "config.pbtxt")
    config.dynamic_batching.max_queue_delay_microseconds = 20_000
    config.dynamic_batching.default_queue_policy.max_queue_size = QUEUE_BOUND
    (repo / "rank" / "config.pbtxt").write_text(to_text(config))
    return repo


def _bad_request(http_url: str) -> None:
    """An empty query, sent with Triton's own client (the SDK refuses to send it): tokenize answers 400."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(http_url)
    tensors = []
    for name, value in (("query", np.array([b"  "], dtype=object)), ("texts", np.array([b"oak table"], dtype=object))):
        tensors.append(httpclient.InferInput(name, list(value.shape), "BYTES"))
        tensors[-1].set_data_from_numpy(value)
    with pytest.raises(InferenceServerException, match="'query' is empty"):
        client.infer("ranker", tensors)
    client.close()


def _substituted(metrics_query: str, series: str) -> str:
    """The adapter's metricsQuery as prometheus-adapter fills it in for the HPA's request about
    the pods of one namespace (its template fields, for the pods resource)."""
    matchers = f'namespace="{LABELS["namespace"]}",pod=~"{LABELS["pod"]}"'
    return metrics_query.replace("<<.Series>>", series).replace("<<.LabelMatchers>>", matchers).replace("<<.GroupBy>>", "pod")


def _close(got: float, expected: float, tol: float, what: str) -> None:
    assert expected > 0 or got == expected, (what, got, expected)
    assert abs(got - expected) <= tol * expected, f"{what}: Prometheus {got}, Triton's counters {expected} (tolerance {tol:.1%})"


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed (`make system`: Debian's prometheus)")
def test_the_rules_the_adapter_and_the_dashboard_read_triton_counters_under_load(tiny_repo, tmp_path):
    from rankserve.server.embedded import EmbeddedServer
    from rankserve_client import Overloaded, RankerClient

    repo = _repo(tiny_repo, tmp_path)
    settings = free_serve_settings()
    server = EmbeddedServer(repo, settings, tmp_path / "tritonserver.log")
    prometheus = None
    try:
        server.start().wait_ready()
        (tmp_path / "prometheus").mkdir()
        prometheus = Prometheus(tmp_path / "prometheus", f"{settings.host}:{settings.metrics_port}")
        prometheus.wait_for(lambda: prometheus.query('up{job="rankserve-triton"} == 1'))
        first_scrape = time.monotonic()
        before = triton_counters(server.metrics_url)

        # load: bursts of 8 concurrent requests against a rank queue of 2, and bad input
        outcomes = {"ok": 0, "overloaded": 0, "bad": 0}
        pairs = 0
        latencies = []

        def call(client):
            started = time.perf_counter()
            try:
                client.rank("oak table", TEXTS)
                return "ok"
            except Overloaded as exc:
                assert "maximum queue size" in str(exc)
                return "overloaded"
            finally:
                latencies.append(time.perf_counter() - started)

        with RankerClient(f"http://{server.http_url}", retries=0) as client, ThreadPoolExecutor(8) as pool:
            end = time.monotonic() + 20
            while time.monotonic() < end:
                for outcome in pool.map(lambda _: call(client), range(8)):
                    outcomes[outcome] += 1
                if outcomes["bad"] < 3:
                    _bad_request(server.http_url)
                    outcomes["bad"] += 1
                time.sleep(0.2)
        pairs = outcomes["ok"] * len(TEXTS)
        assert outcomes["ok"] and outcomes["overloaded"], outcomes

        after = prometheus.wait_for(lambda: (c := triton_counters(server.metrics_url))[("nv_inference_request_success", "ranker")]
                                    - before[("nv_inference_request_success", "ranker")] >= outcomes["ok"] and c)
        time.sleep(4 * SCRAPE_S)  # a scrape of the final counters, then a rule evaluation on it
        assert triton_counters(server.metrics_url) == after  # idle: the counters Prometheus holds are these
        span = time.monotonic() - first_scrape
        assert span < WINDOW_S - 10  # the whole run inside the rules' window
        delta = {key: after[key] - before.get(key, 0.0) for key in after}
        d = lambda name, model: delta.get((f"nv_inference_{name}", model), 0.0)  # noqa: E731

        # What Triton counts (measured): each accepted request is one ensemble success; each refused
        # or bad request two ensemble failures and a tokenize success, and nothing at the rank model.
        assert d("request_success", "ranker") == outcomes["ok"]
        assert d("request_failure", "ranker") == 2 * (outcomes["overloaded"] + outcomes["bad"])
        assert d("request_success", "tokenize") == sum(outcomes.values())
        assert d("request_success", "rank") == outcomes["ok"] and d("request_failure", "rank") == 0
        assert d("count", "rank") == pairs

        # rate() over [2m] with samples covering `span`: extrapolated by at most 1.6 scrape intervals
        tol = 1.6 * SCRAPE_S / span + 0.01
        rank_queue_ms = d("queue_duration_us", "rank") / 1000 / d("request_success", "rank")
        expected = {
            "rankserve:rank_queue_ms:mean2m": rank_queue_ms,
            "rankserve:rank_queue_length:mean2m": d("queue_duration_us", "rank") / 1e6 / WINDOW_S,
            "rankserve:rank_compute_ms:mean2m": d("compute_infer_duration_us", "rank") / 1000 / d("request_success", "rank"),
            "rankserve:requests:rate2m": outcomes["ok"] / WINDOW_S,
            "rankserve:failed_requests:rate2m": (outcomes["overloaded"] + outcomes["bad"]) / WINDOW_S,
            "rankserve:refused_requests:rate2m": (outcomes["overloaded"] + outcomes["bad"]) / WINDOW_S,
            "rankserve:refused_requests:ratio2m": (outcomes["overloaded"] + outcomes["bad"]) / sum(outcomes.values()),
            "rankserve:pairs:rate2m": pairs / WINDOW_S,
        }
        recorded = {r["record"] for g in yaml.safe_load((MONITORING / "rules.yml").read_text())["groups"] for r in g["rules"] if "record" in r}
        assert set(expected) == recorded
        got = {}
        for name, value in expected.items():
            ((labels, got[name]),) = prometheus.query(name)
            assert labels.items() >= {**LABELS, "job": "rankserve-triton"}.items()
            _close(got[name], value, tol, name)
        assert rank_queue_ms > 1  # the 20 ms batching delay shows: a real signal, not zero

        # the HPA's numbers exactly as the Prometheus adapter asks for them
        adapter = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "prometheus-adapter.yaml").read_text())["rules"]["custom"]
        for rule in adapter:
            series = re.fullmatch(r"([\w:]+)\{.*", rule["seriesQuery"]).group(1)
            assert prometheus.query(rule["seriesQuery"])  # the adapter discovers the series
            ((labels, value),) = prometheus.query(_substituted(rule["metricsQuery"], series))
            assert labels == {"pod": LABELS["pod"]} and value == pytest.approx(got[series], rel=0.02), rule["name"]["as"]

        # every rule evaluates without error; the alerts on refusals and failures are pending (for: 5m)
        rule_groups = prometheus.api("rules")["groups"]
        assert {r["health"] for g in rule_groups for r in g["rules"]} == {"ok"}, [r for g in rule_groups for r in g["rules"] if r["health"] != "ok"]
        alerts = prometheus.alerts()
        assert [a["state"] for a in alerts["RankserveRequestsRefused"]] == ["pending"]
        assert [a["state"] for a in alerts["RankserveRequestsFailing"]] == ["pending"]
        assert ("RankserveQueueTimeHigh" in alerts) == (rank_queue_ms > 300)
        for quiet in ("RankserveStubFailing", "RankserveRestarting", "RankserveDown"):
            assert quiet not in alerts, alerts[quiet]

        # every dashboard panel's query
        dashboard = json.loads((MONITORING / "grafana" / "dashboards" / "rankserve.json").read_text())
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                results = prometheus.query(target["expr"])
                assert results, (panel["title"], target["expr"])
                title, legend = panel["title"], target["legendFormat"]
                if title.startswith("Queue vs compute"):
                    kind = "queue_duration_us" if legend.endswith("queue") else "compute_infer_duration_us"
                    by_model = {labels["model"]: v for labels, v in results}
                    assert set(by_model) == {"tokenize", "rank", "postprocess"}, by_model
                    for model, v in by_model.items():
                        _close(v, d(kind, model) / 1000 / d("request_success", model), tol, f"{title}: {model} {kind}")
                elif title.startswith("Latency"):  # Triton 2.51 keeps latency summaries for the steps, not the ensemble
                    by_step = {}
                    for labels, v in results:
                        by_step.setdefault(labels["model"], {})[labels["quantile"]] = v
                    assert set(by_step) == {"tokenize", "rank", "postprocess"}, by_step
                    for model, quantiles in by_step.items():
                        scraped = summary_quantiles(server.metrics_url, model)
                        assert quantiles == pytest.approx({q: scraped[q] / 1000 for q in ("0.5", "0.95")}), model  # idle: as scraped
                        assert 0 < quantiles["0.5"] <= quantiles["0.95"] <= max(latencies) * 1000, (model, quantiles)
                elif title.startswith("Replicas"):
                    assert [v for _, v in results] == [1.0]
                else:  # sums or the per-replica recording rules, one replica here
                    (value,) = [v for _, v in results]
                    name = re.search(r"rankserve:[\w:]+", target["expr"]).group(0)
                    assert value == pytest.approx(got[name], rel=0.02), (title, legend)
        print(f"\n{outcomes}, span {span:.1f} s; Triton: rank queue {rank_queue_ms:.2f} ms/request; Prometheus: "
              + ", ".join(f"{k} {v:.4g}" for k, v in got.items()))

        # a dead stub: Triton keeps the model ready and fails its requests in the backend
        from rankserve_client import Unavailable

        for stub in [s for s in server.stubs if s.model == "tokenize"]:  # both instances: every request fails
            os.kill(stub.pid, signal.SIGKILL)
        time.sleep(0.5)
        with RankerClient(f"http://{server.http_url}", retries=0) as client:
            for _ in range(3):
                with pytest.raises(Unavailable, match="not healthy"):
                    client.rank("oak table", TEXTS)
        firing = prometheus.wait_for(lambda: [a for a in prometheus.alerts().get("RankserveStubFailing", []) if a["state"] == "firing"])
        assert [a["labels"]["model"] for a in firing] == ["tokenize"]

        # the server goes away (down, pending for 2m), then comes back: its counters start again
        server.stop()
        prometheus.wait_for(lambda: prometheus.alerts().get("RankserveDown"))
        server = EmbeddedServer(repo, settings, tmp_path / "tritonserver-2.log")  # the same ports
        server.start().wait_ready()
        with RankerClient(f"http://{server.http_url}", retries=0) as client:
            client.rank("oak table", TEXTS)
        restarted = prometheus.wait_for(lambda: prometheus.alerts().get("RankserveRestarting"))
        assert [a["state"] for a in restarted] == ["firing"] and restarted[0]["labels"]["pod"] == LABELS["pod"]
    finally:
        if prometheus is not None:
            prometheus.stop()
        server.stop()
