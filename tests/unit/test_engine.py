"""TensorRT engine logic that needs no GPU: profiles, names, configs, portability, checks."""

import dataclasses

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


def test_the_profile_is_the_fitting_one_nearest_to_its_opt_shape_as_triton_picks():
    wide = EngineProfile("wide", min=(1, 1), opt=(512, 128), max=(1000, 128))
    near = EngineProfile("near", min=(1, 1), opt=(8, 32), max=(1000, 64))
    settings = EngineSettings(profiles=(wide, near))
    assert profile_for(settings, 10, 30) == 1  # both fit; the first one listed is not the nearest
    assert profile_for(settings, 600, 100) == 0  # only `wide` takes 100 tokens
    assert profile_for(settings, 600, 64) == 0  # |600-512|+|64-128| = 152 < |600-8|+|64-32| = 624


def test_plan_files_per_compute_capability_and_nvidia_smi_parsing():
    assert plan_filename("8.6") == "model.sm86.plan" and plan_filename("10.0") == "model.sm100.plan"
    with pytest.raises(BuildError, match="compute capability"):
        plan_filename("sm86")
    assert parse_nvidia_smi("NVIDIA H200, 9.0\nNVIDIA A10G, 8.6\n") == [H200, A10G]
    assert isinstance(local_gpus(), list)  # empty here, no nvidia-smi: never an exception


def _record(gpu=A10G, version="10.5.0.18", **engine):
    return engine_record("fp16", version, gpu, dataclasses.replace(DEFAULT.engine, **engine),
                         "rank_trt_fp16/1/" + plan_filename(gpu.compute_capability), "0" * 64, {})


def test_portability_guard_names_the_mismatch():
    check_portability(_record(), "10.5.0.18", A10G)
    for other in ("10.5.1.3", "10.5.0.26", "10.6.0.26"):  # engines load only in the exact version that built them
        with pytest.raises(BuildError, match=f"built with TensorRT 10.5.0.18; this server has {other}"):
            check_portability(_record(), other, A10G)
    with pytest.raises(BuildError, match="built on NVIDIA A10G .compute capability 8.6.; NVIDIA H200 has 9.0"):
        check_portability(_record(), "10.5.0.18", H200)
    check_portability(_record(version_compatible=True), "10.7.0.23", A10G)
    with pytest.raises(BuildError, match="at or above"):
        check_portability(_record(version_compatible=True), "10.3.0.26", A10G)
    check_portability(_record(hardware_compatibility="ampere_plus"), "10.5.0.18", H200)
    with pytest.raises(BuildError, match="Ampere or newer"):
        check_portability(_record(hardware_compatibility="ampere_plus"), "10.5.0.18", T4)


def test_the_engine_for_this_gpu_is_chosen_among_one_per_compute_capability():
    records = [_record(A10G), _record(H200)]
    assert usable_engine(records, "10.5.0.18", H200)["plan_file"] == "rank_trt_fp16/1/model.sm90.plan"
    with pytest.raises(BuildError, match="no engine can run here") as err:
        usable_engine(records, "10.5.0.18", T4)
    assert "model.sm86.plan" in str(err.value) and "model.sm90.plan" in str(err.value)


def test_post_build_check_against_onnx_runtime():
    reference = np.array([0.5, -1.0, 2.0])
    result = compare_to_reference(reference + 0.01, reference, 0.05, "fp16")
    assert result["max_abs_diff"] == pytest.approx(0.01) and result["same_order"]
    with pytest.raises(BuildError, match="differs from ONNX Runtime FP32 by 0.3"):
        compare_to_reference(reference + np.array([0, 0.3, 0]), reference, 0.05, "fp16")


def test_tensorrt_models_and_ensembles_keep_the_public_api():
    engines = {p: [engine_record(p, "10.5.0.18", g, DEFAULT.engine, f"rank_trt_{p}/1/{plan_filename(g.compute_capability)}", "0" * 64, {})
                   for g in (A10G, H200)] for p in DEFAULT.engine.precisions}
    models = {name: configs.parse(configs.to_text(c)) for name, c in configs.gpu_models(DEFAULT, engines).items()}
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


