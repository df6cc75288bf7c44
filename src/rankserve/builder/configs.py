"""Triton model configurations, generated from the settings as ``ModelConfig`` protobuf messages.

Using Triton's own protobuf schema (shipped in ``tritonclient``) means every field name and enum is
checked when the config is built, and :func:`parse` reads a ``config.pbtxt`` back for verification.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from rankserve import api
from rankserve.api import TensorSpec
from rankserve.builder import engine as engine_files
from rankserve.settings import BuildSettings, RuntimeSettings, TokenizeSettings, to_parameters


def _io(message_list, specs: Iterable[TensorSpec]) -> None:
    for spec in specs:
        entry = message_list.add(name=spec.name, data_type=mc.DataType.Value(f"TYPE_{spec.dtype}"))
        entry.dims.extend(spec.dims)
        if spec.optional and hasattr(entry, "optional"):
            entry.optional = True


def python_model(
    name: str,
    inputs: Iterable[TensorSpec],
    outputs: Iterable[TensorSpec],
    parameters: Mapping[str, str] | None = None,
    instances: int = 1,
    queue_size: int = 0,
) -> mc.ModelConfig:
    """A Python-backend model on CPU, without Triton batching (the request is the batch).

    ``queue_size``: at most this many requests wait for an instance; beyond it Triton refuses at
    once (0: unbounded). Triton reads the queue policy only from ``dynamic_batching``; with
    ``max_batch_size: 0`` its scheduler still hands the model one request at a time (Triton 2.51,
    tried: the stages load and serve, and a full queue is refused with "Exceeds maximum queue size")."""
    config = mc.ModelConfig(name=name, backend="python", max_batch_size=0)
    _io(config.input, inputs)
    _io(config.output, outputs)
    if queue_size:
        config.dynamic_batching.default_queue_policy.max_queue_size = queue_size
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=instances)
    for key, value in (parameters or {}).items():
        config.parameters[key].string_value = value
    return config


def _batching(config: mc.ModelConfig, settings: BuildSettings) -> None:
    """Dynamic batching with a bounded queue: overload is refused at once, not queued forever. No
    queue timeout: in Triton's batcher a default timeout has been reported to erode throughput over
    time (server issue 8870), and the bounded queue already bounds the wait."""
    config.dynamic_batching.max_queue_delay_microseconds = settings.batching.max_queue_delay_us
    if settings.batching.max_queue_size:
        config.dynamic_batching.default_queue_policy.max_queue_size = settings.batching.max_queue_size


def batched_rank_model(name: str, settings: BuildSettings, parameters: Mapping[str, str]) -> mc.ModelConfig:
    """The rank stage with Triton dynamic batching: the batch dimension is the pair, so requests
    (each [pairs, tokens]) queue together and the stage scores them in length-sorted token-budget
    batches; logits come back as [pairs, 1].

    The inputs allow ragged batches: each request is padded only to its own longest pair, so two
    requests rarely share a token dimension, and without this Triton's batcher only groups requests
    of equal shape (in 2.51 it also busy-waits on the mismatch while the instance is busy: half a
    core measured). The Python backend hands the stage each request's tensors as they are; the
    stage re-pads them per batch itself."""
    config = mc.ModelConfig(name=name, backend="python", max_batch_size=settings.tokenize.max_candidates)
    _io(config.input, (TensorSpec(t.name, t.dtype, (-1,)) for t in api.ENCODED))
    for entry in config.input:
        entry.allow_ragged_batch = True
    _io(config.output, [TensorSpec(api.LOGITS.name, api.LOGITS.dtype, (1,))])  # [pairs, 1]
    _batching(config, settings)
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=settings.rank_instances)
    if settings.warmup.pairs:
        warmup = config.model_warmup.add(name=f"{settings.warmup.pairs}_pairs_of_{settings.warmup.tokens}_tokens",
                                         batch_size=settings.warmup.pairs)
        for t in api.ENCODED:
            entry = warmup.inputs[t.name]
            entry.data_type = mc.DataType.Value(f"TYPE_{t.dtype}")
            entry.dims.append(settings.warmup.tokens)
            entry.input_data_file = t.name
    for key, value in {**parameters, **to_parameters(settings.batching), "max_pairs": str(settings.tokenize.max_candidates),
                       "max_length": str(settings.tokenize.max_length)}.items():
        config.parameters[key].string_value = value
    return config


WARMUP_DIR = "warmup"
"""Triton reads ``model_warmup`` input files from this folder of the model."""


def warmup_data(settings: BuildSettings) -> dict[str, bytes]:
    """The warmup input files of a CPU rank model: one pair of ``tokens`` tokens, row-major INT64
    (Triton sends it ``pairs`` times): token id 1 everywhere (in every vocabulary), attention on
    every token, the second half as the product text."""
    import numpy as np

    n = settings.warmup.tokens
    types = np.zeros(n, np.int64)
    types[n // 2:] = 1
    return {"input_ids": np.ones(n, np.int64).tobytes(), "attention_mask": np.ones(n, np.int64).tobytes(),
            "token_type_ids": types.tobytes()}


def write_warmup(model_dir: Path, config: mc.ModelConfig, settings: BuildSettings) -> list[Path]:
    """Write the files ``config``'s warmup reads (none when it has no warmup)."""
    if not config.model_warmup:
        return []
    folder = Path(model_dir) / WARMUP_DIR
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in warmup_data(settings).items():
        (folder / name).write_bytes(data)
        written.append(folder / name)
    return written


