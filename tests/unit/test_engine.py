"""TensorRT engine logic that needs no GPU: profiles, names, configs, portability, checks."""

import dataclasses
import importlib.util

import numpy as np
import pytest

from rankserve import api
from rankserve.builder import configs
from rankserve.builder.engine import (GpuFacts, check_portability, compare_to_reference, engine_record, local_gpus,
                                      parse_nvidia_smi, plan_filename, profile_for, profile_shapes, usable_engine)
from rankserve.errors import BuildError, ConfigError
from rankserve.settings import PRESETS, BuildSettings, EngineProfile, EngineSettings, TokenizeSettings

DEFAULT = PRESETS["default"]
A10G, H200, T4 = GpuFacts("NVIDIA A10G", "8.6"), GpuFacts("NVIDIA H200", "9.0"), GpuFacts("Tesla T4", "7.5")


def test_profiles_are_validated():
    with pytest.raises(ConfigError, match="min <= opt <= max"):
        EngineProfile("p", min=(1, 8), opt=(4, 4), max=(8, 16))
    short = EngineProfile("short", min=(1, 1), opt=(8, 16), max=(64, 32))
    with pytest.raises(ConfigError, match="unique"):
        EngineSettings(profiles=(short, short))
    with pytest.raises(ConfigError, match="same largest batch"):
        EngineSettings(profiles=(short, EngineProfile("long", min=(1, 1), opt=(8, 64), max=(32, 128))))
    with pytest.raises(ConfigError, match="batch of one pair"):
        EngineSettings(profiles=(EngineProfile("p", min=(2, 1), opt=(8, 16), max=(64, 32)),))
    with pytest.raises(ConfigError, match="precisions"):
        EngineSettings(precisions=("fp8",))


def test_gpu_target_needs_profiles_that_cover_what_the_tokenizer_lets_through():
    BuildSettings(target="gpu")  # the defaults cover 1000 candidates x 128 tokens
    with pytest.raises(ConfigError, match="max_length"):
        BuildSettings(target="gpu", tokenize=TokenizeSettings(max_length=256))
    with pytest.raises(ConfigError, match="max_candidates"):
        BuildSettings(target="gpu", tokenize=TokenizeSettings(max_candidates=2000))
    BuildSettings(target="cpu", tokenize=TokenizeSettings(max_length=256))  # engines are not built for cpu


def test_every_input_gets_each_profile_and_batches_find_their_profile():
    shapes = profile_shapes(DEFAULT.engine.profiles[0], [t.name for t in api.ENCODED])
    assert set(shapes) == {"input_ids", "attention_mask", "token_type_ids"}
    assert shapes["input_ids"] == ((1, 1), (128, 48), (1000, 64))
    assert profile_for(DEFAULT.engine, 500, 40) == 0 and profile_for(DEFAULT.engine, 500, 100) == 1
    with pytest.raises(BuildError, match="no optimization profile accepts 2000 pairs"):
        profile_for(DEFAULT.engine, 2000, 10)


def test_plan_files_per_compute_capability_and_nvidia_smi_parsing():
    assert plan_filename("8.6") == "model.sm86.plan" and plan_filename("10.0") == "model.sm100.plan"
    with pytest.raises(BuildError, match="compute capability"):
        plan_filename("sm86")
    assert parse_nvidia_smi("NVIDIA H200, 9.0\nNVIDIA A10G, 8.6\n") == [H200, A10G]
    assert isinstance(local_gpus(), list)  # empty here, no nvidia-smi: never an exception


def _record(gpu=A10G, version="10.5.0", **engine):
    return engine_record("fp16", version, gpu, dataclasses.replace(DEFAULT.engine, **engine),
                         "rank_trt_fp16/1/" + plan_filename(gpu.compute_capability), "0" * 64, {})


