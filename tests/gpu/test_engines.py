"""TensorRT engines on a real GPU, from the ONNX files a CPU build wrote (``--work-dir``).

Runs inside the TensorRT container (``make gpu-check`` does: tensorrt and Polygraphy are there,
torch is not and is not needed), or anywhere with a GPU, tensorrt and a built work directory:
``RANKSERVE_GPU_TEST_WORK=artifacts/variants pytest tests/gpu``. Each engine is checked against
ONNX Runtime FP32 at shapes in every optimization profile, each run in the profile Triton would pick.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from rankserve.builder.consistency import onnx_signature
from rankserve.builder.engine import SOURCE_VARIANT, compare_to_reference, local_gpus, profile_for, synthetic_feeds
from rankserve.settings import PRESETS, OrtSettings, RuntimeSettings

WORK = Path(os.environ.get("RANKSERVE_GPU_TEST_WORK", "artifacts/variants"))
SETTINGS = PRESETS["default"].engine


def _missing() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt package is not installed (GPU hosts: the TensorRT container, `make gpu-check`)"
    if not local_gpus():
        return "no NVIDIA GPU visible to nvidia-smi"
    if not (WORK / "fp32.onnx").exists():
        return f"no CPU build's ONNX files in {WORK} (`make build`, or set RANKSERVE_GPU_TEST_WORK)"
    return None


MISSING = _missing()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(MISSING is not None, reason=str(MISSING))]

# (pairs, tokens): both profiles of the default settings, their edges, and one beyond profile 0's tokens
SHAPES = [(1, 8), (7, 20), (300, 64), (33, 100), (1000, 128), (1, 128)]


@pytest.mark.parametrize("precision", SETTINGS.precisions)
def test_engine_scores_like_onnx_runtime_in_every_profile(precision, tmp_path):
    from rankserve.builder.engine import build_engine, run_engine
    from rankserve.stages.rank import create_ranker

    source = WORK / f"{SOURCE_VARIANT[precision]}.onnx"
    if not source.exists():
        pytest.skip(f"{source} was not built (`rankserve build --variants ...,{SOURCE_VARIANT[precision]}`)")
    names = onnx_signature(source).input_names
    assert {profile_for(SETTINGS, *shape) for shape in SHAPES} == set(range(len(SETTINGS.profiles)))
    plan = build_engine(source, precision, SETTINGS, tmp_path / "timing.cache", log=lambda _m: None)
    rng = np.random.default_rng(0)
    batches = [synthetic_feeds(names, pairs, tokens, rng) for pairs, tokens in SHAPES]
    reference = create_ranker(WORK / "fp32.onnx", RuntimeSettings(), OrtSettings())
    for (pairs, tokens), feeds, got in zip(SHAPES, batches, run_engine(plan, batches, SETTINGS)):
        assert got.shape == (pairs,)
        compare_to_reference(got, reference.score(feeds), SETTINGS.tolerance(precision), precision)
