"""Every server command line the project ships, executed by the real tritonserver 2.51, flag for flag.

A flag the pinned Triton lacks (``--http-max-input-size`` came in 2.59) makes the server exit at
start: only running the command catches that. The commands come from where they are shipped: the
compose services resolved by Docker Compose itself, the Kubernetes Deployment rendered by kustomize,
the images' entrypoints and health checks. They run on a built CPU repository (the GPU-only models
left out: no TensorRT backend here) with, per the host, only these changes: the repository path
(``/models...`` in the container), the backend directory of the embedded install, and loopback
addresses and free ports for the three endpoints (the containers bind 0.0.0.0:8000-8002).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import configmaps_of, free_serve_settings, kubelet_env, kubelet_expand, kustomize, resolved_compose
from rankserve.server.embedded import EmbeddedServer, TritonInstall

pytestmark = pytest.mark.triton
ROOT = Path(__file__).resolve().parents[2]
KEY = "a-test-key-0123456789"


@pytest.fixture(autouse=True)
def admin_key_file(tmp_path, monkeypatch) -> Path:
    """The key the containers mount at /run/secrets/triton_admin_key, here a file of the test read by
    the shipped entrypoint (`rankserve exec-server`) through RANKSERVE_ADMIN_KEY_FILE."""
    path = tmp_path / "triton_admin_key"
    path.write_text(KEY + "\n")
    monkeypatch.setenv("RANKSERVE_ADMIN_KEY_FILE", str(path))
    return path


def _entrypoint_on_host(entrypoint: list[str], install: TritonInstall, repo: Path, container_repo: str) -> list[str]:
    """A container's entrypoint as shipped, tritonserver being the embedded install's binary."""
    if entrypoint[:1] in (["sh"], ["/bin/sh"]):  # `sh -c "... && exec rankserve exec-server -- tritonserver "$@"" --`
        shell, dash_c, script, zero = entrypoint
        script = _on_host(script, container_repo, repo).replace("-- tritonserver ", f"-- {install.binary} ")
        return [shell, dash_c, script, zero]
    return [str(install.binary) if a == "tritonserver" else a for a in entrypoint]


def _restricted_apis_need_the_key(url: str) -> None:
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{url}/v2/systemsharedmemory/status", timeout=5)
    assert refused.value.code == 403
    request = urllib.request.Request(f"{url}/v2/systemsharedmemory/status", headers={"rankserve-admin-key": KEY})
    assert urllib.request.urlopen(request, timeout=5).status == 200


def _host_flags(backends: Path, s) -> list[str]:
    return [f"--backend-directory={backends}", f"--http-address={s.host}", f"--http-port={s.http_port}",
            f"--grpc-address={s.host}", f"--grpc-port={s.grpc_port}", f"--metrics-address={s.host}",
            f"--metrics-port={s.metrics_port}"]


def _on_host(text: str, container_repo: str, repo: Path) -> str:
    return text.replace(container_repo, str(repo))


def _unescape(text: str) -> str:
    """``docker compose config`` writes a literal ``$`` as ``$$``; the container gets ``$``."""
    return text.replace("$$", "$")


@pytest.fixture
def repo(tiny_repo, tmp_path) -> Path:
    """A copy of the built repository: the health check wants exactly one server per repository."""
    return Path(shutil.copytree(tiny_repo, tmp_path / "models"))


def _serve(repo: Path, tmp_path: Path, argv) -> EmbeddedServer:
    settings = free_serve_settings()
    return EmbeddedServer(repo, settings, tmp_path / "tritonserver.log", argv=lambda install, backends: argv(install, backends, settings))


def _health(command: list[str], url: str, container_repo: str, repo: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """A container's rankserve command (health check, probe, check-engines) as shipped, pointed at
    this server (its URL) and repository; ``env``: the container's environment, its paths moved too."""
    assert command[0] == "rankserve"
    args = [_on_host(a, container_repo, repo) for a in command[1:]]
    args = [re.sub(r"^http://(localhost|127\.0\.0\.1):8000$", url, a) for a in args]
    moved = {k: _on_host(v, container_repo, repo) for k, v in (env or {}).items()}
    return subprocess.run([sys.executable, "-m", "rankserve", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **moved})


