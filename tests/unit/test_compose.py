"""Static checks of docker-compose.yml (no Docker engine here): paths exist, versions agree."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
TRITON_EMBEDDED = "2.51"  # the tritonserver in the nvidia-pytriton wheel; NGC 24.10 ships 2.51.0
NGC_RELEASE_FOR = {"2.51": "24.10"}


def _compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_triton_image_matches_the_embedded_server_version():
    image = _compose()["x-versions"]["triton-image"]
    assert image == f"nvcr.io/nvidia/tritonserver:{NGC_RELEASE_FOR[TRITON_EMBEDDED]}-py3"
    assert _compose()["services"]["triton"]["build"]["args"]["TRITON_IMAGE"] == image


def test_build_context_and_mounts_exist():
    triton = _compose()["services"]["triton"]
    assert (ROOT / triton["build"]["context"] / triton["build"]["dockerfile"]).exists()
    host_path = triton["volumes"][0].split(":")[0]
    assert (ROOT / host_path / "tokenize" / "1" / "model.py").exists()


def test_ports_stay_on_loopback_and_health_check_hits_the_ranker():
    triton = _compose()["services"]["triton"]
    assert all(p.startswith("127.0.0.1:") for p in triton["ports"])
    assert "/v2/models/ranker/ready" in " ".join(triton["healthcheck"]["test"])
    assert "--model-control-mode=none" in triton["command"]


def _extra(name: str) -> list[str]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][name]


def test_dockerfile_installs_the_stages_extra_which_holds_every_cpu_runtime():
    from rankserve.settings import RUNTIMES

    dockerfile = (ROOT / "deploy/docker/triton-cpu.Dockerfile").read_text()
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
    assert "triton" not in _compose()["services"]["triton"].get("profiles", [])  # plain `up` still serves
    assert master["depends_on"]["triton"]["condition"] == "service_healthy"
    script = master["command"][-1]
    assert "--master --headless" in script and "--host http://triton:8000" in script
    assert "--expect-workers ${LOCUST_WORKERS:-2}" in script and worker["deploy"]["replicas"] == "${LOCUST_WORKERS:-2}"
    assert script.rstrip().split(";")[-1].strip().startswith("rankserve loadtest-summary --csv /reports/locust_stats.csv")
    assert worker["command"][worker["command"].index("--master-host") + 1] == "locust-master"
    locustfile = (ROOT / "loadtest" / "locustfile.py").read_text()
    for command in (script, " ".join(worker["command"])):
        assert "-f loadtest/locustfile.py RankerHttpUser" in command and "RankerHttpUser" in locustfile
    env_read = (ROOT / "src/rankserve/loadtest/users.py").read_text()
    assert all(name in env_read for name in master["environment"])
    assert "ENV RANKSERVE_WANDS_QUERIES=/data/wands/query.csv" in (ROOT / "deploy/docker/locust.Dockerfile").read_text()