def test_portability_guard_names_the_mismatch():
    check_portability(_record(), "10.5.0", A10G)
    check_portability(_record(), "10.5.1", A10G)  # patch releases share engines
    with pytest.raises(BuildError, match="built with TensorRT 10.5.0; this server has 10.6.0"):
        check_portability(_record(), "10.6.0", A10G)
    with pytest.raises(BuildError, match="built on NVIDIA A10G .compute capability 8.6.; NVIDIA H200 has 9.0"):
        check_portability(_record(), "10.5.0", H200)
    check_portability(_record(version_compatible=True), "10.7.0", A10G)
    with pytest.raises(BuildError, match="at or above"):
        check_portability(_record(version_compatible=True), "10.3.0", A10G)
    check_portability(_record(hardware_compatibility="ampere_plus"), "10.5.0", H200)
    with pytest.raises(BuildError, match="Ampere or newer"):
        check_portability(_record(hardware_compatibility="ampere_plus"), "10.5.0", T4)


def test_the_engine_for_this_gpu_is_chosen_among_one_per_compute_capability():
    records = [_record(A10G), _record(H200)]
    assert usable_engine(records, "10.5.0", H200)["plan_file"] == "rank_trt_fp16/1/model.sm90.plan"
    with pytest.raises(BuildError, match="no engine can run here") as err:
        usable_engine(records, "10.5.0", T4)
    assert "model.sm86.plan" in str(err.value) and "model.sm90.plan" in str(err.value)


def test_post_build_check_against_onnx_runtime():
    reference = np.array([0.5, -1.0, 2.0])
    result = compare_to_reference(reference + 0.01, reference, 0.05, "fp16")
    assert result["max_abs_diff"] == pytest.approx(0.01) and result["same_order"]
    with pytest.raises(BuildError, match="differs from ONNX Runtime FP32 by 0.3"):
        compare_to_reference(reference + np.array([0, 0.3, 0]), reference, 0.05, "fp16")


def test_tensorrt_models_and_ensembles_keep_the_public_api():
    models = {name: configs.parse(configs.to_text(c)) for name, c in configs.gpu_models(DEFAULT, ["8.6", "9.0"]).items()}
    assert set(models) == {"tokenize_gpu", "rank_trt_fp16", "ranker_trt_fp16", "rank_trt_int8", "ranker_trt_int8"}
    assert models["tokenize_gpu"].parameters["pad_buckets"].string_value == "64,128"  # the profiles' widths
    rank = models["rank_trt_int8"]
    assert rank.platform == "tensorrt_plan" and rank.max_batch_size == DEFAULT.engine.max_pairs
    assert rank.instance_group[0].kind == rank.instance_group[0].KIND_GPU and list(rank.instance_group[0].profile) == ["0", "1"]
    assert dict(rank.cc_model_filenames) == {"8.6": "model.sm86.plan", "9.0": "model.sm90.plan"}
    assert rank.dynamic_batching.max_queue_delay_microseconds == DEFAULT.batching.max_queue_delay_us
    assert [i.name for i in rank.input] == [t.name for t in api.ENCODED]
    cpu = configs.ensemble(api.RANKER_MODEL, api.RANK_MODEL)
    ensemble = models["ranker_trt_int8"]
    assert list(ensemble.input) == list(cpu.input) and list(ensemble.output) == list(cpu.output)
    assert [s.model_name for s in ensemble.ensemble_scheduling.step] == ["tokenize_gpu", "rank_trt_int8", "postprocess"]


def _tensorrt_gpu() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt package is not installed (GPU hosts: the TensorRT container)"
    if not local_gpus():
        return "no NVIDIA GPU visible to nvidia-smi"
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_tensorrt_gpu() is not None, reason=str(_tensorrt_gpu()))
def test_fp16_engine_scores_like_onnx_runtime(tiny_repo, tmp_path):
    from rankserve.builder.engine import build_engine, run_engine
    from rankserve.settings import OrtSettings, RuntimeSettings
    from rankserve.stages.rank import create_ranker

    tiny = PRESETS["tiny"]
    onnx = tiny_repo / "rank" / "1" / "model.onnx"
    plan = build_engine(onnx, "fp16", tiny.engine, tmp_path / "timing.cache", log=lambda _m: None)
    assert (tmp_path / "timing.cache").stat().st_size > 0
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(1, 1000, (7, 20)), "attention_mask": np.ones((7, 20), np.int64),
             "token_type_ids": np.zeros((7, 20), np.int64)}
    (got,) = run_engine(plan, [feeds])
    expected = create_ranker(onnx, RuntimeSettings(), OrtSettings()).score(feeds)
    compare_to_reference(got, expected, tiny.engine.tolerance("fp16"), "fp16")


