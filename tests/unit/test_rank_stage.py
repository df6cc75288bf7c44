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


def test_threads_follow_a_containers_cpu_limit(tmp_path):
    import os

    from rankserve.stages.rank import cpu_quota, default_threads

    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cpu_quota(tmp_path) == 2  # 1.5 CPUs: two threads, rounded up
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(v1) == 1 and cpu_quota(tmp_path / "none") is None
    assert default_threads(3, v1) == 3  # configured wins
    expected = 1 if len(os.sched_getaffinity(0)) > 1 and (os.cpu_count() or 1) > 1 else 0
    assert default_threads(0, v1) == expected  # limited to 1 CPU: 1 thread (0 = runtime default if that is all there is)
    assert default_threads(0, tmp_path / "none") in (0, len(os.sched_getaffinity(0)))