def tensorrt_rank_model(name: str, settings: BuildSettings, input_names: Sequence[str],
                        plan_files: Mapping[str, str] | None = None) -> mc.ModelConfig:
    """The rank stage as a TensorRT plan on the GPU: the pair is the batch dimension (up to the
    profiles' largest batch), every optimization profile is offered to the instance (for each batch
    Triton picks, among the profiles that accept its shape, the one whose opt shape is nearest),
    dynamic batching merges requests of equal width.

    ``input_names`` are the engine's inputs, read from the ONNX file it was built from (rankers
    without ``token_type_ids`` have two). ``logits`` is ``[pairs]`` in the engine; the config
    declares dims ``[1]`` with an empty ``reshape`` so the ensemble sees ``[pairs, 1]``, as from the
    CPU rank stage, while Triton compares ``[-1]`` with the engine (tensorrt_backend
    ``CompareDimsSupported``; core accepts an empty reshape for dims ``[1]`` when batching).
    ``plan_files`` maps a compute capability to its plan (``cc_model_filenames``); a GPU not listed
    loads ``model.plan``, where a hardware-compatible (Ampere+) engine is written."""
    engine = settings.engine
    config = mc.ModelConfig(name=name, platform="tensorrt_plan", max_batch_size=engine.max_pairs)
    _io(config.input, (TensorSpec(t.name, t.dtype, (-1,)) for t in _encoded(input_names)))
    _io(config.output, [TensorSpec(api.LOGITS.name, api.LOGITS.dtype, (1,))])
    config.output[0].reshape.SetInParent()  # reshape { } : [pairs] in the engine, [pairs, 1] outside
    group = config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=1)
    group.profile.extend(str(i) for i in range(len(engine.profiles)))
    _batching(config, settings)
    config.default_model_filename = engine_files.DEFAULT_PLAN
    for cc, filename in sorted((plan_files or {}).items()):
        config.cc_model_filenames[cc] = filename
    return config


def _encoded(input_names: Sequence[str]) -> tuple[TensorSpec, ...]:
    """The encoded tensors a model takes, in ``api.ENCODED`` order; unknown names are an error."""
    known = {t.name: t for t in api.ENCODED}
    unknown = [n for n in input_names if n not in known]
    if unknown or not {"input_ids", "attention_mask"} <= set(input_names):
        raise ValueError(f"a rank model takes input_ids, attention_mask and optionally token_type_ids; got {list(input_names)}")
    return tuple(t for t in api.ENCODED if t.name in input_names)


def ensemble(name: str, rank_model: str, tokenize_model: str = api.TOKENIZE_MODEL,
             rank_inputs: Sequence[str] = api.MODEL_INPUT_NAMES, response_cache: bool = False) -> mc.ModelConfig:
    """The public ``ranker`` API wired as ``tokenize_model`` -> ``rank_model`` -> postprocess; only
    the encoded tensors the rank model takes (``rank_inputs``) flow between the first two. The
    tokenize step's ``token_counts`` is an output of the ensemble as it is.

    ``response_cache``: the ensemble's answers may be kept in the server's response cache, keyed by
    the ensemble's name, version and inputs (query, texts, top_k). Triton 2.51 caches top-level
    ensemble requests (a hit skips every step) and ignores the flag on a server without a cache."""
    config = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=0)
    if response_cache:
        config.response_cache.enable = True
    _io(config.input, api.RANKER_INPUTS)
    _io(config.output, (*api.RANKER_OUTPUTS, *api.RANKER_EXTRA_OUTPUTS))
    encoded = [t.name for t in _encoded(rank_inputs)]
    steps = config.ensemble_scheduling.step
    tokenize = steps.add(model_name=tokenize_model, model_version=-1)
    tokenize.input_map.update({api.QUERY.name: api.QUERY.name, api.TEXTS.name: api.TEXTS.name})
    tokenize.output_map.update({t: t for t in (*encoded, api.TOKEN_COUNTS.name)})
    rank = steps.add(model_name=rank_model, model_version=-1)
    rank.input_map.update({t: t for t in encoded})
    rank.output_map.update({api.LOGITS.name: api.LOGITS.name})
    post = steps.add(model_name=api.POSTPROCESS_MODEL, model_version=-1)
    post.input_map.update({api.LOGITS.name: api.LOGITS.name, api.TOP_K.name: api.TOP_K.name})
    post.output_map.update({t.name: t.name for t in api.RANKER_OUTPUTS})
    return config