@pytest.mark.parametrize("service", ["triton-cpu", "triton"])
def test_compose_server_commands_start_the_real_server(service, repo, tmp_path):
    spec = resolved_compose(TRITON_ADMIN_KEY=KEY)["services"][service]
    container_repo = "/models"
    command = [_unescape(_on_host(a, container_repo, repo)) for a in spec["command"]]
    entrypoint = [_unescape(a) for a in spec["entrypoint"]]

    def argv(install: TritonInstall, backends: Path, s) -> list[str]:
        # triton-cpu: `rankserve exec-server -- tritonserver FLAGS`; the GPU service:
        # `sh -c "rankserve check-engines ... -- "$@" && exec rankserve exec-server -- tritonserver "$@"" -- FLAGS`
        return [*_entrypoint_on_host(entrypoint, install, repo, container_repo), *command, *_host_flags(backends, s)]

    with _serve(repo, tmp_path, argv) as server:
        url = f"http://{server.http_url}"
        out = _health(spec["healthcheck"]["test"][1:], url, container_repo, repo)
        assert out.returncode == 0 and "healthy" in out.stdout, out.stdout + out.stderr
        if service == "triton":  # check-engines ran first, on this repository and the server's flags
            assert "no TensorRT engines in the repository: nothing to check" in server.log_path.read_text()
        _restricted_apis_need_the_key(url)  # the key of the secret file, added by the entrypoint
        assert KEY not in json.dumps(spec)  # and in no command or environment of the service


def test_the_triton_image_health_check_passes_on_the_real_server(repo, tmp_path):
    dockerfile = (ROOT / "deploy/docker/triton.Dockerfile").read_text()
    (health,) = re.findall(r"^HEALTHCHECK .*?CMD (\[.*\])$", dockerfile, re.M)
    compose = resolved_compose(TRITON_ADMIN_KEY=KEY)["services"]["triton-cpu"]

    def argv(install, backends, s):
        return [*_entrypoint_on_host(compose["entrypoint"], install, repo, "/models"),
                *[_on_host(a, "/models", repo) for a in compose["command"]], *_host_flags(backends, s)]

    with _serve(repo, tmp_path, argv) as server:
        out = _health(json.loads(health), f"http://{server.http_url}", "/models", repo)
        assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_kubernetes_triton_container_starts_the_real_server_and_its_probes_pass(overlay, repo, tmp_path):
    docs = kustomize(ROOT / "deploy/kubernetes/overlays" / overlay)
    deployment = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "rankserve-triton")
    pod = deployment["spec"]["template"]["spec"]
    (triton,) = [c for c in pod["containers"] if c["name"] == "triton"]
    assert triton["command"] == ["rankserve", "exec-server", "--", "tritonserver"]
    env = kubelet_env(triton, configmaps_of(docs), secret=KEY)
    container_repo = kubelet_expand(next(a for a in triton["args"] if a.startswith("--model-repository=")).split("=", 1)[1], env)
    assert container_repo.startswith("/models/releases/") and "$(" not in container_repo
    for init in pod.get("initContainers", []):  # check-repository: waits for the release, verifies it, checks engines
        init_env = kubelet_env(init, configmaps_of(docs), secret=KEY)
        assert init_env["RANKSERVE_MODEL_REPOSITORY"] == container_repo  # the release the server will load
        out = _health(init["command"], "", container_repo, repo, init_env)
        if overlay == "gpu":  # a GPU replica refuses a release without its engines (this CPU build has none)
            assert out.returncode == 2 and "lists no TensorRT engines" in out.stderr, out.stdout + out.stderr
        else:
            assert out.returncode == 0 and "no TensorRT engines in the repository" in out.stdout, out.stdout + out.stderr
    # Kubernetes expands $(VAR) from the container's env before starting it
    args = [_on_host(kubelet_expand(a, env), container_repo, repo) for a in triton["args"]]

    def argv(install, backends, s):
        return [*_entrypoint_on_host(triton["command"], install, repo, container_repo), *args, *_host_flags(backends, s)]

    with _serve(repo, tmp_path, argv) as server:
        url = f"http://{server.http_url}"
        _restricted_apis_need_the_key(url)  # the key of the Secret volume, added by the entrypoint
        for probe in ("livenessProbe", "readinessProbe"):
            if "exec" in triton.get(probe, {}):
                out = _health(triton[probe]["exec"]["command"], url, container_repo, repo, env)
                assert out.returncode == 0, (probe, out.stdout + out.stderr)
