"""Okapi BM25: the lexical baseline that gives the ranker's numbers a meaning."""

from __future__ import annotations

import math
from collections import Counter
from typing import Iterable, Sequence

import numpy as np

from rankserve.data.catalog import tokens


class BM25:
    """BM25 with corpus statistics (IDF, mean length) taken from ``corpus``."""

    def __init__(self, corpus: Iterable[str], k1: float = 1.2, b: float = 0.75) -> None:
        docs = [tokens(t) for t in corpus]
        if not docs:
            raise ValueError("BM25 needs a non-empty corpus")
        self.k1, self.b = k1, b
        self.avgdl = sum(len(d) for d in docs) / len(docs)
        df = Counter(w for d in docs for w in set(d))
        n = len(docs)
        self.idf = {w: math.log(1 + (n - c + 0.5) / (c + 0.5)) for w, c in df.items()}
        self.default_idf = math.log(1 + (n + 0.5) / 0.5)

    def score(self, query: str, texts: Sequence[str]) -> np.ndarray:
        q = tokens(query)
        out = np.zeros(len(texts), dtype=np.float64)
        for i, text in enumerate(texts):
            doc = tokens(text)
            tf = Counter(doc)
            norm = self.k1 * (1 - self.b + self.b * len(doc) / self.avgdl)
            out[i] = sum(
                self.idf.get(w, self.default_idf) * tf[w] * (self.k1 + 1) / (tf[w] + norm) for w in q if tf[w]
            )
        return out
