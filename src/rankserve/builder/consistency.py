"""Each generated ``config.pbtxt`` checked against the ONNX model it serves, by the rules Triton applies.

Triton refuses a model whose config disagrees with it only when the model loads: on a GPU host,
for a TensorRT plan, at first contact. These checks run at build time and in the tests on the real
ONNX files, and follow what Triton r24.10 does:

- core (``model_config_utils.cc``): a ``reshape`` has the element count of ``dims``; an empty
  reshape only for dims ``[1]`` of a batching model;
- tensorrt_backend (``CompareDimsSupported``): the engine's shape is the config's shape (``reshape``
  when present, else ``dims``) after a batch dimension when ``max_batch_size > 0``, a ``-1`` on
  either side matching anything; every engine input is in the config and the reverse; data types
  equal. A TensorRT engine has the ONNX file's inputs and outputs, dynamic axes as ``-1``;
- ensembles (core ``ensemble_utils.cc``): a tensor passed between steps has one data type and
  compatible shapes (batch dimension included) on both sides;
- the Python rank stage: it feeds the ONNX model only the inputs the model has, [pairs, tokens],
  and returns one logit per pair as ``[pairs, 1]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from rankserve.errors import BuildError

_ONNX_TO_TRITON = {1: "FP32", 10: "FP16", 16: "BF16", 6: "INT32", 7: "INT64", 9: "BOOL", 8: "STRING"}


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # Triton's name without TYPE_: FP32, INT64, ...
    shape: tuple[int, ...]  # -1 for a dynamic axis


@dataclass(frozen=True)
class Signature:
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)


def onnx_signature(path: str | Path) -> Signature:
    """Inputs and outputs of an ONNX file (its graph only: external weights are not read)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}

    def tensors(values) -> tuple[Tensor, ...]:
        out = []
        for v in values:
            if v.name in initializers:
                continue
            t = v.type.tensor_type
            shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
            out.append(Tensor(v.name, _ONNX_TO_TRITON.get(t.elem_type, f"onnx-type-{t.elem_type}"), shape))
        return tuple(out)

    return Signature(tensors(model.graph.input), tensors(model.graph.output))


def _dtype(io) -> str:
    return mc.DataType.Name(io.data_type).removeprefix("TYPE_")


def _compatible(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) == len(b) and all(x == y or x == -1 or y == -1 for x, y in zip(a, b))


def reshape_problems(config: mc.ModelConfig) -> list[str]:
    """Triton core's rules for ``reshape`` (checked when the model config is loaded)."""
    problems = []
    for io in [*config.input, *config.output]:
        if not io.HasField("reshape"):
            continue
        dims, shape = list(io.dims), list(io.reshape.shape)
        where = f"{config.name}: '{io.name}'"
        if not shape:
            if config.max_batch_size == 0:
                problems.append(f"{where}: an empty reshape needs a batching model (max_batch_size > 0)")
            elif dims != [1]:
                problems.append(f"{where}: an empty reshape is only allowed for dims [1], got {dims}")
        elif -1 not in dims and -1 not in shape and math.prod(dims) != math.prod(shape):
            problems.append(f"{where}: dims {dims} and reshape {shape} hold different element counts")
    return problems


def _model_shape(config: mc.ModelConfig, io) -> tuple[int, ...]:
    """The shape the backend compares with the model: batch dimension first when batching."""
    shape = tuple(io.reshape.shape) if io.HasField("reshape") else tuple(io.dims)
    return ((-1,) if config.max_batch_size > 0 else ()) + shape


def _full_dims(config: mc.ModelConfig, io) -> tuple[int, ...]:
    """The shape other models see (ensembles): batch dimension first when batching, then ``dims``."""
    return ((-1,) if config.max_batch_size > 0 else ()) + tuple(io.dims)


