"""The build's inputs: a ranker directory is loaded without running its code and from its
safetensors weights, and the GPU build checks the FP32 reference ONNX it scores against before
using it."""

import dataclasses

import pytest

from conftest import TINY
from rankserve.builder.export import load_ranker
from rankserve.builder.repository import build_repository
from rankserve.errors import BuildError

pytestmark = pytest.mark.slow


def test_the_ranker_is_loaded_without_its_code_and_from_safetensors(tiny_ranker, monkeypatch):
    import transformers

    calls = []
    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForSequenceClassification):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, _name=cls.__name__, **kwargs):
            calls.append((_name, kwargs))
            return _original(klass, *args, **kwargs)
        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    load_ranker(tiny_ranker, TINY)
    assert {name for name, _ in calls} == {"AutoConfig", "AutoTokenizer", "AutoModelForSequenceClassification"}
    assert all(kwargs.get("trust_remote_code") is False for _, kwargs in calls), calls
    assert [kw.get("use_safetensors") for name, kw in calls if name == "AutoModelForSequenceClassification"] == [True]


def test_the_gpu_build_refuses_an_fp32_reference_that_is_not_the_recorded_one(tiny_ranker, dataset, tmp_path):
    """Checked before any GPU work (this host has no GPU: the old build failed on that first)."""
    from rankserve.builder.gpu import build_gpu_repository

    repo, work = tmp_path / "repo", tmp_path / "work"
    build_repository(tiny_ranker, repo, TINY, log=lambda _m: None, work_dir=work)
    settings = dataclasses.replace(TINY, engine=dataclasses.replace(TINY.engine, precisions=("fp16",)))
    with pytest.raises(BuildError, match="needs the 'fp16' ONNX variant"):  # the reference passes; the engine's source is missing
        build_gpu_repository(repo, work, dataset, settings, log=lambda _m: None)
    with (work / "fp32.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(BuildError, match=r"fp32\.onnx does not match the checksum the manifest records for 'fp32'"):
        build_gpu_repository(repo, work, dataset, settings, log=lambda _m: None)
