"""Triton Python-backend adapter of the ``tokenize`` stage: (query, texts) -> encoded pairs."""

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from rankserve.errors import triton_error
from rankserve.settings import TokenizeSettings, from_parameters
from rankserve.stages.tokenize import encode_pairs, load_tokenizer, parse_request


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.settings = from_parameters(TokenizeSettings, config.get("parameters", {}))
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.tokenizer = load_tokenizer(version_dir / "tokenizer.json", self.settings)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                query, texts = parse_request(
                    _numpy(request, "query"), _numpy(request, "texts"), self.settings
                )
                encoded = encode_pairs(self.tokenizer, query, texts)
                tensors = [pb_utils.Tensor(name, value) for name, value in encoded.items()]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except Exception as exc:  # one response per request, whatever happens
                responses.append(pb_utils.InferenceResponse(error=triton_error(exc, pb_utils)))
        return responses


def _numpy(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()
