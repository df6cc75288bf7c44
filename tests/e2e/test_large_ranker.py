"""A ranker over protobuf's 2 GB limit, for real: made here with random weights (a 540,000-token
vocabulary x 1,024 wide, 2.2 GB in FP32; one encoder layer keeps it quick to run), built with an
INT8 variant, laid out, checked, served by the real tritonserver, ranked over HTTP and gRPC, and
deleted afterwards. Its memory estimate is checked against the rank stub's measured memory."""

import dataclasses
import json
import shutil

import pytest

from conftest import TINY, free_serve_settings
from rankserve.builder import memory, onnx_files
from rankserve.builder.repository import build_repository, verify_repository
from rankserve.server.embedded import EmbeddedServer
from rankserve_client import RankerClient

pytestmark = [pytest.mark.triton, pytest.mark.slow]

VOCAB, HIDDEN = 540_000, 1024


@pytest.fixture(scope="module")
def large(tmp_path_factory, dataset):
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from rankserve.train.finetune import pretrained_encoder_dir

    root = tmp_path_factory.mktemp("large")
    ranker = root / "ranker"
    tokenizer = AutoTokenizer.from_pretrained(pretrained_encoder_dir())
    config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=16, intermediate_size=4096,
                        max_position_embeddings=512, num_labels=1)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(ranker, safe_serialization=True)
    tokenizer.save_pretrained(ranker)
    del model
    settings = dataclasses.replace(TINY, variants=("fp32", "int8_dynamic"), load="all")
    manifest = build_repository(ranker, root / "repo", settings, log=print, dataset=dataset, work_dir=root / "work")
    yield ranker, root / "repo", manifest
    shutil.rmtree(root, ignore_errors=True)


def test_the_fp32_model_is_over_2gb_and_travels_with_its_weights_file(large):
    _, repo, manifest = large
    fp32 = repo / manifest["variants"]["fp32"]["rank_model"] / "1"
    assert onnx_files.external_locations(fp32 / "model.onnx") == ["model.onnx.data"]
    assert (fp32 / "model.onnx.data").stat().st_size > 2**31 > manifest["variants"]["fp32"]["onnx_bytes"] - 2**30
    assert f"{fp32.parent.name}/1/model.onnx.data" in manifest["models"][fp32.parent.name]["files"]
    # INT8 falls under the limit but is still large (553 MB): the runtimes map its weights file too
    int8 = repo / manifest["variants"]["int8_dynamic"]["rank_model"] / "1"
    assert manifest["variants"]["int8_dynamic"]["onnx_bytes"] >= onnx_files.WEIGHTS_FILE_MIN_BYTES
    assert sorted(p.name for p in int8.iterdir() if p.name.startswith("model.onnx")) == ["model.onnx", "model.onnx.data"]
    assert manifest["variants"]["int8_dynamic"]["external_data"] is True
    verify_repository(repo)


def test_it_ranks_over_http_and_grpc_like_pytorch_and_within_its_memory_estimate(large, dataset, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    ranker, repo, manifest = large
    q = dataset.split("heldout")[2]
    texts = [dataset.products[j.product_id].text for j in dataset.by_query()[q.query_id]][:12]
    model = AutoModelForSequenceClassification.from_pretrained(ranker).eval()
    tokenizer = AutoTokenizer.from_pretrained(ranker)
    with torch.inference_mode():
        enc = tokenizer([q.text] * len(texts), texts, truncation=True, max_length=TINY.tokenize.max_length, padding=True,
                        return_tensors="pt")
        expected = model(**enc).logits[:, 0].numpy()
    del model
    estimate = memory.estimate_repository(repo)
    fp32, int8 = manifest["variants"]["fp32"], manifest["variants"]["int8_dynamic"]
    settings = dataclasses.replace(free_serve_settings(), cache_dir=str(tmp_path / "cache"))
    with EmbeddedServer(repo, settings, tmp_path / "tritonserver.log") as server:
        for client in (RankerClient(f"http://{server.http_url}"), RankerClient(f"grpc://{server.grpc_url}")):
            with client:
                got = {r.id: r.score for r in client.rank(q.text, texts, model=fp32["ensemble"])}
                assert max(abs(got[i] - float(expected[i])) for i in range(len(texts))) <= 1e-4
                int8_scores = {r.id: r.score for r in client.rank(q.text, texts, model=int8["ensemble"])}
                assert len(int8_scores) == len(texts)
        stub = next(s for s in server.stubs if s.model == fp32["rank_model"])
        with open(f"/proc/{stub.pid}/status") as f:
            rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    print(json.dumps({"rank_stub_rss": rss, "estimate": estimate.models[fp32["rank_model"]]}))
    assert rss <= estimate.models[fp32["rank_model"]]  # the estimate is an upper bound (the embedding is mapped, touched rows resident)
    # the ONNX Runtime models were optimized and packed for this CPU once, into the host's cache ...
    ort_models = [v for v in (fp32, int8) if v["runtime"] == "onnxruntime"]
    assert len(list((tmp_path / "cache" / "onnxruntime").iterdir())) == len(ort_models) >= 1
    # ... and a restart serves them from it, with the same scores
    with EmbeddedServer(repo, settings, tmp_path / "tritonserver-2.log") as server, RankerClient(f"http://{server.http_url}") as client:
        again = {r.id: r.score for r in client.rank(q.text, texts, model=int8["ensemble"])}
    assert max(abs(again[i] - int8_scores[i]) for i in range(len(texts))) <= 1e-5