def test_server_tensorrt_version_from_its_libraries():
    from rankserve.builder.engine import tensorrt_version_from_libraries

    libs = ["/usr/lib/x86_64-linux-gnu/libnvinfer.so.10", "/usr/lib/x86_64-linux-gnu/libnvinfer.so.10.5.0",
            "/usr/lib/x86_64-linux-gnu/libnvinfer_plugin.so.10.5.0", "/usr/lib/x86_64-linux-gnu/libnvinfer.so.9.3.0"]
    assert tensorrt_version_from_libraries(libs) == "10.5.0"
    assert tensorrt_version_from_libraries(["/usr/lib/libc.so.6"]) is None


def test_repository_engines_checked_before_serving():
    from rankserve.builder.engine import check_repository_engines

    manifest = {"engines": {"fp16": [_record(A10G), _record(H200)], "int8": [_record(A10G)]}}
    assert check_repository_engines({"models": {}}, None, []) == []  # a CPU repository: nothing to check
    lines = check_repository_engines({"engines": {"fp16": manifest["engines"]["fp16"]}}, "10.5.0", [A10G, H200])
    assert len(lines) == 2 and "model.sm90.plan runs on NVIDIA H200" in lines[1]
    with pytest.raises(BuildError, match="no engine can run here"):
        check_repository_engines(manifest, "10.5.0", [H200])  # int8 was built on the A10G only
    with pytest.raises(BuildError, match="no TensorRT runtime"):
        check_repository_engines(manifest, None, [A10G])
    with pytest.raises(BuildError, match="no NVIDIA GPU"):
        check_repository_engines(manifest, "10.5.0", [])


def test_gpu_check_table_and_served_comparison():
    from rankserve.gpu_check import Step, compare_served, format_table

    base = [np.array([0.1, 0.2]), np.array([1.0])]
    scores = {"ranker_fp32": base, "ranker_trt_fp16": [b + 0.01 for b in base], "ranker_trt_int8": [b + 0.9 for b in base]}
    steps = compare_served(scores, "ranker_fp32", DEFAULT.engine.tolerance)
    assert [(s.name, s.passed) for s in steps] == [("ranker_trt_fp16 vs ranker_fp32", True), ("ranker_trt_int8 vs ranker_fp32", False)]
    table = format_table([Step("GPU visible", True, "nvidia-smi -L"), *steps])
    assert "| ranker_trt_int8 vs ranker_fp32 | FAIL | max abs diff 0.9" in table and table.endswith("FAILED: ranker_trt_int8 vs ranker_fp32")


def test_gpu_check_stops_at_once_without_an_admin_key(monkeypatch, tmp_path):
    from rankserve.gpu_check import run_gpu_check

    monkeypatch.delenv("TRITON_ADMIN_KEY", raising=False)
    (step,) = run_gpu_check(tmp_path, tmp_path)
    assert not step.passed and "TRITON_ADMIN_KEY" in step.detail


def test_gpu_tokenize_pads_requests_to_the_profile_widths(tiny_repo):
    from rankserve.stages.tokenize import encode_pairs, load_tokenizer

    settings = TokenizeSettings(pad_buckets="64,128")
    tokenizer = load_tokenizer(tiny_repo / "tokenize" / "1" / "tokenizer.json", settings)
    short = encode_pairs(tokenizer, "blue sofa", ["velvet sofa", "a blue velvet sofa with oak legs"], settings.buckets)
    plain = encode_pairs(tokenizer, "blue sofa", ["velvet sofa", "a blue velvet sofa with oak legs"])
    assert short["input_ids"].shape == (2, 64) and plain["input_ids"].shape[1] < 64
    np.testing.assert_array_equal(short["input_ids"][:, : plain["input_ids"].shape[1]], plain["input_ids"])
    assert short["attention_mask"].sum() == plain["attention_mask"].sum()  # only padding was added
    long = encode_pairs(tokenizer, "sofa", ["sofa " * 100], settings.buckets)
    assert long["input_ids"].shape == (1, 128)
    with pytest.raises(ConfigError, match="pad_buckets"):
        TokenizeSettings(pad_buckets="128,64")
    with pytest.raises(ConfigError, match="pad_buckets"):
        TokenizeSettings(pad_buckets="32")  # must hold max_length
