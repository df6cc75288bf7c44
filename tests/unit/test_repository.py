"""The model repository laid out by ``build_repository`` and its manifest."""

import json

import pytest

from conftest import TINY
from rankserve.builder import configs
from rankserve.builder.repository import MANIFEST, build_repository, model_entry, refresh_configs, verify_repository
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
    assert manifest["manifest_format"] == 2
    assert set(manifest["models"]["rank"]["files"]) == {"rank/config.pbtxt", "rank/1/model.py", "rank/1/model.onnx", "rank/warmup/input_ids",
                                                        "rank/warmup/attention_mask", "rank/warmup/token_type_ids"}
    assert set(manifest["models"]["ranker"]["files"]) == {"ranker/config.pbtxt"}
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


def _record(repo, *names):
    """Record the current files of ``names`` in the manifest, as the build that wrote them did."""
    manifest = json.loads((repo / MANIFEST).read_text())
    for name in names:
        manifest["models"][name] = model_entry(repo, name)
    (repo / MANIFEST).write_text(json.dumps(manifest))


def test_configs_of_an_older_layout_are_regenerated_in_place(tiny_repo, tmp_path):
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(tiny_repo, copy)
    assert refresh_configs(copy, TINY) == []  # a fresh build is current
    current = (copy / "rank" / "config.pbtxt").read_text()
    (copy / "rank" / "config.pbtxt").write_text(current.replace("  allow_ragged_batch: true\n", ""))
    _record(copy, "rank")  # what an older version laid out and recorded
    onnx_before = (copy / "rank" / "1" / "model.onnx").read_bytes()
    assert refresh_configs(copy, TINY) == ["rank"]
    assert (copy / "rank" / "config.pbtxt").read_text() == current
    assert (copy / "rank" / "1" / "model.onnx").read_bytes() == onnx_before
    verify_repository(copy)  # the rewritten config is recorded
    adapter = copy / "rank" / "1" / "model.py"
    tracked = adapter.read_bytes()
    adapter.write_text("# an adapter from an older version\n")
    with pytest.raises(BuildError, match=r"model\.py does not match its checksum"):
        verify_repository(copy)  # an adapter nobody recorded is refused, by refresh too
    with pytest.raises(BuildError, match=r"model\.py does not match its checksum"):
        refresh_configs(copy, TINY)
    _record(copy, "rank")  # recorded by the older build that wrote it: replaced and recorded
    assert refresh_configs(copy, TINY) == ["rank"] and adapter.read_bytes() == tracked
    verify_repository(copy)
    shutil.copytree(copy / "rank", copy / "rank_extra")
    _record(copy, "rank_extra")
    with pytest.raises(BuildError, match="other models"):
        refresh_configs(copy, TINY)


def test_an_adapter_of_this_version_is_recorded_by_refresh(tiny_repo, tmp_path):
    """A repository built in place (the checkout's model_repository/, whose model.py files are the
    tracked ones): after a pull changed an adapter, refresh accepts this version's and records it."""
    import shutil

    from rankserve.builder import repository

    copy = tmp_path / "repo"
    shutil.copytree(tiny_repo, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["models"]["rank"]["files"]["rank/1/model.py"] = "0" * 64  # recorded before the pull
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BuildError, match="does not match its checksum"):
        verify_repository(copy)
    assert (copy / "rank" / "1" / "model.py").read_bytes() == (repository.STAGE_SOURCES / "rank" / "1" / "model.py").read_bytes()
    assert refresh_configs(copy, TINY) == []
    verify_repository(copy)


def test_failed_check_leaves_the_output_untouched(tiny_ranker, tmp_path):
    """A tolerance no float32 export can meet: the real check fails and nothing is written."""
    import dataclasses

    strict = dataclasses.replace(TINY, check=dataclasses.replace(TINY.check, atol=1e-12))
    out = tmp_path / "out"
    with pytest.raises(BuildError, match="numeric check failed"):
        build_repository(tiny_ranker, out, strict, log=lambda _m: None)
    assert not out.exists()


def _cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "rankserve", *args], capture_output=True, text=True, timeout=600)


def test_variants_need_data_for_calibration_and_the_gate(tiny_ranker, tmp_path):
    out = _cli("build", "--ranker", str(tiny_ranker), "--out", str(tmp_path / "repo"), "--preset", "tiny", "--variants", "int8")
    assert out.returncode == 2 and "need --data" in out.stderr and not (tmp_path / "repo").exists()


def test_build_command_with_variants_lays_out_one_ensemble_each(tiny_ranker, dataset, tmp_path):
    dataset.save(tmp_path / "data")
    out = _cli("build", "--ranker", str(tiny_ranker), "--out", str(tmp_path / "repo"), "--preset", "tiny",
               "--variants", "fp32,int8_dynamic", "--data", str(tmp_path / "data"), "--calibration-method", "minmax")
    assert out.returncode == 0, out.stderr
    manifest = json.loads((tmp_path / "repo" / MANIFEST).read_text())
    assert set(manifest["variants"]) == {"fp32", "int8_dynamic"}
    assert manifest["settings"]["quant"]["method"] == "minmax"
    names = sorted(p.parent.name for p in (tmp_path / "repo").glob("*/config.pbtxt"))
    default = manifest["default_variant"]
    other = ({"fp32", "int8_dynamic"} - {default}).pop()
    assert names == sorted(["tokenize", "postprocess", "rank", f"rank_{other}", "ranker", "ranker_fp32", "ranker_int8_dynamic"])
    assert "variant int8_dynamic" in out.stdout and "default ranker" in out.stdout


