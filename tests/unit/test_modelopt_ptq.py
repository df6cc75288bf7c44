"""ModelOpt ONNX INT8 PTQ: the settings, the argv, the calibration file, and (slow, when the
ModelOpt venv exists) a real quantization of the tiny 2-layer BERT export."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest

from rankserve.errors import BuildError, ConfigError
from rankserve.optimize import modelopt_ptq
from rankserve.optimize.modelopt_ptq import (
    ModelOptSettings, calibration_npz, calibration_shapes, modelopt_python, ptq_command, quantized_matmuls,
)

NAMES = ("input_ids", "attention_mask", "token_type_ids")


def _batches(n_batches=3, pairs=4, width=16, seed=0):
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, 1000, (pairs, width), dtype=np.int64),
             "attention_mask": np.ones((pairs, width), dtype=np.int64),
             "token_type_ids": np.zeros((pairs, width), dtype=np.int64)} for _ in range(n_batches)]


# -- settings ------------------------------------------------------------------------------------
def test_default_settings_are_the_measured_placement():
    s = ModelOptSettings()
    assert s.op_types_to_exclude == ("Add",) and s.disable_mha_qdq
    assert s.calibration_eps == ("cpu",) and s.high_precision_dtype == "fp32"
    assert s.calibration_method in ("max", "entropy") and s.fp32_residual
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.calibration_method = "entropy"  # type: ignore[misc]


@pytest.mark.parametrize("change", [
    {"calibration_method": "percentile"},
    {"calibration_method": "minmax"},
    {"op_types_to_exclude": ["Add"]},
    {"op_types_to_exclude": ("Softmax",)},
    {"op_types_to_exclude": ("Add", "Add")},
    {"op_types_to_exclude": ("MatMul",)},
    {"calibration_eps": ()},
    {"calibration_eps": "cpu"},
    {"calibration_eps": ("gpu",)},
    {"calibration_eps": ("cuda",)},
    {"high_precision_dtype": "fp64"},
    {"disable_mha_qdq": "yes"},
    {"fp32_residual": 1},
    {"calibration_pairs": 4},
    {"calibration_length": 4},
    {"calibration_length": 1024},
    {"calibration_batch": 0},
    {"calibration_batch": 10_000},
])
def test_settings_refuse_bad_values(change):
    with pytest.raises(ConfigError):
        ModelOptSettings(**change)


def test_settings_accept_the_other_valid_values():
    s = ModelOptSettings(calibration_method="entropy", op_types_to_exclude=(), disable_mha_qdq=False,
                         calibration_eps=("cuda:0", "trt", "cpu"), high_precision_dtype="fp16",
                         calibration_pairs=1024, calibration_length=128, calibration_batch=1)
    assert s.calibration_eps == ("cuda:0", "trt", "cpu")


# -- argv ----------------------------------------------------------------------------------------
def test_ptq_command_defaults():
    argv = ptq_command("/venv/bin/python", "in.onnx", Path("out/q.onnx"), "cal.npz")
    assert argv[:3] == ["/venv/bin/python", "-m", "modelopt.onnx.quantization"]
    pairs = {argv[i]: argv[i + 1] for i in range(3, len(argv) - 1) if argv[i].startswith("--") and not argv[i + 1].startswith("--")}
    assert pairs["--onnx_path"] == "in.onnx" and pairs["--output_path"] == "out/q.onnx"
    assert pairs["--quantize_mode"] == "int8" and pairs["--calibration_data_path"] == "cal.npz"
    assert pairs["--calibration_method"] == ModelOptSettings().calibration_method
    assert pairs["--calibration_eps"] == "cpu" and pairs["--high_precision_dtype"] == "fp32"
    assert argv[argv.index("--op_types_to_exclude") + 1:argv.index("--op_types_to_exclude") + 2] == ["Add"]
    assert "--disable_mha_qdq" in argv and "--calibration_shapes" not in argv
    assert all(isinstance(a, str) for a in argv)
    assert "--use_external_data_format" not in argv


def test_ptq_command_lets_modelopt_take_a_model_over_2gb():
    """ModelOpt 0.47 refuses a model over 2 GB ("Please set --use_external_data_format") unless told."""
    argv = ptq_command("py", "a.onnx", "b.onnx", "c.npz", external_data=True)
    assert argv.count("--use_external_data_format") == 1
    installed = Path(".venv-modelopt/lib/python3.11/site-packages/modelopt/onnx/quantization/__main__.py")
    if installed.exists():  # the flag is the installed ModelOpt's own
        assert '"--use_external_data_format"' in installed.read_text()


def test_ptq_command_follows_settings_and_shapes():
    s = ModelOptSettings(calibration_method="entropy", op_types_to_exclude=("Add", "Mul"), disable_mha_qdq=False,
                         calibration_eps=("cuda:0", "cpu"), high_precision_dtype="fp16")
    argv = ptq_command("py", "a.onnx", "b.onnx", "c.npz", s, {"input_ids": (32, 64), "attention_mask": (32, 64)})
    i = argv.index("--calibration_eps")
    assert argv[i + 1:i + 3] == ["cuda:0", "cpu"] and argv[i + 3].startswith("--")
    i = argv.index("--op_types_to_exclude")
    assert argv[i + 1:i + 3] == ["Add", "Mul"]
    assert argv[argv.index("--calibration_method") + 1] == "entropy"
    assert argv[argv.index("--high_precision_dtype") + 1] == "fp16"
    assert argv[argv.index("--calibration_shapes") + 1] == "input_ids:32x64,attention_mask:32x64"
    assert "--disable_mha_qdq" not in argv


def test_ptq_command_without_exclusions_has_no_empty_flag():
    argv = ptq_command("py", "a.onnx", "b.onnx", "c.npz", ModelOptSettings(op_types_to_exclude=()))
    assert "--op_types_to_exclude" not in argv


# -- calibration file ----------------------------------------------------------------------------
def test_calibration_npz_stacks_batches_by_input_name(tmp_path):
    batches = _batches(3, 4, 16)
    path = calibration_npz(tmp_path / "sub" / "cal.npz", batches)
    assert path == tmp_path / "sub" / "cal.npz" and path.is_file()
    with np.load(path) as data:
        assert set(data.files) == set(NAMES)
        for name in NAMES:
            assert data[name].dtype == np.int64 and data[name].shape == (12, 16)
            np.testing.assert_array_equal(data[name], np.concatenate([b[name] for b in batches]))
    assert calibration_shapes(batches) == {name: (4, 16) for name in NAMES}


def test_calibration_npz_keeps_a_name_without_the_suffix(tmp_path):
    path = calibration_npz(tmp_path / "calibration.data", _batches(1))
    assert path.is_file() and not (tmp_path / "calibration.data.npz").exists()


@pytest.mark.parametrize("bad", ["widths", "names", "dtype", "empty"])
def test_calibration_npz_refuses_what_modelopt_cannot_split(tmp_path, bad):
    batches = _batches(2, 4, 16)
    if bad == "widths":
        batches[1] = _batches(1, 4, 20)[0]
    elif bad == "names":
        del batches[1]["token_type_ids"]
    elif bad == "dtype":
        batches[1]["input_ids"] = batches[1]["input_ids"].astype(np.int32)
    else:
        batches = []
    with pytest.raises(ValueError):
        calibration_npz(tmp_path / "c.npz", batches)


def test_calibration_batches_use_the_project_pairs(dataset):
    from transformers import AutoTokenizer

    from rankserve.optimize.calibration import calibration_pairs
    from rankserve.train.finetune import pretrained_encoder_dir

    tokenizer = AutoTokenizer.from_pretrained(pretrained_encoder_dir())
    s = ModelOptSettings(calibration_pairs=40, calibration_length=48, calibration_batch=16)
    batches = modelopt_ptq.calibration_batches(dataset, tokenizer, NAMES, s, seed=7)
    assert [b["input_ids"].shape for b in batches] == [(16, 48), (16, 48), (8, 48)]
    first = calibration_pairs(dataset, 40, seed=7)[0]
    expected = tokenizer(first[0], first[1], truncation=True, max_length=48, padding="max_length")["input_ids"]
    assert batches[0]["input_ids"][0].tolist() == expected


# -- finding ModelOpt ----------------------------------------------------------------------------
def test_modelopt_python_from_env(tmp_path, monkeypatch):
    exe = tmp_path / "python"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.setenv(modelopt_ptq.PYTHON_ENV, str(exe))
    assert modelopt_python() == exe


def test_modelopt_python_from_the_repository_venv(tmp_path, monkeypatch):
    monkeypatch.delenv(modelopt_ptq.PYTHON_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BuildError, match="pip install -r deploy/modelopt-requirements.txt"):
        modelopt_python()
    exe = tmp_path / ".venv-modelopt" / "bin" / "python"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    assert modelopt_python() == exe


def test_modelopt_python_missing_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv(modelopt_ptq.PYTHON_ENV, str(tmp_path / "nope" / "python"))
    with pytest.raises(BuildError, match=modelopt_ptq.PYTHON_ENV):
        modelopt_python()


def test_quantize_reports_modelopt_failure_with_its_output(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'progress line'\necho 'Traceback: the real reason' >&2\nexit 3\n")
    fake.chmod(0o755)
    from onnx import TensorProto, helper

    model = tmp_path / "in.onnx"
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(model))
    lines = []
    with pytest.raises(BuildError, match=r"exit status 3(.|\n)*the real reason"):
        modelopt_ptq.quantize(model, tmp_path / "out.onnx", _batches(1), log=lines.append, python=fake)
    assert lines == ["progress line", "Traceback: the real reason"]


# -- counting what the graph quantized -----------------------------------------------------------
def test_quantized_matmuls_counts_dequantized_weights_only():
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w_float")
    wq = numpy_helper.from_array(np.ones((4, 4), np.int8), "w_int8")
    scale = numpy_helper.from_array(np.ones(4, np.float32), "scale")
    nodes = [
        helper.make_node("DequantizeLinear", ["w_int8", "scale"], ["w_dq"], axis=1, name="dq"),
        helper.make_node("MatMul", ["x", "w_dq"], ["a"], name="quantized"),
        helper.make_node("MatMul", ["a", "w_float"], ["b"], name="float_weight"),
        helper.make_node("MatMul", ["b", "b"], ["c"], name="activations_only"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [4, 4])], [w, wq, scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    assert quantized_matmuls(model) == (1, 2)
    assert modelopt_ptq.onnx_opset(model) == 19


def test_fp32_residuals_rewires_only_activation_qdq_into_adds():
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zero = numpy_helper.from_array(np.array(0, np.int8), "z")
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g"], ["ln"], name="ln"),
        helper.make_node("QuantizeLinear", ["ln", "s", "z"], ["ln_q"], name="q_act"),
        helper.make_node("DequantizeLinear", ["ln_q", "s", "z"], ["ln_dq"], name="dq_act"),
        helper.make_node("QuantizeLinear", ["w", "s", "z"], ["w_q"], name="q_w"),
        helper.make_node("DequantizeLinear", ["w_q", "s", "z"], ["w_dq"], name="dq_w"),
        helper.make_node("MatMul", ["ln_dq", "w_dq"], ["mm"], name="linear"),
        helper.make_node("Add", ["mm", "ln_dq"], ["res"], name="residual"),
        helper.make_node("Add", ["res", "w_dq"], ["out"], name="adds_a_weight"),
    ]
    g = numpy_helper.from_array(np.ones(4, np.float32), "g")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [4, 4])], [w, scale, zero, g])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    assert modelopt_ptq.fp32_residuals(model) == 1
    by_name = {n.name: n for n in model.graph.node}
    assert list(by_name["residual"].input) == ["mm", "ln"]  # the residual reads the LayerNorm output itself
    assert list(by_name["linear"].input) == ["ln_dq", "w_dq"]  # the Linear still reads INT8
    assert list(by_name["adds_a_weight"].input) == ["res", "w_dq"]  # a quantized constant is not an activation
    assert quantized_matmuls(model) == (1, 1)
    assert modelopt_ptq.fp32_residuals(model) == 0


# -- the real thing ------------------------------------------------------------------------------
def _modelopt_or_skip() -> Path:
    try:
        return modelopt_python()
    except BuildError:
        pytest.skip(f"no ModelOpt venv (install it with: {modelopt_ptq.INSTALL_COMMAND}, or set {modelopt_ptq.PYTHON_ENV})")


@pytest.mark.slow
def test_quantize_tiny_bert_for_real(tiny_ranker, tiny_repo, dataset, tmp_path):
    python = _modelopt_or_skip()
    import onnx
    from transformers import AutoTokenizer

    from rankserve.optimize.transforms import weight_matmuls
    from rankserve.settings import OrtSettings, RuntimeSettings
    from rankserve.stages.rank import create_ranker

    fp32 = tiny_repo / "rank" / "1" / "model.onnx"
    names = tuple(i.name for i in onnx.load(str(fp32), load_external_data=False).graph.input)
    settings = ModelOptSettings(calibration_pairs=32, calibration_length=32, calibration_batch=16)
    batches = modelopt_ptq.calibration_batches(dataset, AutoTokenizer.from_pretrained(tiny_ranker), names, settings)
    lines = []
    before = fp32.read_bytes()
    stats = modelopt_ptq.quantize(fp32, tmp_path / "int8.onnx", batches, settings, log=lines.append, python=python)
    assert fp32.read_bytes() == before  # the input is never touched (ModelOpt works on a copy)
    assert lines  # ModelOpt's progress came through
    expected = len(weight_matmuls(fp32))  # 6 Linears a layer (Q, K, V, attention out, FFN in, FFN out)
    assert expected == 12 and (stats.quantized_matmuls, stats.weight_matmuls) == (expected, expected)
    assert stats.opset >= 19 and stats.command[1:3] == ("-m", "modelopt.onnx.quantization")
    model = onnx.load(str(tmp_path / "int8.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    assert stats.fp32_residual_inputs == 4  # 2 layers x (attention, FFN) residuals
    assert not [n.name for n in model.graph.node if n.op_type == "Add" and any(producers.get(i) == "DequantizeLinear" for i in n.input)]
    scores = create_ranker(tmp_path / "int8.onnx", RuntimeSettings(), OrtSettings()).score(batches[0])
    reference = create_ranker(fp32, RuntimeSettings(), OrtSettings()).score(batches[0])
    assert scores.shape == (16,) and np.isfinite(scores).all()
    assert np.corrcoef(scores, reference)[0, 1] > 0.9
