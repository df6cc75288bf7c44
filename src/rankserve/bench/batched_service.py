"""The baseline a team would deploy without Triton, and the bench's headline comparison: a FastAPI
server over the PyTorch model (the Hugging Face directory the repository was built from) with a
dynamic batcher.

Each request's (query, text) pairs join one queue in arrival order. One worker thread takes up to
``max_pairs`` (32) queued pairs at a time, across requests (a larger request is split over several
calls), tokenizes them padded to the longest pair of that call, scores them under
``torch.inference_mode`` (in BF16 autocast where the CPU has BF16 units, else FP32) with one torch
thread per core, and answers each request as soon as all its pairs are scored. A call that is not
full waits at most ``max_wait_ms`` for more pairs, counted from its oldest pair's arrival.

Run: ``python -m rankserve.bench.batched_service RANKER_DIR --port PORT [--max-length N] ...``;
``POST /rank {"query": ..., "texts": [...]}`` answers ``{"indices": [...], "scores": [...]}``, best
first; ``GET /stats`` counts requests, model calls and pairs; ``GET /ready``.
"""
# No ``from __future__ import annotations``: FastAPI must resolve the request model defined in make_app.

import argparse
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from typing import Callable, Sequence

import numpy as np

from rankserve.settings import BaselineSettings

Scorer = Callable[[list[str], list[str]], np.ndarray]
"""(queries, texts) of one model call -> one score per pair."""


class _Request:
    __slots__ = ("query", "texts", "order", "scores", "left", "taken", "future", "arrived")

    def __init__(self, query: str, texts: Sequence[str], sort_by_length: bool) -> None:
        self.query, self.texts = query, list(texts)
        n = len(self.texts)
        # the queue holds this request's pairs in ``order`` (shortest text first); scores go back by index
        self.order = np.argsort([len(t) for t in self.texts], kind="stable") if sort_by_length else np.arange(n)
        self.scores = np.empty(n, dtype=np.float32)
        self.left = n
        self.taken = 0
        self.future: Future = Future()
        self.arrived = time.monotonic()


def _settle(future: Future, outcome) -> None:
    """Set a result or an exception once; a future its caller cancelled (a client that went away) stays so."""
    try:
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
    except InvalidStateError:
        pass


class DynamicBatcher:
    """Queued pairs of many requests, scored ``max_pairs`` at a time, in arrival order, by one
    worker thread calling ``score``. :meth:`submit` returns a future of the request's scores, in
    the order of its texts."""

    def __init__(self, score: Scorer, max_pairs: int = 32, max_wait_s: float = 0.002, sort_by_length: bool = True,
                 start: bool = True) -> None:
        if max_pairs < 1 or max_wait_s < 0:
            raise ValueError(f"max_pairs must be >= 1 and max_wait_s >= 0, got {max_pairs}, {max_wait_s}")
        self.score, self.max_pairs, self.max_wait_s, self.sort_by_length = score, max_pairs, max_wait_s, sort_by_length
        self._cv = threading.Condition()
        self._queue: deque[_Request] = deque()
        self._queued = 0  # pairs queued and not yet taken
        self._closed = False
        self._stats = {"requests": 0, "batches": 0, "pairs": 0, "multi_request_batches": 0, "max_requests_per_batch": 0,
                       "failed_batches": 0}
        self._thread = threading.Thread(target=self._loop, name="dynamic-batcher", daemon=True)
        if start:
            self.start()

    def start(self) -> None:
        self._thread.start()

    def submit(self, query: str, texts: Sequence[str]) -> Future:
        request = _Request(query, texts, self.sort_by_length)
        if not request.texts:
            _settle(request.future, request.scores)
            return request.future
        with self._cv:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.append(request)
            self._queued += len(request.texts)
            self._stats["requests"] += 1
            self._cv.notify()
        return request.future

    def stats(self) -> dict:
        with self._cv:
            return dict(self._stats, queued_pairs=self._queued)

    def close(self) -> None:
        """Stop taking work: requests still queued fail; the call in progress finishes."""
        with self._cv:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            self._queued = 0
            self._cv.notify()
        for request in pending:
            _settle(request.future, RuntimeError("the service is shutting down"))
        if self._thread.is_alive():
            self._thread.join()

    def _take(self) -> list[tuple[_Request, int, int]]:
        """The next call's pairs, as (request, first, end) positions in each request's queue order:
        up to ``max_pairs`` from the head of the queue (with the lock held)."""
        segments: list[tuple[_Request, int, int]] = []
        room = self.max_pairs
        while self._queue and room:
            request = self._queue[0]
            rest = len(request.texts) - request.taken
            if request.future.done():  # failed in an earlier call, or cancelled: its other pairs are not scored
                self._queue.popleft()
                self._queued -= rest
                continue
            n = min(room, rest)
            segments.append((request, request.taken, request.taken + n))
            request.taken += n
            room -= n
            self._queued -= n
            if request.taken == len(request.texts):
                self._queue.popleft()
        return segments

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                deadline = self._queue[0].arrived + self.max_wait_s
                while self._queued < self.max_pairs and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                segments = self._take()
            if segments:
                self._run(segments)

    def _run(self, segments: list[tuple[_Request, int, int]]) -> None:
        queries: list[str] = []
        texts: list[str] = []
        for request, lo, hi in segments:
            queries.extend([request.query] * (hi - lo))
            texts.extend(request.texts[i] for i in request.order[lo:hi])
        try:
            scores = np.asarray(self.score(queries, texts), dtype=np.float32).reshape(-1)
            if scores.shape != (len(texts),):
                raise RuntimeError(f"the model returned {scores.size} scores for {len(texts)} pairs")
        except Exception as exc:  # noqa: BLE001 - each request of the call fails with it; the worker goes on
            with self._cv:
                self._stats["failed_batches"] += 1
            for request, _, _ in segments:
                _settle(request.future, exc)
            return
        with self._cv:
            self._stats["batches"] += 1
            self._stats["pairs"] += len(texts)
            self._stats["multi_request_batches"] += len(segments) > 1
            self._stats["max_requests_per_batch"] = max(self._stats["max_requests_per_batch"], len(segments))
        k = 0
        for request, lo, hi in segments:
            request.scores[request.order[lo:hi]] = scores[k:k + hi - lo]
            k += hi - lo
            request.left -= hi - lo
            if request.left == 0:
                _settle(request.future, request.scores)


