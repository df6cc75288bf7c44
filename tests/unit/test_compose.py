"""Static checks of docker-compose.yml (no Docker engine here): paths exist, versions agree."""

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


def test_dockerfile_installs_what_the_stages_import():
    dockerfile = (ROOT / "deploy/docker/triton-cpu.Dockerfile").read_text()
    for package in ("onnxruntime", "tokenizers", "numpy"):
        assert package in dockerfile
    assert "USER rankserve" in dockerfile
