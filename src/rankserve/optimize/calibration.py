"""Calibration data: real (query, product) pairs from the training distribution."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from rankserve.data.catalog import Dataset


def calibration_pairs(dataset: Dataset, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` pairs drawn from the training queries' candidate lists (all labels, as served)."""
    rng = np.random.default_rng(seed)
    by_query = dataset.by_query()
    pairs = [(q.text, dataset.products[j.product_id].text) for q in dataset.split("train") for j in by_query[q.query_id]]
    if not pairs:
        raise ValueError("the dataset has no training pairs to calibrate on")
    picks = rng.choice(len(pairs), size=min(n, len(pairs)), replace=False)
    return [pairs[i] for i in sorted(picks)]


def fixed_length_batches(
    tokenizer, pairs: Sequence[tuple[str, str]], length: int, batch_size: int, input_names: Sequence[str]
) -> list[dict[str, np.ndarray]]:
    """Tokenized batches padded to one ``length`` (histogram calibrators need a single shape)."""
    batches = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        enc = tokenizer([q for q, _ in chunk], [t for _, t in chunk], truncation=True, max_length=length,
                        padding="max_length", return_tensors="np")
        batches.append({name: enc[name].astype(np.int64) for name in input_names})
    return batches


class BatchReader:
    """An ONNX Runtime ``CalibrationDataReader`` over prepared batches."""

    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self._batches = batches
        self._next = 0

    def get_next(self):
        if self._next >= len(self._batches):
            return None
        self._next += 1
        return self._batches[self._next - 1]

    def rewind(self) -> None:
        self._next = 0
