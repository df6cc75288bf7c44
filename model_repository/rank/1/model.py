"""Triton Python-backend adapter of the CPU ``rank`` stage: an ONNX Runtime session.

The same adapter serves every CPU variant (``rank_<variant>``); only ``model.onnx`` and the
parameters in ``config.pbtxt`` differ.
"""

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from rankserve.api import LOGITS, MODEL_INPUT_NAMES
from rankserve.settings import OrtSettings, from_parameters
from rankserve.stages.rank import OnnxRanker
from rankserve.stages.triton_io import respond_each


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        settings = from_parameters(OrtSettings, config.get("parameters", {}))
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.ranker = OnnxRanker(version_dir / "model.onnx", settings)

    def execute(self, requests):
        return respond_each(pb_utils, requests, MODEL_INPUT_NAMES, lambda inputs: {LOGITS.name: self.ranker.score(inputs)})