def tensorrt_problems(config: mc.ModelConfig, model: Signature) -> list[str]:
    """What tensorrt_backend would refuse when loading an engine built from ``model`` with ``config``."""
    problems = reshape_problems(config)
    for kind, declared, actual in (("input", config.input, model.inputs), ("output", config.output, model.outputs)):
        engine = {t.name: t for t in actual}
        names = {io.name for io in declared}
        problems += [f"{config.name}: the engine has {kind} '{n}' that the config does not declare" for n in engine if n not in names]
        for io in declared:
            if io.name not in engine:
                problems.append(f"{config.name}: {kind} '{io.name}' is not an engine {kind} (it has {sorted(engine)})")
                continue
            t = engine[io.name]
            if _dtype(io) != t.dtype:
                problems.append(f"{config.name}: {kind} '{io.name}' is TYPE_{t.dtype} in the engine, TYPE_{_dtype(io)} in the config")
            expected = _model_shape(config, io)
            if not _compatible(t.shape, expected):
                problems.append(f"{config.name}: {kind} '{io.name}': the engine's shape is {list(t.shape)}, the config makes "
                                f"{list(expected)} (max_batch_size {config.max_batch_size}, dims {list(io.dims)}"
                                f"{', reshape ' + str(list(io.reshape.shape)) if io.HasField('reshape') else ''})")
    return problems


def python_rank_problems(config: mc.ModelConfig, model: Signature) -> list[str]:
    """The Python rank stage's contract with its ONNX file: the model's inputs are config inputs
    of the same type and [pairs, tokens]; its one output is a logit per pair, served as [pairs, 1]."""
    problems = reshape_problems(config)
    declared = {io.name: io for io in config.input}
    for t in model.inputs:
        io = declared.get(t.name)
        if io is None:
            problems.append(f"{config.name}: the model's input '{t.name}' is not a config input ({sorted(declared)})")
        elif _dtype(io) != t.dtype or not _compatible(t.shape, _model_shape(config, io)):
            problems.append(f"{config.name}: input '{t.name}' is TYPE_{t.dtype} {list(t.shape)} in the model, "
                            f"TYPE_{_dtype(io)} {list(_model_shape(config, io))} in the config")
    outputs = {t.name: t for t in model.outputs}
    for io in config.output:
        t = outputs.get(io.name)
        if t is None:
            problems.append(f"{config.name}: output '{io.name}' is not a model output ({sorted(outputs)})")
        elif _dtype(io) != t.dtype or not (len(t.shape) == 1 and list(io.dims) == [1] and config.max_batch_size > 0):
            problems.append(f"{config.name}: output '{io.name}' is TYPE_{t.dtype} {list(t.shape)} in the model; the stage "
                            f"serves one logit per pair as [pairs, 1] (TYPE_{_dtype(io)}, dims {list(io.dims)})")
    return problems


def ensemble_problems(models: Mapping[str, mc.ModelConfig]) -> list[str]:
    """Every tensor passed between an ensemble's steps has one type and compatible shapes on both
    sides, and every required step input and every ensemble output is produced."""
    problems = []
    for ensemble in (c for c in models.values() if c.platform == "ensemble"):
        available = {io.name: (_dtype(io), _full_dims(ensemble, io), ensemble.name) for io in ensemble.input}
        for step in ensemble.ensemble_scheduling.step:
            model = models.get(step.model_name)
            if model is None:
                problems.append(f"{ensemble.name}: step model '{step.model_name}' is not in the repository")
                continue
            inputs = {io.name: io for io in model.input}
            for model_input, tensor in step.input_map.items():
                if tensor not in available or model_input not in inputs:
                    problems.append(f"{ensemble.name}: {step.model_name}.{model_input} <- '{tensor}' is not produced or not an input")
                    continue
                dtype, shape, source = available[tensor]
                io = inputs[model_input]
                takes = _full_dims(model, io)
                if dtype != _dtype(io) or not _compatible(shape, takes):
                    problems.append(f"{ensemble.name}: '{tensor}' is TYPE_{dtype} {list(shape)} from {source}, but "
                                    f"{step.model_name}.{model_input} takes TYPE_{_dtype(io)} {list(takes)}")
            missing = {n for n, io in inputs.items() if not io.optional} - set(step.input_map)
            problems += [f"{ensemble.name}: {step.model_name} lacks input '{n}'" for n in sorted(missing)]
            outputs = {io.name: io for io in model.output}
            for model_output, tensor in step.output_map.items():
                if model_output not in outputs:
                    problems.append(f"{ensemble.name}: {step.model_name} has no output '{model_output}'")
                    continue
                io = outputs[model_output]
                available[tensor] = (_dtype(io), _full_dims(model, io), step.model_name)
        problems += [f"{ensemble.name}: output '{io.name}' is never produced" for io in ensemble.output if io.name not in available]
    return problems