def test_server_tensorrt_version_is_read_from_the_library_itself(tmp_path):
    """``getInferLibVersion`` and ``getInferLibBuildVersion`` of whatever libnvinfer the loader finds
    (no glob of image folders). No TensorRT here: a library with TensorRT 10.5.0.18's two exported
    version functions stands in for it, compiled by the test."""
    import shutil
    import subprocess

    from rankserve.builder.engine import _decode_version, library_tensorrt_version

    assert library_tensorrt_version() is None  # no TensorRT on this machine: None, not an exception
    assert _decode_version(100500) == (10, 5, 0) and _decode_version(8601) == (8, 6, 1)
    if shutil.which("cc") is None:
        pytest.skip("no C compiler to build the stand-in library")
    source = tmp_path / "nvinfer.c"
    source.write_text("int getInferLibVersion(void) { return 100500; }\nint getInferLibBuildVersion(void) { return 18; }\n")
    library = tmp_path / "libnvinfer.so.10"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    assert library_tensorrt_version(str(library)) == "10.5.0.18"


def test_repository_engines_checked_before_serving():
    from rankserve.builder.engine import check_repository_engines

    manifest = {"engines": {"fp16": [_record(A10G), _record(H200)], "int8": [_record(A10G)]}}
    assert check_repository_engines({"models": {}}, None, []) == []  # a CPU repository: nothing to check
    with pytest.raises(BuildError, match="lists no TensorRT engines"):  # a GPU replica must not serve it
        check_repository_engines({"models": {}}, "10.5.0.18", [A10G], require=True)
    assert check_repository_engines({"engines": {"fp16": manifest["engines"]["fp16"]}}, "10.5.0.18", [A10G], require=True)
    lines = check_repository_engines({"engines": {"fp16": manifest["engines"]["fp16"]}}, "10.5.0.18", [A10G, H200])
    assert len(lines) == 2 and "model.sm90.plan runs on NVIDIA H200" in lines[1]
    with pytest.raises(BuildError, match="no engine can run here"):
        check_repository_engines(manifest, "10.5.0.18", [H200])  # int8 was built on the A10G only
    with pytest.raises(BuildError, match="no TensorRT runtime"):
        check_repository_engines(manifest, None, [A10G])
    with pytest.raises(BuildError, match="no NVIDIA GPU"):
        check_repository_engines(manifest, "10.5.0.18", [])


def test_version_compatible_engines_need_the_server_flag():
    from rankserve.builder.engine import VERSION_COMPATIBLE_FLAG, check_repository_engines

    manifest = {"engines": {"fp16": [_record(A10G, version_compatible=True)]}}
    server = ["--model-repository=/models", "--backend-config=python,shm-default-byte-size=16777216"]
    with pytest.raises(BuildError, match="needs --backend-config=tensorrt,version-compatible=true"):
        check_repository_engines(manifest, "10.7.0.23", [A10G], server)
    assert check_repository_engines(manifest, "10.7.0.23", [A10G], server + [VERSION_COMPATIBLE_FLAG])
    assert check_repository_engines(manifest, "10.7.0.23", [A10G])  # no server arguments given: nothing to compare
    plain = {"engines": {"fp16": [_record(A10G)]}}
    assert check_repository_engines(plain, "10.5.0.18", [A10G], server)


def test_gpu_check_table():
    from rankserve.gpu_check import Step, format_table

    table = format_table([Step("GPU visible", True, "nvidia-smi -L"), Step("ranker_trt_int8 vs ranker_fp32", False, "max abs diff 0.9")])
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


