"""Fine-tuning runs, learns, and saves the format ``rankserve build`` accepts."""

import dataclasses

import pytest

from conftest import TINY, make_tiny_ranker
from rankserve.builder.export import load_ranker
from rankserve.settings import TrainSettings
from rankserve.errors import ConfigError
from rankserve.train.finetune import (chunked_forward, freeze_bottom, init_cross_encoder, length_chunks, save_ranker,
                                       train)

pytestmark = pytest.mark.slow


def test_training_lowers_the_loss_and_saves_a_buildable_ranker(dataset, tmp_path):
    base = make_tiny_ranker(tmp_path / "base")
    model, tokenizer = init_cross_encoder(base, seed=0)
    small = dataclasses.replace(dataset, queries=dataset.split("train")[:24])
    settings = TrainSettings(epochs=8, queries_per_step=4, learning_rate=3e-3, max_length=48)
    losses = train(model, tokenizer, small, settings, progress=False)
    assert len(losses) == 8 * 6  # 24 queries, 4 per step, 8 epochs
    first_epoch, last_epoch = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last_epoch < 0.93 * first_epoch
    out = save_ranker(model, tokenizer, tmp_path / "ranker", {"note": "test"})
    loaded = load_ranker(out, TINY)
    assert loaded.model.config.num_labels == 1 and (out / "training_report.json").exists()


def test_length_chunks_score_like_one_padded_batch(tiny_ranker):
    import torch

    model, tokenizer = init_cross_encoder(tiny_ranker)
    model.eval()
    queries = ["outdoor welcome rug"] * 5 + ["tv stand"] * 4
    texts = ["rug", "a very long product description of a woven outdoor rug with a welcome sign " * 3, "mat",
             "doormat with coir bristles", "stand", "oak tv stand", "tv", "media console for televisions up to 65 inches", "x"]
    chunks = length_chunks(tokenizer, queries, texts, 64, 4)
    assert [len(idx) for idx, _ in chunks] == [4, 4, 1]
    lengths = [int(enc["attention_mask"].sum(1).max()) for _, enc in chunks]
    assert lengths == sorted(lengths) and all(enc["input_ids"].shape[1] == n for (_, enc), n in zip(chunks, lengths))
    with torch.no_grad():
        together = chunked_forward(model, length_chunks(tokenizer, queries, texts, 64, 0))
        chunked = chunked_forward(model, chunks)
        alone = torch.cat([model(**tokenizer(q, t, truncation=True, max_length=64, return_tensors="pt")).logits[:, 0]
                           for q, t in zip(queries, texts)])
    assert torch.allclose(chunked, alone, atol=1e-5) and torch.allclose(together, alone, atol=1e-5)


def test_frozen_layers_get_no_gradient(tiny_ranker):
    model, tokenizer = init_cross_encoder(tiny_ranker)
    freeze_bottom(model, 1)
    enc = tokenizer(["q", "q"], ["a", "b c"], padding=True, return_tensors="pt")
    model(**enc).logits.sum().backward()
    frozen = {n for n, p in model.named_parameters() if p.grad is None}
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith(("bert.embeddings.", "bert.encoder.layer.0."))}
    with pytest.raises(ConfigError, match="cannot freeze 2 layers"):
        freeze_bottom(model, 2)
    model, _ = init_cross_encoder(tiny_ranker)
    freeze_bottom(model, 0)
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["bert.embeddings.word_embeddings.weight"]
