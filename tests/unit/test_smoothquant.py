"""SmoothQuant on a real (tiny) export: the smoothed FP32 model computes the same scores, the
activation ranges it hands the quantizer are flatter, and dynamic INT8 runs on it."""

import numpy as np
import onnx
import pytest

from conftest import TINY
from rankserve.builder.export import export_onnx, load_ranker
from rankserve.optimize import smoothquant, transforms
from rankserve.optimize.calibration import calibration_pairs, fixed_length_batches
from rankserve.settings import OrtSettings, RuntimeSettings
from rankserve.stages.rank import create_ranker

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(tiny_ranker, dataset, tmp_path_factory):
    ranker = load_ranker(tiny_ranker, TINY)
    fp32 = export_onnx(ranker, tmp_path_factory.mktemp("s") / "fp32.onnx", TINY.opset)
    batches = fixed_length_batches(ranker.tokenizer, calibration_pairs(dataset, 64), 32, 16, ranker.input_names)
    return fp32, batches


def test_scales_follow_the_formula_and_are_clipped():
    act, weight = np.array([4.0, 1.0, 0.0, 1e6]), np.array([1.0, 0.25, 1.0, 1e-6])
    s = smoothquant.smoothing_scales(act, weight, 0.5)
    assert np.allclose(s[:2], [2.0, 2.0])
    assert s[2] == pytest.approx(smoothquant.SCALE_LIMITS[0]) and s[3] == pytest.approx(smoothquant.SCALE_LIMITS[1])
    with pytest.raises(ValueError):
        smoothquant.smoothing_scales(act, weight, 1.0)


def test_smoothed_model_scores_as_the_original(exported, tmp_path):
    fp32, batches = exported
    model = onnx.load(str(fp32))
    groups = smoothquant.matmul_groups(model)
    assert sum(len(g.matmuls) for g in groups) == len([n for n in model.graph.node if n.op_type == "MatMul"
                                                        and n.input[1] in {i.name for i in model.graph.initializer}])
    assert any(len(g.matmuls) == 3 for g in groups)  # Q, K and V read one activation: one scale
    assert [g.matmuls for g in smoothquant.matmul_groups(model, only=groups[0].matmuls[:1])] == [groups[0].matmuls[:1]]
    out = tmp_path / "smooth.onnx"
    stats = smoothquant.smooth(fp32, out, batches[:2], alpha=0.8)
    assert stats["groups"] == len(groups)
    assert stats["activation_max_over_mean"]["after"] < stats["activation_max_over_mean"]["before"]
    smoothed = onnx.load(str(out))
    assert sum(n.op_type == "Mul" and n.name.startswith("/smoothquant/") for n in smoothed.graph.node) == len(groups)
    onnx.checker.check_model(smoothed)
    before = create_ranker(fp32, RuntimeSettings(), OrtSettings())
    after = create_ranker(out, RuntimeSettings(), OrtSettings())
    for feeds in batches[2:4]:
        np.testing.assert_allclose(after.score(feeds), before.score(feeds), atol=1e-4)


def test_dynamic_int8_of_the_smoothed_model(exported, tmp_path):
    fp32, batches = exported
    smooth = tmp_path / "smooth.onnx"
    smoothquant.smooth(fp32, smooth, batches[:2], alpha=0.8, only=transforms.weight_matmuls(fp32)[1:])
    for weights in ("s8", "s7", "u8"):
        out = transforms.dynamic_int8(smooth, tmp_path / f"{weights}.onnx", weights)
        ops = {n.op_type for n in onnx.load(str(out)).graph.node}
        assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops or "DynamicQuantizeMatMul" in ops, ops
        score = create_ranker(out, RuntimeSettings(), OrtSettings()).score(batches[0])
        assert score.shape == (16,) and np.isfinite(score).all()


def test_a_model_with_a_weights_file_is_smoothed_in_place_of_its_directory(exported, tmp_path):
    """Large rankers keep their weights in ``<name>.data``: the statistics probe must read it from
    the model's own directory (ONNX Runtime refuses data paths leaving it) and leave nothing behind."""
    fp32, batches = exported
    src = tmp_path / "large" / "fp32.onnx"
    src.parent.mkdir()
    onnx.save(onnx.load(str(fp32)), str(src), save_as_external_data=True, location="fp32.onnx.data", size_threshold=0)
    out = tmp_path / "smooth.onnx"
    smoothquant.smooth(src, out, batches[:2], alpha=0.9)
    assert sorted(p.name for p in src.parent.iterdir()) == ["fp32.onnx", "fp32.onnx.data"]
    before = create_ranker(fp32, RuntimeSettings(), OrtSettings())
    np.testing.assert_allclose(create_ranker(out, RuntimeSettings(), OrtSettings()).score(batches[2]), before.score(batches[2]), atol=1e-4)
