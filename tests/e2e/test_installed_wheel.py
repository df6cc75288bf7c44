"""The built wheel, installed (not editable) into a fresh venv, builds a repository with no source
tree in sight: the CPU build and the GPU build's layout steps (the TensorRT image installs the
package this way; a path into the checkout would fail there only).

The wheel is built from exactly the files the images copy (the COPY lines of triton.Dockerfile);
the fresh venv borrows the heavy dependencies (torch, onnxruntime...) from the test venv through a
plain path entry, which does not load the checkout's editable-install hook.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rankserve import api

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _image_sources() -> list[str]:
    sources = []
    for line in (ROOT / "deploy/docker/triton.Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            sources += shlex.split(line)[1:-1]
    return sources


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    for rel in _image_sources():  # what the images copy, adapters included (the .dockerignore keeps only them)
        src = ROOT / rel
        if src.is_dir():
            shutil.copytree(src, source / rel, ignore=shutil.ignore_patterns("__pycache__", "*.onnx", "*.json", "*.pbtxt", "rank_*", "tokenize_*"))
        else:
            (source / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, source / rel)
    run = lambda *cmd: subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source), "-w", str(tmp / "dist"))
    (wheel,) = (tmp / "dist").glob("rankserve-*.whl")
    venv = tmp / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", str(venv))
    python = venv / "bin" / "python"
    site = Path(run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    deps = Path(run(sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    (site / "zz-test-venv-deps.pth").write_text(f"{deps}\n")  # a path line: the editable hook's .pth there is not run
    run(sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel))
    return venv


def test_the_wheel_ships_the_stage_adapters_and_imports_from_site_packages(fresh_venv, tmp_path):
    out = subprocess.run([str(fresh_venv / "bin/python"), "-c", "import rankserve.builder.repository as r; print(r.__file__); print(r.STAGE_SOURCES)"],
                         capture_output=True, text=True, cwd=tmp_path, check=True)
    module, stages = out.stdout.split()
    assert str(fresh_venv) in module and str(ROOT) not in module
    assert Path(stages) == Path(module).parents[1] / "model_repository"
    for stage in (api.TOKENIZE_MODEL, api.RANK_MODEL, api.POSTPROCESS_MODEL):
        assert (Path(stages) / stage / "1" / "model.py").read_bytes() == (ROOT / "model_repository" / stage / "1" / "model.py").read_bytes()


def test_cpu_build_and_gpu_layout_from_the_installed_wheel(fresh_venv, tiny_ranker, tiny_repo, tmp_path):
    repo = tmp_path / "repo"
    build = subprocess.run([str(fresh_venv / "bin/rankserve"), "build", "--ranker", str(tiny_ranker), "--out", str(repo), "--preset", "tiny"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    for stage in (api.TOKENIZE_MODEL, api.RANK_MODEL, api.POSTPROCESS_MODEL):
        assert (repo / stage / "1" / "model.py").exists()
    # the GPU build's layout steps (after its engines): tokenize_gpu's adapter and the TensorRT configs
    script = f"""
import json
from pathlib import Path
from rankserve import api
from rankserve.builder import configs
from rankserve.builder.consistency import onnx_signature, repository_problems
from rankserve.builder.engine import GpuFacts, engine_record
from rankserve.builder.gpu import layout_gpu_models
from rankserve.builder.repository import MANIFEST, install_stage
from rankserve.settings import PRESETS

repo = Path({str(repo)!r})
settings = PRESETS["tiny"]
manifest = json.loads((repo / MANIFEST).read_text())
sig = onnx_signature(repo / "rank" / "1" / "model.onnx")
manifest["engines"] = {{p: [engine_record(p, "10.5.0.18", GpuFacts("NVIDIA L4", "8.9"), settings.engine, f"rank_trt_{{p}}/1/model.sm89.plan",
                                          "0" * 64, {{}}, sig.input_names)] for p in settings.engine.precisions}}
install_stage(configs.GPU_TOKENIZE_MODEL, repo, source_stage=api.TOKENIZE_MODEL)
layout_gpu_models(repo, manifest, settings)
print(json.dumps(repository_problems(repo, {{f"rank_trt_{{p}}": sig for p in settings.engine.precisions}})))
"""
    out = subprocess.run([str(fresh_venv / "bin/python"), "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
    assert (repo / "tokenize_gpu" / "1" / "model.py").read_bytes() == (ROOT / "model_repository/tokenize/1/model.py").read_bytes()
    assert (repo / "ranker_trt_int8" / "config.pbtxt").exists()
