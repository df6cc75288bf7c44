"""Triton Python-backend adapter of the ``tokenize`` stage: (query, texts) -> encoded pairs.

Also serves ``tokenize_gpu`` (same adapter, ``pad_buckets`` set): requests padded to a few widths,
which the TensorRT rank stage can batch together."""

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from rankserve.api import QUERY, TEXTS
from rankserve.settings import TokenizeSettings, from_parameters
from rankserve.stages.tokenize import bounded_deserializer, encode_pairs, load_tokenizer, parse_request
from rankserve.stages.triton_io import respond_each


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.settings = from_parameters(TokenizeSettings, config.get("parameters", {}))
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.tokenizer = load_tokenizer(version_dir / "tokenizer.json", self.settings)
        # the stub decodes BYTES inputs with this before execute: bound it (count and size)
        pb_utils.deserialize_bytes_tensor = bounded_deserializer(self.settings.max_candidates, self.settings.max_request_bytes)

    def execute(self, requests):
        return respond_each(pb_utils, requests, (QUERY.name, TEXTS.name), self._encode)

    def _encode(self, inputs):
        query, texts = parse_request(inputs[QUERY.name], inputs[TEXTS.name], self.settings)
        return encode_pairs(self.tokenizer, query, texts, self.settings.buckets)
