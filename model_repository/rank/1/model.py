"""Triton Python-backend adapter of the CPU rank stage: ONNX Runtime or OpenVINO over an ONNX model.

The same adapter serves every CPU variant (``rank_<variant>``); only ``model.onnx`` and the
parameters in ``config.pbtxt`` (runtime, precision, threads) differ.
"""

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from rankserve.api import LOGITS, MODEL_INPUT_NAMES
from rankserve.settings import OrtSettings, RuntimeSettings, from_parameters
from rankserve.stages.rank import create_ranker
from rankserve.stages.triton_io import respond_each


class TritonPythonModel:
    def initialize(self, args):
        parameters = json.loads(args["model_config"]).get("parameters", {})
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.ranker = create_ranker(
            version_dir / "model.onnx",
            from_parameters(RuntimeSettings, parameters),
            from_parameters(OrtSettings, parameters),
        )

    def execute(self, requests):
        return respond_each(pb_utils, requests, MODEL_INPUT_NAMES, lambda inputs: {LOGITS.name: self.ranker.score(inputs)})
