"""Pure functions of the ``postprocess`` stage: order candidates by score and keep the top k."""

from __future__ import annotations

import numpy as np

from rankserve.api import INDICES, LOGITS, SCORES
from rankserve.errors import InvalidInput


def parse_top_k(top_k: np.ndarray | None, n: int) -> int:
    """The number of results to return: ``top_k``, or all ``n`` when absent.

    A ``top_k`` outside 1..n is refused: asking for more results than candidates is a client bug
    (it usually means the list was cut upstream), and answering with fewer hides it."""
    if top_k is None:
        return n
    values = np.asarray(top_k).reshape(-1)
    if values.size != 1:
        raise InvalidInput(f"'top_k' must hold one value, got {values.size}")
    if not np.issubdtype(values.dtype, np.integer):
        raise InvalidInput(f"'top_k' must be an integer, got {values.dtype}")
    k = int(values[0])
    if k < 1:
        raise InvalidInput(f"'top_k' must be >= 1, got {k}")
    if k > n:
        raise InvalidInput(f"'top_k' is {k} but the request has only {n} candidates: send top_k <= {n}, or omit it for all")
    return k


def order(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (int32) and scores (float32) of the ``k`` best candidates, best first.

    Ties keep input order; NaN scores sort last.
    """
    s = np.asarray(scores, dtype=np.float32).reshape(-1)
    key = np.where(np.isnan(s), -np.inf, s)
    idx = np.lexsort((np.arange(s.size), np.isnan(s), -key))[:k]
    return idx.astype(np.int32), s[idx]


def postprocess(logits: np.ndarray | None, top_k: np.ndarray | None, max_candidates: int | None = None) -> dict[str, np.ndarray]:
    """The stage as a whole: ``indices`` and ``scores`` of the best ``top_k`` candidates.

    ``logits`` is one score per candidate (``[n, 1]`` as the rank stage writes it, or ``[n]``),
    at least one and, with ``max_candidates``, no more than a request may carry: the stage is also
    reachable by name, and the limits of the public API hold there too."""
    if logits is None:
        raise InvalidInput(f"input '{LOGITS.name}' is required")
    logits = np.asarray(logits)
    if logits.ndim not in (1, 2) or (logits.ndim == 2 and logits.shape[1] != 1):
        raise InvalidInput(f"'{LOGITS.name}' must be one score per candidate ([n, 1]), got shape {list(logits.shape)}")
    scores = logits.reshape(-1)
    if scores.size == 0:
        raise InvalidInput(f"'{LOGITS.name}' is empty: at least one candidate is needed")
    if max_candidates is not None and scores.size > max_candidates:
        raise InvalidInput(f"'{LOGITS.name}' holds {scores.size} scores, more than the limit of {max_candidates} candidates")
    indices, ordered = order(scores, parse_top_k(top_k, scores.size))
    return {INDICES.name: indices, SCORES.name: ordered}
