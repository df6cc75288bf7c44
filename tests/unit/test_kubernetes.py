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

from conftest import configmaps_of, kubelet_env, kubelet_expand
from rankserve.cli import parser as build_parser
from rankserve.server.embedded import ADMIN_KEY_FILE
from rankserve.settings import LoadTestSettings, ServeSettings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
TARGETS = {"gpu": K8S / "overlays" / "gpu", "cpu": K8S / "overlays" / "cpu", "loadtest": K8S / "loadtest",
           "cpu-gateway": K8S / "overlays" / "cpu-gateway", "cpu-canary": K8S / "overlays" / "cpu-canary",
           "gpu-canary": K8S / "overlays" / "gpu-canary"}
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


REGISTRY = "registry.invalid"  # RFC 6761: never resolves, so an image not pushed and set fails to pull, loudly


def _env(container: dict) -> dict[str, str]:
    """The container's environment as the kubelet builds it (:func:`conftest.kubelet_env`), from the
    ConfigMaps :func:`_pod_containers` attached."""
    return kubelet_env(container, container["_configmaps"])


_expand = kubelet_expand


def _pod_containers(docs, kind, name) -> list[dict]:
    """A workload's containers (init first), each with the rendered ConfigMaps attached for :func:`_env`."""
    return [dict(c, _configmaps=configmaps_of(docs)) for c in _containers(_find(docs, kind, name))]


def _release(docs) -> str:
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("rankserve-release-")]
    return cm["data"]["RANKSERVE_RELEASE"]


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
    cluster_wide = ("Namespace", "PriorityClass")
    assert {d["metadata"].get("namespace") for d in rendered[target] if d["kind"] not in cluster_wide} == {"rankserve"}


@needs_kubectl
def test_images_are_pinned_to_the_compose_release(rendered):
    release = _ngc_release()
    images = {c["image"] for docs in rendered.values() for d in docs for c in _containers(d)}
    assert f"{REGISTRY}/rankserve/triton:{release}" in images and f"{REGISTRY}/rankserve/trt-build:{release}" in images
    assert all(":" in image.rsplit("/", 1)[-1] for image in images), images  # every image tagged
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
    # ... behind the same entrypoint, which adds the restricted-API flags from the mounted key
    assert triton["command"] == _compose()["services"]["triton-cpu"]["entrypoint"] == ["rankserve", "exec-server", "--", "tritonserver"]
    for name in ("--model-control-mode", "--strict-readiness", "--exit-timeout-secs"):
        assert flags[name] == compose_flags[name]
    python_backend = f"--backend-config=python,shm-default-byte-size={ServeSettings().shm_default_bytes}"
    assert python_backend in triton["args"] and python_backend in _compose()["x-triton"]["command"]
    # the admin key: a Secret volume at /run/secrets/triton_admin_key, in no argument or variable of the pod
    (key_mount,) = [m for m in triton["volumeMounts"] if m["name"] == "admin-key"]
    (key_volume,) = [v for v in pod["volumes"] if v["name"] == "admin-key"]
    assert key_mount["readOnly"] and f"{key_mount['mountPath']}/{key_volume['secret']['items'][0]['path']}" == ADMIN_KEY_FILE
    assert key_volume["secret"]["secretName"] == "rankserve-admin" and key_volume["secret"]["defaultMode"] == 0o440
    assert not any("restricted" in a or "ADMIN" in a for a in triton["args"])
    assert not any("secretKeyRef" in v.get("valueFrom", {}) for c in pod["containers"] + pod.get("initContainers", []) for v in c.get("env", []))
    assert {p["containerPort"] for p in triton["ports"]} == {8000, 8001, 8002}
    repo = flags["--model-repository"].split("=", 1)[1]
    assert repo == "$(RANKSERVE_MODEL_REPOSITORY)"  # the probes' `rankserve health` reads the same variable
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
@pytest.mark.parametrize("target", ["gpu", "cpu"])
def test_probes_check_every_stub_and_give_a_busy_replica_room(rendered, target, monkeypatch):
    """Readiness: Triton's /v2/models/ranker/ready stays 200 after a stub died (tests/e2e/test_faults.py),
    so readiness is the check compose runs, `rankserve health --model ranker`; liveness leaves a
    saturated pod time to start a Python probe before it restarts the busiest replica."""
    (triton,) = [c for c in _pod_containers(rendered[target], "Deployment", "rankserve-triton") if c["name"] == "triton"]
    monkeypatch.setenv("RANKSERVE_MODEL_REPOSITORY", _env(triton)["RANKSERVE_MODEL_REPOSITORY"])
    compose = build_parser().parse_args(_compose()["x-triton"]["healthcheck"]["test"][2:])
    ready, live = triton["readinessProbe"], triton["livenessProbe"]
    for probe in (ready, live):
        assert probe["exec"]["command"][:2] == ["rankserve", "health"]
        args = build_parser().parse_args(probe["exec"]["command"][1:])  # the real CLI, with the pod's environment
        assert args.url == "http://127.0.0.1:8000" and args.model_repository == _env(triton)["RANKSERVE_MODEL_REPOSITORY"]
    assert build_parser().parse_args(ready["exec"]["command"][1:]).model == compose.model == "ranker"
    assert build_parser().parse_args(live["exec"]["command"][1:]).model is None  # a busy ranker is alive
    assert live["timeoutSeconds"] >= 10 and live["periodSeconds"] * live["failureThreshold"] >= 60
    assert ready["timeoutSeconds"] >= 5


