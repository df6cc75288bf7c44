"""Load, export and numeric check of real (tiny) Hugging Face cross-encoders."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import TINY, make_tiny_ranker
from rankserve.builder.export import _same_ranking, check_onnx, export_onnx, load_ranker, random_inputs
from rankserve.errors import BuildError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def loaded(tiny_ranker):
    return load_ranker(tiny_ranker, TINY)


@pytest.fixture(scope="module")
def exported(loaded, tmp_path_factory):
    return export_onnx(loaded, tmp_path_factory.mktemp("onnx") / "model.onnx", TINY.opset)


def test_export_has_dynamic_batch_and_sequence_axes(exported, loaded):
    model = onnx.load(str(exported))
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    for graph_input in model.graph.input:
        dims = graph_input.type.tensor_type.shape.dim
        assert [d.dim_param for d in dims] == ["batch", "sequence"]
    (output,) = model.graph.output
    assert output.name == "logits" and [d.dim_param for d in output.type.tensor_type.shape.dim] == ["batch"]


def test_numeric_check_passes_at_every_configured_shape(exported, loaded):
    checks = check_onnx(loaded, exported, TINY.check)
    assert [(c.batch, c.length) for c in checks] == list(TINY.check.shapes)
    assert all(c.max_abs_diff <= TINY.check.atol and c.same_ranking for c in checks)


def test_numeric_check_fails_with_a_clear_message_on_a_wrong_model(exported, loaded, tmp_path):
    model = onnx.load(str(exported))
    biggest = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    weights = numpy_helper.to_array(biggest).copy()
    weights += np.random.default_rng(0).normal(0, 0.05, weights.shape).astype(weights.dtype)
    biggest.CopyFrom(numpy_helper.from_array(weights, biggest.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    with pytest.raises(BuildError, match=r"numeric check failed .* at batch=1, length=8: max abs difference"):
        check_onnx(loaded, broken, TINY.check)


def test_fresh_inputs_look_like_padded_pairs(loaded):
    feeds = random_inputs(loaded, 5, 20, np.random.default_rng(1))
    mask = feeds["attention_mask"]
    assert mask[0].all() and mask.sum(axis=1).min() >= 4
    assert (feeds["input_ids"][:, 0] == loaded.tokenizer.cls_token_id).all()
    assert ((feeds["input_ids"] == loaded.tokenizer.pad_token_id) == (mask == 0)).all()


def test_same_ranking_ignores_only_differences_below_tolerance():
    ref = np.array([1.0, 0.5, 0.50001])
    assert _same_ranking(ref, ref + 1e-6, 1e-4)
    assert _same_ranking(ref, np.array([1.0, 0.50002, 0.5]), 1e-4)  # a near tie may flip
    assert not _same_ranking(ref, np.array([0.4, 0.5, 0.50001]), 1e-4)


def test_rejects_a_classifier_with_several_labels(tmp_path):
    make_tiny_ranker(tmp_path, num_labels=2)
    with pytest.raises(BuildError, match="has 2 output labels; a cross-encoder ranker must have exactly one"):
        load_ranker(tmp_path, TINY)


def test_rejects_a_directory_that_is_not_a_model(tmp_path):
    with pytest.raises(BuildError, match="no config.json"):
        load_ranker(tmp_path, TINY)


def test_a_ranker_without_token_type_ids_builds_and_scores_like_pytorch(tmp_path):
    """DistilBERT-style cross-encoders take no token_type_ids: the export drops that input and the
    CPU rank stage ignores the tensor tokenize sends."""
    import torch
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForSequenceClassification

    from rankserve.builder.repository import build_repository
    from rankserve.stages.rank import OnnxRanker
    from rankserve.stages.tokenize import encode_pairs, load_tokenizer
    from rankserve.train.finetune import pretrained_encoder_dir

    tokenizer = AutoTokenizer.from_pretrained(pretrained_encoder_dir())
    config = DistilBertConfig(vocab_size=len(tokenizer), dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                              num_labels=1, initializer_range=0.2)
    torch.manual_seed(0)
    DistilBertForSequenceClassification(config).eval().save_pretrained(tmp_path / "ranker")
    tokenizer.save_pretrained(tmp_path / "ranker")
    manifest = build_repository(tmp_path / "ranker", tmp_path / "repo", TINY, log=lambda _m: None)
    assert manifest["ranker"]["inputs"] == ["input_ids", "attention_mask"]

    texts = ["Larkin Salon Chair | Massage Chairs", "Oak Dining Table | Dining Tables", "rug"]
    encoded = encode_pairs(load_tokenizer(tmp_path / "repo/tokenize/1/tokenizer.json", TINY.tokenize), "salon chair", texts)
    served = OnnxRanker(tmp_path / "repo/rank/1/model.onnx", TINY.ort).score(encoded)
    model = DistilBertForSequenceClassification.from_pretrained(tmp_path / "ranker").eval()
    with torch.inference_mode():
        enc = tokenizer(["salon chair"] * 3, texts, truncation=True, max_length=TINY.tokenize.max_length,
                        padding=True, return_tensors="pt", return_token_type_ids=False)
        expected = model(**enc).logits[:, 0].numpy()
    assert np.max(np.abs(served - expected)) <= 1e-4
