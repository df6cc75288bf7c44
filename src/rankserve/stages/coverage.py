"""How much of a request the ranker's vocabulary covers: tokens the tokenizer could only map to its
unknown token (``[UNK]`` in a WordPiece vocabulary), of the query and of the candidate texts.

An uncased English WordPiece vocabulary (all-MiniLM-L6-v2's) turns most CJK characters, many
other scripts and emoji into ``[UNK]``: the ranker then scores text it cannot read, silently. The
counts go out with every answer (the ``token_counts`` output) and into Triton's metrics."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

MOSTLY_UNKNOWN = 0.5
"""A query with a larger share of unknown tokens than this is flagged: the ranker cannot read most of it."""

SHARE_BUCKETS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9)
"""Buckets of the ``rankserve_query_unknown_share`` histogram (``le``; +Inf, which is 1.0, implied)."""


@dataclass(frozen=True)
class TokenCounts:
    """Unknown and all tokens of the query and of the candidate texts, as the ranker reads them
    (after truncation; special tokens and padding not counted). The query is counted once."""

    query_unknown: int
    query_tokens: int
    texts_unknown: int
    texts_tokens: int

    @property
    def query_share(self) -> float:
        return self.query_unknown / self.query_tokens if self.query_tokens else 0.0

    @property
    def texts_share(self) -> float:
        return self.texts_unknown / self.texts_tokens if self.texts_tokens else 0.0

    @property
    def query_mostly_unknown(self) -> bool:
        return self.query_share > MOSTLY_UNKNOWN

    def as_array(self) -> np.ndarray:
        """The ``token_counts`` output: INT64 ``[query_unknown, query_tokens, texts_unknown, texts_tokens]``."""
        return np.array([self.query_unknown, self.query_tokens, self.texts_unknown, self.texts_tokens], dtype=np.int64)


def unknown_token_id(tokenizer: Any) -> int | None:
    """The id of the tokenizer's unknown token (from its model's ``unk_token``), or None when it has
    none (a byte-level BPE reads every string)."""
    model = json.loads(tokenizer.to_str()).get("model", {})
    token = model.get("unk_token")
    return None if token is None else tokenizer.token_to_id(token)


def count_tokens(ids: np.ndarray, attention_mask: np.ndarray, special_mask: np.ndarray, text_starts: Sequence[int],
                 unknown_id: int | None) -> TokenCounts:
    """Counts of one request's encoded pairs (``[pairs, width]`` arrays; ``text_starts[i]``: the
    position of pair i's first candidate-text token, its width when the text has none). The query
    is counted in the first pair."""
    ids = np.asarray(ids)
    width = ids.shape[1]
    real = (np.asarray(attention_mask) == 1) & (np.asarray(special_mask) == 0)
    is_text = np.arange(width)[None, :] >= np.asarray(text_starts, dtype=np.int64)[:, None]
    text, query = real & is_text, real[0] & ~is_text[0]
    unknown = np.zeros_like(real) if unknown_id is None else ids == unknown_id
    return TokenCounts(query_unknown=int((unknown[0] & query).sum()), query_tokens=int(query.sum()),
                       texts_unknown=int((unknown & text).sum()), texts_tokens=int(text.sum()))


def count_encodings(encodings: Sequence[Any], ids: np.ndarray, attention_mask: np.ndarray, unknown_id: int | None) -> TokenCounts:
    """:func:`count_tokens` of ``tokenizers`` pair encodings (and their stacked ids and attention mask)."""
    special = np.array([e.special_tokens_mask for e in encodings], dtype=np.int64)
    starts = []
    for e in encodings:
        sequence = e.sequence_ids
        starts.append(sequence.index(1) if 1 in sequence else len(sequence))
    return count_tokens(ids, attention_mask, special, starts, unknown_id)


def token_metrics(pb_utils: Any, model: str, version: str) -> Callable[[TokenCounts], None]:
    """Python-backend custom metrics of the counts, on Triton's metrics endpoint, as an ``observe(counts)``
    hook: counters ``rankserve_tokens_total`` and ``rankserve_unknown_tokens_total`` by ``part``
    (query, texts), and the histogram ``rankserve_query_unknown_share`` (one observation per request)."""
    labels = {"model": model, "version": str(version)}
    # the families must outlive their metrics (Triton refuses to update a metric of a deleted family)
    families = {
        "tokens": pb_utils.MetricFamily(name="rankserve_tokens_total", kind=pb_utils.MetricFamily.COUNTER,
                                        description="Tokens the ranker read, by part (query, texts), special tokens and padding not counted"),
        "unknown": pb_utils.MetricFamily(name="rankserve_unknown_tokens_total", kind=pb_utils.MetricFamily.COUNTER,
                                         description="Of those, tokens the tokenizer could only map to its unknown token ([UNK]), by part"),
        "share": pb_utils.MetricFamily(name="rankserve_query_unknown_share", kind=pb_utils.MetricFamily.HISTOGRAM,
                                       description="Per request: share of the query's tokens that are unknown to the ranker's vocabulary"),
    }
    metrics = {(kind, part): families[kind].Metric(labels={**labels, "part": part})
               for kind in ("tokens", "unknown") for part in ("query", "texts")}
    share = families["share"].Metric(labels=labels, buckets=list(SHARE_BUCKETS))

    def observe(counts: TokenCounts, _families=families) -> None:
        metrics["tokens", "query"].increment(counts.query_tokens)
        metrics["tokens", "texts"].increment(counts.texts_tokens)
        metrics["unknown", "query"].increment(counts.query_unknown)
        metrics["unknown", "texts"].increment(counts.texts_unknown)
        if counts.query_tokens:
            share.observe(counts.query_share)

    return observe
