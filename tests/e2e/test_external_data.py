"""Models over protobuf's 2 GB limit, fast: the tiny ranker built with the limit lowered to 200 KB
takes exactly the path of a large ranker (every variant with one weights file beside its graph,
the layout, the manifest's checksums, the checks before serving, the server). The real > 2 GB
ranker goes the same way in ``test_large_ranker.py`` (slow)."""

import dataclasses
import json
import shutil

import numpy as np
import pytest

from conftest import TINY, free_serve_settings
from rankserve.builder import onnx_files
from rankserve.builder.repository import MANIFEST, build_repository, verify_repository
from rankserve.errors import BuildError
from rankserve.server.embedded import EmbeddedServer
from rankserve_client import RankerClient

pytestmark = [pytest.mark.triton, pytest.mark.slow]

VARIANTS = ("fp32", "int8", "int8_dynamic", "fp16")


@pytest.fixture(scope="module")
def external_repo(tiny_ranker, dataset, tmp_path_factory):
    work, out = tmp_path_factory.mktemp("ext_work"), tmp_path_factory.mktemp("ext_repo")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnx_files, "PROTOBUF_LIMIT", 200_000)
        mp.setattr(onnx_files, "INLINE_MARGIN", 0)
        manifest = build_repository(tiny_ranker, out, dataclasses.replace(TINY, variants=VARIANTS), log=lambda _m: None,
                                    dataset=dataset, work_dir=work)
    return out, work, manifest


def test_every_variant_and_served_model_keeps_its_weights_in_one_data_file(external_repo):
    out, work, manifest = external_repo
    for name in VARIANTS:
        assert sorted(p.name for p in work.glob(f"{name}.onnx*")) == [f"{name}.onnx", f"{name}.onnx.data"], name
        assert manifest["variants"][name]["external_data"] is True
        assert manifest["variants"][name]["onnx_bytes"] == onnx_files.model_bytes(work / f"{name}.onnx")
    assert not [p for p in work.iterdir() if p.is_file() and not p.name.endswith((".onnx", ".onnx.data"))]  # no stray weight files
    for model, entry in manifest["models"].items():
        if (out / model / "1" / "model.onnx").exists():
            assert {f for f in entry["files"] if "/1/" in f} == {f"{model}/1/model.onnx", f"{model}/1/model.onnx.data",
                                                                 f"{model}/1/model.py"}
            assert onnx_files.external_locations(out / model / "1" / "model.onnx") == ["model.onnx.data"]
            data = out / model / "1" / "model.onnx.data"  # readable by a server running as another user
            assert data.stat().st_mode & 0o777 == (out / model / "1" / "model.onnx").stat().st_mode & 0o777
            assert data.stat().st_mode & 0o004


def test_a_repository_without_its_weights_or_with_other_weights_is_refused_before_serving(external_repo, tmp_path):
    out, _, _ = external_repo
    copy = tmp_path / "repo"
    shutil.copytree(out, copy)
    verify_repository(copy)
    data = copy / "rank" / "1" / "model.onnx.data"
    blob = bytearray(data.read_bytes())
    blob[-1] ^= 0xFF
    data.write_bytes(bytes(blob))
    with pytest.raises(BuildError, match=r"model\.onnx\.data does not match its checksum"):
        verify_repository(copy)
    data.unlink()
    with pytest.raises(BuildError, match=r"model\.onnx\.data is missing"):
        verify_repository(copy)
    # a manifest of an older build that did not list the weights: refused, naming the file
    manifest = json.loads((copy / MANIFEST).read_text())
    del manifest["models"]["rank"]["files"]["rank/1/model.onnx.data"]
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BuildError, match=r"needs its weights file model\.onnx\.data, which .* does not list"):
        verify_repository(copy)


def test_served_scores_equal_pytorch_over_http_and_grpc(external_repo, offline_scorer, dataset, tmp_path):
    out, _, manifest = external_repo
    q = dataset.split("heldout")[0]
    texts = [dataset.products[j.product_id].text for j in dataset.by_query()[q.query_id]]
    expected = offline_scorer(q.text, texts)
    with EmbeddedServer(out, free_serve_settings(), tmp_path / "tritonserver.log") as server:
        for client in (RankerClient(f"http://{server.http_url}"), RankerClient(f"grpc://{server.grpc_url}")):
            with client:
                got = {r.id: r.score for r in client.rank(q.text, texts, model=manifest["variants"]["fp32"]["ensemble"])}
                assert max(abs(got[i] - expected[i]) for i in range(len(texts))) <= 1e-4
                for name in ("int8", "int8_dynamic"):  # the quantized ones load their weights file too
                    scores = [r.score for r in client.rank(q.text, texts, model=manifest["variants"][name]["ensemble"])]
                    assert len(scores) == len(texts) and np.isfinite(scores).all()
