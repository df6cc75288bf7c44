"""Throughput measurements shared by the build (runtime choice, default variant) and the report."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from rankserve.data.catalog import Dataset


def workload_batches(dataset: Dataset, batch_size: int, n: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    """``n`` requests of ``batch_size`` candidates as served: one held-out query, real product texts."""
    rng = np.random.default_rng(seed)
    queries = dataset.split("heldout") or dataset.queries
    texts = [p.text for p in dataset.products.values()]
    return [
        (queries[int(rng.integers(len(queries)))].text, [texts[int(i)] for i in rng.integers(len(texts), size=batch_size)])
        for _ in range(n)
    ]


def fixed_batch(batch_size: int, length: int, vocab: int = 30522, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, min(vocab, 20000), size=(batch_size, length)).astype(np.int64)
    ids[:, 0], ids[:, -1] = 101, 102
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def pairs_per_second(run: Callable[[], object], pairs: int, repeats: int = 5, min_seconds: float = 0.0) -> float:
    """Median throughput over ``repeats`` timed calls after one warm-up call."""
    run()
    times = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return pairs / float(np.median(times))
