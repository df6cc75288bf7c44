"""The monitoring kit without a cluster: Prometheus' own checker and unit tests on the rules and the
scrape config, the Kubernetes objects (PodMonitor, PrometheusRule, dashboard ConfigMap) against the
prometheus-operator CRD schemas, and what the pieces say about each other (rate windows against
scrape intervals, the HPA's metrics against the adapter's rules and the queue bound, the dashboard's
data source). tests/e2e/test_prometheus.py evaluates the same rules on a real server's metrics."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import kustomize, resolved_compose
from rankserve.settings import BatchingSettings

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
K8S = ROOT / "deploy" / "kubernetes"
CRDS = Path(__file__).parent / "prometheus_operator_crds"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (`make system`: Debian's prometheus)")
OVERLAYS = {"cpu": K8S / "overlays" / "cpu", "gpu": K8S / "overlays" / "gpu"}
MIN_SAMPLES_PER_WINDOW = 4
"""rate() needs two samples in its window; with four, a missed or late scrape still leaves three."""


def rules() -> dict:
    return yaml.safe_load((MONITORING / "rules.yml").read_text())


def recording_rules() -> dict[str, str]:
    return {r["record"]: r["expr"] for g in rules()["groups"] for r in g["rules"] if "record" in r}


def dashboard() -> dict:
    return json.loads((MONITORING / "grafana" / "dashboards" / "rankserve.json").read_text())


def panel_queries() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dashboard()["panels"] for t in p["targets"]]


def adapter_rules() -> list[dict]:
    return yaml.safe_load((K8S / "prometheus-adapter.yaml").read_text())["rules"]["custom"]


def seconds(duration: str) -> float:
    """A Prometheus duration (``30s``, ``2m``, ``1h30m``) in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    parts = re.findall(r"(\d+)(ms|s|m|h|d)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(int(n) * units[u] for n, u in parts)


def windows(expr: str) -> list[float]:
    return [seconds(d) for d in re.findall(r"\[(\w+)\]", expr)]


def _find(docs, kind, name=None):
    return next(d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name))


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: kustomize(path) for name, path in OVERLAYS.items()}