TOKENIZE_OUTPUTS = (*api.ENCODED, api.TOKEN_COUNTS)
"""The tokenize stages' outputs: the encoded pairs and the request's token counts."""


def rank_model_name(variant: str, default: str) -> str:
    """``rank`` for the default variant (its tracked adapter folder), ``rank_<variant>`` otherwise."""
    return api.RANK_MODEL if variant == default else f"{api.RANK_MODEL}_{variant}"


def ranker_model_name(variant: str) -> str:
    return f"{api.RANKER_MODEL}_{variant}"


def cpu_repository(settings: BuildSettings, runtimes: Mapping[str, RuntimeSettings], default: str) -> dict[str, mc.ModelConfig]:
    """Every model of the CPU repository: tokenize, postprocess, one rank model and one ``ranker_<v>``
    ensemble per variant, and ``ranker`` wired to the ``default`` variant (whose rank model is ``rank``)."""
    if default not in runtimes:
        raise ValueError(f"default variant {default!r} is not among {sorted(runtimes)}")
    models = {
        api.TOKENIZE_MODEL: python_model(
            api.TOKENIZE_MODEL, (api.QUERY, api.TEXTS), TOKENIZE_OUTPUTS, to_parameters(settings.tokenize),
            instances=settings.tokenize.instances, queue_size=settings.tokenize.queue_size,
        ),
        api.POSTPROCESS_MODEL: python_model(
            api.POSTPROCESS_MODEL, (TensorSpec(api.LOGITS.name, api.LOGITS.dtype, (-1, 1)), api.TOP_K), api.RANKER_OUTPUTS,
            {"max_candidates": str(settings.tokenize.max_candidates)},
        ),
    }
    for variant, runtime in runtimes.items():
        rank = rank_model_name(variant, default)
        parameters = {**to_parameters(settings.ort), **to_parameters(runtime), "variant": variant}
        models[rank] = batched_rank_model(rank, settings, parameters)
        models[ranker_model_name(variant)] = ensemble(ranker_model_name(variant), rank, response_cache=settings.response_cache)
    models[api.RANKER_MODEL] = ensemble(api.RANKER_MODEL, api.RANK_MODEL, response_cache=settings.response_cache)
    return models


def to_text(config: mc.ModelConfig) -> str:
    return "# Generated by `rankserve build` from rankserve.settings; do not edit.\n" + text_format.MessageToString(config)


def parse(path_or_text: str | Path) -> mc.ModelConfig:
    text = Path(path_or_text).read_text() if isinstance(path_or_text, Path) else path_or_text
    return text_format.Parse(text, mc.ModelConfig())


GPU_TOKENIZE_MODEL = f"{api.TOKENIZE_MODEL}_gpu"


def gpu_tokenize_settings(settings: BuildSettings) -> TokenizeSettings:
    """Tokenize for the TensorRT ensembles: requests padded to the profiles' widths, so they share
    the few shapes TensorRT batches (and each lands in the profile built for it)."""
    widths = sorted({p.max[1] for p in settings.engine.profiles})
    return dataclasses.replace(settings.tokenize, pad_buckets=",".join(map(str, widths)))


def engine_plan_files(records: Iterable[Mapping]) -> dict[str, str]:
    """``cc_model_filenames`` of one engine family: compute capability -> plan file of the engines
    built for one GPU type (a hardware-compatible engine is ``model.plan``, found on any GPU)."""
    return {r["gpu"]["compute_capability"]: Path(r["plan_file"]).name for r in records
            if r.get("hardware_compatibility", "none") == "none"}


def gpu_models(settings: BuildSettings, engines: Mapping[str, Sequence[Mapping]]) -> dict[str, mc.ModelConfig]:
    """``tokenize_gpu``, and one TensorRT rank model and one ``ranker_trt_<precision>`` ensemble per
    engine family the manifest records (``engines``: precision -> engine records, whose ``inputs``
    were read from the ONNX file each engine was built from); postprocess is the CPU repository's."""
    models = {GPU_TOKENIZE_MODEL: python_model(GPU_TOKENIZE_MODEL, (api.QUERY, api.TEXTS), TOKENIZE_OUTPUTS,
                                               to_parameters(gpu_tokenize_settings(settings)),
                                               instances=settings.tokenize.instances,
                                               queue_size=settings.tokenize.queue_size)}
    for precision, records in sorted(engines.items()):
        inputs = records[0]["inputs"]
        if any(r["inputs"] != inputs for r in records):
            raise ValueError(f"the {precision} engines disagree on their inputs: {[r['inputs'] for r in records]}")
        rank, public = engine_files.engine_model_name(precision), engine_files.engine_ensemble_name(precision)
        models[rank] = tensorrt_rank_model(rank, settings, inputs, engine_plan_files(records))
        models[public] = ensemble(public, rank, GPU_TOKENIZE_MODEL, inputs, response_cache=settings.response_cache)
    return models
