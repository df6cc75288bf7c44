"""Host memory a served repository needs, estimated from its files, and the budget it must fit.

Every Python-backend model instance is a process of its own (a Triton stub): the estimate adds,
per instance, the stub's base (Python, numpy, the runtime's libraries), the weights as the runtime
holds them, and its working memory at the largest batch (``max_batch_tokens``), then the server's
own. Weights count in full but for embedding rows no token id reaches: ONNX Runtime maps a weights
file and reads the embedding table in place, so only the rows tokens touch become resident; over a
long run most of a shop's vocabulary is touched, and a budget has to hold that, so every row the
serving tokenizer can produce counts. ``tests/e2e/test_memory_budget.py`` and
``test_large_ranker.py`` check the estimate against the measured memory of served repositories.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from rankserve.builder import onnx_files
from rankserve.errors import BuildError

MiB = 2**20

SERVER_BYTES = 64 * MiB
"""tritonserver itself with the Python backend loaded (measured 42 MiB RSS, 2.51, CPU)."""
LIGHT_STUB_BYTES = 64 * MiB
"""A tokenize or postprocess stub (measured 39-53 MiB RSS)."""
RANK_STUB_BYTES = {"onnxruntime": 96 * MiB, "openvino": 160 * MiB}
"""A rank stub before its model: Python, numpy, rankserve and the runtime (measured with a 4 MB
model: ONNX Runtime 67 MiB, OpenVINO 110 MiB)."""
SINGLE_FILE_FACTOR = 1.5
"""ONNX Runtime with a model in one file (under 2 GB): the graph's bytes are read into the process
and the matrices prepacked beside them. Measured: the 536 MB dynamic-INT8 model of a 560M ranker
held 915 MB in its rank stub after a request (with the same weights mapped from a weights file,
500 MB)."""
OPENVINO_PRIVATE_FACTOR = 0.65
"""OpenVINO maps the whole weights file (every page is read while compiling; the pages are shared by
the instances) and keeps a repacked copy of the matrices per instance: measured 2.20 GB of file
pages and 1.38 GB private for a 2.24 GB FP32 model (0.62), 1.38x the file for its INT8 QDQ model."""
ACTIVATION_BYTES_PER_TOKEN_HIDDEN = 64
"""Working memory of one model call, per token of the batch and per unit of hidden size (FP32):
ONNX Runtime's arena grew by 133 MiB for 2,048 tokens of a 1,024-wide, 24-layer encoder."""

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """``8GiB``, ``512MiB``, ``1.5GB``, ``2000000000`` -> bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a memory size: {text!r} (use e.g. 8GiB, 512MiB, 2GB)")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value <= 0:
        raise ValueError(f"a memory size must be positive, got {text!r}")
    return int(value)


def format_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / MiB:.0f} MiB"


@dataclass(frozen=True)
class Weights:
    """A model's weights as the runtimes hold them."""

    total: int
    """Bytes on disk (graph and weights file)."""
    tables: int
    """Embedding tables (the data of a Gather) read in place from a mapped weights file: the bytes of
    the rows a token id can reach. 0 for a single-file model: its weights are read into memory."""

    mapped: bool = False
    """The weights live in a mapped weights file (a model over 2 GB), not in the graph."""

    @property
    def dense(self) -> int:
        return self.total - self.tables


def model_weights(onnx_path: str | Path, vocab_size: int | None = None) -> Weights:
    """Split a model's weights into what ONNX Runtime copies (prepacked matrices, every weight of a
    single-file model) and the embedding tables it reads in place from a mapped weights file, of
    which only the rows the serving tokenizer (``vocab_size`` ids) can produce count: a 540,000-row
    table served with a 30,522-token tokenizer is 6% reachable."""
    import onnx

    path = Path(onnx_path)
    if not onnx_files.data_path(path).exists():  # one file (the layout names any weights file X.data): no need
        return Weights(path.stat().st_size, 0)   # to parse it (a 536 MB INT8 graph at every serve start)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not a readable graph (the server will say which model fails): its size
        return Weights(path.stat().st_size, 0)
    total = onnx_files.model_bytes(path)
    gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather"}
    tables = 0
    for tensor in model.graph.initializer:
        length = next((int(e.value) for e in tensor.external_data if e.key == "length"), None)
        if tensor.name not in gathered or len(tensor.dims) != 2 or length is None:
            continue
        rows = tensor.dims[0]
        tables += length * min(rows, vocab_size or rows) // rows
    return Weights(total, tables, mapped=True)


def rank_model_bytes(weights: Weights, runtime: str, precision: str, instances: int, max_batch_tokens: int,
                     hidden_size: int, prepack: bool = True) -> int:
    """A rank model with ``instances`` stubs: what each holds (stub base, private weights, working
    memory at the largest batch) plus, once, the mapped weight pages they share."""
    working = ACTIVATION_BYTES_PER_TOKEN_HIDDEN * max_batch_tokens * hidden_size
    stub = RANK_STUB_BYTES.get(runtime, max(RANK_STUB_BYTES.values()))
    if runtime == "openvino":
        shared, private = weights.total, OPENVINO_PRIVATE_FACTOR * weights.total
    elif not prepack and weights.mapped:  # ONNX Runtime reading every weight in place from the mapped file
        shared, private = weights.tables + weights.dense, 0
    elif not weights.mapped:  # ONNX Runtime, one file: read into each process, matrices prepacked beside
        shared, private = 0, SINGLE_FILE_FACTOR * weights.total
    else:  # ONNX Runtime: prepacked copies of the matrices per instance, tables read in place
        shared, private = weights.tables, weights.dense
    return int(shared + instances * (stub + private + working))


