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
            arrays = {}
            for name in names:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                arrays[name] = None if tensor is None else tensor.as_numpy()
            outputs = handler(arrays)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in outputs.items()]))
        except Exception as exc:  # one response per request, whatever happens
            responses.append(pb_utils.InferenceResponse(error=triton_error(exc, pb_utils)))
    return responses


def respond_all(pb_utils: Any, requests: Sequence[Any], input_names: Iterable[str],
                handler: Callable[[list], list]) -> list:
    """Like :func:`respond_each`, for a stage that handles all requests of a dynamic batch at once:
    ``handler(list of inputs)`` returns one outputs dict or one exception per request."""
    names = tuple(input_names)
    inputs: list = []
    for request in requests:
        arrays = {}
        for name in names:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            arrays[name] = None if tensor is None else tensor.as_numpy()
        inputs.append(arrays)
    try:
        outcomes = handler(inputs)
    except Exception as exc:  # the whole batch failed: every request gets the error
        outcomes = [exc] * len(requests)
    responses = []
    for outcome in outcomes:
        if isinstance(outcome, Exception):
            responses.append(pb_utils.InferenceResponse(error=triton_error(outcome, pb_utils)))
        else:
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in outcome.items()]))
    return responses
