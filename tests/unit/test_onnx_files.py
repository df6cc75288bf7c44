"""The one on-disk layout of ONNX models: a single file, or the graph with ONE data file beside it."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from rankserve.builder import onnx_files
from rankserve.errors import BuildError


def _model(n: int = 64) -> onnx.ModelProto:
    """y = (x @ W1) @ W2 with two n x n weights: 2 * 4 n^2 bytes of initializers."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32), "W1")
    w2 = numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32), "W2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("MatMul", ["h", "W2"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], [w1, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(path) -> np.ndarray:
    x = np.ones((1, 64), np.float32)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.fixture
def small_limit(monkeypatch):
    """A protobuf limit of 20 KB: the 32 KB test model takes the large-model path."""
    monkeypatch.setattr(onnx_files, "PROTOBUF_LIMIT", 20_000)
    monkeypatch.setattr(onnx_files, "INLINE_MARGIN", 0)


def test_a_model_under_the_limit_is_one_file(tmp_path):
    path = onnx_files.save(_model(), tmp_path / "m.onnx")
    assert onnx_files.model_files(path) == [path] and not onnx_files.data_path(path).exists()
    assert onnx_files.model_bytes(path) == path.stat().st_size


def test_a_model_over_the_limit_keeps_its_weights_in_one_data_file(tmp_path, small_limit):
    path = onnx_files.save(_model(), tmp_path / "m.onnx")
    assert onnx_files.external_locations(path) == ["m.onnx.data"]
    assert onnx_files.model_files(path) == [path, tmp_path / "m.onnx.data"]
    assert onnx_files.model_bytes(path) > 2 * 64 * 64 * 4
    assert onnx_files.needs_external_data(path)
    np.testing.assert_allclose(_run(path), _run(onnx_files.save(_model(), tmp_path / "ref" / "m.onnx")), rtol=0, atol=0)


def test_normalize_gathers_a_tools_many_weight_files_into_one(tmp_path, small_limit):
    # what PyTorch's exporter does over 2 GB: one file per weight, named after it
    path = tmp_path / "m.onnx"
    onnx.save_model(_model(), str(path), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["W1", "W2", "m.onnx"]
    expected = _run(path)
    onnx_files.normalize(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    np.testing.assert_array_equal(_run(path), expected)


def test_normalize_inlines_weights_a_tool_wrote_outside_a_small_model(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save_model(_model(), str(path), save_as_external_data=True, location="m.onnx_data", size_threshold=0)
    onnx_files.normalize(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert onnx_files.external_locations(path) == []


def test_the_weights_file_is_as_readable_as_the_graph(tmp_path, small_limit):
    """onnx.save_model and the quantizers create it 0600: a server running as another user could
    read the graph but not its weights."""
    path = onnx_files.save(_model(), tmp_path / "m.onnx")
    assert oct(onnx_files.data_path(path).stat().st_mode & 0o777) == oct(path.stat().st_mode & 0o777)
    assert onnx_files.data_path(path).stat().st_mode & 0o044  # group and others may read it
    onnx_files.data_path(path).chmod(0o600)  # as ONNX Runtime's quantizer leaves it
    onnx_files.normalize(path)
    assert onnx_files.data_path(path).stat().st_mode & 0o044
    copied = onnx_files.copy(path, tmp_path / "repo" / "model.onnx")
    assert oct(onnx_files.data_path(copied).stat().st_mode & 0o777) == oct(copied.stat().st_mode & 0o777)


def test_copy_renames_the_data_file_and_leaves_the_source_alone(tmp_path, small_limit):
    src = onnx_files.save(_model(), tmp_path / "work" / "int8.onnx")
    before = {p.name: p.read_bytes() for p in src.parent.iterdir()}
    dst = onnx_files.copy(src, tmp_path / "repo" / "rank" / "1" / "model.onnx")
    assert onnx_files.external_locations(dst) == ["model.onnx.data"]
    assert sorted(p.name for p in dst.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert {p.name: p.read_bytes() for p in src.parent.iterdir()} == before
    np.testing.assert_array_equal(_run(dst), _run(src))
    # a single-file model copied over it leaves no stale data file behind
    onnx_files.copy(_small(tmp_path), dst)
    assert sorted(p.name for p in dst.parent.iterdir()) == ["model.onnx"]


def _small(tmp_path):
    path = tmp_path / "small" / "m.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(_model(8), str(path))
    return path


def test_copy_refuses_a_model_whose_weights_file_is_missing(tmp_path, small_limit):
    src = onnx_files.save(_model(), tmp_path / "m.onnx")
    onnx_files.data_path(src).unlink()
    with pytest.raises(BuildError, match=r"needs its weights file .*m\.onnx\.data, which does not exist"):
        onnx_files.copy(src, tmp_path / "out" / "model.onnx")