@dataclass(frozen=True)
class Estimate:
    models: dict[str, int]
    """Model name -> bytes, all its instances."""
    server: int = SERVER_BYTES

    @property
    def total(self) -> int:
        return self.server + sum(self.models.values())

    def table(self) -> str:
        rows = [f"  {name:<24} {format_bytes(b):>10}" for name, b in sorted(self.models.items(), key=lambda x: -x[1]) if b]
        return "\n".join([*rows, f"  {'tritonserver':<24} {format_bytes(self.server):>10}", f"  {'total':<24} {format_bytes(self.total):>10}"])

    def to_dict(self) -> dict:
        return {"models": dict(sorted(self.models.items())), "server": self.server, "total": self.total}


def estimate_repository(repo: str | Path, hidden_size: int | None = None) -> Estimate:
    """Estimate a laid-out repository from its configs (runtime, precision, instances, batching)
    and its model files; ``hidden_size`` defaults to the manifest's record of the ranker."""
    import json

    from rankserve.builder import configs

    repo = Path(repo)
    if hidden_size is None:
        try:
            hidden_size = int(json.loads((repo / "manifest.json").read_text())["ranker"]["hidden_size"])
        except (OSError, ValueError, KeyError, TypeError):
            hidden_size = 1024  # an older manifest: a large encoder's width, to err on the safe side
    vocab = tokenizer_vocab(repo / "tokenize" / "1" / "tokenizer.json")
    models: dict[str, int] = {}
    for path in sorted(repo.glob("*/config.pbtxt")):
        config = configs.parse(path)
        name = config.name or path.parent.name
        if config.platform == "ensemble" or config.backend != "python":
            models[name] = 0  # ensembles hold nothing; TensorRT engines live in GPU memory
            continue
        instances = sum(g.count or 1 for g in config.instance_group) or 1
        onnx = path.parent / "1" / "model.onnx"
        if not onnx.exists():
            models[name] = instances * LIGHT_STUB_BYTES
            continue
        p = {k: v.string_value for k, v in config.parameters.items()}
        models[name] = rank_model_bytes(model_weights(onnx, vocab), p.get("runtime", "onnxruntime"),
                                        p.get("inference_precision", "f32"), instances, int(p.get("max_batch_tokens", "1024")),
                                        hidden_size, prepack=p.get("prepack_weights", "True") in ("True", "true", "1"))
    return Estimate(models)


def tokenizer_vocab(tokenizer_json: Path) -> int | None:
    """The number of ids the serving tokenizer can produce (None when there is no tokenizer file)."""
    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(tokenizer_json)).get_vocab_size(with_added_tokens=True)
    except Exception:  # noqa: BLE001 - no or unreadable tokenizer: count every row
        return None


def require_budget(estimate: Estimate, budget: int, what: str, error: type[Exception] = BuildError) -> None:
    """Raise ``error`` with the per-model table when ``estimate`` exceeds ``budget`` (0: none)."""
    if budget and estimate.total > budget:
        raise error(f"{what} needs an estimated {format_bytes(estimate.total)} of memory, more than the budget of "
                         f"{format_bytes(budget)}:\n{estimate.table()}\nload fewer variants (rankserve build --load, e.g. "
                         "--load int8), fewer rank instances, or raise the budget")


def variant_bytes(weights: Mapping[str, Weights], runtimes: Mapping[str, tuple[str, str]], instances: int,
                  max_batch_tokens: int, hidden_size: int, prepack: bool = True) -> dict[str, int]:
    """Per variant, what loading it adds: its rank model (its ensemble holds nothing)."""
    return {name: rank_model_bytes(weights[name], *runtimes[name], instances, max_batch_tokens, hidden_size, prepack)
            for name in weights}


def shared_bytes(tokenize_instances: int | None = None) -> int:
    """What every repository holds whatever variants it loads: the server, the tokenize instances
    (default: :attr:`TokenizeSettings.instances`), postprocess."""
    if tokenize_instances is None:
        from rankserve.settings import TokenizeSettings

        tokenize_instances = TokenizeSettings().instances
    return SERVER_BYTES + (tokenize_instances + 1) * LIGHT_STUB_BYTES


def choose_loaded(requested: str, estimates: Mapping[str, int], fastest_first: list[str], budget: int,
                  auto_limit: int) -> list[str]:
    """The variants a repository loads, in the order of ``fastest_first`` (the default candidate
    first). ``requested``: ``all``, ``auto`` or a comma-separated list. ``auto`` loads every variant
    when together they fit ``budget`` (or ``auto_limit`` without one), else only the first: seven
    variants of a 560M-parameter ranker would hold well over 10 GB."""
    if requested == "all":
        return list(fastest_first)
    if requested == "auto":
        limit = budget or auto_limit
        if shared_bytes() + sum(estimates.values()) <= limit:
            return list(fastest_first)
        return fastest_first[:1]
    names = [v.strip() for v in requested.split(",") if v.strip()]
    unknown = [n for n in names if n not in estimates]
    if unknown or not names:
        raise BuildError(f"--load {requested!r}: {unknown or 'nothing'} not among the variants built and served on CPU "
                         f"({', '.join(fastest_first)})")
    return [n for n in fastest_first if n in names]

