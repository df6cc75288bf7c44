import threading

import numpy as np
import pytest

from rankserve.errors import InvalidInput, Unavailable
from rankserve.stages.scheduling import DeadlineQueue, ScheduledStage
from test_batching import _encoded as _encoded_to_width

NAMES = ("input_ids", "attention_mask")


def _encoded(lengths, seed=0):
    return _encoded_to_width(lengths, max(lengths), seed)


def _sum(feeds):  # a pure function of each row's real tokens
    return (feeds["input_ids"] * feeds["attention_mask"]).sum(axis=1).astype(np.float32)


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _queue(clock, max_tokens=1000, max_pairs=4, slowdown=4.0, tokens_per_s=100.0):
    return DeadlineQueue(NAMES, max_tokens, max_pairs, slowdown, tokens_per_s=tokens_per_s, ema=0.0, clock=clock)


def _run_all(queue, score=_sum):
    order = []
    while len(queue):
        call = queue.take()
        queue.score(call, score)
        order += [req for req in queue.finished()]
    return order


def test_a_short_request_that_arrives_later_overtakes_a_long_one_at_the_next_call():
    clock = Clock()
    queue = _queue(clock)
    long, short = _encoded([10] * 40, 1), _encoded([10] * 2, 2)
    queue.add(long, lambda s: None)
    first = queue.take()  # the long request's first call is in progress ...
    assert len(first) == 4 and {id(r) for r, _ in first} == {id(queue._heap[0][2])}
    queue.score(first, _sum)
    clock.t = 0.5  # ... when the short one arrives: deadline 0.5 + 4 x 20/100 = 1.3 < 0 + 4 x 400/100
    queue.add(short, lambda s: None)
    second = queue.take()
    assert [r.lengths.size for r, _ in second][:2] == [2, 2]  # the short request's two pairs first
    queue.score(second, _sum)
    finished = queue.finished()
    assert [r.lengths.size for r in finished] == [2]  # answered after two calls, not after the long list
    np.testing.assert_array_equal(finished[0].scores, _sum(short))
    rest = _run_all(queue)
    assert [r.lengths.size for r in rest] == [40] and len(queue) == 0
    np.testing.assert_array_equal(rest[0].scores, _sum(long))


def test_each_pair_is_scored_once_into_its_own_request_and_position():
    clock = Clock()
    queue = _queue(clock, max_tokens=64, max_pairs=3)
    requests = [_encoded([30, 5, 12], 0), _encoded([7, 50, 6, 31], 1), _encoded([9], 2)]
    for k, enc in enumerate(requests):
        clock.t = k * 0.01
        queue.add(enc, lambda s: None)
    calls = []
    done = []
    while len(queue):
        call = queue.take()
        calls.append([(int(r.lengths[j])) for r, j in call])
        queue.score(call, _sum)
        done += queue.finished()
    for widths in calls:
        assert len(widths) <= 3 and (len(widths) == 1 or len(widths) * max(widths) <= 64)
    assert sum(len(c) for c in calls) == 8
    by_size = {r.lengths.size: r for r in done}
    for enc in requests:
        np.testing.assert_array_equal(by_size[len(enc["input_ids"])].scores, _sum(enc))


def test_deadlines_follow_arrival_and_size_and_the_measured_speed_moves_them():
    clock = Clock()
    queue = DeadlineQueue(NAMES, 1000, 8, slowdown=2.0, tokens_per_s=100.0, ema=1.0, clock=clock)
    queue.add(_encoded([10] * 10), lambda s: None)  # 100 tokens: deadline 0 + 2 x 1 s
    clock.t = 1.0
    queue.add(_encoded([10] * 2), lambda s: None)  # 20 tokens: deadline 1 + 2 x 0.2 s
    assert [round(d, 3) for d, _, _ in sorted(queue._heap)] == [1.4, 2.0]
    queue.score(queue.take(), _sum)
    assert queue.tokens_per_s > 1000  # measured on this call (ema 1.0: the estimate is the measurement)


