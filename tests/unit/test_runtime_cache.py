"""The host's cache of optimized ONNX Runtime models: written once, reused, keyed, and never in the way."""

import logging
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rankserve.builder import onnx_files
from rankserve.settings import OrtSettings
from rankserve.stages import runtime_cache
from rankserve.stages.rank import create_session

SETTINGS = {"graph_optimization": "all", "prepack_weights": "True"}


def matmul_model(path, seed=0, width=256):
    """x[N, width] @ W + b, then Relu: a weight matrix ONNX Runtime packs and a fusion to apply."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(width).astype(np.float32), "B")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "B"], ["y0"]),
         helper.make_node("Relu", ["y0"], ["y"])], "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", width])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx_files.save(model, path)
    return path


def run(session, width=256):
    x = np.linspace(-1, 1, 3 * width, dtype=np.float32).reshape(3, width)
    return session.run(None, {"x": x})[0]


def settings(**kw):
    return OrtSettings(intra_op_threads=1, **kw)


def test_first_load_writes_an_entry_the_next_loads_reuse(tmp_path):
    model = matmul_model(tmp_path / "m.onnx")
    reference, source = create_session(model, settings(), cache=None)
    assert source == "model"
    made, source = create_session(model, settings(), cache=tmp_path / "cache")
    assert source == "cached"
    (entry,) = (tmp_path / "cache" / "onnxruntime").iterdir()
    assert (entry / "model.onnx").exists() and oct(entry.stat().st_mode & 0o777) == "0o755"
    assert not [p for p in entry.parent.iterdir() if p.name.startswith(".new-")]  # no staging left
    reused, source = create_session(model, settings(), cache=tmp_path / "cache")
    assert source == "cache"
    np.testing.assert_array_equal(run(made), run(reference))
    np.testing.assert_allclose(run(reused), run(reference), rtol=0, atol=1e-6)
    # the packed matrix is in the entry's weights file, next to the original one
    weights = entry / "model.onnx.data"
    assert weights.exists() and weights.stat().st_size > onnx_files.model_bytes(model) - os.path.getsize(model) + 256 * 256 * 4


def test_the_key_follows_the_model_the_runtime_the_cpu_and_the_settings(tmp_path):
    a = matmul_model(tmp_path / "a.onnx", seed=0)
    b = matmul_model(tmp_path / "b.onnx", seed=1)
    key = runtime_cache.ort_key(a, SETTINGS, "1.32.0", flags="avx2 fma")
    assert runtime_cache.ort_key(a, dict(SETTINGS), "1.32.0", flags="avx2 fma") == key
    assert runtime_cache.ort_key(b, SETTINGS, "1.32.0", flags="avx2 fma") != key
    assert runtime_cache.ort_key(a, SETTINGS, "1.33.0", flags="avx2 fma") != key
    assert runtime_cache.ort_key(a, SETTINGS, "1.32.0", flags="avx2 avx512f fma") != key
    assert runtime_cache.ort_key(a, {**SETTINGS, "prepack_weights": "False"}, "1.32.0", flags="avx2 fma") != key


def test_a_large_weights_file_is_keyed_by_size_and_time(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_files, "WEIGHTS_FILE_MIN_BYTES", 1000)
    monkeypatch.setattr(runtime_cache, "HASHED_BYTES", 1000)
    model = matmul_model(tmp_path / "m.onnx")
    data = onnx_files.data_path(model)
    assert data.exists()
    key = runtime_cache.ort_key(model, SETTINGS, "1", flags="f")
    st = data.stat()
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # rewritten in place
    assert runtime_cache.ort_key(model, SETTINGS, "1", flags="f") != key


def test_the_cpu_flags_come_from_cpuinfo(tmp_path):
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nflags\t\t: sse2 avx2 fma\n\nprocessor\t: 1\nflags\t\t: sse2 avx2 fma\n")
    assert runtime_cache.cpu_flags(tmp_path / "cpuinfo") == "avx2 fma sse2"
    assert runtime_cache.cpu_flags(tmp_path / "missing")  # falls back to the platform's name


def test_a_damaged_entry_is_skipped_with_a_warning(tmp_path, caplog):
    model = matmul_model(tmp_path / "m.onnx")
    expected = run(create_session(model, settings())[0])
    create_session(model, settings(), cache=tmp_path / "cache")
    (entry,) = (tmp_path / "cache" / "onnxruntime").iterdir()
    (entry / "model.onnx").write_bytes(b"not a model")
    with caplog.at_level(logging.WARNING, logger="rankserve.cache"):
        session, source = create_session(model, settings(), cache=tmp_path / "cache")
    assert source == "model" and "failed to load" in caplog.text
    np.testing.assert_array_equal(run(session), expected)


def test_an_unwritable_cache_loads_the_model_as_without_one(tmp_path, caplog):
    model = matmul_model(tmp_path / "m.onnx")
    (tmp_path / "cache").write_text("a file where the folder should be")
    with caplog.at_level(logging.WARNING, logger="rankserve.cache"):
        session, source = create_session(model, settings(), cache=tmp_path / "cache")
    assert source == "model" and "not writable" in caplog.text
    assert run(session).shape == (3, 256)


def test_nothing_is_cached_when_the_graph_is_not_optimized(tmp_path):
    model = matmul_model(tmp_path / "m.onnx")
    _, source = create_session(model, settings(graph_optimization="disable"), cache=tmp_path / "cache")
    assert source == "model" and not (tmp_path / "cache").exists()


def test_the_environment_names_the_cache():
    assert runtime_cache.cache_dir({}) is None
    assert str(runtime_cache.cache_dir({runtime_cache.CACHE_ENV: "/var/cache/rankserve"})) == "/var/cache/rankserve"


@pytest.mark.parametrize("prepack", [True, False])
def test_the_entry_keeps_the_prepacking_setting(tmp_path, prepack):
    model = matmul_model(tmp_path / "m.onnx")
    reference = run(create_session(model, settings(prepack_weights=prepack))[0])
    create_session(model, settings(prepack_weights=prepack), cache=tmp_path / "cache")
    session, source = create_session(model, settings(prepack_weights=prepack), cache=tmp_path / "cache")
    assert source == "cache"
    np.testing.assert_allclose(run(session), reference, rtol=0, atol=1e-6)


def test_the_serving_image_needs_no_onnx_package(tmp_path):
    """The stubs run with the `stages` extra (no `onnx`): the cache must work without it."""
    import subprocess
    import sys

    model = matmul_model(tmp_path / "m.onnx")
    code = (
        "import sys; sys.modules['onnx'] = None\n"
        "from pathlib import Path\n"
        "from rankserve.settings import OrtSettings\n"
        "from rankserve.stages.rank import create_session\n"
        f"for expected in ('cached', 'cache'):\n"
        f"    _, source = create_session({str(model)!r}, OrtSettings(intra_op_threads=1), Path({str(tmp_path / 'cache')!r}))\n"
        "    assert source == expected, source\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