@needs_kubectl
def test_the_autoscaler_owns_the_replica_count(rendered):
    """`replicas:` next to an HPA resets a scaled-out Deployment to that number on every apply."""
    for docs in rendered.values():
        for hpa in (d for d in docs if d["kind"] == "HorizontalPodAutoscaler"):
            target = _find(docs, hpa["spec"]["scaleTargetRef"]["kind"], hpa["spec"]["scaleTargetRef"]["name"])
            assert "replicas" not in target["spec"], target["metadata"]["name"]


@needs_kubectl
def test_images_name_a_registry_and_fail_loudly_until_it_is_set(rendered):
    """An unqualified name (rankserve/triton) is a Docker Hub namespace this project does not own."""
    for docs in rendered.values():
        for d in docs:
            for c in _containers(d):
                registry, path = c["image"].split("/", 1)
                assert "." in registry or ":" in registry, c["image"]  # a registry host, not a Docker Hub path
                if path.startswith("rankserve/"):  # ours: one placeholder, set in the kustomizations' images[]
                    assert registry == REGISTRY, c["image"]


@needs_kubectl
@pytest.mark.parametrize("target,flavour", [("cpu", ""), ("gpu", "-gpu")])
def test_replicas_serve_a_whole_published_release(rendered, target, flavour):
    """The server, its probes and the init check all read releases/<release>[-gpu], the folder the
    publish (or engines) Job renames into place whole; nothing reads the volume's top level."""
    docs = rendered[target]
    release = _release(docs)
    expected = f"/models/releases/{release}{flavour}/model_repository"
    containers = _pod_containers(docs, "Deployment", "rankserve-triton")
    (triton,) = [c for c in containers if c["name"] == "triton"]
    (check,) = [c for c in containers if c["name"] == "check-repository"]
    for c in (triton, check):
        assert _env(c)["RANKSERVE_MODEL_REPOSITORY"] == expected, c["name"]  # fully expanded, in the kubelet's order
    flags = dict(f.split("=", 1) for f in triton["args"] if "=" in f)
    assert _expand(flags["--model-repository"], _env(triton)) == expected
    args = build_parser().parse_args(check["command"][1:])
    assert args.func.__name__ == "_check_engines" and args.wait >= 600
    assert args.require_engines is (target == "gpu")  # GPU replicas wait for the engines, and refuse a release without them
    # the release is the models image's tag, and its publish Job is that release's own
    models = {c["image"] for d in docs for c in _containers(d) if "/rankserve/models:" in c["image"]}
    assert models == {f"{REGISTRY}/rankserve/models:{release}"}


@needs_kubectl
@pytest.mark.parametrize("target", ["gpu", "cpu"])
def test_each_release_is_published_by_its_own_idempotent_job(rendered, target):
    """Jobs publish next to the live releases, never onto them; a Job's template cannot change, so
    each release has its own; finished Jobs are kept, so a sync does not run them again."""
    docs = rendered[target]
    release = _release(docs)
    jobs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Job"}
    expected = {f"rankserve-publish-{release}"} | ({f"rankserve-engines-{release}"} if target == "gpu" else set())
    assert set(jobs) == expected
    for name, job in jobs.items():
        assert "ttlSecondsAfterFinished" not in job["spec"], name
        (c,) = [dict(c, _configmaps=configmaps_of(docs))
                for c in job["spec"]["template"]["spec"]["containers"]]
        command = [_expand(word, _env(c)) for word in c["command"]]
        assert command[0] == "rankserve-publish", name
        image = c["image"].split("/", 1)[1].rsplit(":", 1)[0]
        dockerfile = {"rankserve/models": "models.Dockerfile", "rankserve/trt-build": "trt-build.Dockerfile"}[image]
        text = (ROOT / "deploy" / "docker" / dockerfile).read_text()
        assert re.search(r"^COPY --chmod=0755 deploy/docker/publish.sh /usr/local/bin/rankserve-publish$", text, re.M), dockerfile
        if name.startswith("rankserve-publish"):
            assert command[1:4] == [release, "/bundle", "/shared"]
        else:  # the engines: built in a copy of the release, published whole as <release>-gpu
            assert command[1:4] == [f"{release}-gpu", f"/models/releases/{release}", "/models"] and command[4] == "--"
            assert command[5] == "rankserve"
            args = build_parser().parse_args(command[6:] + c["args"])
            assert args.target == "gpu" and not Path(args.out).is_absolute() and args.out == "model_repository"
            assert int(_env(c)["RANKSERVE_WAIT_S"]) >= 600  # it may start before the publish Job is done


