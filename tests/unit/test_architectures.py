"""Every supported architecture family, each as a tiny random-weight ranker made here: loaded,
exported, checked against PyTorch, scored through the served path (serving tokenizer, rank stage
batching and re-padding) against PyTorch on each pair alone, quantizable layer by layer, prunable."""

import numpy as np
import pytest

from conftest import TINY
from rankserve.builder.export import (ENCODER_ARCHITECTURES, check_onnx, check_serving, export_onnx, load_ranker)
from rankserve.builder.repository import write_serving_tokenizer
from rankserve.errors import BuildError
from rankserve.optimize import transforms
from rankserve.optimize.prune import prune_layers
from rankserve.stages.tokenize import load_tokenizer
from tiny_rankers import DECODERS, ENCODERS, make_ranker

pytestmark = pytest.mark.slow


def _exported(directory, tmp_path):
    ranker = load_ranker(directory, TINY)
    onnx = export_onnx(ranker, tmp_path / "model.onnx", TINY.opset)
    tokenizer = load_tokenizer(write_serving_tokenizer(ranker.tokenizer, tmp_path / "tokenizer.json"), TINY.tokenize)
    return ranker, onnx, tokenizer


@pytest.mark.parametrize("arch", DECODERS + ENCODERS)
def test_every_architecture_builds_checks_and_serves_like_pytorch_on_each_pair_alone(arch, tmp_path):
    ranker, onnx, tokenizer = _exported(make_ranker(arch, tmp_path / "ranker"), tmp_path)
    assert ranker.family == ("encoder" if arch in ENCODER_ARCHITECTURES else "decoder")
    checks = check_onnx(ranker, onnx, TINY.check)
    assert max(c.max_abs_diff for c in checks) <= 1e-4
    assert check_serving(ranker, onnx, tokenizer, TINY.batching, 1e-4) <= 1e-4
    # the INT8 ladder finds the FFN and attention output projections of every family; the head stays FP32
    matmuls = transforms.weight_matmuls(onnx)
    assert [len(step) for _, step in transforms.mixed_precision_ladder(matmuls)] == [0, 2, 4]
    assert not [m for m in matmuls if transforms.HEAD.search(m)]
    # structured pruning keeps one of the two layers and still exports a model that matches PyTorch
    ranker.model = prune_layers(ranker.model, (1,))
    pruned = export_onnx(ranker, tmp_path / "pruned.onnx", TINY.opset)
    assert max(c.max_abs_diff for c in check_onnx(ranker, pruned, TINY.check)) <= 1e-4


@pytest.mark.parametrize("setup", [dict(padding_side="left"), dict(pad_is_eos=True), dict(append_eos=False), dict(set_pad=False)],
                         ids=["left-padding", "pad-is-eos", "no-eos", "no-pad-id-in-config"])
def test_decoder_tokenizer_setups_serve_like_pytorch_on_each_pair_alone(setup, tmp_path):
    """A tokenizer that pads left is served right-padded: the graph pools the last non-pad token
    and rotary positions are relative, so the scores are the same (checked here, pair by pair)."""
    ranker, onnx, tokenizer = _exported(make_ranker("qwen2", tmp_path / "ranker", **setup), tmp_path)
    assert ranker.model.config.pad_token_id == ranker.tokenizer.pad_token_id
    assert check_serving(ranker, onnx, tokenizer, TINY.batching, 1e-4) <= 1e-4


def test_the_served_path_check_catches_a_decoder_export_that_reads_its_padding(tmp_path):
    """What the build shipped before: the model exported as is. Its padded positions get id 0 from
    the rank stage, the model takes them for tokens, and the scores are wrong; the numeric check,
    which feeds PyTorch and ONNX Runtime the same padded tensors, passes all the same."""
    import torch

    ranker, _, tokenizer = _exported(make_ranker("qwen2", tmp_path / "ranker"), tmp_path)
    plain = tmp_path / "plain.onnx"

    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = ranker.model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]

    example = (torch.ones((2, 8), dtype=torch.int64), torch.ones((2, 8), dtype=torch.int64))
    torch.onnx.export(Plain().eval(), example, str(plain), input_names=["input_ids", "attention_mask"], output_names=["logits"],
                      dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}, "logits": {0: "b"}},
                      opset_version=TINY.opset, dynamo=False)
    check_onnx(ranker, plain, TINY.check)  # passes: it cannot see the fault
    with pytest.raises(BuildError, match=r"serving check failed: .* differ from PyTorch on each pair alone by up to .*reads its padding"):
        check_serving(ranker, plain, tokenizer, TINY.batching, 1e-4)


def test_decoder_quantized_variants_run_and_keep_their_shape(tmp_path):
    from rankserve.settings import OrtSettings, RuntimeSettings
    from rankserve.stages.rank import create_ranker
    from rankserve.stages.tokenize import encode_pairs

    ranker, onnx, tokenizer = _exported(make_ranker("qwen3", tmp_path / "ranker"), tmp_path)
    feeds = encode_pairs(tokenizer, "outdoor rug", ["8x10 outdoor rug, polypropylene", "rug", "lamp shade"])
    dynamic = transforms.dynamic_int8(onnx, tmp_path / "int8_dynamic.onnx")
    for path in (onnx, dynamic):
        scores = create_ranker(path, RuntimeSettings(), OrtSettings()).score(feeds)
        assert scores.shape == (3,) and np.isfinite(scores).all()
