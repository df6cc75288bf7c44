"""The memory estimate of a served repository, the budget, and which variants a repository loads."""

import pytest

from rankserve.builder import memory
from rankserve.errors import BuildError, ServeError

GiB = 2**30


@pytest.mark.parametrize("text, expected", [("8GiB", 8 * GiB), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000),
                                            ("2000000000", 2_000_000_000), (" 3 gib ", 3 * GiB)])
def test_parse_bytes(text, expected):
    assert memory.parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "8 parsecs", "-1GiB", "0", "GiB"])
def test_parse_bytes_refuses_what_is_not_a_size(text):
    with pytest.raises(ValueError, match="memory size"):
        memory.parse_bytes(text)


def test_a_rank_model_counts_its_runtime_its_weights_its_largest_batch_and_its_instances():
    small, large = memory.Weights(10 * 2**20, 0), memory.Weights(2238 * 2**20, 0)
    ort = lambda w, instances=1, tokens=1024: memory.rank_model_bytes(w, "onnxruntime", "f32", instances, tokens, 1024)
    assert ort(large) - ort(small) == int(memory.SINGLE_FILE_FACTOR * 2228 * 2**20)  # one file: read in, and prepacked beside
    assert ort(small, tokens=4096) > ort(small)
    assert memory.rank_model_bytes(small, "openvino", "f32", 1, 1024, 1024) > ort(small)
    # ONNX Runtime: each instance its own prepacked matrices; the mapped embedding table once
    mapped = memory.Weights(2238 * 2**20, 1000 * 2**20, mapped=True)
    assert ort(mapped, instances=2) - ort(mapped) == ort(memory.Weights(1238 * 2**20, 0, mapped=True))
    # ONNX Runtime without prepacking: every weight of a mapped model read in place, one copy for all instances
    shared = memory.Weights(2238 * 2**20, 1000 * 2**20, mapped=True)
    one, two = (memory.rank_model_bytes(shared, "onnxruntime", "f32", n, 1024, 1024, prepack=False) for n in (1, 2))
    assert two - one == ort(memory.Weights(0, 0)) and one == ort(shared)
    # OpenVINO: the whole file mapped once, its private copy per instance
    ov = lambda instances: memory.rank_model_bytes(large, "openvino", "f32", instances, 1024, 1024)
    assert ov(2) - ov(1) < ov(1) - memory.rank_model_bytes(memory.Weights(0, 0), "openvino", "f32", 1, 1024, 1024)


FASTEST_FIRST = ["int8_dynamic", "int8", "fp32"]


def test_auto_loads_every_variant_of_a_small_ranker_and_only_the_fastest_of_a_large_one():
    small = {"int8_dynamic": 150 * 2**20, "int8": 200 * 2**20, "fp32": 250 * 2**20}
    large = {"int8_dynamic": int(0.7 * GiB), "int8": int(1.5 * GiB), "fp32": int(2.4 * GiB)}
    assert memory.choose_loaded("auto", small, FASTEST_FIRST, 0, 4 * GiB) == FASTEST_FIRST
    assert memory.choose_loaded("auto", large, FASTEST_FIRST, 0, 4 * GiB) == ["int8_dynamic"]
    assert memory.choose_loaded("auto", large, FASTEST_FIRST, 8 * GiB, 4 * GiB) == FASTEST_FIRST  # a budget that holds them all
    assert memory.choose_loaded("all", large, FASTEST_FIRST, 0, 4 * GiB) == FASTEST_FIRST
    assert memory.choose_loaded("fp32,int8", large, FASTEST_FIRST, 0, 4 * GiB) == ["int8", "fp32"]  # fastest first


def test_loading_a_variant_that_was_not_built_is_refused_by_name():
    with pytest.raises(BuildError, match=r"\['bf16'\] not among the variants built"):
        memory.choose_loaded("fp32,bf16", {"fp32": 1}, ["fp32"], 0, GiB)


def test_over_budget_is_refused_with_the_table_and_what_to_do():
    estimate = memory.Estimate({"rank": 3 * GiB, "rank_fp32": 2 * GiB, "ranker": 0, "tokenize": 96 * 2**20})
    memory.require_budget(estimate, 0, "repo")  # no budget
    memory.require_budget(estimate, 6 * GiB, "repo")
    with pytest.raises(ServeError, match=r"(?s)needs an estimated 5\.\d\d GiB .* budget of 4\.00 GiB.*rank_fp32 +2\.00 GiB.*--load"):
        memory.require_budget(estimate, 4 * GiB, "the repository repo", ServeError)


def test_embedding_rows_past_the_tokenizers_vocabulary_stay_on_disk(tmp_path, monkeypatch):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from rankserve.builder import onnx_files

    table = numpy_helper.from_array(np.zeros((1000, 64), np.float32), "E")  # 256,000 bytes
    dense = numpy_helper.from_array(np.zeros((64, 64), np.float32), "W")  # 16,384 bytes
    graph = helper.make_graph([helper.make_node("Gather", ["E", "ids"], ["h"]), helper.make_node("MatMul", ["h", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 64])], [table, dense])
    single = onnx_files.save(helper.make_model(graph), tmp_path / "single" / "m.onnx")
    assert memory.model_weights(single, 100) == memory.Weights(single.stat().st_size, 0)  # read into memory: all of it
    monkeypatch.setattr(onnx_files, "PROTOBUF_LIMIT", 100_000)
    monkeypatch.setattr(onnx_files, "INLINE_MARGIN", 0)
    mapped = onnx_files.save(helper.make_model(graph), tmp_path / "mapped" / "m.onnx")
    full = onnx_files.model_bytes(mapped)
    assert memory.model_weights(mapped) == memory.Weights(full, 256_000, mapped=True)
    assert memory.model_weights(mapped, 2000) == memory.Weights(full, 256_000, mapped=True)  # a tokenizer that reaches every row
    assert memory.model_weights(mapped, 100) == memory.Weights(full, 25_600, mapped=True)
