"""Repository verification on every start of tritonserver, against ``rankserve serve`` and the real
server: a file changed on disk between restarts is refused at the restart, and bytecode planted
beside a stage's ``model.py`` never runs (the stub's Python is isolated: it ignores
PYTHONDONTWRITEBYTECODE and PYTHONPYCACHEPREFIX and would load a matching ``__pycache__`` file)."""

import importlib._bootstrap_external as bootstrap
import importlib.util
import os
import shutil
import signal
from pathlib import Path

import pytest

from conftest import Serve, processes_mentioning
from rankserve.server.processes import stub_processes
from rankserve_client import RankerClient

pytestmark = pytest.mark.triton


def _plant_bytecode(model_py: Path, marker: Path) -> Path:
    """Bytecode of ``model_py`` plus one line, with the header (source size and time) of the real
    file: Python's source loader takes it for the up-to-date cache of ``model_py``."""
    st = model_py.stat()
    code = compile(model_py.read_text() + f"\nopen({str(marker)!r}, 'w').write('planted bytecode ran')\n", str(model_py), "exec")
    cache = Path(importlib.util.cache_from_source(str(model_py)))
    cache.parent.mkdir(exist_ok=True)
    cache.write_bytes(bootstrap._code_to_timestamp_pyc(code, st.st_mtime, st.st_size))
    return cache


def test_bytecode_planted_beside_a_stage_never_runs(tiny_repo, tmp_path):
    repo, marker = tmp_path / "repo", tmp_path / "planted-ran"
    shutil.copytree(tiny_repo, repo)
    shutil.rmtree(repo / "postprocess" / "1" / "__pycache__", ignore_errors=True)
    cache = _plant_bytecode((repo / "postprocess" / "1" / "model.py").resolve(), marker)
    planted = cache.read_bytes()
    serve = Serve(repo)
    try:
        serve.wait_for("SIGTERM stops it")
        with RankerClient(serve.url, retries=0, check_api=False) as client:
            assert [r.id for r in client.rank("oak table", ["an oak table", "a chair"])]
    finally:
        serve.stop()
    assert not marker.exists(), "the planted bytecode ran instead of the verified model.py"
    assert not cache.exists() or cache.read_bytes() != planted  # removed; the stub compiled the verified source


@pytest.mark.parametrize("change, message", [
    ("stage code", "tokenize/1/model.py does not match its checksum"),
    ("config", "tokenize/config.pbtxt does not match its checksum"),
    ("model folder", "does not list: extra"),
])
def test_a_repository_changed_on_disk_is_refused_at_the_next_restart(tiny_repo, tmp_path, change, message):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo)
    serve = Serve(repo, "--health-interval", "0.2")
    try:
        serve.wait_for("SIGTERM stops it")
        if change == "stage code":
            with (repo / "tokenize" / "1" / "model.py").open("a") as f:
                f.write("\nprint('code nobody verified')\n")
        elif change == "config":
            with (repo / "tokenize" / "config.pbtxt").open("a") as f:
                f.write("\n# edited after the build\n")
        else:
            shutil.copytree(repo / "postprocess", repo / "extra")
        stub = next(s for s in stub_processes(serve.server_pid()) if s.model == "tokenize")  # one of the tokenize instances
        os.kill(stub.pid, signal.SIGKILL)  # the supervisor restarts the server: the repository is verified again
        assert serve.proc.wait(timeout=60) == 2
    finally:
        serve.stop()
    assert message in serve.output and "ready again" not in serve.output, serve.output
    assert "Traceback" not in serve.output and processes_mentioning(str(repo)) == [] and serve.leftover_shm() == set()


def test_modules_in_the_working_directory_are_not_imported_by_the_stubs(tiny_repo, tmp_path, monkeypatch):
    """The stubs' interpreter has '' (the working directory) first on sys.path: a json.py where the
    server was started from would shadow the standard library's. The server runs in its own empty
    folder instead."""
    from rankserve.server.embedded import EmbeddedServer, free_serve_settings

    marker = tmp_path / "imported-by"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "json.py").write_text(  # records who imported it, then stands in for the real module
        "import importlib, os, sys\n"
        f"open({str(marker)!r}, 'a').write(os.readlink('/proc/self/exe') + '\\n')\n"
        "del sys.modules['json']\nsys.path[:] = [p for p in sys.path if p not in ('', os.getcwd())]\n"
        "globals().update(importlib.import_module('json').__dict__)\n")
    monkeypatch.chdir(cwd)
    with EmbeddedServer(tiny_repo, free_serve_settings(exit_timeout_s=10), tmp_path / "tritonserver.log") as server:
        with RankerClient(f"http://{server.http_url}", retries=0, check_api=False) as client:
            assert client.rank("oak table", ["an oak table", "a chair"])
    assert not marker.exists() or "triton_python_backend_stub" not in marker.read_text()
