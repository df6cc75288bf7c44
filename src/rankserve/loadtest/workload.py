"""The realistic workload: real WANDS queries, demo-catalog product texts, varied list sizes."""

from __future__ import annotations

import numpy as np

from rankserve.data.catalog import Dataset, generate
from rankserve.data.wands import load_queries
from rankserve.settings import DataSettings, LoadTestSettings


def draw_sizes(settings: LoadTestSettings, rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` list sizes: log-normal with mean ``candidates_mean`` and spread ``candidates_sigma``,
    clipped to [1, candidates_max]."""
    sigma = settings.candidates_sigma
    mu = np.log(settings.candidates_mean) - sigma**2 / 2  # E[lognormal] = mean
    return np.clip(np.round(rng.lognormal(mu, sigma, n)).astype(int), 1, settings.candidates_max)


class Workload:
    """Draws (query, candidate texts) requests; list sizes are log-normal with the configured mean."""

    def __init__(self, dataset: Dataset, settings: LoadTestSettings, seed: int | None = None) -> None:
        self.queries = [q.text for q in dataset.queries]
        self.texts = [p.text for p in dataset.products.values()]
        self.settings = settings
        self.rng = np.random.default_rng(settings.seed if seed is None else seed)

    @classmethod
    def default(cls, settings: LoadTestSettings, seed: int | None = None) -> "Workload":
        return cls(generate(load_queries(), DataSettings()), settings, seed)

    def size(self) -> int:
        return int(self.sizes(1)[0])

    def sizes(self, n: int) -> np.ndarray:
        return draw_sizes(self.settings, self.rng, n)

    def next_request(self) -> tuple[str, list[str]]:
        query = self.queries[int(self.rng.integers(len(self.queries)))]
        picks = self.rng.choice(len(self.texts), size=self.size(), replace=False)
        return query, [self.texts[int(i)] for i in picks]


def check_response(texts: list[str], results: list, top_k: int | None = None) -> None:
    """Raise ``AssertionError`` unless the ranking is complete, unique and sorted by score."""
    expected = len(texts) if top_k is None else min(top_k, len(texts))
    if len(results) != expected:
        raise AssertionError(f"expected {expected} results, got {len(results)}")
    if len({r.id for r in results}) != len(results):
        raise AssertionError("duplicate ids in the ranking")
    scores = [r.score for r in results]
    if any(a < b for a, b in zip(scores, scores[1:])):
        raise AssertionError("results are not sorted by score")
