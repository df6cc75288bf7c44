"""The Dockerfiles, read without a Docker engine: every COPY source is in the build context (after the
.dockerignore that applies), the project install has every file it needs, and every program the
image or its compose service runs is installed in that image."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from conftest import resolved_compose

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
DOCKERFILES = sorted(p.name for p in DOCKER.glob("*.Dockerfile"))
# What `make build` writes: the only sources models.Dockerfile may COPY (build outputs, not tracked)
BUILD_OUTPUTS = {"model_repository", "artifacts/variants", "artifacts/data"}
PUBLISH_SCRIPT = "deploy/docker/publish.sh"  # the one source file the models image carries besides them
ADAPTERS = [f"model_repository/{stage}/1/model.py" for stage in ("tokenize", "rank", "postprocess")]


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def ignore_patterns(dockerfile: Path) -> list[str]:
    """The ignore file BuildKit applies: ``<name>.dockerignore`` beside the Dockerfile, else the context's."""
    own = dockerfile.with_name(dockerfile.name + ".dockerignore")
    path = own if own.exists() else ROOT / ".dockerignore"
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or a folder above it decides; ``!`` re-includes."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    result = False
    for raw in patterns:
        negate, pattern = raw.startswith("!"), raw.lstrip("!").strip("/")
        options = [pattern[3:], "*/" + pattern[3:]] if pattern.startswith("**/") else [pattern]
        if any(fnmatch.fnmatchcase(c, p) for c in ([path] if negate else prefixes) for p in options):
            result = not negate
    return result


def context_files(source: str, patterns: list[str]) -> list[str]:
    base = ROOT / source
    files = [base] if base.is_file() else [p for p in base.rglob("*") if p.is_file()]
    return [str(p.relative_to(ROOT)) for p in files if not ignored(str(p.relative_to(ROOT)), patterns)]


def copies(dockerfile: Path) -> list[tuple[list[str], str]]:
    out = []
    for word, args in instructions(dockerfile):
        if word == "COPY":
            parts = [a for a in shlex.split(args) if not a.startswith("--")]
            out.append((parts[:-1], parts[-1]))
    return out


def test_dockerignore_rule():
    patterns = ["artifacts", "model_repository/*", "!model_repository/rank/1/model.py", "**/__pycache__"]
    assert ignored("artifacts/variants/fp32.onnx", patterns) and ignored("model_repository/rank/1/model.onnx", patterns)
    assert not ignored("model_repository/rank/1/model.py", patterns) and ignored("src/rankserve/__pycache__/x.pyc", patterns)
    assert not ignored("src/rankserve/cli.py", patterns)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copy_sources_are_in_the_build_context(name):
    dockerfile = DOCKER / name
    patterns = ignore_patterns(dockerfile)
    for sources, _ in copies(dockerfile):
        for source in sources:
            if name == "models.Dockerfile" and source != PUBLISH_SCRIPT:  # build outputs: made by `make build`, and let through
                assert source in BUILD_OUTPUTS, source
                assert not ignored(source, patterns) and not ignored(f"{source}/x.onnx", patterns)
                continue
            assert (ROOT / source).exists(), f"{name}: COPY {source}: no such file in the repository"
            if name == "models.Dockerfile":
                assert not ignored(source, patterns)
                continue
            assert context_files(source, patterns), f"{name}: COPY {source}: everything is excluded by the .dockerignore"
    if name != "models.Dockerfile":  # the sources images never get build outputs, venvs or weights
        for sources, _ in copies(dockerfile):
            for source in sources:
                sent = context_files(source, patterns)
                assert not [f for f in sent if f.endswith((".onnx", ".plan", ".safetensors")) or "/.venv" in f or f.startswith(".venv")]


def _project_installs(dockerfile: Path) -> list[tuple[str, set[str]]]:
    """(project dir, extras) of each `pip install` of this project."""
    found = []
    for word, args in instructions(dockerfile):
        if word == "RUN" and "pip install" in args:
            for token in shlex.split(args):
                m = re.fullmatch(r"(/opt/rankserve|\.)\[([\w,-]+)\]", token)
                if m:
                    found.append((m.group(1), set(m.group(2).split(","))))
    return found


@pytest.mark.parametrize("name", [n for n in DOCKERFILES if n != "models.Dockerfile"])
def test_the_project_install_has_every_file_setup_needs(name):
    dockerfile = DOCKER / name
    (project, extras), = _project_installs(dockerfile)
    extras_known = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras <= set(extras_known), extras
    workdir = next((a for w, a in instructions(dockerfile) if w == "WORKDIR"), "/")
    target = "/opt/rankserve" if project == "/opt/rankserve" else workdir
    copied = {}
    for sources, dest in copies(dockerfile):
        dest = dest if dest.startswith("/") else f"{workdir.rstrip('/')}/{dest.lstrip('./')}"
        for source in sources:
            copied[source] = dest
    patterns = ignore_patterns(dockerfile)
    needed = ["pyproject.toml", "setup.py", "README.md", "src", *ADAPTERS]  # setup.py's package_dir and package_data
    for path in needed:
        source = next((s for s in copied if path == s or path.startswith(s + "/")), None)
        assert source is not None, f"{name}: {path} is not copied before the install"
        assert copied[source].rstrip("/").startswith(target.rstrip("/")) and not ignored(path, patterns), (name, path)


def _programs(name: str) -> dict[str, set[str]]:
    """Programs each image provides: its base's and the console scripts of what it installs."""
    dockerfile = DOCKER / name
    base = next(a for w, a in instructions(dockerfile) if w == "FROM")
    provided = {"sh", "/bin/sh"}
    if base.startswith("python:"):
        provided.add("python")
    if "tritonserver" in base:
        provided |= {"tritonserver"}
    for _, extras in _project_installs(dockerfile):
        provided.add("rankserve")  # [project.scripts]
        deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        if any(d.startswith("locust") for e in extras for d in deps.get(e, [])):
            provided.add("locust")
        if any(d.startswith("pytest") for e in extras for d in deps.get(e, [])) or "tensorrt" in base:
            provided.add("python")
    return provided


def test_what_each_image_runs_is_installed_in_it():
    images = {"rankserve/triton": "triton.Dockerfile", "rankserve/trt-build": "trt-build.Dockerfile",
              "rankserve/locust": "locust.Dockerfile"}
    for name in images.values():
        provided = _programs(name)
        for word, args in instructions(DOCKER / name):
            if word in ("ENTRYPOINT", "CMD") or (word == "HEALTHCHECK" and "CMD" in args):
                argv = json.loads(args.split("CMD", 1)[1].strip() if word == "HEALTHCHECK" else args)
                assert argv[0] in provided, (name, word, argv)
    services = resolved_compose(TRITON_ADMIN_KEY="k")["services"]
    for service in services.values():
        image = images[service["image"].split(":")[0]]
        provided = _programs(image)
        commands = [service.get("entrypoint") or [], service.get("healthcheck", {}).get("test", [])[1:]]
        has_entrypoint = any(w == "ENTRYPOINT" for w, _ in instructions(DOCKER / image))
        if service.get("entrypoint") is None and not has_entrypoint and service.get("command"):
            commands.append(service["command"])  # with an ENTRYPOINT, the command is its arguments
        for argv in filter(None, commands):
            assert argv[0] in provided, (service["image"], argv)
            if argv[0] in ("sh", "/bin/sh"):  # each command of the shell script
                for part in re.split(r"&&|;|\|\|", argv[2]):
                    words = shlex.split(part.replace("exec ", "", 1))
                    assert not words or words[0] in provided, (service["image"], words)
