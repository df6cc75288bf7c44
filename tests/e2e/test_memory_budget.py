"""Which variants a repository loads, the memory budget at build and at serve, and the estimate
checked against the measured resident memory of the real server and its stubs."""

import dataclasses
import json
import subprocess
import sys

import pytest

from conftest import TINY, free_serve_settings
from rankserve.builder import memory
from rankserve.builder.repository import build_repository
from rankserve.errors import BuildError
from rankserve.server.embedded import EmbeddedServer, repository_models
from rankserve_client import RankerClient

pytestmark = [pytest.mark.triton, pytest.mark.slow]

VARIANTS = ("fp32", "int8_dynamic")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("memory_work")


def _build(tiny_ranker, dataset, work, out, **settings):
    # one runtime: the estimate depends on it, and a choice by measured speed may differ between two builds
    return build_repository(tiny_ranker, out, dataclasses.replace(TINY, variants=VARIANTS, runtimes=("onnxruntime",), **settings),
                            log=lambda _m: None, dataset=dataset, work_dir=work)


def test_a_repository_loads_the_variants_asked_for_and_records_the_others(tiny_ranker, dataset, work, tmp_path):
    manifest = _build(tiny_ranker, dataset, work, tmp_path / "one", load="fp32")
    assert manifest["serving"]["loaded"] == ["fp32"] and manifest["default_variant"] == "fp32"
    assert manifest["variants"]["int8_dynamic"]["loaded"] is False and manifest["variants"]["int8_dynamic"]["rank_model"] is None
    assert manifest["variants"]["int8_dynamic"]["gate"]["passed"]  # built and gated all the same
    assert repository_models(tmp_path / "one") == ["postprocess", "rank", "ranker", "ranker_fp32", "tokenize"]
    # auto with a small ranker: everything fits, everything loads, the fastest is the default
    auto = _build(tiny_ranker, dataset, work, tmp_path / "auto")
    assert set(auto["serving"]["loaded"]) == set(VARIANTS) and auto["serving"]["loaded"][0] == auto["default_variant"]
    estimate = auto["serving"]["estimate"]
    assert estimate["total"] == estimate["server"] + sum(estimate["models"].values())
    assert estimate["models"]["tokenize"] == TINY.tokenize.instances * memory.LIGHT_STUB_BYTES
    assert estimate["models"]["rank"] > memory.LIGHT_STUB_BYTES and estimate["models"]["ranker"] == 0


def test_the_build_refuses_loaded_variants_over_the_budget(tiny_ranker, dataset, work, tmp_path):
    estimates = {n: v["estimated_memory_bytes"] for n, v in _build(tiny_ranker, dataset, work, tmp_path / "free")["variants"].items()}
    both = memory.shared_bytes() + sum(estimates.values())
    with pytest.raises(BuildError, match=r"loaded variants \['(fp32|int8_dynamic)', '(fp32|int8_dynamic)'\] need an estimated .* "
                                         r"more than the budget of"):
        _build(tiny_ranker, dataset, work, tmp_path / "r", load="all", memory_budget_bytes=both - 2**20)
    assert not (tmp_path / "r").exists()  # refused before anything was laid out
    # auto under a budget that holds either variant but not both falls back to the fastest alone
    budget = memory.shared_bytes() + max(estimates.values()) + 2**20
    manifest = _build(tiny_ranker, dataset, work, tmp_path / "r", memory_budget_bytes=budget)
    assert len(manifest["serving"]["loaded"]) == 1 and manifest["serving"]["estimate"]["total"] <= budget


def test_serve_refuses_a_repository_over_its_budget_before_starting_anything(tiny_repo):
    s = free_serve_settings()
    out = subprocess.run([sys.executable, "-m", "rankserve", "serve", "--model-repository", str(tiny_repo), "--http-port",
                          str(s.http_port), "--grpc-port", str(s.grpc_port), "--metrics-port", str(s.metrics_port),
                          "--memory-budget", "100MiB"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "needs an estimated" in out.stderr and "more than the budget of 100 MiB" in out.stderr and "rank " in out.stderr
    assert "tritonserver ready" not in out.stdout


def test_the_estimate_holds_the_measured_memory_of_the_served_repository(tiny_repo, tmp_path):
    estimate = memory.estimate_repository(tiny_repo)
    with EmbeddedServer(tiny_repo, free_serve_settings(), tmp_path / "tritonserver.log") as server:
        with RankerClient(f"http://{server.http_url}") as client:  # the largest batch the rank stage takes
            client.rank("solid wood dining table", ["extendable oak dining table for six"] * 200)
        stubs = {s.model: rss_bytes(s.pid) for s in server.stubs}
        measured = rss_bytes(server.process.pid) + sum(stubs.values())
    print(json.dumps({"estimate": estimate.to_dict(), "measured_rss": {"server": measured - sum(stubs.values()), **stubs}}))
    assert measured <= estimate.total <= 2.5 * measured
    for model, rss in stubs.items():
        assert rss <= estimate.models[model], model
