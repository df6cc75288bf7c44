"""Fine-tuning runs, learns, and saves the format ``rankserve build`` accepts."""

import dataclasses

import pytest

from conftest import TINY, make_tiny_ranker
from rankserve.builder.export import load_ranker
from rankserve.settings import TrainSettings
from rankserve.train.finetune import init_cross_encoder, save_ranker, train

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
