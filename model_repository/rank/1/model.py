"""Triton Python-backend adapter of the CPU rank stage: ONNX Runtime or OpenVINO over an ONNX model.

The same adapter serves every CPU variant (``rank_<variant>``); only ``model.onnx`` and the
parameters in ``config.pbtxt`` (runtime, precision, threads, batching) differ. Triton's dynamic
batcher hands it several requests at once; their pairs are scored in token-budget calls, smallest
request first, and each request is answered as soon as its own pairs are scored. With
``scheduling: deadline`` the stage queues the pairs itself and ``execute`` returns at once, so a
short request that arrives while a long one is scored goes into the next call
(:mod:`rankserve.stages.scheduling`).
"""

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from rankserve.api import MODEL_INPUT_NAMES
from rankserve.settings import BatchingSettings, OrtSettings, RuntimeSettings, from_parameters
from rankserve.stages.rank import create_ranker, rank_batch, scheduled_rank
from rankserve.stages.triton_io import respond_as_done, respond_later, stage_metrics


class TritonPythonModel:
    def initialize(self, args):
        parameters = json.loads(args["model_config"]).get("parameters", {})
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.batching = from_parameters(BatchingSettings, parameters)
        self.max_pairs = int(parameters.get("max_pairs", {}).get("string_value", "1000"))
        self.max_length = int(parameters.get("max_length", {}).get("string_value", "512"))  # the tokenizer's
        self.ranker = create_ranker(
            version_dir / "model.onnx",
            from_parameters(RuntimeSettings, parameters),
            from_parameters(OrtSettings, parameters),
        )
        self.stage, self.submit = None, None
        if self.batching.scheduling == "deadline":
            observe = stage_metrics(pb_utils, args["model_name"], args["model_version"])
            self.stage, self.submit = scheduled_rank(self.ranker, self.batching, self.max_pairs, observe, self.max_length)

    def execute(self, requests):
        if self.stage is not None:
            return respond_later(pb_utils, requests, MODEL_INPUT_NAMES, self.submit)
        return respond_as_done(pb_utils, requests, MODEL_INPUT_NAMES, lambda inputs, done: rank_batch(
            self.ranker, inputs, self.batching.max_batch_tokens, self.max_pairs, on_done=done, max_length=self.max_length))

    def finalize(self):
        if self.stage is not None:
            self.stage.stop()
