"""The accuracy gate: ranking quality on held-out queries and agreement with the FP32 ranker."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Callable, Sequence

import numpy as np

from rankserve.data.catalog import Dataset
from rankserve.errors import BuildError
from rankserve.train.metrics import ndcg_at_k, reciprocal_rank

ScoreFn = Callable[[str, Sequence[str]], np.ndarray]


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b between two score lists (ties counted as neither concordant nor discordant)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    dx = np.sign(x[:, None] - x[None, :])
    dy = np.sign(y[:, None] - y[None, :])
    iu = np.triu_indices(len(x), 1)
    dx, dy = dx[iu], dy[iu]
    denom = np.sqrt(np.count_nonzero(dx) * np.count_nonzero(dy))
    return float(np.sum(dx * dy) / denom) if denom else 1.0


def top_k_overlap(a: Sequence[float], b: Sequence[float], k: int) -> float:
    ta = set(np.argsort(-np.asarray(a), kind="stable")[:k])
    tb = set(np.argsort(-np.asarray(b), kind="stable")[:k])
    return len(ta & tb) / max(1, min(k, len(a)))


def heldout_scores(dataset: Dataset, score_fn: ScoreFn) -> dict[int, np.ndarray]:
    """Scores of every held-out query's candidates, by query id."""
    by_query = dataset.by_query()
    return {
        q.query_id: np.asarray(score_fn(q.text, [dataset.products[j.product_id].text for j in by_query[q.query_id]]))
        for q in dataset.split("heldout")
    }


@dataclass(frozen=True)
class GateResult:
    variant: str
    ndcg: float
    mrr: float
    reference_ndcg: float
    relative_drop: float
    max_drop: float
    top_k_overlap: float
    kendall_tau: float
    passed: bool
    min_top_k_overlap: float = 0.0
    strict: bool = False
    """Whether it also passes the strict gate that the default ``ranker`` must pass (NDCG@k within
    ``GateSettings.max_ndcg_drop`` and top-k overlap with FP32 at least ``GateSettings.min_top_k_overlap``,
    each query scored alone and, where measured, in served batches)."""
    served_ndcg: float | None = None
    """NDCG@k with the held-out queries scored in served dynamic batches (None: not measured)."""
    served_top_k_overlap: float | None = None
    batch_max_abs_diff: float | None = None
    """Largest change of a pair's score between its query scored alone and in a served batch."""

    def to_dict(self) -> dict:
        return asdict(self)

    def with_served(self, served: "GateResult", max_abs_diff: float, strict: tuple[float, float],
                    require_invariance: bool = False, atol: float = 1e-3) -> "GateResult":
        """This result with the served-batch figures: strict only if the served scores pass the
        strict limits too (and, with ``require_invariance``, scores move by at most ``atol``)."""
        served_strict = served.relative_drop <= strict[0] and served.top_k_overlap >= strict[1]
        invariant = max_abs_diff <= atol
        return replace(self, served_ndcg=served.ndcg, served_top_k_overlap=served.top_k_overlap,
                       batch_max_abs_diff=max_abs_diff,
                       strict=self.strict and served_strict and (invariant or not require_invariance))

    def describe(self) -> str:
        return (f"{self.variant}: NDCG@10 {self.ndcg:.4f} vs FP32 {self.reference_ndcg:.4f} "
                f"({100 * self.relative_drop:+.2f}% drop, limit {100 * self.max_drop:.1f}%), MRR {self.mrr:.3f}, "
                f"top-10 overlap {self.top_k_overlap:.3f}"
                + (f" (limit {self.min_top_k_overlap:.2f})" if self.min_top_k_overlap else "")
                + f", Kendall tau {self.kendall_tau:.3f}"
                + (f"; in served batches NDCG@10 {self.served_ndcg:.4f}, top-10 overlap {self.served_top_k_overlap:.3f}, "
                   f"scores move up to {self.batch_max_abs_diff:.2g} with batch neighbours"
                   if self.served_ndcg is not None else "")
                + "; "
                + ("passes the strict gate (may be the default)" if self.strict else "not strict: never the default unless named"))


def gate(
    variant: str, dataset: Dataset, scores: dict[int, np.ndarray], reference: dict[int, np.ndarray], max_drop: float, k: int = 10,
    min_overlap: float = 0.0, strict: tuple[float, float] = (0.0, 1.0),
) -> GateResult:
    """Score ``variant`` against the labels and against the FP32 ``reference`` scores; it passes
    when its NDCG@k drops at most ``max_drop`` and its top-k overlaps FP32's by ``min_overlap``,
    and is ``strict`` when it does so within ``strict`` = (max drop, min overlap)."""
    by_query = dataset.by_query()
    labels = {qid: [j.label for j in by_query[qid]] for qid in scores}
    ndcg = float(np.mean([ndcg_at_k(labels[q], scores[q], k) for q in scores]))
    ref = float(np.mean([ndcg_at_k(labels[q], reference[q], k) for q in scores]))
    drop = (ref - ndcg) / ref if ref > 0 else 0.0
    overlap = float(np.mean([top_k_overlap(reference[q], scores[q], k) for q in scores]))
    return GateResult(
        variant=variant,
        ndcg=ndcg,
        mrr=float(np.mean([reciprocal_rank(labels[q], scores[q]) for q in scores])),
        reference_ndcg=ref,
        relative_drop=drop,
        max_drop=max_drop,
        top_k_overlap=overlap,
        kendall_tau=float(np.mean([kendall_tau(reference[q], scores[q]) for q in scores])),
        passed=drop <= max_drop and overlap >= min_overlap,
        min_top_k_overlap=min_overlap,
        strict=drop <= strict[0] and overlap >= strict[1],
    )


def passed_gate(result: dict) -> str:
    """Which gate a variant passed, from its manifest entry: ``strict`` (it may be the default
    ranker) or only its own, looser one."""
    if "strict" not in result:  # a manifest from before the strict gate: it was not judged
        return "not recorded"
    return "strict" if result["strict"] else f"own only ({100 * result['max_drop']:g}% NDCG)"


def require(result: GateResult) -> GateResult:
    if not result.passed:
        raise BuildError(f"accuracy gate failed for variant {result.describe()}")
    return result
