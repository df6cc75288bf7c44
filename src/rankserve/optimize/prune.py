"""Structured pruning (drop encoder layers) and distillation from the FP32 ranker's scores."""

from __future__ import annotations

import copy
from typing import Sequence

from rankserve.data.catalog import Dataset
from rankserve.errors import BuildError
from rankserve.settings import PruneSettings
from rankserve.train.finetune import encoder_layers, fit, query_groups, ranking_loss


def prune_layers(model, keep: Sequence[int]):
    """A copy of ``model`` that keeps only the encoder layers ``keep`` (0-based, in order)."""
    import torch

    student = copy.deepcopy(model)
    base, path, layers = encoder_layers(student)
    if max(keep) >= len(layers):
        raise BuildError(f"cannot keep layers {list(keep)}: the model has {len(layers)}")
    kept = torch.nn.ModuleList([layers[i] for i in keep])
    parent = base
    *parents, last = path.split(".")
    for attr in parents:
        parent = getattr(parent, attr)
    setattr(parent, last, kept)
    for key in ("num_hidden_layers", "n_layers"):
        if hasattr(student.config, key):
            setattr(student.config, key, len(keep))
    if isinstance(getattr(student.config, "layer_types", None), (list, tuple)):  # per-layer attention kinds (Gemma, Qwen)
        student.config.layer_types = [student.config.layer_types[i] for i in keep]
    for i, layer in enumerate(kept):  # attention modules index their cache (and decoders their kind) by layer
        for name in ("attention", "self_attn", "attn"):
            attention = getattr(layer, name, None)
            inner = getattr(attention, "self", attention)
            if inner is not None and hasattr(inner, "layer_idx"):
                inner.layer_idx = i
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = i
    return student


def distill(student, teacher, tokenizer, dataset: Dataset, settings: PruneSettings, progress: bool = True) -> list[float]:
    """Train ``student`` to reproduce ``teacher``'s logits on the training pairs (MSE), plus the
    labels' ranking loss weighted by ``label_weight``, with a progress bar."""
    import torch
    import torch.nn.functional as F

    teacher.eval()

    def loss_fn(logits, forward, batch):
        with torch.no_grad():
            target = forward(teacher)
        return F.mse_loss(logits, target) + settings.label_weight * ranking_loss(logits, batch)

    return fit(student, tokenizer, query_groups(dataset, "train"), epochs=settings.epochs,
               queries_per_step=settings.queries_per_step, max_length=settings.max_length,
               learning_rate=settings.learning_rate, seed=settings.seed, loss_fn=loss_fn, length_chunk=settings.length_chunk,
               desc="distilling pruned ranker", progress=progress)