@needs_kubectl
def test_gpu_rollouts_leave_the_engines_job_a_gpu(rendered):
    docs = rendered["gpu"]
    deployment = _find(docs, "Deployment", "rankserve-triton")
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0  # no surge pod holding a GPU
    job = next(d for d in docs if d["kind"] == "Job" and d["metadata"]["name"].startswith("rankserve-engines-"))
    priority = _find(docs, "PriorityClass", job["spec"]["template"]["spec"]["priorityClassName"])
    assert priority["value"] > deployment["spec"]["template"]["spec"].get("priority", 0)
    assert priority["preemptionPolicy"] == "PreemptLowerPriority" and not priority.get("globalDefault")
    assert "priorityClassName" not in deployment["spec"]["template"]["spec"]


@needs_kubectl
def test_the_model_claim_asks_for_a_shared_class_writable_by_the_jobs(rendered):
    import kubernetes_validate

    claim = _find(rendered["cpu"], "PersistentVolumeClaim", "rankserve-models")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"] and claim["spec"]["storageClassName"] == "rankserve-rwx"
    uids = {d["spec"]["template"]["spec"]["securityContext"]["runAsUser"] for docs in rendered.values() for d in docs
            if d["kind"] == "Job" and d["metadata"]["name"].startswith("rankserve-")}
    assert uids == {10001}
    examples = [d for d in yaml.safe_load_all((K8S / "storage-classes.yaml").read_text()) if d]
    assert {d["provisioner"] for d in examples} == {"efs.csi.aws.com", "file.csi.azure.com"}
    for d in examples:
        kubernetes_validate.validate(d, KUBERNETES_VERSION, strict=True)
        assert d["metadata"]["name"] == "rankserve-rwx"
        owner = (d.get("parameters", {}).get("uid"), d.get("parameters", {}).get("gid"))
        if owner == (None, None):
            owner = tuple(o.split("=")[1] for o in d["mountOptions"] if o.startswith(("uid=", "gid=")))
        assert owner == ("10001", "10001"), d["provisioner"]  # NFS-type volumes ignore fsGroup


