"""Length-aware batching for the rank stage: pairs from one or many requests are sorted by token
length and cut into batches under a token budget, so little compute goes to padding
(the ``max_batch_tokens`` idea of text-embeddings-inference)."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

Encoded = Mapping[str, np.ndarray]


def token_budget_batches(lengths: Sequence[int], max_tokens: int, max_pairs: int) -> list[np.ndarray]:
    """Indices of pairs grouped into batches, shortest first; each batch's padded size
    (pairs x longest pair) stays within ``max_tokens`` and ``max_pairs`` (a single longer pair still
    gets a batch of its own)."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    batches, current, longest = [], [], 0
    for i in order:
        n = int(lengths[i])
        if current and (max(longest, n) * (len(current) + 1) > max_tokens or len(current) >= max_pairs):
            batches.append(np.array(current))
            current, longest = [], 0
        current.append(int(i))
        longest = max(longest, n)
    if current:
        batches.append(np.array(current))
    return batches


def score_batched(score: Callable[[dict], np.ndarray], requests: Sequence[Encoded], names: Sequence[str],
                  max_tokens: int, max_pairs: int) -> list[np.ndarray]:
    """Score the pairs of several requests together under a token budget; one score array per request.

    Each pair is trimmed to its own length (from ``attention_mask``) and re-padded only to the
    longest pair of its batch, so scores do not depend on what else is in the batch."""
    rows: list[dict[str, np.ndarray]] = []
    owner: list[tuple[int, int]] = []
    for r, enc in enumerate(requests):
        lengths = enc["attention_mask"].sum(axis=1)
        for j, n in enumerate(lengths):
            rows.append({name: enc[name][j, : int(n)] for name in names})
            owner.append((r, j))
    lengths = [len(row["input_ids"]) for row in rows]
    results = [np.empty(len(enc["input_ids"]), dtype=np.float32) for enc in requests]
    for batch in token_budget_batches(lengths, max_tokens, max_pairs):
        width = max(lengths[i] for i in batch)
        feeds = {name: np.zeros((len(batch), width), dtype=np.int64) for name in names}
        for k, i in enumerate(batch):
            for name in names:
                feeds[name][k, : lengths[i]] = rows[i][name]
        scores = score(feeds)
        for k, i in enumerate(batch):
            r, j = owner[i]
            results[r][j] = scores[k]
    return results
