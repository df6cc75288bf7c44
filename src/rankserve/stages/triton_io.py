"""The one piece of glue every stage adapter shares: exactly one response per request.

``pb_utils`` is passed in because ``triton_python_backend_utils`` only exists inside the
Python-backend stub; everything else a stage does lives in pure functions.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from rankserve.errors import triton_error

Handler = Callable[[Mapping[str, "np.ndarray | None"]], Mapping[str, np.ndarray]]


def respond_each(pb_utils: Any, requests: Iterable[Any], input_names: Iterable[str], handler: Handler) -> list:
    """Run ``handler`` on each request's inputs (``None`` when absent) and answer every request:
    its outputs, or a ``TritonError`` with the right code (never a traceback) when it raises."""
    names = tuple(input_names)
    responses = []
    for request in requests:
        try:
            outputs = handler(read_inputs(pb_utils, request, names))
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in outputs.items()]))
        except Exception as exc:  # one response per request, whatever happens
            responses.append(pb_utils.InferenceResponse(error=triton_error(exc, pb_utils)))
    return responses


def read_inputs(pb_utils: Any, request: Any, names: Iterable[str]) -> dict:
    """A request's input arrays by name (``None`` for an absent optional input)."""
    arrays = {}
    for name in names:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        arrays[name] = None if tensor is None else tensor.as_numpy()
    return arrays


def send_outcome(pb_utils: Any, request: Any, outcome: Any) -> None:
    """Answer ``request`` through its response sender, final: its outputs (a dict of arrays) or the
    exception as a ``TritonError`` with the right code."""
    if isinstance(outcome, Exception):
        response = pb_utils.InferenceResponse(error=triton_error(outcome, pb_utils))
    else:
        response = pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in outcome.items()])
    request.get_response_sender().send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


def respond_later(pb_utils: Any, requests: Sequence[Any], input_names: Iterable[str],
                  submit: Callable[[dict, Callable[[Any], None]], None]) -> None:
    """For a stage that schedules work of its own (:mod:`rankserve.stages.scheduling`): each
    request's inputs go to ``submit(inputs, reply)`` and ``execute`` returns at once, so Triton
    hands the stage the next requests while it works; ``reply(outputs dict or exception)`` answers
    the request later, from any thread (Triton 2.51 keeps a request whose response sender has not
    sent its final response, in the default transaction policy too). A request whose ``submit``
    raises is answered with the error at once."""
    names = tuple(input_names)
    for request in requests:
        try:
            submit(read_inputs(pb_utils, request, names), lambda outcome, r=request: send_outcome(pb_utils, r, outcome))
        except Exception as exc:  # noqa: BLE001 - one response per request, whatever happens
            send_outcome(pb_utils, request, exc)
    return None


def respond_as_done(pb_utils: Any, requests: Sequence[Any], input_names: Iterable[str],
                    handler: Callable[[list, Callable[[int, Any], None]], Any]) -> None:
    """For a stage that handles all requests of a dynamic batch at once and answers each one as soon
    as its result is known: ``handler(list of inputs, done)`` calls ``done(index, outputs dict or
    exception)`` once per request. Each answer goes out through the request's response sender (the
    default, non-decoupled transaction policy allows this since Triton 24.06), so a small request
    does not wait for a large one scored in the same batch. Exactly one response per request: those
    the handler leaves unanswered, or all that remain when it raises, get an error."""
    names = tuple(input_names)
    inputs = [read_inputs(pb_utils, request, names) for request in requests]
    answered = [False] * len(requests)

    def done(i: int, outcome: Any) -> None:
        if answered[i]:
            return
        answered[i] = True
        send_outcome(pb_utils, requests[i], outcome)

    try:
        handler(inputs, done)
    except Exception as exc:  # the rest of the batch failed: every unanswered request gets the error
        for i in range(len(requests)):
            done(i, exc)
    for i in range(len(requests)):
        done(i, RuntimeError("the stage produced no result for this request"))
    return None


STAGE_METRICS = {
    "queue_duration_us": "Cumulative time requests waited in a rankserve-scheduled stage before their first model call (us)",
    "compute_duration_us": "Cumulative time from a request's first model call in a rankserve-scheduled stage to its answer (us)",
    "request_success": "Requests a rankserve-scheduled stage answered with results",
    "request_failure": "Requests a rankserve-scheduled stage answered with an error or refused",
}
"""``rankserve_stage_<name>{model, version}`` counters, the stage-side view of Triton's
``nv_inference_*`` of the same names: Triton sees a scheduled stage's ``execute`` return at once."""


def stage_metrics(pb_utils: Any, model: str, version: str) -> Callable[[float, float, bool], None]:
    """Counters of a stage that schedules its own work (Python-backend custom metrics, shown on
    Triton's metrics endpoint), as an ``observe(wait_s, busy_s, ok)`` hook."""
    labels = {"model": model, "version": str(version)}
    # the families must outlive their metrics (Triton refuses to update a metric of a deleted family)
    families = {name: pb_utils.MetricFamily(name=f"rankserve_stage_{name}", description=text, kind=pb_utils.MetricFamily.COUNTER)
                for name, text in STAGE_METRICS.items()}
    counters = {name: family.Metric(labels=labels) for name, family in families.items()}

    def observe(wait_s: float, busy_s: float, ok: bool, _families=families) -> None:
        counters["request_success" if ok else "request_failure"].increment(1.0)
        if ok:
            counters["queue_duration_us"].increment(wait_s * 1e6)
            counters["compute_duration_us"].increment(busy_s * 1e6)

    return observe