def resolve_precision(precision: str, flags: Sequence[str] | None = None) -> str:
    """``auto``: ``bf16`` where the CPU multiplies BF16 natively (AVX512-BF16 or AMX-BF16), else ``fp32``."""
    if precision != "auto":
        return precision
    from rankserve.optimize.report import native_matrix_units
    from rankserve.stages.runtime_cache import cpu_flags

    return "bf16" if "bf16" in native_matrix_units(cpu_flags().split() if flags is None else list(flags)) else "fp32"


class TorchScorer:
    """The Hugging Face model in PyTorch: tokenize a call's pairs (truncated to ``max_length``,
    longest side first, padded to the call's longest pair) and return one logit per pair."""

    def __init__(self, ranker_dir: str, settings: BaselineSettings) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from rankserve.builder.export import load_options

        from rankserve.stages.rank import default_threads

        threads = settings.threads or default_threads(0)  # 0: torch's own default, one per core
        if threads:
            torch.set_num_threads(threads)
        self.torch, self.max_length = torch, settings.max_length
        self.precision = resolve_precision(settings.precision)
        self.threads = torch.get_num_threads()
        self.tokenizer = AutoTokenizer.from_pretrained(ranker_dir, trust_remote_code=False)
        self.model = AutoModelForSequenceClassification.from_pretrained(ranker_dir, **load_options(ranker_dir)).eval()

    def __call__(self, queries: list[str], texts: list[str]) -> np.ndarray:
        torch = self.torch
        encoded = self.tokenizer(queries, texts, truncation="longest_first", max_length=self.max_length, padding=True,
                                 return_tensors="pt")
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            logits = self.model(**encoded).logits
        return logits[:, 0].float().numpy()


def make_app(ranker_dir: str, settings: BaselineSettings | None = None):
    import asyncio
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, HTTPException
    from pydantic import BaseModel, Field

    settings = settings or BaselineSettings()
    scorer = TorchScorer(ranker_dir, settings)
    scorer(["warm up"] * settings.max_pairs, ["the first calls of a model are slower"] * settings.max_pairs)
    batcher = DynamicBatcher(scorer, settings.max_pairs, settings.max_wait_ms / 1000, settings.sort_by_length)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        batcher.close()

    app = FastAPI(title="PyTorch ranker with dynamic batching (the rankserve bench baseline)", lifespan=lifespan)

    class RankRequest(BaseModel):
        query: str = Field(min_length=1)
        texts: list[str] = Field(min_length=1, max_length=settings.max_candidates)

    @app.post("/rank")
    async def rank(req: RankRequest):
        if not req.query.strip():
            raise HTTPException(status_code=400, detail="'query' is empty")
        scores = await asyncio.wrap_future(batcher.submit(req.query, req.texts))
        order = np.argsort(-scores, kind="stable")
        return {"indices": order.tolist(), "scores": scores[order].tolist()}

    @app.get("/stats")
    def stats():
        return {**batcher.stats(), "precision": scorer.precision, "threads": scorer.threads,
                "max_pairs": settings.max_pairs, "max_wait_ms": settings.max_wait_ms, "max_length": settings.max_length}

    @app.get("/ready")
    def ready():
        return {"ready": True}

    return app


def main(argv: Sequence[str] | None = None) -> None:
    d = BaselineSettings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ranker_dir")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--max-pairs", type=int, default=d.max_pairs)
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms)
    p.add_argument("--max-length", type=int, default=d.max_length)
    p.add_argument("--precision", default=d.precision)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--no-sort-by-length", action="store_true", help="queue each request's pairs in its own order")
    args = p.parse_args(argv)
    settings = BaselineSettings(max_pairs=args.max_pairs, max_wait_ms=args.max_wait_ms, max_length=args.max_length,
                                precision=args.precision, threads=args.threads, sort_by_length=not args.no_sort_by_length)
    import uvicorn

    uvicorn.run(make_app(args.ranker_dir, settings), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
