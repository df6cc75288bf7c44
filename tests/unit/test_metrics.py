import math

import pytest

from rankserve.train.bm25 import BM25
from rankserve.train.metrics import evaluate, ndcg_at_k, reciprocal_rank


def test_ndcg_perfect_and_reversed():
    labels = [2, 1, 0, 0]
    assert ndcg_at_k(labels, [4, 3, 2, 1]) == pytest.approx(1.0)
    worst = (0 + 0 + 1 / math.log2(4) + 3 / math.log2(5))
    ideal = 3 / math.log2(2) + 1 / math.log2(3)
    assert ndcg_at_k(labels, [1, 2, 3, 4]) == pytest.approx(worst / ideal)


def test_ndcg_cutoff_and_no_relevant():
    assert ndcg_at_k([0, 0, 2], [3, 2, 1], k=2) == 0.0
    assert ndcg_at_k([0, 0], [1, 2]) == 0.0


def test_ties_are_broken_by_input_order_not_in_our_favour():
    assert ndcg_at_k([0, 2], [1.0, 1.0]) < 1.0


def test_reciprocal_rank_of_first_exact():
    assert reciprocal_rank([1, 0, 2], [3, 2, 1]) == pytest.approx(1 / 3)
    assert reciprocal_rank([1, 0], [2, 1]) == 0.0


def test_bm25_prefers_matching_documents():
    bm25 = BM25(["turquoise velvet pillow", "oak dining table", "turquoise rug", "gray pillow"])
    scores = bm25.score("turquoise pillow", ["turquoise velvet pillow", "oak dining table", "gray pillow"])
    assert scores[0] > scores[2] > scores[1] == 0


def test_evaluate_oracle_and_bm25_on_the_demo_data(dataset):
    labels = {(j.query_id, dataset.products[j.product_id].text): j.label for j in dataset.judgments}
    queries = {q.text: q.query_id for q in dataset.queries}
    oracle = evaluate(dataset, lambda q, texts: [labels[(queries[q], t)] for t in texts])
    assert oracle["ndcg@10"] == pytest.approx(1.0) and oracle["mrr"] == pytest.approx(1.0)
    bm25 = BM25(p.text for p in dataset.products.values())
    lexical = evaluate(dataset, bm25.score)
    assert 0.3 < lexical["ndcg@10"] < 0.95  # a real baseline: useful, far from perfect
    assert lexical["queries"] == len(dataset.split("heldout"))
