"""Triton Python-backend adapter of the ``postprocess`` stage: sort by score, keep the top k."""

import json

import triton_python_backend_utils as pb_utils

from rankserve.api import LOGITS, TOP_K
from rankserve.stages.postprocess import postprocess
from rankserve.stages.triton_io import respond_each


class TritonPythonModel:
    def initialize(self, args):
        parameters = json.loads(args["model_config"]).get("parameters", {})
        self.max_candidates = int(parameters.get("max_candidates", {}).get("string_value", "100000"))

    def execute(self, requests):
        return respond_each(pb_utils, requests, (LOGITS.name, TOP_K.name),
                            lambda inputs: postprocess(inputs[LOGITS.name], inputs[TOP_K.name], self.max_candidates))
