"""Load a Hugging Face cross-encoder, export it to ONNX, and check the export against PyTorch."""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rankserve.api import LOGITS, MODEL_INPUT_NAMES
from rankserve.errors import BuildError
from rankserve.settings import BuildSettings, CheckSettings


ENCODER_ARCHITECTURES = frozenset({"bert", "roberta", "xlm-roberta", "distilbert", "modernbert", "deberta-v2"})
"""Cross-encoders (``model_type``) built, checked and served in the test suite."""
DECODER_ARCHITECTURES = frozenset({"qwen2", "qwen3", "llama", "mistral", "gemma", "gemma2", "gemma3_text", "phi3"})
"""Decoder-only rerankers served as sequence classifiers (last-token pooling), tested the same way."""


def architecture_family(model_type: str) -> str:
    """``encoder``, ``decoder``, or ``untested`` (still built: the numeric and served-path checks decide)."""
    if model_type in ENCODER_ARCHITECTURES:
        return "encoder"
    return "decoder" if model_type in DECODER_ARCHITECTURES else "untested"


@dataclass
class LoadedRanker:
    model: object  # transformers PreTrainedModel in eval mode
    tokenizer: object  # transformers fast tokenizer
    input_names: tuple[str, ...]  # the subset of MODEL_INPUT_NAMES the model takes
    source: Path

    @property
    def family(self) -> str:
        return architecture_family(self.model.config.model_type)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def load_options(source: str | Path) -> dict:
    """The options of every ``from_pretrained`` of a model directory: its own Python code is never
    run (``trust_remote_code=False``), and its safetensors weights are read when it has them
    (``use_safetensors=True``: a pickle checkpoint beside them is never unpickled; a directory with
    only a pickle checkpoint is still read, by Transformers' restricted loader)."""
    return {"trust_remote_code": False, "use_safetensors": True if any(Path(source).glob("*.safetensors")) else None}


def _load_weights(auto_class, source: Path):
    """The model with every weight from ``source``; a missing, truncated or partial checkpoint is
    a :class:`BuildError` (Hugging Face would fill missing tensors with random values, with only
    a warning, and the build would ship a ranker that scores at random)."""
    try:
        try:
            model, info = auto_class.from_pretrained(source, attn_implementation="eager", output_loading_info=True,
                                                     **load_options(source))
        except TypeError:  # architectures without an eager/attn switch
            model, info = auto_class.from_pretrained(source, output_loading_info=True, **load_options(source))
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad ranker directory
        raise BuildError(f"cannot load the ranker's weights from {source}: {_first_line(exc)}") from None
    missing = list(info.get("missing_keys", []))
    if missing:
        raise BuildError(f"the weights in {source} lack {len(missing)} tensors the model needs ({', '.join(missing[:3])}...): "
                         "a partial or mismatched checkpoint; retrain or re-save the ranker")
    return model.eval()


