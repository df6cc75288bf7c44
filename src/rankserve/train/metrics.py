"""Ranking quality: NDCG@k and MRR over graded judgments, and the evaluation loop around them."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from rankserve.data.catalog import EXACT, Dataset

ScoreFn = Callable[[str, Sequence[str]], np.ndarray]


def _ranked(labels: Sequence[int], scores: Sequence[float]) -> list[int]:
    """Labels in ranked order: by score descending, ties kept in input order."""
    order = sorted(range(len(labels)), key=lambda i: (-float(scores[i]), i))
    return [labels[i] for i in order]


def dcg(labels_in_rank_order: Sequence[int], k: int) -> float:
    return sum((2**rel - 1) / math.log2(i + 2) for i, rel in enumerate(labels_in_rank_order[:k]))


def ndcg_at_k(labels: Sequence[int], scores: Sequence[float], k: int = 10) -> float:
    """NDCG@k with exponential gains (2^label - 1); 0 when no candidate is relevant."""
    ideal = dcg(sorted(labels, reverse=True), k)
    return dcg(_ranked(labels, scores), k) / ideal if ideal > 0 else 0.0


def reciprocal_rank(labels: Sequence[int], scores: Sequence[float], relevant: int = EXACT) -> float:
    """1 / rank of the first candidate with label >= ``relevant``; 0 when there is none."""
    for i, rel in enumerate(_ranked(labels, scores)):
        if rel >= relevant:
            return 1.0 / (i + 1)
    return 0.0


def evaluate(dataset: Dataset, score_fn: ScoreFn, split: str = "heldout", k: int = 10) -> dict[str, float]:
    """Mean NDCG@k and MRR (first exact match) of ``score_fn`` over the queries of ``split``."""
    by_query = dataset.by_query()
    ndcgs, rrs = [], []
    for q in dataset.split(split):
        judgments = by_query[q.query_id]
        texts = [dataset.products[j.product_id].text for j in judgments]
        labels = [j.label for j in judgments]
        scores = np.asarray(score_fn(q.text, texts), dtype=np.float64)
        ndcgs.append(ndcg_at_k(labels, scores, k))
        rrs.append(reciprocal_rank(labels, scores))
    return {f"ndcg@{k}": float(np.mean(ndcgs)), "mrr": float(np.mean(rrs)), "queries": len(ndcgs)}