def test_gpu_check_reports_every_step_even_when_one_fails(monkeypatch, tmp_path):
    """With the key set and no GPU here, the check stops at `GPU visible` (nvidia-smi missing: a
    FAIL row, not a traceback) and still writes report.json and report.md with the table."""
    import json

    from rankserve.gpu_check import run_gpu_check

    monkeypatch.setenv("TRITON_ADMIN_KEY", "k")
    steps = run_gpu_check(tmp_path, tmp_path, out=tmp_path / "gpu", log=lambda _m: None)
    assert [(s.name, s.passed) for s in steps] == [("TRITON_ADMIN_KEY set", True), ("GPU visible", False)]
    assert "FileNotFoundError" in steps[-1].detail or "nvidia-smi" in steps[-1].detail
    report = json.loads((tmp_path / "gpu" / "report.json").read_text())
    assert [s["name"] for s in report["steps"]] == ["TRITON_ADMIN_KEY set", "GPU visible"]
    assert "| GPU visible | FAIL |" in (tmp_path / "gpu" / "report.md").read_text()


def test_gpu_report_tables_and_served_agreement(dataset):
    from rankserve.gpu_check import Step, agreement, format_report, latency_summary

    heldout = dataset.split("heldout")[:10]
    by_query = dataset.by_query()
    rng = np.random.default_rng(0)
    reference = {q.query_id: rng.normal(size=len(by_query[q.query_id])).astype(np.float32) for q in heldout}
    close = {q: s + 0.001 for q, s in reference.items()}
    a = agreement(dataset, close, reference, "int8", DEFAULT.gate)
    assert a["max_abs_diff"] == pytest.approx(0.001, abs=1e-6) and a["top_k_overlap"] == 1.0 and a["gate_passed"]
    shuffled = {q: rng.permutation(s) for q, s in reference.items()}
    assert not agreement(dataset, shuffled, reference, "int8", DEFAULT.gate)["gate_passed"]  # overlap < 0.95
    summary = latency_summary([10.0, 20.0, 30.0, 40.0], pairs=400, seconds=2.0)
    assert summary["p50_ms"] == 25.0 and summary["pairs_per_s"] == 200.0 and summary["requests"] == 4
    report = {"versions": {"tensorrt": "10.5.0.18", "triton": "2.51.0"},
              "gpus": [{"name": "NVIDIA H200", "compute_capability": "9.0", "driver": "560.35"}],
              "engines": [{"plan_file": "rank_trt_int8/1/model.sm90.plan", "build_seconds": 61.2, "plan_bytes": 3 * 2**20,
                           "grid": [{"pairs": 32, "tokens": 64, "profile": "short", "p50_ms": 0.8, "pairs_per_s": 40000.0}]}],
              "served": {"ranker_fp32": summary, "ranker_trt_int8": {**summary, "agreement": a}},
              "steps": [vars(Step("GPU visible", True, "")), vars(Step("ranker_trt_int8 vs ranker_fp32", True, a["gate"]))]}
    md = format_report(report)
    assert "| rank_trt_int8/1/model.sm90.plan | 61.2 | 3.0 | 32 | 64 | short | 0.8 | 40000.0 |" in md
    assert "| ranker_trt_int8 | 4 | 25.0 |" in md and "| ranker_fp32 | 4 |" in md and "reference |" in md
    assert "- tensorrt: 10.5.0.18" in md and "NVIDIA H200 (compute capability 9.0, driver 560.35)" in md
    assert md.rstrip().endswith("all checks passed")


def test_engine_benchmark_grid_and_synthetic_inputs():
    from rankserve.builder.engine import bench_grid, synthetic_feeds

    grid = bench_grid(DEFAULT.engine)
    assert (512, 128) in grid and (1, 32) in grid and all(profile_for(DEFAULT.engine, *s) >= 0 for s in grid)
    assert bench_grid(DEFAULT.engine, pairs=(2000,)) == []  # no profile takes 2000 pairs
    feeds = synthetic_feeds(["input_ids", "attention_mask"], 5, 16, np.random.default_rng(0))
    assert set(feeds) == {"input_ids", "attention_mask"} and feeds["input_ids"].shape == (5, 16)
    mask = feeds["attention_mask"]
    assert mask[:, :8].all() and (np.diff(mask, axis=1) <= 0).all()  # right padding only
    assert (feeds["input_ids"][mask == 0] == 0).all()
