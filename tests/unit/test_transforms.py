"""The ONNX transforms on a real (tiny) export: every calibration method runs and gives QDQ INT8."""

import numpy as np
import onnx
from onnx import numpy_helper
import pytest

from conftest import TINY
from rankserve.builder.export import export_onnx, load_ranker
from rankserve.optimize import transforms
from rankserve.optimize.calibration import calibration_pairs, fixed_length_batches
from rankserve.settings import OrtSettings, QuantSettings, RuntimeSettings
from rankserve.stages.rank import create_ranker

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(tiny_ranker, tmp_path_factory):
    ranker = load_ranker(tiny_ranker, TINY)
    return ranker, export_onnx(ranker, tmp_path_factory.mktemp("t") / "fp32.onnx", TINY.opset)


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_each_calibration_method_gives_qdq_int8(exported, dataset, tmp_path, method):
    ranker, fp32 = exported
    settings = QuantSettings(calibration_pairs=32, method=method, calibration_length=32)
    batches = fixed_length_batches(ranker.tokenizer, calibration_pairs(dataset, 32), 32, 16, ranker.input_names)
    matmuls = transforms.weight_matmuls(fp32)
    keep = transforms.mixed_precision_ladder(matmuls)[1][1]  # "FFN output in FP32"
    assert keep and set(keep) < set(matmuls)
    out = transforms.qdq_int8(fp32, tmp_path / "q.onnx", batches, settings, exclude=keep)
    graph = onnx.load(str(out)).graph
    initializers = {i.name for i in graph.initializer}
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    nodes = {n.name: n for n in graph.node}
    for name in matmuls:
        weight_is_float = any(i in initializers for i in nodes[name].input)
        weight_is_int8 = any(i in dequantized for i in nodes[name].input)
        assert (weight_is_float, weight_is_int8) == ((True, False) if name in keep else (False, True)), name
    feeds = batches[0]
    score = create_ranker(out, RuntimeSettings(), OrtSettings()).score(feeds)
    assert score.shape == (16,) and np.isfinite(score).all()


def test_calibration_pairs_come_from_training_queries_only(dataset):
    train_queries = {q.text for q in dataset.split("train")}
    pairs = calibration_pairs(dataset, 200, seed=3)
    assert len(pairs) == 200 and all(q in train_queries for q, _ in pairs)
    assert pairs == calibration_pairs(dataset, 200, seed=3)


def test_calibration_is_sliced_when_all_batches_would_not_fit_in_memory():
    from rankserve.optimize.calibration import calibration_stride

    batches = [{"input_ids": np.zeros((32, 64), np.int64)}] * 16  # 512 pairs of 64 tokens
    # the 560M ranker: 172,032 activation values a token -> 22.5 GB at once; slices of 2 batches (1.4 GB)
    assert calibration_stride(batches, 172_032) == 2
    assert calibration_stride(batches, 16_128) is None  # MiniLM-L6: 2.1 GB, all at once
    assert calibration_stride(batches, 172_032, limit=1) == 1
    assert 12 % calibration_stride(batches[:12], 172_032, limit=5 * 2**30) == 0  # a divisor, as ONNX Runtime requires


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_sliced_calibration_gives_the_scales_of_calibrating_at_once(exported, dataset, tmp_path, monkeypatch, method):

    from rankserve.optimize import calibration

    ranker, fp32 = exported
    settings = QuantSettings(calibration_pairs=64, method=method, calibration_length=32)
    batches = fixed_length_batches(ranker.tokenizer, calibration_pairs(dataset, 64), 32, 16, ranker.input_names)
    once = transforms.qdq_int8(fp32, tmp_path / "once.onnx", batches, settings)
    floats = transforms.activation_floats_per_token(fp32, transforms.weight_matmuls(fp32))
    monkeypatch.setattr(calibration, "CALIBRATION_MEMORY_BYTES", 16 * 32 * floats * 4)  # one batch a slice
    assert calibration.calibration_stride(batches, floats) == 1
    sliced = transforms.qdq_int8(fp32, tmp_path / "sliced.onnx", batches, settings)

    def scales(path):
        graph = onnx.load(str(path)).graph
        return {i.name: numpy_helper.to_array(i) for i in graph.initializer if i.name.endswith("_scale")}

    a, b = scales(once), scales(sliced)
    assert a.keys() == b.keys() and a
    worst = max(float(np.max(np.abs(a[k] - b[k]) / np.maximum(np.abs(a[k]), 1e-12))) for k in a)
    assert worst <= (1e-6 if method == "minmax" else 0.01), worst  # min/max merge exactly; histograms re-bin (0.04% here)


def test_dynamic_int8_weight_types_and_saturation_without_vnni(exported, tmp_path):
    """U8 weights store as UINT8, S8 and S7 as INT8 (S7 within [-64, 64]: 255 x 64 x 2 fits a 16-bit sum); without VNNI, ONNX Runtime's
    U8S8 kernel (VPMADDUBSW, 16-bit sums) saturates on the tiny model's large random weights with S8;
    U8U8 does not, and 7-bit weights (no saturation, one bit less) still beat S8."""
    from rankserve.optimize.report import native_matrix_units

    ranker, fp32 = exported
    feeds = ranker.tokenizer(["outdoor rug"] * 3, ["welcome mat", "tv stand", "coir doormat"], padding=True, return_tensors="np")
    feeds = {k: feeds[k].astype(np.int64) for k in ranker.input_names}
    reference = create_ranker(fp32, RuntimeSettings(), OrtSettings()).score(feeds)
    error = {}
    for weights, dtype in (("s8", onnx.TensorProto.INT8), ("s7", onnx.TensorProto.INT8), ("u8", onnx.TensorProto.UINT8)):
        out = transforms.dynamic_int8(fp32, tmp_path / f"{weights}.onnx", weights)
        graph = onnx.load(str(out)).graph
        matmul_weights = {n.input[1] for n in graph.node if n.op_type == "MatMulInteger"}
        stored = [i for i in graph.initializer if i.name in matmul_weights]
        assert matmul_weights and {i.data_type for i in stored} == {dtype}
        values = np.concatenate([numpy_helper.to_array(i).ravel().astype(np.int32) for i in stored])
        assert (np.abs(values).max() <= 64) == (weights == "s7"), (weights, values.min(), values.max())
        error[weights] = float(np.abs(create_ranker(out, RuntimeSettings(), OrtSettings()).score(feeds) - reference).max())
    assert max(error.values()) < 0.5, error
    if "int8" not in native_matrix_units():
        assert error["u8"] < 0.5 * error["s8"], error
        assert error["s7"] < error["s8"], error  # one bit less precision, but no saturated sums (0.085 vs 0.145 here)
