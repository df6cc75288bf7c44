import dataclasses

import pytest
import torch

from conftest import make_tiny_ranker
from rankserve.errors import BuildError
from rankserve.optimize.prune import distill, prune_layers
from rankserve.settings import PruneSettings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = make_tiny_ranker(tmp_path_factory.mktemp("teacher"))
    return AutoModelForSequenceClassification.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_prune_keeps_the_chosen_layers_and_leaves_the_teacher_alone(teacher):
    model, tokenizer = teacher
    student = prune_layers(model, (1,))
    assert len(student.bert.encoder.layer) == 1 and student.config.num_hidden_layers == 1
    assert len(model.bert.encoder.layer) == 2
    kept, original = student.bert.encoder.layer[0], model.bert.encoder.layer[1]
    assert torch.equal(kept.output.dense.weight, original.output.dense.weight)
    enc = tokenizer(["sofa"], ["gray sofa"], return_tensors="pt")
    assert student(**enc).logits.shape == (1, 1)
    with pytest.raises(BuildError, match="the model has 2"):
        prune_layers(model, (0, 5))


def test_distillation_brings_the_student_closer_to_the_teacher(teacher, dataset):
    model, tokenizer = teacher
    student = prune_layers(model, (1,))
    small = dataclasses.replace(dataset, queries=dataset.split("train")[:32])
    settings = PruneSettings(keep_layers=(1,), epochs=3, queries_per_step=8, learning_rate=3e-3, label_weight=0.0)
    losses = distill(student, model, tokenizer, small, settings, progress=False)
    assert len(losses) == 12
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4
