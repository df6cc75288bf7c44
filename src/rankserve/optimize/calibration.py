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
    """An ONNX Runtime ``CalibrationDataReader`` over prepared batches; ``set_range`` lets the
    quantizer calibrate a slice at a time (``CalibStridedMinMax``, which strides any calibrator)."""

    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self._batches = batches
        self._next, self._end = 0, len(batches)

    def __len__(self) -> int:
        return len(self._batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next, self._end = start_index, min(end_index, len(self._batches))

    def get_next(self):
        if self._next >= self._end:
            return None
        self._next += 1
        return self._batches[self._next - 1]

    def rewind(self) -> None:
        self._next, self._end = 0, len(self._batches)


CALIBRATION_MEMORY_BYTES = 4 * 2**30
"""Most memory the calibrator may hold at once. ONNX Runtime keeps every batch's activations until it
builds its histograms: 512 pairs of 64 tokens through a 24-layer, 1024-wide ranker are 22.5 GB (the
build of a 560M ranker was killed for memory at 22.9 GB). Past this, it calibrates a slice of the
batches at a time and merges the histograms."""


def calibration_stride(batches: Sequence[dict[str, np.ndarray]], floats_per_token: int, limit: int | None = None) -> int | None:
    """Batches per calibration slice so one slice's activations (``floats_per_token`` FP32 values
    per token, the inputs of the quantized matrices) stay under ``limit``; a divisor of the number of
    batches, as ONNX Runtime requires. None: all at once fits."""
    limit = CALIBRATION_MEMORY_BYTES if limit is None else limit
    if not batches:
        return None
    tokens = int(next(iter(batches[0].values())).size)
    per_batch = tokens * floats_per_token * 4
    if per_batch * len(batches) <= limit:
        return None
    fits = max(1, limit // per_batch)
    return max(d for d in range(1, len(batches) + 1) if len(batches) % d == 0 and d <= fits)