@needs_kubectl
def test_gpu_overlay_builds_engines_and_checks_them_before_serving(rendered):
    docs = rendered["gpu"]
    pod = _find(docs, "Deployment", "rankserve-triton")["spec"]["template"]["spec"]
    (triton,) = pod["containers"]
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    (check,) = pod["initContainers"]
    assert build_parser().parse_args(check["command"][1:]).func.__name__ == "_check_engines"
    assert check["resources"]["limits"]["nvidia.com/gpu"] == 1  # it checks the engines against this node's GPU
    job = next(d for d in docs if d["kind"] == "Job" and d["metadata"]["name"].startswith("rankserve-engines-"))
    (build,) = job["spec"]["template"]["spec"]["containers"]
    assert build["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert job["spec"]["template"]["spec"]["nodeSelector"] == pod["nodeSelector"]  # engines for the GPU type that serves them


@needs_kubectl
def test_cpu_overlay_has_no_gpu_and_no_engines(rendered):
    text = json.dumps(rendered["cpu"])
    assert "nvidia.com/gpu" not in text and "rankserve-engines" not in text and "--require-engines" not in text


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
    workers = _find(docs, "Job", "locust-worker")  # a Job: the workers end with the run
    worker = workers["spec"]["template"]["spec"]["containers"][0]["command"]
    assert worker[worker.index("--master-host") + 1] == "locust-master"
    expected = {e["name"]: e.get("value") for e in master["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert workers["spec"]["completions"] == workers["spec"]["parallelism"] == int(expected["LOCUST_WORKERS"])
    assert workers["spec"]["template"]["spec"]["restartPolicy"] == "OnFailure"
    assert float(scenario["RANKSERVE_LOADTEST_RATE_PER_USER"]) > 0  # open loop (Poisson), not closed loop on a bounded queue
    (reports,) = [v for v in master["spec"]["template"]["spec"]["volumes"] if v["name"] == "reports"]
    claim = _find(docs, "PersistentVolumeClaim", reports["persistentVolumeClaim"]["claimName"])  # kept after the Job
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    for job in (master, workers):
        assert "ttlSecondsAfterFinished" not in job["spec"]  # a sync must not start another load test


@needs_kubectl
def test_the_gateway_component_serves_the_tested_template_and_only_it_reaches_triton(rendered):
    """overlays/cpu-gateway: nginx with the very template tests/e2e/test_gateway.py runs, every
    variable of it set, Triton's HTTP and gRPC open to the gateway's pods only."""
    from tls_gateway import TEMPLATE, TEMPLATE_VARIABLES

    docs = rendered["cpu-gateway"]
    template = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("rankserve-gateway-template"))
    assert template["data"] == {"rankserve.conf.template": TEMPLATE.read_text()}  # the copy in the component equals the tested one
    deployment = _find(docs, "Deployment", "rankserve-gateway")
    pod = deployment["spec"]["template"]["spec"]
    (nginx,) = pod["containers"]
    env = {e["name"]: e for e in nginx["env"]}
    assert set(env) == set(TEMPLATE_VARIABLES)
    assert env["GATEWAY_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "rankserve-gateway-token", "key": "token"}
    http_service = _find(docs, "Service", "rankserve")
    ports = {p["name"]: p["port"] for p in http_service["spec"]["ports"]}
    assert env["TRITON_HTTP"]["value"] == f"rankserve:{ports['http']}" and env["TRITON_GRPC"]["value"] == f"rankserve:{ports['grpc']}"
    container_ports = {p["name"]: p["containerPort"] for p in nginx["ports"]}
    assert (int(env["GATEWAY_HTTPS_PORT"]["value"]), int(env["GATEWAY_GRPC_PORT"]["value"])) == (container_ports["https"], container_ports["grpcs"])
    mounts = {m["mountPath"]: m["name"] for m in nginx["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/etc/nginx/templates"]]["configMap"]["name"] == template["metadata"]["name"]
    tls_dir = env["GATEWAY_TLS_CERT"]["value"].rsplit("/", 1)[0]
    assert volumes[mounts[tls_dir]]["secret"]["secretName"] == "rankserve-gateway-tls"
    assert {env["GATEWAY_TLS_CERT"]["value"], env["GATEWAY_TLS_KEY"]["value"]} == {f"{tls_dir}/tls.crt", f"{tls_dir}/tls.key"}
    assert nginx["readinessProbe"]["httpGet"]["path"] == "/gateway/healthz" and "location = /gateway/healthz" in TEMPLATE.read_text()
    policy = _find(docs, "NetworkPolicy", "rankserve-triton")
    gateway_only = [r for r in policy["spec"]["ingress"] if r.get("from")]
    assert [sorted(p["port"] for p in r["ports"]) for r in gateway_only] == [[8000, 8001]]
    assert gateway_only[0]["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "rankserve-gateway"}}}]
    assert all("from" in r or {p["port"] for p in r["ports"]} == {8002} for r in policy["spec"]["ingress"])  # only metrics stay open
    assert "rankserve-gateway" not in json.dumps(rendered["cpu"])  # optional: the plain overlays lack it


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


@needs_kubectl
@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_the_canary_serves_its_own_release_behind_the_same_services(rendered, target):
    """overlays cpu-canary and gpu-canary: the overlay plus Deployment rankserve-triton-canary (1
    replica, track canary) on its own release; the Services reach both tracks, the autoscaler and
    the disruption budget only the stable one, and nothing else is rendered twice. On GPU the
    canary's release gets its own engines Job and the canary replica serves <release>-gpu."""
    docs, cpu = rendered[f"{target}-canary"], rendered[target]
    flavour = "-gpu" if target == "gpu" else ""
    stable, canary = _find(docs, "Deployment", "rankserve-triton"), _find(docs, "Deployment", "rankserve-triton-canary")
    kinds = lambda ds: sorted((d["kind"], d["metadata"]["name"]) for d in ds if d["kind"] not in ("Deployment", "Job", "ConfigMap"))  # noqa: E731
    assert kinds(docs) == kinds(cpu)  # no second Service, claim, HPA, budget or policy
    assert stable == _find(cpu, "Deployment", "rankserve-triton")  # the stable replicas are the cpu overlay's, unchanged
    assert canary["spec"]["replicas"] == 1 and "replicas" not in stable["spec"]
    tracks = {d["metadata"]["name"]: (d["spec"]["selector"]["matchLabels"], d["spec"]["template"]["metadata"]["labels"])
              for d in (stable, canary)}
    assert {n: t[0]["rankserve.io/track"] for n, t in tracks.items()} == {"rankserve-triton": "stable", "rankserve-triton-canary": "canary"}
    for selector, labels in tracks.values():
        assert selector.items() <= labels.items()
        for service in (d for d in docs if d["kind"] == "Service"):  # both tracks behind each Service: share = replica share
            assert service["spec"]["selector"].items() <= labels.items(), service["metadata"]["name"]
    monitor = _find(docs, "PodMonitor", "rankserve-triton")  # both tracks scraped, the track kept as a label for the dashboard
    assert all(monitor["spec"]["selector"]["matchLabels"].items() <= t[1].items() for t in tracks.values())
    assert "rankserve.io/track" in monitor["spec"]["podTargetLabels"]
    dashboard = json.loads((ROOT / "deploy" / "monitoring" / "grafana" / "dashboards" / "rankserve.json").read_text())
    compared = [p["title"] for p in dashboard["panels"] if all("by (rankserve_io_track" in t["expr"] for t in p["targets"])]
    assert len(compared) == 3 and any("pairs" in t for t in compared) and any("failed" in t for t in compared) \
        and any("p95" in t for t in compared)
    assert _find(docs, "HorizontalPodAutoscaler", "rankserve-triton")["spec"]["scaleTargetRef"]["name"] == "rankserve-triton"
    assert _find(docs, "PodDisruptionBudget", "rankserve-triton")["spec"]["selector"]["matchLabels"]["rankserve.io/track"] == "stable"
    # each track reads its own release (its own hashed ConfigMap), published by its own Job
    configmaps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    releases = {}
    for d in (stable, canary):
        (triton,) = [c for c in _pod_containers(docs, "Deployment", d["metadata"]["name"]) if c["name"] == "triton"]
        releases[d["metadata"]["name"]] = _env(triton)["RANKSERVE_RELEASE"]
        assert _env(triton)["RANKSERVE_MODEL_REPOSITORY"] == f"/models/releases/{releases[d['metadata']['name']]}{flavour}/model_repository"
    assert releases["rankserve-triton"] == _release(cpu) != releases["rankserve-triton-canary"]
    assert any(n.startswith("rankserve-release-canary-") for n in configmaps)
    jobs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Job"}
    kinds_of_jobs = ("publish", "engines") if target == "gpu" else ("publish",)
    assert set(jobs) == {f"rankserve-{k}-{releases['rankserve-triton']}" for k in kinds_of_jobs} | \
        {f"rankserve-{k}-{releases['rankserve-triton-canary']}-canary" for k in kinds_of_jobs}
    if target == "gpu":  # the canary's engines: built from its release, published as <release>-gpu, same priority class
        engines = jobs[f"rankserve-engines-{releases['rankserve-triton-canary']}-canary"]
        (build,) = [dict(c, _configmaps=configmaps) for c in engines["spec"]["template"]["spec"]["containers"]]
        assert [_expand(w, _env(build)) for w in build["command"][1:3]] == \
            [f"{releases['rankserve-triton-canary']}-gpu", f"/models/releases/{releases['rankserve-triton-canary']}"]
        assert _find(docs, "PriorityClass", engines["spec"]["template"]["spec"]["priorityClassName"])
        assert canary["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    canary_job = jobs[f"rankserve-publish-{releases['rankserve-triton-canary']}-canary"]["spec"]["template"]["spec"]["containers"][0]
    assert canary_job["image"].endswith(f"/rankserve/models:{releases['rankserve-triton-canary']}")
    # apart from its name, labels, replicas and release, the canary pod is the stable one
    strip = lambda d: json.loads(json.dumps(d["spec"]["template"]["spec"]).replace(  # noqa: E731
        next(n for n in configmaps if n.startswith("rankserve-release-canary-")), "RELEASE").replace(
        next(n for n in configmaps if n.startswith("rankserve-release-") and "canary" not in n), "RELEASE"))
    spread = lambda spec: {**spec, "topologySpreadConstraints": None}  # noqa: E731
    assert spread(strip(canary)) == spread(strip(stable))
