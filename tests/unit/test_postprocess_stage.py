import numpy as np
import pytest

from rankserve.errors import InvalidInput
from rankserve.stages.postprocess import order, parse_top_k, postprocess


def test_order_sorts_descending_and_keeps_top_k():
    idx, scores = order(np.array([0.1, 2.0, -1.0, 0.5], dtype=np.float32), 3)
    assert idx.tolist() == [1, 3, 0] and idx.dtype == np.int32
    assert scores.tolist() == pytest.approx([2.0, 0.5, 0.1]) and scores.dtype == np.float32


def test_ties_keep_input_order_and_nan_sorts_last():
    idx, _ = order(np.array([1.0, np.nan, 1.0, 3.0, np.nan]), 5)
    assert idx.tolist() == [3, 0, 2, 1, 4]


def test_top_k_absent_means_all():
    assert parse_top_k(None, 7) == 7
    assert parse_top_k(np.array([3], dtype=np.int32), 7) == 3
    assert parse_top_k(np.array([7], dtype=np.int32), 7) == 7
    with pytest.raises(InvalidInput, match="only 7 candidates"):
        parse_top_k(np.array([8], dtype=np.int32), 7)


@pytest.mark.parametrize(
    "value, message",
    [(np.array([0], dtype=np.int32), ">= 1"), (np.array([-2], dtype=np.int32), ">= 1"),
     (np.array([1, 2], dtype=np.int32), "one value"), (np.array([1.5], dtype=np.float32), "integer")],
)
def test_bad_top_k(value, message):
    with pytest.raises(InvalidInput, match=message):
        parse_top_k(value, 5)


def test_postprocess_stage_outputs():
    out = postprocess(np.array([0.2, 0.9, 0.5], dtype=np.float32), np.array([2], dtype=np.int32))
    assert out["indices"].tolist() == [1, 2] and out["scores"].tolist() == pytest.approx([0.9, 0.5])
    assert postprocess(np.array([1.0], dtype=np.float32), None)["indices"].tolist() == [0]
    with pytest.raises(InvalidInput, match="'logits' is required"):
        postprocess(None, None)
