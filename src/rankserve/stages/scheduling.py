"""Deadline scheduling for the rank stage: a short list does not wait behind a long one.

Under Triton's own queue the rank stage scores each dynamic batch to its end, so a 20-candidate
request that arrives while a 400-candidate one is scored waits for all of it. With
``BatchingSettings.scheduling = "deadline"`` the stage answers Triton at once and keeps the pairs
in a :class:`DeadlineQueue` of its own, scored by one worker thread (:class:`ScheduledStage`):

- each request gets a deadline: its arrival plus ``slowdown`` times its estimated time alone (its
  tokens over the tokens/s the stage measures on its own calls);
- each model call takes, earliest deadline first, the pairs (shortest first) that fit the token
  budget, so a new short request goes into the next call (one call, ~``max_tokens`` tokens)
  instead of after a whole long list, and is answered as soon as its last pair is scored;
- a long list is overtaken only by requests whose deadline comes before its own: the longer it
  has waited, the fewer can pass it.

Pure Python over a ``score(feeds) -> scores`` callable: unit-tested without Triton.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from rankserve.errors import Unavailable
from rankserve.stages.batching import _isolate

Reply = Callable[["np.ndarray | Exception"], None]


@dataclass(eq=False)
class _Request:
    feeds: Mapping[str, np.ndarray]
    lengths: np.ndarray
    reply: Reply
    order: np.ndarray = field(init=False)  # pairs, shortest first
    taken: int = 0
    scores: np.ndarray = field(init=False)
    failed: bool = False
    error: "Exception | None" = None
    submitted: float = 0.0  # time.monotonic() when it entered the stage
    started: float = 0.0  # ... when the first call holding one of its pairs began

    def __post_init__(self) -> None:
        self.order = np.argsort(self.lengths, kind="stable")
        self.scores = np.empty(len(self.lengths), dtype=np.float32)


class DeadlineQueue:
    """Requests' pairs waiting to be scored, earliest deadline first. Not thread-safe on its own:
    :class:`ScheduledStage` guards it. ``tokens_per_s`` is the first estimate of the stage's speed;
    each call's measured speed moves it (exponential average, weight ``ema``)."""

    def __init__(self, names: Sequence[str], max_tokens: int, max_pairs: int, slowdown: float,
                 tokens_per_s: float = 10_000.0, ema: float = 0.2, clock: Callable[[], float] = time.monotonic) -> None:
        self.names, self.max_tokens, self.max_pairs, self.slowdown = tuple(names), max_tokens, max_pairs, slowdown
        self.tokens_per_s, self.ema, self.clock = tokens_per_s, ema, clock
        self._heap: list[tuple[float, int, _Request]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, feeds: Mapping[str, np.ndarray], reply: Reply) -> None:
        """Queue one request's checked feeds; ``reply(scores or exception)`` is called once. A
        request without pairs is answered at once."""
        lengths = np.asarray(feeds["attention_mask"]).sum(axis=1).astype(int)
        if lengths.size == 0:
            reply(np.empty(0, dtype=np.float32))
            return
        deadline = self.clock() + self.slowdown * float(lengths.sum()) / self.tokens_per_s
        request = _Request(feeds, lengths, reply, submitted=time.monotonic())
        heapq.heappush(self._heap, (deadline, next(self._seq), request))

    def take(self) -> list[tuple[_Request, int]]:
        """The next model call: (request, pair) in deadline order, each request's pairs shortest
        first, while pairs x longest pair stays within ``max_tokens`` and ``max_pairs`` (a single
        longer pair gets a call of its own)."""
        call: list[tuple[_Request, int]] = []
        longest = 0
        for _, _, req in sorted(self._heap):
            while req.taken < len(req.order):
                j = int(req.order[req.taken])
                n = int(req.lengths[j])
                if call and (max(longest, n) * (len(call) + 1) > self.max_tokens or len(call) >= self.max_pairs):
                    return call
                call.append((req, j))
                longest = max(longest, n)
                req.taken += 1
        return call

    def finished(self) -> list[_Request]:
        """Remove and return the requests that have all their pairs taken (call after scoring)."""
        done = [entry for entry in self._heap if entry[2].taken == len(entry[2].order) or entry[2].failed]
        if done:
            self._heap = [entry for entry in self._heap if entry not in done]
            heapq.heapify(self._heap)
        return [entry[2] for entry in done]

    def drain(self) -> list[_Request]:
        out = [entry[2] for entry in self._heap]
        self._heap = []
        return out

    def score(self, call: list[tuple[_Request, int]], score: Callable[[dict], np.ndarray]) -> None:
        """Score one call's pairs (each trimmed to its length, padded to the call's longest) into
        their requests; a failing call is retried one request at a time, so only the request the
        model cannot score fails (``failed``; its exception is its reply)."""
        members = list(dict.fromkeys(req for req, _ in call))
        index = {id(req): k for k, req in enumerate(members)}

        def run(part: list[tuple[int, int]]) -> np.ndarray:
            width = max(int(members[k].lengths[j]) for k, j in part)
            feeds = {name: np.zeros((len(part), width), dtype=np.int64) for name in self.names}
            for row, (k, j) in enumerate(part):
                n = int(members[k].lengths[j])
                for name in self.names:
                    feeds[name][row, :n] = members[k].feeds[name][j, :n]
            return score(feeds)

        def scored(part: list[tuple[int, int]], scores: np.ndarray) -> None:
            for row, (k, j) in enumerate(part):
                members[k].scores[j] = scores[row]

        def fail(k: int, exc: Exception) -> None:
            members[k].failed = True
            members[k].error = exc

        part = [(index[id(req)], j) for req, j in call]
        now = time.monotonic()
        for req in members:
            req.started = req.started or now
        started = time.perf_counter()
        try:
            scores = run(part)
        except Exception as exc:  # noqa: BLE001 - isolated: only the request the model cannot score fails
            _isolate(part, exc, run, scored, set(), fail)
            return
        elapsed = time.perf_counter() - started
        tokens = sum(int(members[k].lengths[j]) for k, j in part)
        if elapsed > 0:
            self.tokens_per_s += self.ema * (tokens / elapsed - self.tokens_per_s)
        scored(part, scores)