@needs_promtool
def test_promtool_accepts_the_rules_and_the_compose_scrape_config():
    out = subprocess.run([PROMTOOL, "check", "rules", str(MONITORING / "rules.yml")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run([PROMTOOL, "check", "config", str(MONITORING / "prometheus.yml")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "1 rule files found" in out.stdout, out.stdout + out.stderr


@needs_promtool
def test_promtool_unit_tests_of_the_rules_pass():
    out = subprocess.run([PROMTOOL, "test", "rules", str(MONITORING / "tests" / "rules_test.yml")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr
    tested = set(re.findall(r"^\s+- alertname: (\w+)", (MONITORING / "tests" / "rules_test.yml").read_text(), re.M))
    assert tested == {r["alert"] for g in rules()["groups"] for r in g["rules"] if "alert" in r}  # every alert has a test
    tested = set(re.findall(r"^\s+- expr: ([\w:]+)$", (MONITORING / "tests" / "rules_test.yml").read_text(), re.M))
    assert tested == set(recording_rules())  # every recording rule too


@needs_promtool
def test_every_dashboard_query_is_valid_promql(tmp_path):
    """promtool parses each panel query (as a recording rule of a scratch file)."""
    scratch = {"groups": [{"name": "dashboard", "rules": [{"record": f"panel:{i}", "expr": e} for i, (_, e) in enumerate(panel_queries())]}]}
    (tmp_path / "panels.yml").write_text(yaml.safe_dump(scratch))
    out = subprocess.run([PROMTOOL, "check", "rules", str(tmp_path / "panels.yml")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_dashboard_shows_each_step_traffic_refusals_failures_and_latency():
    queries = " ".join(e for _, e in panel_queries())
    for needed in ("nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us", "rankserve:pairs:rate2m",
                   "rankserve:requests:rate2m", "rankserve:refused_requests:rate2m", "rankserve:failed_requests:rate2m",
                   'quantile=~"0.5|0.95"', "rankserve:rank_queue_ms:mean2m", "rankserve:rank_queue_length:mean2m"):
        assert needed in queries, needed
    for name in re.findall(r"rankserve:[\w:]+", queries):
        assert name in recording_rules(), name  # the panels read rules that exist
    provisioned = yaml.safe_load((MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = provisioned["datasources"]
    for p in dashboard()["panels"]:
        assert p["datasource"]["uid"] == source["uid"] and all(t["datasource"]["uid"] == source["uid"] for t in p["targets"])
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids))


def test_the_rate_windows_hold_four_scrapes_of_every_shipped_scrape_config(rendered):
    """Defect 1.4: the adapter's [1m] window at the common 1m scrape interval held one sample (no
    rate at all), and the pods were scraped only by annotation, which kube-prometheus-stack ignores."""
    intervals = {"compose": seconds(yaml.safe_load((MONITORING / "prometheus.yml").read_text())["global"]["scrape_interval"])}
    for name, docs in rendered.items():
        (endpoint,) = _find(docs, "PodMonitor")["spec"]["podMetricsEndpoints"]
        intervals[f"PodMonitor ({name})"] = seconds(endpoint["interval"])  # set: not left to a global default
    queries = {**recording_rules(), **{f"alert {r['alert']}": r["expr"] for g in rules()["groups"] for r in g["rules"] if "alert" in r},
               **{f"panel {t}": e for t, e in panel_queries()}, **{f"adapter {r['name']['as']}": r["metricsQuery"] for r in adapter_rules()}}
    for source, interval in intervals.items():
        for name, expr in queries.items():
            for window in windows(expr):
                assert window >= MIN_SAMPLES_PER_WINDOW * interval, (name, window, source, interval)
    assert all(not windows(r["metricsQuery"]) for r in adapter_rules())  # the adapter reads recording rules: one window


def test_a_podmonitor_scrapes_the_triton_pods_metrics_port(rendered):
    compose_metrics = [p for p in resolved_compose("monitoring", TRITON_ADMIN_KEY="k")["services"]["triton"]["ports"] if p["published"] == "8002"]
    for docs in rendered.values():
        monitor = _find(docs, "PodMonitor", "rankserve-triton")
        deployment = _find(docs, "Deployment", "rankserve-triton")
        assert monitor["metadata"]["namespace"] == deployment["metadata"]["namespace"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        (triton,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "triton"]
        (port,) = [p for p in triton["ports"] if p["name"] == endpoint["port"]]
        assert port["containerPort"] == compose_metrics[0]["target"] == 8002 and endpoint["path"] == "/metrics"
        assert "--metrics-config=summary_latencies=true" in triton["args"]  # the dashboard's p50/p95
        assert not any(k.startswith("prometheus.io/") for k in deployment["spec"]["template"]["metadata"].get("annotations", {}))
        assert seconds(endpoint["scrapeTimeout"]) < seconds(endpoint["interval"])


def test_the_prometheusrule_carries_the_rules_file_and_the_dashboard_its_configmap(rendered):
    for docs in rendered.values():
        assert _find(docs, "PrometheusRule", "rankserve")["spec"] == rules()
        (configmap,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("rankserve-grafana-dashboard")]
        assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert json.loads(configmap["data"]["rankserve.json"]) == dashboard()


def _strict(schema):
    """The CRD schema with unknown fields refused (the API server prunes them silently: a typo
    would be dropped, not reported), except where the schema preserves unknown fields."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_strict(v) for v in schema]
    return schema


@pytest.mark.parametrize("kind", ["PodMonitor", "PrometheusRule"])
def test_the_operator_objects_validate_against_the_prometheus_operator_crds(rendered, kind):
    import jsonschema

    crd_file = {"PodMonitor": "monitoring.coreos.com_podmonitors.yaml", "PrometheusRule": "monitoring.coreos.com_prometheusrules.yaml"}[kind]
    crd = yaml.safe_load((CRDS / crd_file).read_text())
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["served"] and v["storage"]]
    # OpenAPI v3 schemas are JSON Schema draft 4 with extensions; not checked as a schema itself:
    # a pattern of the CRD is Go syntax Python's re rejects (`^(?i)...`, a field not used here)
    validator = jsonschema.Draft4Validator(_strict(version["schema"]["openAPIV3Schema"]))
    for docs in rendered.values():
        doc = _find(docs, kind)
        assert doc["apiVersion"] == f"{crd['spec']['group']}/{version['name']}"
        validator.validate(doc)
        assert set(doc["metadata"]) <= {"name", "namespace", "labels", "annotations"}
    broken = json.loads(json.dumps(doc))
    broken["spec"]["typo"] = 1
    with pytest.raises(jsonschema.ValidationError):  # the strict schema does refuse unknown fields
        validator.validate(broken)


def _hpa(docs):
    hpa = _find(docs, "HorizontalPodAutoscaler", "rankserve-triton")
    (metric,) = hpa["spec"]["metrics"]
    return hpa, metric["pods"]["metric"]["name"], metric["pods"]["target"]["averageValue"]


def _quantity(value: str) -> float:
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def test_each_overlay_scales_on_a_target_its_queue_bound_lets_it_reach(rendered):
    """Defect 1.6: the GPU overlay kept the 100 ms measured on CPUs; a GPU replica drains its queue
    of 16 faster than that, so requests are refused before the mean queue time reaches the target."""
    bound = BatchingSettings().max_queue_size
    served = {r["name"]["as"]: r for r in adapter_rules()}
    cpu_hpa, cpu_metric, cpu_target = _hpa(rendered["cpu"])
    gpu_hpa, gpu_metric, gpu_target = _hpa(rendered["gpu"])
    assert (gpu_metric, gpu_target) != (cpu_metric, cpu_target)  # not the CPU-measured target
    assert int(cpu_hpa["metadata"]["annotations"]["rankserve.io/max-queue-size"]) == bound
    # a queue time: the queue holds at most `bound` requests, drained at the saturated rate
    saturated = float(cpu_hpa["metadata"]["annotations"]["rankserve.io/saturation-requests-per-second"])
    assert cpu_metric == "rankserve_rank_queue_ms" and 0 < _quantity(cpu_target) < 1000 * bound / saturated
    assert "rankserve.io/saturation-requests-per-second" not in gpu_hpa["metadata"].get("annotations", {})
    assert gpu_metric == "rankserve_rank_queue_length" and 0 < _quantity(gpu_target) <= bound / 4
    # Little's law on the CPU measurement the GPU target is derived from (hpa-gpu.yaml): 8.0 req/s x 103.5 ms
    assert abs(_quantity(gpu_target) - 8.0 * 0.1035) < 0.05
    for metric in (cpu_metric, gpu_metric):
        rule = served[metric]
        series = re.fullmatch(r"'?([\w:]+)\{.*", rule["seriesQuery"]).group(1)
        assert series in recording_rules() and re.fullmatch(rule["name"]["matches"], series)
        assert "<<.LabelMatchers>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]


def test_the_rank_queue_rules_cover_every_rank_model_and_no_ensemble():
    for name in ("rankserve:rank_queue_ms:mean2m", "rankserve:rank_queue_length:mean2m"):
        pattern = re.search(r'nv_inference_queue_duration_us\{model=~"([^"]+)"\}', recording_rules()[name]).group(1)
        assert all(re.fullmatch(pattern, m) for m in ["rank", "rank_int8", "rank_pruned_int8", "rank_trt_fp16"])
        assert not any(re.fullmatch(pattern, m) for m in ("ranker", "ranker_trt_fp16", "tokenize", "tokenize_gpu", "postprocess"))


def test_compose_runs_prometheus_and_grafana_under_the_monitoring_profile():
    services = resolved_compose("monitoring", TRITON_ADMIN_KEY="k")["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    assert prometheus["profiles"] == ["monitoring"] and grafana["profiles"] == ["monitoring"]
    assert "prometheus" not in resolved_compose("cpu", TRITON_ADMIN_KEY="k")["services"]  # only on request
    mounts = {v["target"]: Path(v["source"]) for s in (prometheus, grafana) for v in s["volumes"]}
    config = next(c.split("=", 1)[1] for c in prometheus["command"] if c.startswith("--config.file="))
    host_config = mounts[str(Path(config).parent)] / Path(config).name
    assert host_config == MONITORING / "prometheus.yml"
    assert all((host_config.parent / f).exists() for f in yaml.safe_load(host_config.read_text())["rule_files"])
    assert mounts["/etc/grafana/provisioning"] == MONITORING / "grafana" / "provisioning"
    provider = yaml.safe_load((MONITORING / "grafana" / "provisioning" / "dashboards" / "rankserve.yml").read_text())
    assert mounts[provider["providers"][0]["options"]["path"]] == MONITORING / "grafana" / "dashboards"
    assert all(p["host_ip"] == "127.0.0.1" for s in (prometheus, grafana) for p in s["ports"])
    datasource = yaml.safe_load((MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    targets = yaml.safe_load(host_config.read_text())["scrape_configs"][0]["dns_sd_configs"][0]
    assert set(targets["names"]) == {"triton", "triton-cpu"} and targets["port"] == 8002
    if shutil.which("prometheus"):  # the image runs the release the tests evaluate the rules with
        version = re.search(r"version (\d+\.\d+\.\d+)", subprocess.run(["prometheus", "--version"], capture_output=True, text=True).stdout + subprocess.run(["prometheus", "--version"], capture_output=True, text=True).stderr).group(1)
        assert prometheus["image"] == f"prom/prometheus:v{version}"
