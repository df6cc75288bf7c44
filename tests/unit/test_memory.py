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


def test_a_rank_instance_counts_its_runtime_its_weights_and_its_largest_batch():
    small = memory.rank_instance_bytes(10 * 2**20, "onnxruntime", "f32", 1024, 384)
    large = memory.rank_instance_bytes(2238 * 2**20, "onnxruntime", "f32", 1024, 1024)
    assert large - small > 2228 * 2**20  # the weights count in full
    assert memory.rank_instance_bytes(0, "onnxruntime", "f32", 4096, 1024) > memory.rank_instance_bytes(0, "onnxruntime", "f32", 1024, 1024)
    assert memory.rank_instance_bytes(0, "openvino", "f32", 1024, 384) > memory.rank_instance_bytes(0, "onnxruntime", "f32", 1024, 384)


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


def test_embedding_rows_past_the_tokenizers_vocabulary_do_not_count(tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.zeros((1000, 64), np.float32), "E")  # 256,000 bytes
    dense = numpy_helper.from_array(np.zeros((64, 64), np.float32), "W")  # 16,384 bytes
    graph = helper.make_graph([helper.make_node("Gather", ["E", "ids"], ["h"]), helper.make_node("MatMul", ["h", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 64])], [table, dense])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), str(path))
    full = path.stat().st_size
    assert memory.resident_weight_bytes(path) == full
    assert memory.resident_weight_bytes(path, 2000) == full  # a tokenizer that reaches every row
    assert memory.resident_weight_bytes(path, 100) == full - 256_000 * 900 // 1000
