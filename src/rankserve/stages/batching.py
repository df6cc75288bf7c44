"""Length-aware batching for the rank stage: the pairs of one or many requests are cut into model
calls under a token budget (the ``max_batch_tokens`` idea of text-embeddings-inference), so little
compute goes to padding, and each request is answered as soon as its own pairs are scored."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from rankserve.errors import InvalidInput, RankserveError

Encoded = Mapping[str, np.ndarray]


def stream_batches(request_lengths: Sequence[Sequence[int]], max_tokens: int, max_pairs: int) -> list[list[tuple[int, int]]]:
    """Model calls, as lists of (request, pair), for the pairs of several requests.

    Requests go smallest first and each request's pairs shortest first; the stream is cut greedily
    so each call's padded size (pairs x longest pair) stays within ``max_tokens`` and ``max_pairs``
    (a single longer pair still gets a call of its own). A request's pairs sit in consecutive calls,
    so it is complete after its last one; only that call may also carry the next request's first
    (shortest) pairs, which keeps the calls full."""
    order = sorted(range(len(request_lengths)), key=lambda r: len(request_lengths[r]))
    batches: list[list[tuple[int, int]]] = []
    current: list[tuple[int, int]] = []
    longest = 0
    for r in order:
        lengths = np.asarray(request_lengths[r])
        for j in np.argsort(lengths, kind="stable"):
            n = int(lengths[j])
            if current and (max(longest, n) * (len(current) + 1) > max_tokens or len(current) >= max_pairs):
                batches.append(current)
                current, longest = [], 0
            current.append((r, int(j)))
            longest = max(longest, n)
    if current:
        batches.append(current)
    return batches


def score_streamed(score: Callable[[dict], np.ndarray], requests: Sequence[Encoded], names: Sequence[str],
                   max_tokens: int, max_pairs: int, on_done: Callable[[int, "np.ndarray | Exception"], None]) -> None:
    """Score the pairs of several requests in :func:`stream_batches` calls and hand each request's
    scores to ``on_done(request index, scores)`` as soon as its last pair is scored.

    Each pair is trimmed to its own length (from ``attention_mask``) and re-padded only to the
    longest pair of its call, so scores do not depend on what else is in the call.

    A call that fails is retried one request at a time, so a request the model cannot score fails
    alone: it gets ``on_done(index, exception)`` (an :class:`InvalidInput` when other requests of
    the same call scored), its later pairs are skipped, and the requests batched with it still get
    their scores."""
    lengths = [enc["attention_mask"].sum(axis=1).astype(int) for enc in requests]
    results = [np.empty(len(n), dtype=np.float32) for n in lengths]
    remaining = [len(n) for n in lengths]
    failed: set[int] = set()

    def call(batch: list[tuple[int, int]]) -> np.ndarray:
        width = max(int(lengths[r][j]) for r, j in batch)
        feeds = {name: np.zeros((len(batch), width), dtype=np.int64) for name in names}
        for k, (r, j) in enumerate(batch):
            n = int(lengths[r][j])
            for name in names:
                feeds[name][k, :n] = requests[r][name][j, :n]
        return score(feeds)

    def scored(batch: list[tuple[int, int]], scores: np.ndarray) -> None:
        for k, (r, j) in enumerate(batch):
            results[r][j] = scores[k]
            remaining[r] -= 1
            if remaining[r] == 0:
                on_done(r, results[r])

    for r, n in enumerate(remaining):
        if n == 0:
            on_done(r, results[r])
    for batch in stream_batches(lengths, max_tokens, max_pairs):
        batch = [(r, j) for r, j in batch if r not in failed]
        if not batch:
            continue
        try:
            scores = call(batch)
        except Exception as exc:  # noqa: BLE001 - isolated below, one request at a time
            _isolate(batch, exc, call, scored, failed, on_done)
            continue
        scored(batch, scores)


def _isolate(batch, error: Exception, call, scored, failed: set, on_done) -> None:
    """After ``call(batch)`` raised ``error``: score each request's part of it alone; those that
    fail again are failed (for a lone request, with ``error`` itself)."""
    members = list(dict.fromkeys(r for r, _ in batch))
    outcomes: dict = {}
    for r in members:
        part = [(q, j) for q, j in batch if q == r]
        if len(members) == 1:
            outcomes[r] = error
            break
        try:
            outcomes[r] = (part, call(part))
        except Exception as exc:  # noqa: BLE001 - this request's own failure
            outcomes[r] = exc
    others_scored = any(not isinstance(v, Exception) for v in outcomes.values())
    for r, outcome in outcomes.items():
        if not isinstance(outcome, Exception):
            scored(*outcome)
            continue
        failed.add(r)
        if others_scored and not isinstance(outcome, RankserveError):
            outcome = InvalidInput(f"the model could not score this request's tensors ({type(outcome).__name__}): "
                                   "send what the tokenize stage produces")
        on_done(r, outcome)


def score_batched(score: Callable[[dict], np.ndarray], requests: Sequence[Encoded], names: Sequence[str],
                  max_tokens: int, max_pairs: int) -> list[np.ndarray]:
    """:func:`score_streamed`, collected: one score array (or exception) per request."""
    results: list = [None] * len(requests)
    score_streamed(score, requests, names, max_tokens, max_pairs, results.__setitem__)
    return results
