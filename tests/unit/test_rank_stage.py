import numpy as np
import pytest

from rankserve.errors import InvalidInput
from rankserve.stages.rank import check_encoded

NAMES = ("input_ids", "attention_mask")


def test_check_encoded_selects_what_the_model_needs():
    ids = np.ones((2, 5), dtype=np.int64)
    feeds = check_encoded({"input_ids": ids, "attention_mask": ids, "token_type_ids": ids}, NAMES)
    assert list(feeds) == list(NAMES)


@pytest.mark.parametrize(
    "encoded, message",
    [
        ({"input_ids": np.ones((2, 5), np.int64)}, "'attention_mask' is required"),
        ({"input_ids": np.ones((2, 5), np.int32), "attention_mask": np.ones((2, 5), np.int64)}, "INT64"),
        ({"input_ids": np.ones(5, np.int64), "attention_mask": np.ones(5, np.int64)}, "2-D"),
        ({"input_ids": np.ones((2, 5), np.int64), "attention_mask": np.ones((2, 4), np.int64)}, "disagree"),
        ({"input_ids": np.ones((2, 5), np.int64), "attention_mask": np.full((2, 5), 2, np.int64)}, "only 0 and 1"),
        ({"input_ids": np.ones((2, 5), np.int64), "attention_mask": np.eye(2, 5, dtype=np.int64) * [[1], [0]]}, "at least one token"),
        ({"input_ids": -np.ones((2, 5), np.int64), "attention_mask": np.ones((2, 5), np.int64)}, "negative"),
    ],
)
def test_check_encoded_rejects_bad_tensors(encoded, message):
    with pytest.raises(InvalidInput, match=message):
        check_encoded(encoded, NAMES)
