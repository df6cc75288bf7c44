"""Triton Python-backend adapter of the CPU rank stage: ONNX Runtime or OpenVINO over an ONNX model.

The same adapter serves every CPU variant (``rank_<variant>``); only ``model.onnx`` and the
parameters in ``config.pbtxt`` (runtime, precision, threads, batching) differ. Triton's dynamic
batcher hands it several requests at once; their pairs are scored in token-budget calls, smallest
request first, and each request is answered as soon as its own pairs are scored.
"""

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from rankserve.api import MODEL_INPUT_NAMES
from rankserve.settings import BatchingSettings, OrtSettings, RuntimeSettings, from_parameters
from rankserve.stages.rank import create_ranker, rank_batch
from rankserve.stages.triton_io import respond_as_done


class TritonPythonModel:
    def initialize(self, args):
        parameters = json.loads(args["model_config"]).get("parameters", {})
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.batching = from_parameters(BatchingSettings, parameters)
        self.max_pairs = int(parameters.get("max_pairs", {}).get("string_value", "1000"))
        self.ranker = create_ranker(
            version_dir / "model.onnx",
            from_parameters(RuntimeSettings, parameters),
            from_parameters(OrtSettings, parameters),
        )

    def execute(self, requests):
        return respond_as_done(pb_utils, requests, MODEL_INPUT_NAMES, lambda inputs, done: rank_batch(
            self.ranker, inputs, self.batching.max_batch_tokens, self.max_pairs, on_done=done))
