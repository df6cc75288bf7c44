import numpy as np
import pytest

from rankserve.errors import BuildError
from rankserve.optimize.gate import gate, kendall_tau, require, top_k_overlap


def test_kendall_tau_and_overlap():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert top_k_overlap([5, 4, 3, 2, 1], [5, 4, 0, 0, 9], k=2) == pytest.approx(0.5)


def _scores(dataset, fn):
    by_query = dataset.by_query()
    return {q.query_id: np.array([fn(j) for j in by_query[q.query_id]], dtype=float) for q in dataset.split("heldout")}


def test_gate_passes_an_equal_variant_and_fails_a_worse_one_naming_the_numbers(dataset):
    rng = np.random.default_rng(0)
    oracle = _scores(dataset, lambda j: j.label + 0.01 * rng.random())
    same = gate("fp32_copy", dataset, oracle, oracle, max_drop=0.01)
    assert same.passed and same.relative_drop == pytest.approx(0) and same.kendall_tau == pytest.approx(1)
    noisy = {q: s + rng.normal(0, 1.5, s.shape) for q, s in oracle.items()}
    worse = gate("int8", dataset, noisy, oracle, max_drop=0.01)
    assert not worse.passed and worse.relative_drop > 0.01 and worse.kendall_tau < 0.9
    with pytest.raises(BuildError, match=r"accuracy gate failed for variant int8: NDCG@10 0\.\d+ vs FP32 1\.0000 \(\+\d+\.\d+% drop, limit 1\.0%\)"):
        require(worse)
    assert require(same) is same


def test_strict_needs_both_the_ndcg_limit_and_the_top_k_overlap(dataset):
    rng = np.random.default_rng(1)
    oracle = _scores(dataset, lambda j: j.label + 0.01 * rng.random())
    same = gate("fp32_copy", dataset, oracle, oracle, max_drop=0.01, strict=(0.01, 0.95))
    assert same.passed and same.strict and "passes the strict gate" in same.describe()
    # ties broken differently: the same NDCG, but other items in the top 10 -> passes its gate, not strict
    reshuffled = {q: np.round(s) + 0.01 * rng.random(s.shape) for q, s in oracle.items()}
    r = gate("pruned", dataset, reshuffled, oracle, max_drop=0.02, strict=(0.01, 0.95))
    assert r.passed and r.relative_drop <= 0.01 and r.top_k_overlap < 0.95 and not r.strict
    assert "never the default unless named" in r.describe()
    assert not gate("x", dataset, reshuffled, oracle, max_drop=0.02).strict  # without limits: strict only if identical


def test_the_strict_gate_must_hold_in_served_batches_too():
    from rankserve.optimize.gate import GateResult

    base = dict(variant="v", ndcg=0.99, mrr=1.0, reference_ndcg=0.99, relative_drop=0.0, max_drop=0.01,
                top_k_overlap=1.0, kendall_tau=1.0, passed=True, strict=True)
    alone = GateResult(**base)
    good = GateResult(**base)
    bad = GateResult(**{**base, "relative_drop": 0.02, "top_k_overlap": 0.9})
    assert alone.with_served(good, 0.0, (0.01, 0.95)).strict
    assert not alone.with_served(bad, 0.5, (0.01, 0.95)).strict
    moved = alone.with_served(good, 0.5, (0.01, 0.95))
    assert moved.strict and moved.batch_max_abs_diff == 0.5 and "move up to 0.5" in moved.describe()
    assert not alone.with_served(good, 0.5, (0.01, 0.95), require_invariance=True).strict
    assert alone.with_served(good, 1e-5, (0.01, 0.95), require_invariance=True).strict