def test_a_request_the_model_cannot_score_fails_alone():
    clock = Clock()
    queue = _queue(clock, max_tokens=10_000, max_pairs=100)
    good, bad = _encoded([5, 6]), _encoded([4, 4])
    bad["input_ids"][0, 0] = -7

    def score(feeds):
        if (feeds["input_ids"] < 0).any():
            raise ValueError("index out of range")
        return _sum(feeds)

    queue.add(good, lambda s: None)
    queue.add(bad, lambda s: None)
    queue.score(queue.take(), score)
    done = {r.lengths.size and int(r.feeds["input_ids"][0, 0] < 0): r for r in queue.finished()}
    assert not done[0].failed
    np.testing.assert_array_equal(done[0].scores, _sum(good))
    assert done[1].failed and isinstance(done[1].error, InvalidInput)


def test_the_stage_replies_once_per_request_refuses_beyond_its_bound_and_on_stop():
    gate, entered = threading.Event(), threading.Event()
    replies: dict[str, list] = {}
    got = threading.Condition()

    def score(feeds):
        entered.set()
        gate.wait(10)
        return _sum(feeds)

    def reply(name):
        def _r(outcome):
            with got:
                replies.setdefault(name, []).append(outcome)
                got.notify_all()
        return _r

    seen = []
    stage = ScheduledStage(DeadlineQueue(NAMES, 1000, 4, 4.0), score, max_pending=2, observe=lambda *a: seen.append(a))
    try:
        first, second = _encoded([5] * 3, 1), _encoded([3] * 2, 2)
        stage.submit(first, reply("first"))
        stage.submit(second, reply("second"))
        stage.submit(_encoded([4]), reply("third"))  # two unfinished: refused at once
        assert isinstance(replies["third"][0], Unavailable)
        gate.set()
        with got:
            assert got.wait_for(lambda: "first" in replies and "second" in replies, timeout=10)
        np.testing.assert_array_equal(replies["first"][0], _sum(first))
        np.testing.assert_array_equal(replies["second"][0], _sum(second))
        stage.submit({"input_ids": np.zeros((0, 4), np.int64), "attention_mask": np.zeros((0, 4), np.int64)}, reply("empty"))
        assert replies["empty"][0].shape == (0,)
    finally:
        gate.clear()
        entered.clear()
        stage.submit(_encoded([5]), reply("held"))  # scored in a call that waits on the gate ...
        assert entered.wait(10)
        stage.submit(_encoded([6]), reply("queued"))
        stage.stop(timeout_s=0.5)  # ... so this one is still queued when the stage stops
        gate.set()
    with got:
        assert got.wait_for(lambda: "held" in replies and "queued" in replies, timeout=10)
    np.testing.assert_array_equal(replies["held"][0], _sum(_encoded([5])))
    assert isinstance(replies["queued"][0], Unavailable)
    stage.submit(_encoded([5]), reply("late"))
    assert isinstance(replies["late"][0], Unavailable)
    assert all(len(v) == 1 for v in replies.values())
    oks = [a for a in seen if a[2]]
    assert len(oks) == 3 and len(seen) == 6  # first, second, held; third, queued and late refused
    assert all(wait >= 0 and busy > 0 for wait, busy, _ in oks)


@pytest.mark.parametrize("slowdown", [0.5, 2000.0])
def test_the_setting_is_validated(slowdown):
    from rankserve.errors import ConfigError
    from rankserve.settings import BatchingSettings

    with pytest.raises(ConfigError):
        BatchingSettings(scheduling="deadline", deadline_slowdown=slowdown)
    with pytest.raises(ConfigError):
        BatchingSettings(scheduling="shortest")


def test_a_deadline_bound_below_the_warmup_is_refused_at_build_time():
    import dataclasses

    from rankserve.errors import ConfigError
    from rankserve.settings import PRESETS

    base = PRESETS["tiny"]
    with pytest.raises(ConfigError, match="warmup"):
        dataclasses.replace(base, batching=dataclasses.replace(base.batching, scheduling="deadline", max_queue_size=2))
    dataclasses.replace(base, batching=dataclasses.replace(base.batching, scheduling="deadline", max_queue_size=0))
