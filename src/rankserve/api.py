"""The ranker's public API and the tensors passed between pipeline stages.

One definition used by the generated ``config.pbtxt`` files, the stage adapters and the clients.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # Triton data type without the TYPE_ prefix: STRING (BYTES on the wire), INT32, INT64, FP32
    dims: tuple[int, ...]
    optional: bool = False


# The public ensemble ``ranker`` (and every ``ranker_<variant>`` that later builds add).
RANKER_MODEL = "ranker"
QUERY = TensorSpec("query", "STRING", (1,))
TEXTS = TensorSpec("texts", "STRING", (-1,))
TOP_K = TensorSpec("top_k", "INT32", (1,), optional=True)
INDICES = TensorSpec("indices", "INT32", (-1,))
SCORES = TensorSpec("scores", "FP32", (-1,))
# How much of the request the ranker's vocabulary covers (rankserve.stages.coverage): INT64
# [query unknown, query tokens, texts unknown, texts tokens]. An extra output: clients that ask
# only for indices and scores get only those, and the API check does not require it.
TOKEN_COUNTS = TensorSpec("token_counts", "INT64", (4,))
RANKER_INPUTS = (QUERY, TEXTS, TOP_K)
RANKER_OUTPUTS = (INDICES, SCORES)
RANKER_EXTRA_OUTPUTS = (TOKEN_COUNTS,)

# Stage models and the tensors between them.
TOKENIZE_MODEL = "tokenize"
RANK_MODEL = "rank"
POSTPROCESS_MODEL = "postprocess"

MODEL_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
ENCODED = tuple(TensorSpec(name, "INT64", (-1, -1)) for name in MODEL_INPUT_NAMES)
LOGITS = TensorSpec("logits", "FP32", (-1,))
