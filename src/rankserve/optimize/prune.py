"""Structured pruning (drop encoder layers) and distillation from the FP32 ranker's scores."""

from __future__ import annotations

import copy
import random
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from rankserve.data.catalog import Dataset
from rankserve.errors import BuildError
from rankserve.settings import PruneSettings
from rankserve.train.finetune import query_groups, ranking_loss


def _layer_list(model):
    base = model.base_model
    for path in ("encoder.layer", "transformer.layer", "encoder.layers"):
        obj = base
        try:
            for attr in path.split("."):
                obj = getattr(obj, attr)
        except AttributeError:
            continue
        return base, path, obj
    raise BuildError(f"cannot find the encoder layers of {type(model).__name__} to prune")


def prune_layers(model, keep: Sequence[int]):
    """A copy of ``model`` that keeps only the encoder layers ``keep`` (0-based, in order)."""
    import torch

    student = copy.deepcopy(model)
    base, path, layers = _layer_list(student)
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
    for i, layer in enumerate(kept):  # attention modules index their cache by layer
        attention = getattr(layer, "attention", None)
        inner = getattr(attention, "self", attention)
        if inner is not None and hasattr(inner, "layer_idx"):
            inner.layer_idx = i
    return student


def distill(student, teacher, tokenizer, dataset: Dataset, settings: PruneSettings, progress: bool = True) -> list[float]:
    """Train ``student`` to reproduce ``teacher``'s logits on the training pairs (MSE), plus the
    labels' ranking loss weighted by ``label_weight``, with a progress bar."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    groups = query_groups(dataset, "train")
    teacher.eval()
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=settings.learning_rate, weight_decay=0.01)
    steps = settings.epochs * ((len(groups) + settings.queries_per_step - 1) // settings.queries_per_step)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / max(1, steps)))
    losses: list[float] = []
    bar = tqdm(total=steps, desc="distilling pruned ranker", unit="step", disable=not progress)
    for _ in range(settings.epochs):
        rng.shuffle(groups)
        for start in range(0, len(groups), settings.queries_per_step):
            batch = groups[start : start + settings.queries_per_step]
            queries = [q for q, texts, _ in batch for _ in texts]
            texts = [t for _, ts, _ in batch for t in ts]
            enc = tokenizer(queries, texts, truncation=True, max_length=settings.max_length, padding=True, return_tensors="pt")
            with torch.no_grad():
                target = teacher(**enc).logits[:, 0]
            logits = student(**enc).logits[:, 0]
            loss = F.mse_loss(logits, target) + settings.label_weight * ranking_loss(logits, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
            bar.update()
    bar.close()
    student.eval()
    return losses
