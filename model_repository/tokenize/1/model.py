"""Triton Python-backend adapter of the ``tokenize`` stage: (query, texts) -> encoded pairs, and the
request's token counts (unknown tokens of the query and texts: an output and Triton metrics).

Also serves ``tokenize_gpu`` (same adapter, ``pad_buckets`` set): requests padded to a few widths,
which the TensorRT rank stage can batch together."""

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from rankserve.api import QUERY, TEXTS, TOKEN_COUNTS
from rankserve.settings import TokenizeSettings, from_parameters
from rankserve.stages.coverage import token_metrics, unknown_token_id
from rankserve.stages.tokenize import bounded_deserializer, encode_request, load_tokenizer, parse_request
from rankserve.stages.triton_io import respond_each


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.settings = from_parameters(TokenizeSettings, config.get("parameters", {}))
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.tokenizer = load_tokenizer(version_dir / "tokenizer.json", self.settings)
        self.unknown_id = unknown_token_id(self.tokenizer)
        self.observe = token_metrics(pb_utils, args["model_name"], args["model_version"])
        # the stub decodes BYTES inputs with this before execute: bound it (count and size)
        pb_utils.deserialize_bytes_tensor = bounded_deserializer(self.settings.max_candidates, self.settings.max_request_bytes)

    def execute(self, requests):
        return respond_each(pb_utils, requests, (QUERY.name, TEXTS.name), self._encode)

    def _encode(self, inputs):
        query, texts = parse_request(inputs[QUERY.name], inputs[TEXTS.name], self.settings)
        encoded, counts = encode_request(self.tokenizer, query, texts, self.settings.buckets, self.unknown_id, count=True)
        self.observe(counts)
        return {**encoded, TOKEN_COUNTS.name: counts.as_array()}
