"""The ``rank`` stage on CPU: an ONNX Runtime or OpenVINO session scoring encoded pairs, batched
across requests."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from rankserve.api import LOGITS
from rankserve.errors import InvalidInput
from rankserve.stages.batching import score_streamed
from rankserve.settings import OrtSettings, RuntimeSettings
from rankserve.stages import runtime_cache

_GRAPH_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def cpu_quota(cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Whole CPUs the cgroup may use (a container's CPU limit, rounded up), or None when unlimited.
    cgroup v2 ``cpu.max`` (``"200000 100000"`` = 2 CPUs), else v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    if quota in ("max", "-1") or int(period) <= 0:
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def default_threads(configured: int, cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """``configured`` threads, or for 0 (the runtime's default: one per core of the machine) the
    CPUs this process may really use when that is fewer: a container limited to 2 CPUs on a 64-core
    node would otherwise run 32+ threads and be throttled. 0 still means the runtime's default."""
    if configured:
        return configured
    usable = len(os.sched_getaffinity(0))
    quota = cpu_quota(cgroup)
    usable = min(usable, quota) if quota else usable
    return usable if usable < (os.cpu_count() or usable) else 0


def create_session(model_path: str | Path, settings: OrtSettings, cache: Path | None = None, use_cache: bool = True):
    """The ONNX Runtime session of a variant; with ``cache`` (default: ``RANKSERVE_CACHE_DIR``),
    through the host's cache of optimized models (:mod:`rankserve.stages.runtime_cache`), unless
    ``use_cache`` is False. Returns ``(session, source)``."""
    import onnxruntime as ort

    def options():
        o = ort.SessionOptions()
        o.intra_op_num_threads = default_threads(settings.intra_op_threads)
        o.inter_op_num_threads = settings.inter_op_threads
        o.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _GRAPH_LEVELS[settings.graph_optimization])
        if not settings.prepack_weights:  # matrices read in place from the mapped weights file, shared by instances
            o.add_session_config_entry("session.disable_prepacking", "1")
        return o

    graph = {"graph_optimization": settings.graph_optimization, "prepack_weights": str(settings.prepack_weights)}
    root = (cache if cache is not None else runtime_cache.cache_dir()) if use_cache else None
    return runtime_cache.ort_session(model_path, options, graph, root)


def check_encoded(encoded: Mapping[str, np.ndarray | None], required: tuple[str, ...],
                  max_length: int | None = None) -> dict[str, np.ndarray]:
    """Check that the encoded inputs the model needs are present, 2-D int64, of one shape, with 0/1
    masks and token types, at least one token per pair and no negative token id; with
    ``max_length``, no wider than the tokenizer ever makes them. These hold for whatever calls the
    model: the ensemble, or a caller of the internal ``rank`` model by name (Triton refuses more
    pairs than the model's ``max_batch_size``, the ``max_candidates`` of the build). (Ids past the vocabulary are caught when the
    model refuses them: see :func:`score_streamed`.)

    Each ``attention_mask`` row must be ones then zeros (the tokenizer pads on the right): the
    stage reads a pair's tokens as the first ``sum(mask)`` of its row (:func:`score_streamed`), so
    a left-padded or holed mask would be scored on its padding. It is refused rather than
    re-aligned: position ids start at the first token, and only the tokenizer knows the pair."""
    feeds: dict[str, np.ndarray] = {}
    for name in required:
        value = encoded.get(name)
        if value is None:
            raise InvalidInput(f"input '{name}' is required")
        if value.ndim != 2 or value.dtype != np.int64:
            raise InvalidInput(f"'{name}' must be a 2-D INT64 tensor, got {value.ndim}-D {value.dtype}")
        feeds[name] = value
    shapes = {v.shape for v in feeds.values()}
    if len(shapes) != 1:
        raise InvalidInput(f"encoded inputs disagree in shape: {sorted(shapes)}")
    width = next(iter(shapes))[1]
    if max_length is not None and width > max_length:
        raise InvalidInput(f"the encoded pairs are {width} tokens wide, more than the limit of {max_length} (max_length)")
    for name in ("attention_mask", "token_type_ids"):
        if name in feeds and not np.isin(feeds[name], (0, 1)).all():
            raise InvalidInput(f"'{name}' must hold only 0 and 1")
    if "attention_mask" in feeds and feeds["attention_mask"].size:
        mask = feeds["attention_mask"]
        if not mask.any(axis=1).all():
            raise InvalidInput("every pair needs at least one token: a row of 'attention_mask' is all 0")
        if (mask[:, 1:] > mask[:, :-1]).any():
            row = int(np.flatnonzero((mask[:, 1:] > mask[:, :-1]).any(axis=1))[0])
            raise InvalidInput(f"'attention_mask' row {row} is not right-padded: each row must be ones, then zeros")
    if "input_ids" in feeds and (feeds["input_ids"] < 0).any():
        raise InvalidInput("'input_ids' must not be negative")
    return feeds


