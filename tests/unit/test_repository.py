"""The model repository laid out by ``build_repository`` and its manifest."""

import json

import pytest

from conftest import TINY
from rankserve.builder import configs
from rankserve.builder.repository import MANIFEST, build_repository, verify_repository
from rankserve.errors import BuildError

pytestmark = pytest.mark.slow


def test_layout(tiny_repo):
    for name in ("tokenize", "rank", "postprocess", "ranker"):
        assert (tiny_repo / name / "config.pbtxt").exists()
        assert (tiny_repo / name / "1").is_dir()
    for stage in ("tokenize", "rank", "postprocess"):
        assert (tiny_repo / stage / "1" / "model.py").exists()
    assert (tiny_repo / "rank" / "1" / "model.onnx").exists()
    assert (tiny_repo / "tokenize" / "1" / "tokenizer.json").exists()
    assert configs.parse(tiny_repo / "tokenize" / "config.pbtxt").parameters["max_length"].string_value == "64"


def test_manifest_records_source_checksums_versions_and_settings(tiny_repo, tiny_ranker):
    manifest = json.loads((tiny_repo / MANIFEST).read_text())
    assert manifest["ranker"]["source"] == str(tiny_ranker.resolve())
    assert set(manifest["ranker"]["files"]) >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert set(manifest["models"]["rank"]["files"]) == {"rank/1/model.onnx"}
    assert {"torch", "onnx", "onnxruntime", "transformers", "tokenizers", "python"} <= set(manifest["versions"])
    assert manifest["settings"]["tokenize"]["max_length"] == TINY.tokenize.max_length
    assert manifest["default_variant"] == "fp32" and manifest["opset"] == TINY.opset
    fp32 = manifest["variants"]["fp32"]
    assert (fp32["rank_model"], fp32["runtime"], fp32["precision"]) == ("rank", "onnxruntime", "fp32")
    assert all(c["max_abs_diff"] <= 1e-4 for c in manifest["numeric_check"]["shapes"])
    assert verify_repository(tiny_repo) == manifest


def test_verify_detects_a_changed_model_file(tiny_repo, tmp_path):
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(tiny_repo, copy)
    with (copy / "rank" / "1" / "model.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(BuildError, match="does not match its checksum"):
        verify_repository(copy)
    (copy / MANIFEST).write_text("{not json")
    with pytest.raises(BuildError, match="not a valid rankserve manifest"):
        verify_repository(copy)
    (copy / MANIFEST).unlink()
    with pytest.raises(BuildError, match="has no manifest.json"):
        verify_repository(copy)


def test_failed_check_leaves_the_output_untouched(tiny_ranker, tmp_path):
    """A tolerance no float32 export can meet: the real check fails and nothing is written."""
    import dataclasses

    strict = dataclasses.replace(TINY, check=dataclasses.replace(TINY.check, atol=1e-12))
    out = tmp_path / "out"
    with pytest.raises(BuildError, match="numeric check failed"):
        build_repository(tiny_ranker, out, strict, log=lambda _m: None)
    assert not out.exists()
