import numpy as np

from rankserve.errors import InvalidInput
from rankserve.stages.batching import score_batched, score_streamed, stream_batches


def _padded(batch, lengths):
    return len(batch) * max(lengths[r][j] for r, j in batch)


def test_calls_cover_every_pair_once_within_the_budget():
    lengths = [[30, 5, 12], [7, 50, 6, 31], [9]]
    batches = stream_batches(lengths, max_tokens=64, max_pairs=3)
    pairs = sorted(p for b in batches for p in b)
    assert pairs == [(r, j) for r, ls in enumerate(lengths) for j in range(len(ls))]
    for b in batches:
        assert len(b) <= 3 and (len(b) == 1 or _padded(b, lengths) <= 64)


def test_smallest_request_first_each_shortest_first_and_in_consecutive_calls():
    lengths = [[8, 4, 6, 2, 9], [5], [3, 7]]
    flat = [p for b in stream_batches(lengths, max_tokens=1000, max_pairs=2) for p in b]
    assert [r for r, _ in flat] == [1, 2, 2, 0, 0, 0, 0, 0]
    assert [lengths[0][j] for r, j in flat if r == 0] == [2, 4, 6, 8, 9]
    calls = stream_batches(lengths, max_tokens=1000, max_pairs=2)
    for r in range(3):
        holding = [k for k, b in enumerate(calls) if any(q == r for q, _ in b)]
        assert holding == list(range(holding[0], holding[-1] + 1))


def test_a_pair_longer_than_the_budget_gets_its_own_call():
    assert stream_batches([[100, 3]], max_tokens=50, max_pairs=8) == [[(0, 1)], [(0, 0)]]


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


def test_each_request_is_done_as_soon_as_its_own_pairs_are_scored():
    events = []

    def score(feeds):
        events.append(("call", len(feeds["input_ids"])))
        return np.zeros(len(feeds["input_ids"]), dtype=np.float32)

    requests = [_encoded([5] * 9, 5, 0), _encoded([4, 6], 6, 1), _encoded([3], 3, 2)]
    score_streamed(score, requests, ("input_ids", "attention_mask"), max_tokens=1000, max_pairs=3,
                   on_done=lambda r, scores: events.append(("done", r, len(scores))))
    # request 2 (one pair) and request 1 (two pairs) are answered before the big one's later calls
    assert events == [("call", 3), ("done", 2, 1), ("done", 1, 2), ("call", 3), ("call", 3), ("call", 3), ("done", 0, 9)]


def test_a_request_the_model_refuses_fails_alone_and_its_batch_mates_are_scored():
    def score(feeds):  # refuses any token id past its "vocabulary" of 1000, as a runtime would
        if (feeds["input_ids"] >= 1000).any():
            raise RuntimeError("indices element out of data bounds")
        return (feeds["input_ids"] * feeds["attention_mask"]).sum(axis=1).astype(np.float32)

    requests = [_encoded([3, 9, 4], 12, 0), _encoded([5, 2], 6, 1), _encoded([7, 7], 7, 2)]
    requests[1]["input_ids"][1, 0] = 5000
    outcomes = {}
    score_streamed(score, requests, ("input_ids", "attention_mask"), max_tokens=1000, max_pairs=16,
                   on_done=outcomes.__setitem__)
    assert isinstance(outcomes[1], InvalidInput) and "RuntimeError" in str(outcomes[1])
    for r in (0, 2):
        np.testing.assert_array_equal(outcomes[r], (requests[r]["input_ids"] * requests[r]["attention_mask"]).sum(axis=1))


def test_a_call_that_fails_for_every_request_keeps_its_own_error():
    def score(feeds):
        raise MemoryError("out of memory")

    outcomes = {}
    score_streamed(score, [_encoded([3], 3, 0), _encoded([4], 4, 1)], ("input_ids", "attention_mask"),
                   max_tokens=1000, max_pairs=16, on_done=outcomes.__setitem__)
    assert all(isinstance(e, MemoryError) for e in outcomes.values()) and len(outcomes) == 2