Observe = Callable[[float, float, bool], None]
"""``observe(wait_s, busy_s, ok)`` per answered request: from entering the stage to its first call,
from there to its answer, and whether it got scores (refusals count as not ok, with no time)."""


class ScheduledStage:
    """A :class:`DeadlineQueue` served by one worker thread. ``submit`` returns at once; each
    request's ``reply`` is called exactly once, from the worker: its scores, the exception that
    made it fail, or :class:`Unavailable` when more than ``max_pending`` requests are unfinished
    (0: no bound) or the stage stops. Triton's statistics see none of the stage's wait (``execute``
    returns at once): ``observe`` gets it, for the stage's own metrics."""

    def __init__(self, queue: DeadlineQueue, score: Callable[[dict], np.ndarray], max_pending: int = 0,
                 observe: Observe | None = None) -> None:
        self.queue, self.score, self.max_pending, self.observe = queue, score, max_pending, observe
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="rank-scheduler", daemon=True)
        self._thread.start()

    def submit(self, feeds: Mapping[str, np.ndarray], reply: Reply) -> None:
        with self._cond:
            if self._stopping:
                refusal = Unavailable("the rank stage is stopping: retry")
            elif self.max_pending and len(self.queue) >= self.max_pending:
                # Triton's own words for a full queue, so every client classifies it as overload
                refusal = Unavailable(f"Exceeds maximum queue size: the rank stage holds {len(self.queue)} "
                                      f"unfinished requests (max_queue_size {self.max_pending}); retry later")
            else:
                self.queue.add(feeds, reply)
                self._cond.notify()
                return
        self._observe(0.0, 0.0, False)
        reply(refusal)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not len(self.queue) and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    left = self.queue.drain()
                    break
                call = self.queue.take()
            self.queue.score(call, self.score)  # only this thread touches the taken pairs
            with self._cond:
                done = self.queue.finished()
            finished = time.monotonic()
            for req in done:  # counted first: whoever got the answer finds it in the metrics
                self._observe(req.started - req.submitted, finished - req.started, not req.failed)
                _reply(req, req.error if req.failed else req.scores)
        for req in left:
            self._observe(0.0, 0.0, False)
            _reply(req, Unavailable("the rank stage stopped before scoring this request: retry"))

    def _observe(self, wait_s: float, busy_s: float, ok: bool) -> None:
        if self.observe is not None:
            try:
                self.observe(wait_s, busy_s, ok)
            except Exception:  # noqa: BLE001 - metrics must not stop the worker
                pass

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop after the call in progress (waiting at most ``timeout_s``); the requests it does
        not finish are answered Unavailable, by the worker, once that call is done."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout_s)


def _reply(req: _Request, outcome) -> None:
    try:
        req.reply(outcome)
    except Exception:  # noqa: BLE001 - a reply that cannot be sent must not stop the worker
        pass
