"""The command line and the embedded server's life cycle, against the real tritonserver."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_serve_settings, processes_mentioning
from rankserve.errors import ServeError
from rankserve.server.embedded import EmbeddedServer

pytestmark = pytest.mark.triton
REPO_ROOT = Path(__file__).resolve().parents[2]


def _rankserve(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "rankserve", *args], capture_output=True, text=True, timeout=120, **kwargs)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_rank_command(server, tmp_path, protocol):
    texts = tmp_path / "texts.txt"
    texts.write_text("Larkin Salon Chair | Massage Chairs\n\nOak Dining Table | Dining Tables\nGray Rug | Area Rugs\n")
    url = server.http_url if protocol == "http" else server.grpc_url
    out = _rankserve("rank", "--url", url, "--protocol", protocol, "--query", "salon chair",
                     "--texts-file", str(texts), "--top-k", "2")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert "3 candidates" in lines[0] and len(lines) == 3
    assert lines[1].lstrip().startswith("1.") and lines[2].lstrip().startswith("2.")


def test_rank_command_reports_bad_input_cleanly(server, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    out = _rankserve("rank", "--url", server.http_url, "--query", "sofa", "--texts-file", str(empty))
    assert out.returncode == 2 and f"{empty}: no candidate texts" in out.stderr and "Traceback" not in out.stderr


def test_curl_example(server):
    out = subprocess.run(["bash", str(REPO_ROOT / "clients/curl/rank.sh")], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "RANKSERVE_URL": f"http://{server.http_url}"})
    assert out.returncode == 0, out.stderr
    outputs = {o["name"]: o for o in json.loads(out.stdout)["outputs"]}
    assert outputs["indices"]["shape"] == [3] and len(set(outputs["indices"]["data"])) == 3


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_serve_command_starts_reports_endpoints_and_stops_cleanly(tiny_repo, tmp_path, stop_signal):
    import shutil

    repo = tmp_path / "repo"  # a copy: the session's server fixture serves tiny_repo itself
    shutil.copytree(tiny_repo, repo)
    s = free_serve_settings()
    shm_before = set(os.listdir("/dev/shm"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "rankserve", "serve", "--model-repository", str(repo),
         "--http-port", str(s.http_port), "--grpc-port", str(s.grpc_port), "--metrics-port", str(s.metrics_port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "stops it" in line or not line:
                break
        banner = "".join(lines)
        assert "tritonserver ready" in banner, banner
        assert f"http://127.0.0.1:{s.http_port}" in banner and f"127.0.0.1:{s.grpc_port}" in banner
        assert len(processes_mentioning(str(repo))) == 5  # the server and one stub per Python model instance (tokenize has two)
        proc.send_signal(stop_signal)
        rest = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "stopped (exit code 0)" in rest
    assert processes_mentioning(str(repo)) == []
    assert not {n for n in set(os.listdir("/dev/shm")) - shm_before if "triton" in n}


def test_embedded_server_binds_loopback_and_stops_its_stubs(tiny_repo, tmp_path):
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo)
    with EmbeddedServer(repo, free_serve_settings()) as srv:
        assert srv.is_ready()
        assert srv.models == ["postprocess", "rank", "ranker", "ranker_fp32", "tokenize"]
        stubs = [c for c in processes_mentioning(str(repo)) if "triton_python_backend_stub" in c]
        assert len(stubs) == 4  # tokenize (two instances), rank, postprocess
        log = srv.log_path.read_text()
        assert f"127.0.0.1:{srv.settings.http_port}" in log and f"127.0.0.1:{srv.settings.grpc_port}" in log
    assert processes_mentioning(str(repo)) == []


def test_server_refuses_an_empty_repository(tmp_path):
    with pytest.raises(ServeError, match="holds no model"):
        EmbeddedServer(tmp_path, free_serve_settings()).start()


def test_server_that_fails_to_load_reports_the_log(tiny_repo, tmp_path):
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo)
    (repo / "rank" / "1" / "model.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(ServeError, match="(exited|not ready)") as info:
        with EmbeddedServer(repo, free_serve_settings()):
            pass
    assert "model 'rank' failed to load" in str(info.value) and "Protobuf parsing failed" in str(info.value)
    assert processes_mentioning(str(repo)) == []


def test_serve_command_refuses_a_repository_without_manifest(tmp_path):
    out = _rankserve("serve", "--model-repository", str(tmp_path))
    assert out.returncode == 2 and "has no manifest.json" in out.stderr


@pytest.mark.triton
def test_compose_health_check_passes_on_the_real_server(server):
    import yaml

    compose = yaml.safe_load((Path(__file__).resolve().parents[2] / "docker-compose.yml").read_text())
    test = compose["x-triton"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "rankserve", "health"]
    args = test[3:]  # the same command, pointed at this server and its repository
    args[args.index("--url") + 1] = f"http://{server.http_url}"
    args[args.index("--model-repository") + 1] = str(server.repo)
    out = _rankserve("health", *args)
    assert out.returncode == 0 and "4/4 Python-backend stubs running" in out.stdout, out.stderr
    args[args.index("--model") + 1] = "no_such_model"
    out = _rankserve("health", *args)
    assert out.returncode == 2 and "model no_such_model is not ready" in out.stderr