def test_a_rebuild_removes_models_of_the_previous_build(tiny_ranker, dataset, tmp_path):
    dataset.save(tmp_path / "data")
    repo = tmp_path / "repo"
    first = _cli("build", "--ranker", str(tiny_ranker), "--out", str(repo), "--preset", "tiny",
                 "--variants", "fp32,int8_dynamic", "--data", str(tmp_path / "data"))
    assert first.returncode == 0, first.stderr
    second = _cli("build", "--ranker", str(tiny_ranker), "--out", str(repo), "--preset", "tiny")
    assert second.returncode == 0, second.stderr
    assert sorted(p.parent.name for p in repo.glob("*/config.pbtxt")) == ["postprocess", "rank", "ranker", "ranker_fp32", "tokenize"]
    assert not list(repo.glob("rank_*")) and verify_repository(repo)["default_variant"] == "fp32"


def test_refresh_keeps_the_tensorrt_models_a_gpu_build_added(tiny_repo, tmp_path):
    import shutil

    from rankserve.builder.engine import GpuFacts, engine_record

    copy = tmp_path / "repo"
    shutil.copytree(tiny_repo, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    record = engine_record("fp16", "10.5.0", GpuFacts("NVIDIA A10G", "8.6"), TINY.engine, "rank_trt_fp16/1/model.sm86.plan", "0" * 64, {})
    manifest["engines"] = {p: [dict(record, precision=p)] for p in TINY.engine.precisions}
    gpu = configs.gpu_models(TINY, manifest["engines"])
    for name in gpu:  # what build_gpu_repository lays out, without the plan files
        (copy / name / "1").mkdir(parents=True, exist_ok=True)
        (copy / name / "config.pbtxt").write_text("# stale\n")
        manifest["models"][name] = model_entry(copy, name)
    (copy / MANIFEST).write_text(json.dumps(manifest))
    assert sorted(refresh_configs(copy, TINY)) == sorted(gpu)
    assert configs.parse(copy / "rank_trt_fp16" / "config.pbtxt").cc_model_filenames["8.6"] == "model.sm86.plan"
    assert verify_repository(copy)["models"]["rank_trt_fp16"] == model_entry(copy, "rank_trt_fp16")  # rewritten and recorded


def test_the_default_is_the_fastest_strict_variant_unless_one_is_named(tiny_ranker, dataset, tmp_path):
    """With the strict overlap at 1.0, the tiny INT8 model (overlap with FP32 below 1) passes its own gate
    but not the strict one: FP32 is the default whatever the speeds; named, INT8 is; alone, the build refuses."""
    dataset.save(tmp_path / "data")
    common = ["--ranker", str(tiny_ranker), "--preset", "tiny", "--data", str(tmp_path / "data"), "--min-top-k-overlap", "1.0"]
    out = _cli("build", *common, "--out", str(tmp_path / "strict"), "--variants", "fp32,int8_dynamic")
    assert out.returncode == 0, out.stderr
    manifest = json.loads((tmp_path / "strict" / MANIFEST).read_text())
    assert manifest["variants"]["int8_dynamic"]["gate"]["top_k_overlap"] < 1.0
    assert not manifest["variants"]["int8_dynamic"]["gate"]["strict"] and manifest["variants"]["fp32"]["gate"]["strict"]
    assert manifest["default_variant"] == "fp32" and manifest["default_rule"] == "fastest strict"
    assert "default ranker = fp32" in out.stdout and "passing the strict gate" in out.stdout
    named = _cli("build", *common, "--out", str(tmp_path / "named"), "--variants", "fp32,int8_dynamic", "--default", "int8_dynamic")
    assert named.returncode == 0, named.stderr
    manifest = json.loads((tmp_path / "named" / MANIFEST).read_text())
    assert manifest["default_variant"] == "int8_dynamic" and manifest["default_rule"] == "named"
    alone = _cli("build", *common, "--out", str(tmp_path / "alone"), "--variants", "int8_dynamic")
    assert alone.returncode != 0 and "passes the strict gate" in alone.stderr and not (tmp_path / "alone").exists()


def test_check_engines_waits_for_a_release_being_published_then_verifies_it(tiny_repo, tmp_path):
    """The replicas' init container: `rankserve check-engines --wait S` until the publish Job has
    renamed the release into place; then the same checks as before (checksums, engines)."""
    import os
    import shutil
    import subprocess
    import sys
    import threading

    from rankserve.builder.repository import wait_for_manifest

    release = tmp_path / "releases" / "0.1.0" / "model_repository"
    with pytest.raises(BuildError, match="did not appear within 0 s"):
        wait_for_manifest(release, 0.0)
    publisher = threading.Timer(0.5, lambda: shutil.copytree(tiny_repo, release))
    publisher.start()
    assert wait_for_manifest(release, 30, poll_s=0.1, log=lambda _m: None) == release / MANIFEST
    publisher.join()

    def check(*args, **env):
        return subprocess.run([sys.executable, "-m", "rankserve", "check-engines", *args], capture_output=True, text=True,
                              timeout=120, env={**os.environ, **env})
    ok = check("--wait", "5", RANKSERVE_MODEL_REPOSITORY=str(release))  # the pod's environment names the release
    assert ok.returncode == 0 and "no TensorRT engines" in ok.stdout, ok.stderr
    gpu = check("--wait", "5", "--require-engines", "--model-repository", str(release))
    assert gpu.returncode == 2 and "lists no TensorRT engines" in gpu.stderr and "Traceback" not in gpu.stderr
    missing = check("--wait", "1", "--model-repository", str(tmp_path / "releases" / "0.2.0" / "model_repository"))
    assert missing.returncode == 2 and "did not appear within 1 s" in missing.stderr