def load_ranker(ranker_dir: str | Path, settings: BuildSettings) -> LoadedRanker:
    """Load any ``*ForSequenceClassification`` directory with one output logit and a fast tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    source = Path(ranker_dir)
    if not (source / "config.json").exists():
        raise BuildError(f"{source} is not a Hugging Face model directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - a corrupt config.json is a bad ranker directory
        raise BuildError(f"cannot read {source / 'config.json'}: {_first_line(exc)}") from None
    if config.num_labels != 1:
        raise BuildError(
            f"{source} has {config.num_labels} output labels; a cross-encoder ranker must have exactly one "
            "(num_labels=1, one relevance logit per pair)"
        )
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and settings.tokenize.max_length > limit:
        raise BuildError(f"tokenize.max_length {settings.tokenize.max_length} exceeds the model's {limit} positions")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, use_fast=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad ranker directory
        raise BuildError(f"cannot load a tokenizer from {source}: {exc}") from exc
    if not getattr(tokenizer, "is_fast", False) or tokenizer.pad_token_id is None:
        raise BuildError(f"{source} needs a fast tokenizer with a pad token (tokenizer.json)")
    model = _load_weights(AutoModelForSequenceClassification, source)
    if getattr(model.config, "pad_token_id", None) is None:
        # decoder rerankers pool the last token that is not padding, found by the pad id: without
        # one, Hugging Face refuses batches (and so would the export); the tokenizer's is the one
        model.config.pad_token_id = tokenizer.pad_token_id
    # Inputs both the tokenizer produces and the model's forward takes (DistilBERT, RoBERTa-style
    # rankers have no token_type_ids; the rank stage then ignores that tensor).
    produced = set(tokenizer.model_input_names)
    taken = set(inspect.signature(model.forward).parameters)
    names = tuple(n for n in MODEL_INPUT_NAMES if n in produced and n in taken)
    if "input_ids" not in names or "attention_mask" not in names:
        raise BuildError(f"{source}: the inputs both tokenizer and model take, {list(names)}, lack input_ids/attention_mask")
    return LoadedRanker(model, tokenizer, names, source)


def _wrapped(ranker: LoadedRanker):
    """A module with positional inputs in ``input_names`` order and one output: logits [batch]."""
    import torch

    names = ranker.input_names
    pad = getattr(ranker.model.config, "pad_token_id", None)

    class Scorer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = ranker.model

        def forward(self, *inputs):
            feeds = dict(zip(names, inputs))
            if pad is not None:
                # Padded positions carry the pad id whatever the caller filled them with (the rank
                # stage re-pads batches with 0): decoder rerankers pool the last non-pad token by id.
                feeds["input_ids"] = torch.where(feeds["attention_mask"].bool(), feeds["input_ids"],
                                                 torch.full_like(feeds["input_ids"], int(pad)))
            return self.model(**feeds).logits[:, 0]

    return Scorer().eval()


def random_inputs(ranker: LoadedRanker, batch: int, length: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Fresh token ids shaped like real pairs: [CLS] q [SEP] t [SEP], right-padded to ``length``."""
    tok = ranker.tokenizer
    vocab = len(tok)
    special = set(tok.all_special_ids)
    ids = np.full((batch, length), tok.pad_token_id, dtype=np.int64)
    mask = np.zeros((batch, length), dtype=np.int64)
    types = np.zeros((batch, length), dtype=np.int64)
    for row in range(batch):
        n = length if row == 0 else int(rng.integers(4, length + 1))  # one full row, others padded
        body = rng.integers(0, vocab, size=n)
        body = np.array([t if t not in special else tok.unk_token_id or 0 for t in body], dtype=np.int64)
        split = int(rng.integers(2, max(3, n - 1)))
        body[0] = tok.cls_token_id if tok.cls_token_id is not None else body[0]
        body[split - 1] = body[n - 1] = tok.sep_token_id if tok.sep_token_id is not None else body[n - 1]
        ids[row, :n] = body
        mask[row, :n] = 1
        types[row, split:n] = 1
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return {name: feeds[name] for name in ranker.input_names}


