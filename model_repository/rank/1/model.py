"""Triton Python-backend adapter of the CPU ``rank`` stage: an ONNX Runtime session.

The same adapter serves every CPU variant (``rank_<variant>``); only ``model.onnx`` and the
parameters in ``config.pbtxt`` differ.
"""

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from rankserve.api import LOGITS, MODEL_INPUT_NAMES
from rankserve.errors import triton_error
from rankserve.settings import OrtSettings, from_parameters
from rankserve.stages.rank import OnnxRanker


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        settings = from_parameters(OrtSettings, config.get("parameters", {}))
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.ranker = OnnxRanker(version_dir / "model.onnx", settings)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                encoded = {name: _numpy(request, name) for name in MODEL_INPUT_NAMES}
                logits = self.ranker.score(encoded)
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(LOGITS.name, logits)]))
            except Exception as exc:  # one response per request, whatever happens
                responses.append(pb_utils.InferenceResponse(error=triton_error(exc, pb_utils)))
        return responses


def _numpy(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()
