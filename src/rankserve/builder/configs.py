"""Triton model configurations, generated from the settings as ``ModelConfig`` protobuf messages.

Using Triton's own protobuf schema (shipped in ``tritonclient``) means every field name and enum is
checked when the config is built, and :func:`parse` reads a ``config.pbtxt`` back for verification.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable, Mapping

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from rankserve import api
from rankserve.api import TensorSpec
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
) -> mc.ModelConfig:
    """A Python-backend model on CPU, without Triton batching (the request is the batch)."""
    config = mc.ModelConfig(name=name, backend="python", max_batch_size=0)
    _io(config.input, inputs)
    _io(config.output, outputs)
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
    for key, value in {**parameters, **to_parameters(settings.batching),
                       "max_pairs": str(settings.tokenize.max_candidates)}.items():
        config.parameters[key].string_value = value
    return config


def tensorrt_rank_model(name: str, settings: BuildSettings, compute_capabilities: Iterable[str] = ()) -> mc.ModelConfig:
    """The rank stage as a TensorRT plan on the GPU: the pair is the batch dimension (up to the
    profiles' largest batch), every optimization profile is offered to the instance (Triton picks
    the one that fits each batch), dynamic batching merges requests of equal width. With compute
    capabilities, one plan file per GPU type (``cc_model_filenames``); else ``model.plan``."""
    from rankserve.builder.engine import plan_filename

    engine = settings.engine
    config = mc.ModelConfig(name=name, platform="tensorrt_plan", max_batch_size=engine.max_pairs)
    _io(config.input, (TensorSpec(t.name, t.dtype, (-1,)) for t in api.ENCODED))
    _io(config.output, [TensorSpec(api.LOGITS.name, api.LOGITS.dtype, (1,))])
    group = config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=1)
    group.profile.extend(str(i) for i in range(len(engine.profiles)))
    _batching(config, settings)
    config.default_model_filename = "model.plan"
    for cc in compute_capabilities:
        config.cc_model_filenames[cc] = plan_filename(cc)
    return config


def ensemble(name: str, rank_model: str, tokenize_model: str = api.TOKENIZE_MODEL) -> mc.ModelConfig:
    """The public ``ranker`` API wired as ``tokenize_model`` -> ``rank_model`` -> postprocess."""
    config = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=0)
    _io(config.input, api.RANKER_INPUTS)
    _io(config.output, api.RANKER_OUTPUTS)
    steps = config.ensemble_scheduling.step
    tokenize = steps.add(model_name=tokenize_model, model_version=-1)
    tokenize.input_map.update({api.QUERY.name: api.QUERY.name, api.TEXTS.name: api.TEXTS.name})
    tokenize.output_map.update({t.name: t.name for t in api.ENCODED})
    rank = steps.add(model_name=rank_model, model_version=-1)
    rank.input_map.update({t.name: t.name for t in api.ENCODED})
    rank.output_map.update({api.LOGITS.name: api.LOGITS.name})
    post = steps.add(model_name=api.POSTPROCESS_MODEL, model_version=-1)
    post.input_map.update({api.LOGITS.name: api.LOGITS.name, api.TOP_K.name: api.TOP_K.name})
    post.output_map.update({t.name: t.name for t in api.RANKER_OUTPUTS})
    return config


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
            api.TOKENIZE_MODEL, (api.QUERY, api.TEXTS), api.ENCODED, to_parameters(settings.tokenize)
        ),
        api.POSTPROCESS_MODEL: python_model(
            api.POSTPROCESS_MODEL, (TensorSpec(api.LOGITS.name, api.LOGITS.dtype, (-1, 1)), api.TOP_K), api.RANKER_OUTPUTS
        ),
    }
    for variant, runtime in runtimes.items():
        rank = rank_model_name(variant, default)
        parameters = {**to_parameters(settings.ort), **to_parameters(runtime), "variant": variant}
        models[rank] = batched_rank_model(rank, settings, parameters)
        models[ranker_model_name(variant)] = ensemble(ranker_model_name(variant), rank)
    models[api.RANKER_MODEL] = ensemble(api.RANKER_MODEL, api.RANK_MODEL)
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


def gpu_models(settings: BuildSettings, compute_capabilities: Iterable[str] = ()) -> dict[str, mc.ModelConfig]:
    """``tokenize_gpu``, and one TensorRT rank model and one ``ranker_trt_<precision>`` ensemble per
    engine precision (postprocess is the CPU repository's, shared)."""
    from rankserve.builder.engine import engine_ensemble_name, engine_model_name

    ccs = tuple(compute_capabilities)
    models = {GPU_TOKENIZE_MODEL: python_model(GPU_TOKENIZE_MODEL, (api.QUERY, api.TEXTS), api.ENCODED,
                                               to_parameters(gpu_tokenize_settings(settings)))}
    for precision in settings.engine.precisions:
        rank = engine_model_name(precision)
        models[rank] = tensorrt_rank_model(rank, settings, ccs)
        models[engine_ensemble_name(precision)] = ensemble(engine_ensemble_name(precision), rank, GPU_TOKENIZE_MODEL)
    return models
