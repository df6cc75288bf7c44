"""Every generated config against the real ONNX file it serves, by Triton's rules (no GPU needed)."""

import dataclasses
import json

import pytest

from rankserve import api
from rankserve.builder import configs
from rankserve.builder.consistency import (Signature, Tensor, ensemble_problems, onnx_signature, python_rank_problems,
                                           repository_problems, reshape_problems, tensorrt_problems)
from rankserve.builder.engine import GpuFacts, engine_record
from rankserve.settings import PRESETS

TINY = PRESETS["tiny"]
A10G, H200 = GpuFacts("NVIDIA A10G", "8.6"), GpuFacts("NVIDIA H200", "9.0")


def _engines(inputs, gpus=(A10G,), **engine):
    settings = dataclasses.replace(TINY.engine, **engine)
    return {p: [engine_record(p, "10.5.0.18", g, settings, f"rank_trt_{p}/1/model.sm{g.compute_capability.replace('.', '')}.plan",
                              "0" * 64, {}, inputs) for g in gpus] for p in TINY.engine.precisions}


def test_the_onnx_signature_is_read_from_the_graph(tiny_repo):
    sig = onnx_signature(tiny_repo / "rank" / "1" / "model.onnx")
    assert sig.inputs == tuple(Tensor(n, "INT64", (-1, -1)) for n in api.MODEL_INPUT_NAMES)
    assert sig.outputs == (Tensor("logits", "FP32", (-1,)),)  # one logit per pair: [pairs]


def test_tensorrt_rank_config_matches_the_engine_built_from_the_onnx(tiny_repo):
    sig = onnx_signature(tiny_repo / "rank" / "1" / "model.onnx")
    config = configs.tensorrt_rank_model("rank_trt_fp16", TINY, sig.input_names)
    assert tensorrt_problems(config, sig) == []
    # dims [1] without the empty reshape: Triton makes [-1, 1] of it and refuses the [-1] engine output
    config.output[0].ClearField("reshape")
    (problem,) = tensorrt_problems(config, sig)
    assert "output 'logits': the engine's shape is [-1], the config makes [-1, 1]" in problem


def test_the_tensorrt_rules_follow_triton(tiny_repo):
    sig = onnx_signature(tiny_repo / "rank" / "1" / "model.onnx")
    config = configs.tensorrt_rank_model("rank_trt_fp16", TINY, sig.input_names)
    wrong_type = Signature(tuple(dataclasses.replace(t, dtype="INT32") for t in sig.inputs), sig.outputs)
    assert len(tensorrt_problems(config, wrong_type)) == 3
    extra = Signature(sig.inputs + (Tensor("position_ids", "INT64", (-1, -1)),), sig.outputs)
    assert any("has input 'position_ids' that the config does not declare" in p for p in tensorrt_problems(config, extra))
    fixed = Signature(tuple(dataclasses.replace(t, shape=(-1, 64)) for t in sig.inputs), sig.outputs)
    assert tensorrt_problems(config, fixed) == []  # -1 in the config matches any engine dimension
    unbatched = configs.tensorrt_rank_model("rank_trt_fp16", TINY, sig.input_names)
    unbatched.max_batch_size = 0
    assert any("empty reshape needs a batching model" in p for p in reshape_problems(unbatched))
    unbatched.max_batch_size = 8
    unbatched.output[0].dims[:] = [2]
    assert any("only allowed for dims [1]" in p for p in reshape_problems(unbatched))


def test_a_ranker_without_token_type_ids_gets_an_engine_config_with_two_inputs(tiny_repo):
    full = onnx_signature(tiny_repo / "rank" / "1" / "model.onnx")
    two = Signature(tuple(t for t in full.inputs if t.name != "token_type_ids"), full.outputs)
    old = configs.tensorrt_rank_model("rank_trt_fp16", TINY, api.MODEL_INPUT_NAMES)  # what the config used to declare
    assert any("'token_type_ids' is not an engine input" in p for p in tensorrt_problems(old, two))
    models = configs.gpu_models(TINY, _engines(list(two.input_names)))
    assert tensorrt_problems(models["rank_trt_fp16"], two) == []
    cpu = {n: configs.parse(tiny_repo / n / "config.pbtxt") for n in ("tokenize", "postprocess")}
    assert ensemble_problems({**cpu, **models}) == []
    assert [s.input_map for s in models["ranker_trt_fp16"].ensemble_scheduling.step][1] == {
        "input_ids": "input_ids", "attention_mask": "attention_mask"}


def test_python_rank_stage_contract_and_ensemble_shapes(tiny_repo):
    sig = onnx_signature(tiny_repo / "rank" / "1" / "model.onnx")
    rank = configs.parse(tiny_repo / "rank" / "config.pbtxt")
    assert python_rank_problems(rank, sig) == []
    three_d = Signature(sig.inputs, (Tensor("logits", "FP32", (-1, 1)),))
    assert any("one logit per pair" in p for p in python_rank_problems(rank, three_d))
    models = {p.parent.name: configs.parse(p) for p in tiny_repo.glob("*/config.pbtxt")}
    assert ensemble_problems(models) == []
    broken = configs.parse(tiny_repo / "postprocess" / "config.pbtxt")
    broken.input[0].dims[:] = [-1]  # logits as [pairs] where rank sends [pairs, 1]
    assert any("postprocess.logits takes TYPE_FP32 [-1]" in p for p in ensemble_problems({**models, "postprocess": broken}))


def test_built_repositories_are_consistent_cpu_and_gpu(tiny_repo, tmp_path):
    import shutil

    from rankserve.builder.gpu import layout_gpu_models
    from rankserve.builder.repository import MANIFEST

    assert repository_problems(tiny_repo) == []
    copy = tmp_path / "repo"
    shutil.copytree(tiny_repo, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    sig = onnx_signature(tiny_repo / "rank" / "1" / "model.onnx")
    manifest["engines"] = _engines(list(sig.input_names), gpus=(A10G, H200))
    layout_gpu_models(copy, manifest, TINY)  # the GPU build's layout step, without the plans
    engine_models = {f"rank_trt_{p}": sig for p in TINY.engine.precisions}
    assert repository_problems(copy, engine_models) == []
    rank = configs.parse(copy / "rank_trt_int8" / "config.pbtxt")
    assert dict(rank.cc_model_filenames) == {"8.6": "model.sm86.plan", "9.0": "model.sm90.plan"}
    assert "no ONNX signature given" in repository_problems(copy)[0]


@pytest.mark.parametrize("precision", TINY.engine.precisions)
def test_a_hardware_compatible_engine_is_the_default_plan_found_on_any_gpu(precision):
    engines = _engines(list(api.MODEL_INPUT_NAMES), hardware_compatibility="ampere_plus")
    for records in engines.values():
        for r in records:
            r["plan_file"] = r["plan_file"].rsplit("/", 1)[0] + "/model.plan"
    rank = configs.gpu_models(TINY, engines)[f"rank_trt_{precision}"]
    assert rank.default_model_filename == "model.plan" and dict(rank.cc_model_filenames) == {}