def torch_scores(ranker: LoadedRanker, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import torch

    with torch.inference_mode():
        out = _wrapped(ranker)(*(torch.from_numpy(feeds[n]) for n in ranker.input_names))
    return out.float().numpy()


def export_onnx(ranker: LoadedRanker, path: str | Path, opset: int) -> Path:
    """Export with dynamic batch and sequence axes; the output is ``logits`` FP32 [batch]."""
    import onnx
    import torch

    from rankserve.builder import onnx_files

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = random_inputs(ranker, 2, 16, np.random.default_rng(0))
    dynamic = {name: {0: "batch", 1: "sequence"} for name in ranker.input_names}
    dynamic[LOGITS.name] = {0: "batch"}
    # Over 2 GB the exporter writes one file per weight next to the graph: it writes into a folder
    # of its own, and the result is rewritten as path (+ path.data) and moved into place.
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    staged = staging / path.name
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The tracer warns about Python-side branches in transformers' masking code; the numeric
            # check at several (batch, length) shapes is what proves the traced graph is right.
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message="Exporting aten::index operator")
            torch.onnx.export(
                _wrapped(ranker),
                tuple(torch.from_numpy(example[n]) for n in ranker.input_names),
                str(staged),
                input_names=list(ranker.input_names),
                output_names=[LOGITS.name],
                dynamic_axes=dynamic,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,  # the TorchScript exporter gives the graph ORT's transformer fusions expect
            )
        onnx_files.normalize(staged)
        onnx_files.check(staged)
        # the exporter drops inputs the graph never reads (DeBERTa-v3 without token types): the
        # ranker's inputs are the graph's
        graph_inputs = [i.name for i in onnx.load(str(staged), load_external_data=False).graph.input]
        ranker.input_names = tuple(n for n in ranker.input_names if n in graph_inputs)
        onnx_files.data_path(path).unlink(missing_ok=True)
        for file in onnx_files.model_files(staged)[::-1]:  # weights first, the graph last
            os.replace(file, path.parent / file.name)
    except Exception as exc:  # noqa: BLE001 - any exporter failure is a build failure
        raise BuildError(f"ONNX export of {ranker.source} failed: {_first_line(exc)}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


@dataclass(frozen=True)
class ShapeCheck:
    batch: int
    length: int
    max_abs_diff: float
    same_ranking: bool


def _same_ranking(reference: np.ndarray, candidate: np.ndarray, atol: float) -> bool:
    """Every pair the reference orders by more than ``atol`` is ordered the same way by the candidate."""
    ref_gap = reference[:, None] - reference[None, :]
    cand_gap = candidate[:, None] - candidate[None, :]
    decided = np.abs(ref_gap) > atol
    return bool(np.all(np.sign(ref_gap[decided]) == np.sign(cand_gap[decided])))


def check_onnx(ranker: LoadedRanker, onnx_path: str | Path, settings: CheckSettings) -> list[ShapeCheck]:
    """Compare ONNX Runtime with PyTorch on fresh inputs at every configured (batch, length).

    Raises :class:`BuildError` naming the shape and the figures when the maximum absolute difference
    exceeds ``settings.atol`` or the ranking differs.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(settings.seed)
    results = []
    for batch, length in settings.shapes:
        feeds = random_inputs(ranker, batch, length, rng)
        expected = torch_scores(ranker, feeds)
        (got,) = session.run([LOGITS.name], feeds)
        diff = float(np.max(np.abs(expected - got)))
        check = ShapeCheck(batch, length, diff, _same_ranking(expected, got, settings.atol))
        results.append(check)
        if diff > settings.atol or not check.same_ranking:
            raise BuildError(
                f"numeric check failed for {onnx_path} at batch={batch}, length={length}: max abs difference "
                f"{diff:.3g} (limit {settings.atol:g}), rankings {'identical' if check.same_ranking else 'DIFFER'}; "
                "the ONNX model does not reproduce the PyTorch ranker"
            )
    return results


SERVING_CHECK_REQUESTS = (
    ("velvet sofa", ("Mercury Row blue velvet sofa with rolled arms and tufted back cushions", "oak coffee table",
                     "sofa", "Three-seat sectional sofa in grey velvet, reversible chaise, solid wood legs, 96 inches wide")),
    ("outdoor string lights waterproof", ("48 ft LED string lights, shatterproof Edison bulbs, IP65 waterproof, dimmable",
                                          "lamp", "garden solar lights", "queen bed frame")),
)
"""Two requests of product-search pairs of very different lengths: the rank stage batches them
together and re-pads each pair to the longest of its call."""


def check_serving(ranker: LoadedRanker, onnx_path: str | Path, tokenizer, batching, atol: float,
                  requests=SERVING_CHECK_REQUESTS) -> float:
    """The served path against the ground truth: pairs encoded by the serving tokenizer and scored
    by the rank stage (requests batched together, pairs re-padded, see :func:`rank_batch`) against
    PyTorch on each pair alone, unpadded, tokenized by Hugging Face. Catches what the numeric check
    cannot: padding that a model reads (a decoder pools the last non-pad token). Returns the
    largest difference; raises :class:`BuildError` over ``atol``."""
    import torch

    from rankserve.settings import OrtSettings, RuntimeSettings
    from rankserve.stages.rank import create_ranker, rank_batch
    from rankserve.stages.tokenize import encode_pairs

    scorer = create_ranker(onnx_path, RuntimeSettings(), OrtSettings())
    encoded = [encode_pairs(tokenizer, q, texts) for q, texts in requests]
    outcomes = rank_batch(scorer, encoded, batching.max_batch_tokens, 1000)
    worst = 0.0
    for (query, texts), outcome in zip(requests, outcomes):
        if isinstance(outcome, Exception):
            raise BuildError(f"serving check: the rank stage refused the pairs of {query!r}: {outcome}")
        served = outcome["logits"].reshape(-1)
        for text, got in zip(texts, served):
            alone = ranker.tokenizer(query, text, truncation=True, max_length=tokenizer.truncation["max_length"],
                                     return_tensors="pt")
            with torch.inference_mode():
                expected = float(ranker.model(**{n: alone[n] for n in ranker.input_names if n in alone}).logits[0, 0])
            worst = max(worst, abs(expected - float(got)))
    if worst > atol:
        raise BuildError(f"serving check failed: pairs scored by the rank stage (batched, re-padded) differ from PyTorch "
                         f"on each pair alone by up to {worst:.3g} (limit {atol:g}); the model reads its padding")
    return worst