class OnnxRanker:
    """Scores encoded pairs with an ONNX model whose single output is one logit per pair."""

    def __init__(self, model_path: str | Path, settings: OrtSettings, cache: Path | None = None, use_cache: bool = True) -> None:
        self.session, self.source = create_session(model_path, settings, cache, use_cache)
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_name = self.session.get_outputs()[0].name

    def score(self, encoded: Mapping[str, np.ndarray | None]) -> np.ndarray:
        feeds = check_encoded(encoded, self.input_names)
        (logits,) = self.session.run([self.output_name], feeds)
        return np.asarray(logits, dtype=np.float32).reshape(-1)


class OpenVinoRanker:
    """The same contract on OpenVINO (dynamic shapes; ``bf16`` uses the CPU's BF16 matrix units)."""

    def __init__(self, model_path: str | Path, settings: OrtSettings, precision: str = "f32", cache_capacity: int = 256) -> None:
        import openvino as ov

        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY", "CPU_RUNTIME_CACHE_CAPACITY": cache_capacity}
        cache_dir = runtime_cache.cache_dir()
        if cache_dir:  # compiled models are kept there and reloaded on the next start (this host, this CPU)
            config["CACHE_DIR"] = str(cache_dir / "openvino")
        threads = default_threads(settings.intra_op_threads)
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = ov.Core().compile_model(str(model_path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.input_names = tuple(i.get_any_name() for i in self.compiled.inputs)
        self.output = self.compiled.outputs[0]

    def score(self, encoded: Mapping[str, np.ndarray | None]) -> np.ndarray:
        feeds = check_encoded(encoded, self.input_names)
        result = self.request.infer(feeds)
        return np.asarray(result[self.output], dtype=np.float32).reshape(-1)


def create_ranker(model_path: str | Path, runtime: RuntimeSettings, settings: OrtSettings):
    """The rank stage's scorer for a variant: ONNX Runtime or OpenVINO over the same ONNX file."""
    if runtime.runtime == "openvino":
        return OpenVinoRanker(model_path, settings, runtime.inference_precision, runtime.openvino_cache_capacity)
    return OnnxRanker(model_path, settings, use_cache=runtime.cache_optimized_model)


def rank_batch(ranker, requests: list, max_batch_tokens: int, max_pairs: int,
               on_done: Callable[[int, object], None] | None = None, max_length: int | None = None) -> list:
    """The rank stage over one dynamic batch: validate each request, score all valid pairs in
    token-budget calls (:func:`score_streamed`); each request's outcome (logits, or its own
    :class:`InvalidInput`) goes to ``on_done(index, outcome)`` as soon as it is known, and all
    outcomes are returned. ``max_length``: the widest encoded request accepted (:func:`check_encoded`)."""
    outcomes: list = [None] * len(requests)

    def done(i: int, outcome) -> None:
        outcomes[i] = outcome
        if on_done is not None:
            on_done(i, outcome)

    valid, feeds = [], []
    for i, encoded in enumerate(requests):
        try:
            feeds.append(check_encoded(encoded, ranker.input_names, max_length))  # attention_mask is always among them
            valid.append(i)
        except InvalidInput as exc:
            done(i, exc)
    if feeds:
        score_streamed(ranker.score, feeds, ranker.input_names, max_batch_tokens, max_pairs,
                       lambda k, scores: done(valid[k], _as_logits(scores)))
    return outcomes


def _as_logits(scores: "np.ndarray | Exception"):
    """A request's outcome as the stage's output: ``{"logits": [pairs, 1]}``, or the exception."""
    return scores if isinstance(scores, Exception) else {LOGITS.name: scores.reshape(-1, 1)}


def scheduled_rank(ranker, batching, max_pairs: int, observe=None, max_length: int | None = None):
    """The rank stage under ``scheduling="deadline"``: a :class:`ScheduledStage` over the ranker and
    ``submit(inputs, reply)`` for :func:`rankserve.stages.triton_io.respond_later`: inputs are
    checked at once (a malformed request is refused without waiting), logits come back as in
    :func:`rank_batch`; ``observe``: see :class:`ScheduledStage`."""
    from rankserve.stages.scheduling import DeadlineQueue, ScheduledStage

    queue = DeadlineQueue(ranker.input_names, batching.max_batch_tokens, max_pairs, batching.deadline_slowdown)
    stage = ScheduledStage(queue, ranker.score, batching.max_queue_size, observe)

    def submit(encoded: Mapping[str, np.ndarray | None], reply: Callable[[object], None]) -> None:
        feeds = check_encoded(encoded, ranker.input_names, max_length)
        stage.submit(feeds, lambda scores: reply(_as_logits(scores)))

    return stage, submit
