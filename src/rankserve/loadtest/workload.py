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


def zipf_probabilities(n: int, s: float) -> np.ndarray:
    """P(the k-th most popular of ``n`` items) proportional to 1 / k**s, k = 1..n."""
    weights = 1.0 / np.arange(1, n + 1, dtype=float) ** s
    return weights / weights.sum()


class Workload:
    """Draws (query, candidate texts) requests; list sizes are log-normal with the configured mean.

    ``random`` scenario: a random query and a fresh random list each time. ``zipf``: the query's
    popularity rank follows Zipf's law (``zipf_s``) and each query always comes with its own fixed
    list (:meth:`fixed_request`), the same in every process that uses the same settings: ``seed``
    only changes which requests are drawn, not what each query's request is."""

    def __init__(self, dataset: Dataset, settings: LoadTestSettings, seed: int | None = None) -> None:
        self.queries = [q.text for q in dataset.queries]
        self.texts = [p.text for p in dataset.products.values()]
        self.settings = settings
        self.rng = np.random.default_rng(settings.seed if seed is None else seed)
        # the popularity order: rank k (0 = most popular) is query popular[k]; shuffled by the settings' seed
        self.popular = np.random.default_rng([settings.seed, len(self.queries)]).permutation(len(self.queries))
        self.popularity = zipf_probabilities(len(self.queries), settings.zipf_s)
        self._fixed: dict[tuple[int, int], tuple[str, list[str]]] = {}

    @classmethod
    def default(cls, settings: LoadTestSettings, seed: int | None = None) -> "Workload":
        return cls(generate(load_queries(), DataSettings()), settings, seed)

    def size(self) -> int:
        return int(self.sizes(1)[0])

    def sizes(self, n: int) -> np.ndarray:
        return draw_sizes(self.settings, self.rng, n)

    def next_request(self) -> tuple[str, list[str]]:
        if self.settings.scenario == "zipf":
            return self.fixed_request(self.zipf_query())
        query = self.queries[int(self.rng.integers(len(self.queries)))]
        picks = self.rng.choice(len(self.texts), size=self.size(), replace=False)
        return query, [self.texts[int(i)] for i in picks]

    def zipf_query(self) -> int:
        """The index (into ``queries``) of a query drawn by Zipf popularity."""
        return int(self.popular[self.rng.choice(len(self.popularity), p=self.popularity)])

    def fixed_request(self, query: int, salt: int = 0) -> tuple[str, list[str]]:
        """Query ``query`` with its fixed candidate list: size and texts drawn from a generator
        seeded by (settings seed, query, ``salt``), so every call, process and run gets the same
        request. Another ``salt`` gives the query another fixed list (requests outside the workload)."""
        key = (query, salt)
        if key not in self._fixed:
            rng = np.random.default_rng([self.settings.seed, query, salt])
            size = int(draw_sizes(self.settings, rng, 1)[0])
            picks = rng.choice(len(self.texts), size=min(size, len(self.texts)), replace=False)
            self._fixed[key] = (self.queries[query], [self.texts[int(i)] for i in picks])
        return self._fixed[key]


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
