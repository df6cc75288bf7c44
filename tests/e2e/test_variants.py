"""Every optimized variant served through its own ensemble, with the same public API."""

import json

import numpy as np
import pytest

from rankserve.builder.variants import cpu_has_bf16_units
from rankserve_client import RankerClient
from rankserve.settings import OrtSettings, RuntimeSettings
from rankserve.stages.rank import create_ranker
from rankserve.stages.tokenize import encode_pairs, load_tokenizer
from conftest import TINY

pytestmark = [pytest.mark.triton, pytest.mark.slow]


@pytest.fixture(scope="module")
def manifest(tiny_variants_repo):
    return json.loads((tiny_variants_repo / "manifest.json").read_text())


def test_manifest_records_every_variant_with_its_gate_and_runtime(manifest):
    expected = {"fp32", "fused", "int8", "int8_dynamic", "pruned", "pruned_int8", "fp16", "int8_trt"} | ({"bf16"} if cpu_has_bf16_units() else set())
    assert set(manifest["variants"]) == expected
    for name, v in manifest["variants"].items():
        assert v["gate"]["passed"] and 0 <= v["gate"]["ndcg"] <= 1 and -1 <= v["gate"]["kendall_tau"] <= 1
        assert v["runtime"] in ("onnxruntime", "openvino")
    assert manifest["variants"]["int8_dynamic"]["runtime"] == "onnxruntime"
    assert manifest["variants"]["int8"]["format"].startswith("QDQ")
    for gpu_only in ("fp16", "int8_trt"):  # TensorRT engines are built from them on the GPU host
        assert manifest["variants"][gpu_only]["served_on_cpu"] is False and manifest["variants"][gpu_only]["rank_model"] is None
    trt = manifest["variants"]["int8_trt"]  # ModelOpt quantized every Linear; the strict engine gate was applied
    assert trt["quantizer"].startswith("nvidia-modelopt") and trt["quantized_matmuls"] == trt["weight_matmuls"] > 0
    assert trt["gate"]["min_top_k_overlap"] == TINY.gate.min_top_k_overlap_int8_engine
    ladder = manifest["variants"]["int8"]
    assert 0 < ladder["quantized_matmuls"] <= ladder["weight_matmuls"] == trt["weight_matmuls"]
    speeds = {n: max(v["build_speed_pairs_per_s"].values()) for n, v in manifest["variants"].items() if v["served_on_cpu"]}
    assert manifest["default_variant"] == max(speeds, key=speeds.get)


def test_the_gate_also_scores_served_batches_and_records_how_far_scores_move(manifest):
    """FP32 scores a pair the same whatever shares its batch; dynamic INT8 takes its activation
    scale over the whole batch tensor, so its scores move with their neighbours."""
    variants = manifest["variants"]
    for name, v in variants.items():
        if v["served_on_cpu"]:
            g = v["gate"]
            assert g["served_ndcg"] is not None and 0 <= g["served_top_k_overlap"] <= 1, name
    assert variants["fp32"]["gate"]["batch_max_abs_diff"] <= 1e-4
    assert variants["fused"]["gate"]["batch_max_abs_diff"] <= 1e-4
    assert variants["int8_dynamic"]["gate"]["batch_max_abs_diff"] > 1e-3


@pytest.mark.parametrize("variant", ["int8", "int8_trt"])
def test_the_qdq_model_is_symmetric_int8_with_per_channel_weights(tiny_variants_repo, tiny_variants_work, manifest, variant):
    import onnx
    from onnx import numpy_helper

    v = manifest["variants"][variant]
    path = tiny_variants_repo / v["rank_model"] / "1" / "model.onnx" if v["rank_model"] else tiny_variants_work / f"{variant}.onnx"
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert dq
    for node in dq:
        zero_point = inits.get(node.input[2]) if len(node.input) > 2 else None
        assert zero_point is None or (zero_point.dtype == np.int8 and not zero_point.any())  # symmetric
    per_channel = [n for n in dq if inits.get(n.input[1]) is not None and inits[n.input[1]].ndim == 1 and inits[n.input[1]].size > 1]
    assert per_channel, "weights should carry one scale per output channel"


def test_every_variant_ensemble_serves_the_same_api_and_its_own_model(variants_server, tiny_variants_repo, manifest, dataset):
    tokenizer = load_tokenizer(tiny_variants_repo / "tokenize/1/tokenizer.json", TINY.tokenize)
    q = dataset.split("heldout")[0]
    texts = [dataset.products[j.product_id].text for j in dataset.by_query()[q.query_id]]
    with RankerClient(f"http://{variants_server.http_url}") as http, RankerClient(f"grpc://{variants_server.grpc_url}") as grpc:
        for name, v in manifest["variants"].items():
            if not v["served_on_cpu"]:
                continue
            offline = create_ranker(tiny_variants_repo / v["rank_model"] / "1" / "model.onnx",
                                    RuntimeSettings(v["runtime"], v["inference_precision"]), OrtSettings())
            expected = offline.score(encode_pairs(tokenizer, q.text, texts))
            for client in (http, grpc):
                results = client.rank(q.text, texts, top_k=5, model=v["ensemble"])
                assert len(results) == 5
                got = {r.id: r.score for r in results}
                assert max(abs(got[i] - expected[i]) for i in got) <= 1e-4, name
        default = manifest["variants"][manifest["default_variant"]]
        assert default["rank_model"] == "rank"
        assert len(http.rank(q.text, texts)) == len(texts)
