"""Triton Python-backend adapter of the ``postprocess`` stage: sort by score, keep the top k."""

import triton_python_backend_utils as pb_utils

from rankserve.api import INDICES, LOGITS, SCORES, TOP_K
from rankserve.errors import InvalidInput, triton_error
from rankserve.stages.postprocess import order, parse_top_k


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                logits = pb_utils.get_input_tensor_by_name(request, LOGITS.name)
                if logits is None:
                    raise InvalidInput(f"input '{LOGITS.name}' is required")
                scores = logits.as_numpy()
                top_k = pb_utils.get_input_tensor_by_name(request, TOP_K.name)
                k = parse_top_k(None if top_k is None else top_k.as_numpy(), scores.size)
                indices, ordered = order(scores, k)
                responses.append(
                    pb_utils.InferenceResponse(
                        [pb_utils.Tensor(INDICES.name, indices), pb_utils.Tensor(SCORES.name, ordered)]
                    )
                )
            except Exception as exc:  # one response per request, whatever happens
                responses.append(pb_utils.InferenceResponse(error=triton_error(exc, pb_utils)))
        return responses
