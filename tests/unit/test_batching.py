import numpy as np

from rankserve.stages.batching import score_batched, token_budget_batches


def test_batches_are_length_sorted_and_within_budget():
    lengths = [30, 5, 12, 7, 50, 6, 31]
    batches = token_budget_batches(lengths, max_tokens=64, max_pairs=3)
    assert sorted(i for b in batches for i in b) == list(range(7))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths)
    for b in batches:
        assert len(b) <= 3 and (len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 64)


def test_a_pair_longer_than_the_budget_gets_its_own_batch():
    assert [list(b) for b in token_budget_batches([100, 3], max_tokens=50, max_pairs=8)] == [[1], [0]]


def _encoded(lengths, width, seed):
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for j, n in enumerate(lengths):
        ids[j, :n] = rng.integers(1, 1000, n)
        mask[j, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def test_scores_come_back_to_their_request_and_position_with_padding_trimmed():
    calls = []

    def score(feeds):  # a pure function of each row's real tokens: sum of ids where mask is 1
        calls.append(feeds["input_ids"].shape)
        return (feeds["input_ids"] * feeds["attention_mask"]).sum(axis=1).astype(np.float32)

    requests = [_encoded([3, 9, 4], 12, 0), _encoded([20, 2], 25, 1), _encoded([7], 7, 2)]
    results = score_batched(score, requests, ("input_ids", "attention_mask"), max_tokens=40, max_pairs=4)
    for enc, got in zip(requests, results):
        np.testing.assert_array_equal(got, (enc["input_ids"] * enc["attention_mask"]).sum(axis=1))
    assert all(rows * width <= 40 or rows == 1 for rows, width in calls)
    assert sum(rows * width for rows, width in calls) < sum(e["input_ids"].size for e in requests)
