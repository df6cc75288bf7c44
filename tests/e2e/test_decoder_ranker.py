"""A decoder-only reranker (Qwen2ForSequenceClassification, last-token pooling, random weights,
made here) built with its variants, gated, laid out and served by the real tritonserver: scores
over HTTP and gRPC equal PyTorch on each pair alone."""

import dataclasses

import numpy as np
import pytest

from conftest import TINY, free_serve_settings
from rankserve.builder.repository import build_repository
from rankserve.builder.variants import cpu_has_bf16_units
from rankserve.server.embedded import EmbeddedServer
from rankserve_client import RankerClient
from tiny_rankers import make_ranker

pytestmark = [pytest.mark.triton, pytest.mark.slow]

VARIANTS = ("fp32", "int8", "int8_dynamic", "bf16", "pruned", "fp16", "int8_trt")


@pytest.fixture(scope="module")
def decoder(tmp_path_factory, dataset):
    ranker = make_ranker("qwen2", tmp_path_factory.mktemp("qwen2"), padding_side="left")
    out = tmp_path_factory.mktemp("qwen2_repo")
    manifest = build_repository(ranker, out, dataclasses.replace(TINY, variants=VARIANTS, load="all", prune=dataclasses.replace(TINY.prune, epochs=1)), log=lambda _m: None,
                                dataset=dataset, work_dir=tmp_path_factory.mktemp("qwen2_work"))
    return ranker, out, manifest


def test_the_build_records_a_decoder_and_gates_every_variant(decoder):
    _, _, manifest = decoder
    assert manifest["ranker"]["architecture"] == "Qwen2ForSequenceClassification" and manifest["ranker"]["family"] == "decoder"
    assert manifest["ranker"]["inputs"] == ["input_ids", "attention_mask"]
    assert manifest["numeric_check"]["served_path_max_abs_diff"] <= 1e-4
    built = set(manifest["variants"])
    assert built == set(VARIANTS) - ({"bf16"} if not cpu_has_bf16_units() else set()) - set(manifest["skipped_variants"])
    assert {"fp32", "int8", "int8_dynamic", "pruned", "fp16"} <= built
    for name, v in manifest["variants"].items():
        assert v["gate"]["passed"], name
    ladder = manifest["variants"]["int8"]
    assert 0 < ladder["quantized_matmuls"] <= ladder["weight_matmuls"] == 14  # 7 Linears a layer; the score head stays FP32


def test_served_scores_equal_pytorch_on_each_pair_alone(decoder, dataset, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    ranker, out, manifest = decoder
    model = AutoModelForSequenceClassification.from_pretrained(ranker).eval()
    tokenizer = AutoTokenizer.from_pretrained(ranker)
    assert tokenizer.padding_side == "left"  # served right-padded: the graph pools the last non-pad token
    q = dataset.split("heldout")[1]
    texts = [dataset.products[j.product_id].text for j in dataset.by_query()[q.query_id]]
    with torch.inference_mode():
        expected = [float(model(**tokenizer(q.text, t, truncation=True, max_length=TINY.tokenize.max_length,
                                             return_tensors="pt")).logits[0, 0]) for t in texts]
    with EmbeddedServer(out, free_serve_settings(), tmp_path / "tritonserver.log") as server:
        for client in (RankerClient(f"http://{server.http_url}"), RankerClient(f"grpc://{server.grpc_url}")):
            with client:
                got = {r.id: r.score for r in client.rank(q.text, texts, model=manifest["variants"]["fp32"]["ensemble"])}
                assert max(abs(got[i] - expected[i]) for i in range(len(texts))) <= 1e-4
                for name, v in manifest["variants"].items():
                    if v["ensemble"]:
                        scores = [r.score for r in client.rank(q.text, texts, model=v["ensemble"])]
                        assert len(scores) == len(texts) and np.isfinite(scores).all(), name