def require_consistent(problems: list[str]) -> None:
    if problems:
        raise BuildError("generated configs disagree with their models (Triton would refuse them):\n  " + "\n  ".join(problems))


def repository_problems(repo: str | Path, engine_models: Mapping[str, Signature] | None = None) -> list[str]:
    """Every config of a laid-out repository: Python rank models against their ``model.onnx``,
    TensorRT models against the signature of the ONNX their engine was built from
    (``engine_models``: model name -> signature; plans themselves need TensorRT to read), and
    every ensemble's wiring."""
    from rankserve.builder.configs import parse

    repo = Path(repo)
    models = {p.parent.name: parse(p) for p in sorted(repo.glob("*/config.pbtxt"))}
    problems = []
    for name, config in models.items():
        onnx = repo / name / "1" / "model.onnx"
        if config.backend == "python" and onnx.exists():
            problems += python_rank_problems(config, onnx_signature(onnx))
        elif config.platform == "tensorrt_plan":
            if engine_models is None or name not in engine_models:
                problems.append(f"{name}: no ONNX signature given for its engine")
            else:
                problems += tensorrt_problems(config, engine_models[name])
        else:
            problems += reshape_problems(config)
        problems += warmup_problems(config, repo / name)
    return problems + ensemble_problems(models)


_DTYPE_BYTES = {"TYPE_INT64": 8, "TYPE_INT32": 4, "TYPE_FP32": 4, "TYPE_FP16": 2, "TYPE_BOOL": 1}


def warmup_problems(config, model_dir: Path) -> list[str]:
    """Triton's warmup rules (core ``GenerateWarmupData``): every sample names inputs the model has,
    with fixed dims, and each ``input_data_file`` in ``<model>/warmup/`` holds at least one sample's
    bytes (the model would otherwise fail to load)."""
    inputs = {i.name: i for i in config.input}
    problems = []
    for sample in config.model_warmup:
        where = f"{config.name}: warmup '{sample.name}'"
        for name, entry in sample.inputs.items():
            if name not in inputs:
                problems.append(f"{where} feeds '{name}', which the model does not take")
                continue
            if any(d < 1 for d in entry.dims):
                problems.append(f"{where}: input '{name}' needs fixed dims, got {list(entry.dims)}")
                continue
            if entry.data_type != inputs[name].data_type:
                problems.append(f"{where}: input '{name}' is {mc.DataType.Name(entry.data_type)}, the model takes "
                                f"{mc.DataType.Name(inputs[name].data_type)}")
            if entry.WhichOneof("input_data_type") == "input_data_file":
                file = model_dir / "warmup" / entry.input_data_file
                need = int(np.prod(entry.dims)) * _DTYPE_BYTES.get(mc.DataType.Name(entry.data_type), 1)
                if not file.is_file():
                    problems.append(f"{where}: {file} is missing")
                elif file.stat().st_size < need:
                    problems.append(f"{where}: {file} has {file.stat().st_size} bytes, one sample needs {need}")
    return problems
