"""The Kubernetes manifests, without a cluster: every overlay renders with kustomize, every object
validates against the Kubernetes API schemas, a static security check passes, and what the
manifests say agrees with docker compose, the build and the code (ports, probes, images, flags)."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from rankserve.cli import parser as build_parser
from rankserve.settings import LoadTestSettings, ServeSettings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
TARGETS = {"gpu": K8S / "overlays" / "gpu", "cpu": K8S / "overlays" / "cpu", "loadtest": K8S / "loadtest"}
KUBERNETES_VERSION = "1.33.0"
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl (with its built-in kustomize) is not installed")


def _render(path: Path) -> list[dict]:
    out = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=60, check=True)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    if KUBECTL is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    return {name: _render(path) for name, path in TARGETS.items()}


def _find(docs, kind, name):
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def _containers(doc):
    spec = doc["spec"]["template"]["spec"] if doc["kind"] in ("Deployment", "Job") else None
    return [] if spec is None else spec.get("initContainers", []) + spec["containers"]


def _compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _ngc_release() -> str:
    return re.search(r"^NGC_RELEASE=(\S+)$", (ROOT / ".env").read_text(), re.M).group(1)


@needs_kubectl
@pytest.mark.parametrize("target", list(TARGETS))
def test_every_rendered_object_validates_against_the_kubernetes_schemas(rendered, target):
    import kubernetes_validate

    for doc in rendered[target]:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # prometheus-operator kinds: their CRD schemas, tests/unit/test_monitoring.py
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)  # raises on any error
    assert {d["metadata"].get("namespace") for d in rendered[target] if d["kind"] != "Namespace"} == {"rankserve"}


@needs_kubectl
def test_images_are_pinned_to_the_compose_release(rendered):
    release = _ngc_release()
    images = {c["image"] for docs in rendered.values() for d in docs for c in _containers(d)}
    assert f"rankserve/triton:{release}" in images and f"rankserve/trt-build:{release}" in images
    assert all(":" in image for image in images), images  # every image tagged
    compose = _compose()
    assert compose["x-triton"]["image"].startswith("rankserve/triton:${NGC_RELEASE")


@needs_kubectl
@pytest.mark.parametrize("target", ["gpu", "cpu"])
def test_triton_pod_matches_compose_and_the_server_settings(rendered, target):
    docs = rendered[target]
    deployment = _find(docs, "Deployment", "rankserve-triton")
    pod = deployment["spec"]["template"]["spec"]
    (triton,) = [c for c in pod["containers"] if c["name"] == "triton"]
    compose_flags = {f.split("=", 1)[0]: f for f in _compose()["x-triton"]["command"]}
    flags = {f.split("=", 1)[0]: f for f in triton["args"]}
    assert set(flags) == set(compose_flags)  # the same server flags as docker compose
    for name in ("--model-control-mode", "--strict-readiness", "--exit-timeout-secs"):
        assert flags[name] == compose_flags[name]
    python_backend = f"--backend-config=python,shm-default-byte-size={ServeSettings().shm_default_bytes}"
    assert python_backend in triton["args"] and python_backend in _compose()["x-triton"]["command"]
    assert "$(TRITON_ADMIN_KEY)" in flags["--http-restricted-api"] and "$(TRITON_ADMIN_KEY)" in flags["--grpc-restricted-protocol"]
    assert {p["containerPort"] for p in triton["ports"]} == {8000, 8001, 8002}
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/models/ranker/ready"
    compose_health = _compose()["x-triton"]["healthcheck"]["test"]
    assert compose_health[compose_health.index("--model") + 1] == "ranker"  # compose checks the same model's readiness
    live = triton["livenessProbe"]["exec"]["command"]
    assert live[:2] == ["rankserve", "health"]
    args = build_parser().parse_args(live[1:])  # the real CLI accepts it
    repo = flags["--model-repository"].split("=", 1)[1]
    assert args.model_repository == repo and args.url == "http://127.0.0.1:8000"
    exit_timeout = int(flags["--exit-timeout-secs"].split("=")[1])
    pre_stop = int(triton["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > exit_timeout + pre_stop
    (dshm,) = [v for v in pod["volumes"] if v["name"] == "dshm"]
    assert dshm["emptyDir"]["medium"] == "Memory" and dshm["emptyDir"]["sizeLimit"] == "1Gi"
    assert _compose()["x-triton"]["shm_size"] == "1gb"
    assert all(m["readOnly"] for m in triton["volumeMounts"] if m["name"] == "models")
    pdb = _find(docs, "PodDisruptionBudget", "rankserve-triton")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for service in (d for d in docs if d["kind"] == "Service"):
        assert service["spec"]["selector"].items() <= labels.items()
    headless = _find(docs, "Service", "rankserve-grpc")
    assert headless["spec"]["clusterIP"] == "None" and [p["port"] for p in headless["spec"]["ports"]] == [8001]


@needs_kubectl
def test_gpu_overlay_builds_engines_and_checks_them_before_serving(rendered):
    docs = rendered["gpu"]
    pod = _find(docs, "Deployment", "rankserve-triton")["spec"]["template"]["spec"]
    (triton,) = pod["containers"]
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    (check,) = pod["initContainers"]
    assert build_parser().parse_args(check["command"][1:]).func.__name__ == "_check_engines"
    job = _find(docs, "Job", "rankserve-engines")
    (build,) = job["spec"]["template"]["spec"]["containers"]
    args = build_parser().parse_args(["build", "--target", "gpu", *build["args"]])  # the image's entrypoint adds these
    assert args.out == "/models/model_repository" and args.work_dir and args.data
    assert job["spec"]["template"]["spec"]["nodeSelector"] == pod["nodeSelector"]  # engines for the GPU type that serves them
    assert _find(docs, "Job", "rankserve-publish")


@needs_kubectl
def test_cpu_overlay_has_no_gpu_and_no_engines(rendered):
    text = json.dumps(rendered["cpu"])
    assert "nvidia.com/gpu" not in text and "rankserve-engines" not in text and "check-engines" not in text


@needs_kubectl
def test_every_container_runs_unprivileged_with_limits(rendered):
    for docs in rendered.values():
        for d in docs:
            if d["kind"] not in ("Deployment", "Job"):
                continue
            pod = d["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] and pod["automountServiceAccountToken"] is False
            for c in _containers(d):
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, (d["metadata"]["name"], c["name"])
                assert sc["capabilities"]["drop"] == ["ALL"]
                assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and {"cpu", "memory"} <= set(c["resources"]["limits"])


@needs_kubectl
def test_autoscaling_reads_the_metric_the_adapter_serves(rendered):
    hpa = _find(rendered["cpu"], "HorizontalPodAutoscaler", "rankserve-triton")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "rankserve-triton"
    (metric,) = hpa["spec"]["metrics"]
    rules = yaml.safe_load((K8S / "prometheus-adapter.yaml").read_text())["rules"]["custom"]
    assert metric["pods"]["metric"]["name"] in {rule["name"]["as"] for rule in rules}
    assert float(metric["pods"]["target"]["averageValue"]) > 0
    # which models the rule reads, the GPU overlay's target: tests/unit/test_monitoring.py


@needs_kubectl
def test_distributed_locust_targets_the_service_with_the_users_settings(rendered):
    docs = rendered["loadtest"]
    scenario = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("locust-scenario"))["data"]
    users = (ROOT / "src" / "rankserve" / "loadtest" / "users.py").read_text()
    for key in (k for k in scenario if k.startswith("RANKSERVE_LOADTEST_")):
        assert key in users, key  # every scenario variable is one the users read
    assert scenario["LOCUST_HOST"] == "http://rankserve:8000"
    assert int(scenario["RANKSERVE_LOADTEST_CANDIDATES_MAX"]) == LoadTestSettings().candidates_max
    master = _find(docs, "Job", "locust-master")
    command = master["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    assert "--master --headless" in command and "rankserve loadtest-summary" in command
    worker = _find(docs, "Deployment", "locust-worker")["spec"]["template"]["spec"]["containers"][0]["command"]
    assert worker[worker.index("--master-host") + 1] == "locust-master"


CHECKOV = ROOT / ".venv-checkov" / "bin" / "checkov"


@needs_kubectl
@pytest.mark.skipif(not CHECKOV.exists(), reason="checkov not installed: `make checkov` sets up .venv-checkov")
def test_static_security_check_passes(rendered, tmp_path):
    """checkov over the rendered manifests and the Dockerfiles; every skipped check carries its
    reason next to it (annotations in the manifests, comments in the Dockerfiles)."""
    for name, docs in rendered.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump_all(docs))
    for dockerfile in (ROOT / "deploy" / "docker").glob("*.Dockerfile"):
        shutil.copy(dockerfile, tmp_path / f"{dockerfile.stem}.Dockerfile")
    out = subprocess.run([str(CHECKOV), "-d", str(tmp_path), "--framework", "kubernetes", "dockerfile", "--compact",
                          "--quiet", "-o", "json"], capture_output=True, text=True, timeout=600)
    reports = json.loads(out.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed = [f"{r['check_type']}: {c['check_id']} {c['check_name']} ({c['resource']})"
              for r in reports for c in r.get("results", {}).get("failed_checks", [])]
    assert not failed, "\n".join(failed)
    skipped = [c for r in reports for c in r.get("results", {}).get("skipped_checks", [])]
    assert all(c.get("suppress_comment", "").strip() for c in skipped), skipped
