"""Triton Python-backend adapter of the ``postprocess`` stage: sort by score, keep the top k."""

import triton_python_backend_utils as pb_utils

from rankserve.api import LOGITS, TOP_K
from rankserve.stages.postprocess import postprocess
from rankserve.stages.triton_io import respond_each


class TritonPythonModel:
    def execute(self, requests):
        return respond_each(
            pb_utils, requests, (LOGITS.name, TOP_K.name), lambda inputs: postprocess(inputs[LOGITS.name], inputs[TOP_K.name])
        )
