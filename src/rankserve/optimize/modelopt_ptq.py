"""INT8 QDQ ONNX for TensorRT with NVIDIA ModelOpt's ONNX post-training quantization, calibrated on CPU.

ModelOpt (``nvidia-modelopt[onnx]``) pins ``onnx~=1.21`` and ``onnxruntime-gpu`` (the same module
name as ``onnxruntime``), which clash with the serving stack, so it lives in its own venv
(``.venv-modelopt``, from ``deploy/modelopt-requirements.txt``) and runs here as a subprocess:
nothing in this module imports ModelOpt. Its output is the explicit-quantization (QDQ) ONNX that
TensorRT builds an INT8 engine from: symmetric INT8, per-channel weights. One step follows
ModelOpt (``fp32_residual``): the residual Adds read the unquantized LayerNorm output instead of the
Q/DQ pair ModelOpt shares with the next Linears, which keep their INT8 input.

The pieces are pure and importable: :class:`ModelOptSettings` (validated), :func:`calibration_npz`
(the calibration feeds ModelOpt reads), :func:`ptq_command` (the exact argv), :func:`quantized_matmuls`
(what the output graph really quantized); :func:`quantize` runs them.
"""

from __future__ import annotations

import collections
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from rankserve.builder import onnx_files

from rankserve.errors import BuildError
from rankserve.settings import ModelOptSettings

PYTHON_ENV = "RANKSERVE_MODELOPT_PYTHON"
"""Environment variable naming the Python interpreter that has ModelOpt installed."""
VENV = ".venv-modelopt"
REQUIREMENTS = "deploy/modelopt-requirements.txt"
INSTALL_COMMAND = f"python3 -m venv {VENV} && {VENV}/bin/pip install -r {REQUIREMENTS}"

STDERR_TAIL_LINES = 40


def calibration_batches(dataset, tokenizer, input_names: Sequence[str], settings: ModelOptSettings = ModelOptSettings(),
                        seed: int = 1234) -> list[dict[str, np.ndarray]]:
    """The project's calibration pairs (training queries' candidate lists) tokenized by the ranker's
    Hugging Face ``tokenizer`` at ``settings.calibration_length``, ``settings.calibration_batch`` pairs a batch."""
    from rankserve.optimize.calibration import calibration_pairs, fixed_length_batches

    pairs = calibration_pairs(dataset, settings.calibration_pairs, seed=seed)
    return fixed_length_batches(tokenizer, pairs, settings.calibration_length, settings.calibration_batch, input_names)


def calibration_npz(path: str | Path, batches: Sequence[Mapping[str, np.ndarray]]) -> Path:
    """Write ``batches`` (each: ONNX input name -> int64 [pairs, tokens]) as one ``.npz`` of
    input name -> all pairs stacked, the form ``--calibration_data_path`` reads. Every batch must
    hold the same inputs at the same token width (ModelOpt splits each array along pairs only)."""
    if not batches:
        raise ValueError("no calibration batches")
    names = tuple(batches[0])
    if not names:
        raise ValueError("calibration batches have no inputs")
    width = batches[0][names[0]].shape[1:]
    for i, batch in enumerate(batches):
        if tuple(batch) != names:
            raise ValueError(f"batch {i} has inputs {tuple(batch)}, batch 0 has {names}")
        for name, value in batch.items():
            value = np.asarray(value)
            if value.ndim != 2 or value.shape[1:] != width:
                raise ValueError(f"batch {i} input {name!r} has shape {value.shape}; every batch needs "
                                 f"[pairs, {width[0] if width else '?'}] (pad to one length)")
            if value.dtype != np.int64:
                raise ValueError(f"batch {i} input {name!r} is {value.dtype}, the ranker takes int64")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:  # np.savez on a file object keeps the name as given (no added ".npz")
        np.savez(f, **{name: np.concatenate([np.asarray(b[name]) for b in batches], axis=0) for name in names})
    return path


def calibration_shapes(batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, tuple[int, int]]:
    """Per-step input shapes for ``--calibration_shapes``: the first batch's (without it ModelOpt
    takes the dynamic batch dimension as 1 and calibrates pair by pair)."""
    return {name: tuple(int(d) for d in np.asarray(v).shape) for name, v in batches[0].items()}


def ptq_command(python: str | Path, onnx_in: str | Path, onnx_out: str | Path, npz: str | Path,
                settings: ModelOptSettings = ModelOptSettings(),
                shapes: Mapping[str, Sequence[int]] | None = None, external_data: bool = False) -> list[str]:
    """The argv of ModelOpt's ONNX INT8 PTQ of ``onnx_in`` into ``onnx_out``, calibrated on ``npz``
    (``external_data``: the input is over 2 GB, which ModelOpt refuses without its flag)."""
    argv = [str(python), "-m", "modelopt.onnx.quantization",
            "--onnx_path", str(onnx_in),
            "--quantize_mode", "int8",
            "--calibration_method", settings.calibration_method,
            "--calibration_data_path", str(npz),
            "--calibration_eps", *settings.calibration_eps,
            "--high_precision_dtype", settings.high_precision_dtype,
            "--output_path", str(onnx_out)]
    if shapes:
        argv += ["--calibration_shapes", ",".join(f"{name}:{'x'.join(str(int(d)) for d in dims)}" for name, dims in shapes.items())]
    if settings.op_types_to_exclude:
        argv += ["--op_types_to_exclude", *settings.op_types_to_exclude]
    if settings.disable_mha_qdq:
        argv.append("--disable_mha_qdq")
    if external_data:
        argv.append("--use_external_data_format")
    return argv


def modelopt_python() -> Path:
    """The Python of the ModelOpt venv: ``$RANKSERVE_MODELOPT_PYTHON``, else ``./.venv-modelopt/bin/python``."""
    configured = os.environ.get(PYTHON_ENV)
    path = Path(configured) if configured else Path.cwd() / VENV / "bin" / "python"
    if not (path.is_file() and os.access(path, os.X_OK)):
        where = f"{PYTHON_ENV}={configured}" if configured else f"{path} (set {PYTHON_ENV} to use another)"
        raise BuildError(f"ModelOpt's Python not found: {where}. Install ModelOpt in its own venv from the "
                         f"repository root: {INSTALL_COMMAND}")
    return path


def _weight_source(name: str, producers: dict, initializers: set, depth: int = 0) -> str | None:
    """``"float"`` when ``name`` is a float initializer, ``"int8"`` when it is a DequantizeLinear of
    an initializer (directly, or of a QuantizeLinear of one), else None."""
    if name in initializers:
        return "float"
    node = producers.get(name)
    if node is None or depth > 2:
        return None
    if node.op_type == "DequantizeLinear":
        src = node.input[0]
        if src in initializers:
            return "int8"
        q = producers.get(src)
        if q is not None and q.op_type == "QuantizeLinear" and q.input[0] in initializers:
            return "int8"
    return None


def quantized_matmuls(model) -> tuple[int, int]:
    """(weight MatMuls whose weight comes from a DequantizeLinear of an initializer, all weight MatMuls)
    of an ``onnx.ModelProto``; a weight MatMul is one with an initializer input, plain or dequantized,
    the classification head excepted (one logit per pair: it stays FP32, see ``transforms.HEAD``)."""
    from rankserve.optimize.transforms import HEAD

    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    initializers |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    producers = {o: n for n in graph.node for o in n.output}
    quantized = total = 0
    for node in graph.node:
        if node.op_type != "MatMul" or HEAD.search(node.name):
            continue
        kinds = {_weight_source(i, producers, initializers) for i in node.input} - {None}
        if kinds:
            total += 1
            quantized += "int8" in kinds
    return quantized, total


def fp32_residuals(model) -> int:
    """Rewire, in place, every Add input that is an activation's DequantizeLinear(QuantizeLinear(x))
    to ``x`` itself: the residual stream stays in full precision while the Linears that share the
    Q/DQ pair keep reading INT8. Returns the number of Add inputs rewired."""
    graph = model.graph
    constants = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    producers = {o: n for n in graph.node for o in n.output}
    rewired = 0
    for node in graph.node:
        if node.op_type != "Add":
            continue
        for k, name in enumerate(node.input):
            dq = producers.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producers.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear" and q.input[0] not in constants:
                node.input[k] = q.input[0]
                rewired += 1
    return rewired


def onnx_opset(model) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


@dataclass(frozen=True)
class PtqStats:
    quantized_matmuls: int
    weight_matmuls: int
    opset: int
    seconds: float
    command: tuple[str, ...]
    fp32_residual_inputs: int = 0

    def to_dict(self) -> dict:
        return {"quantized_matmuls": self.quantized_matmuls, "weight_matmuls": self.weight_matmuls,
                "opset": self.opset, "seconds": round(self.seconds, 1), "command": list(self.command),
                "fp32_residual_inputs": self.fp32_residual_inputs}


def _child_env() -> dict[str, str]:
    """This environment without what would make the ModelOpt venv import this venv's packages."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}


def quantize(onnx_in: str | Path, onnx_out: str | Path, batches: Sequence[Mapping[str, np.ndarray]],
             settings: ModelOptSettings = ModelOptSettings(), log: Callable[[str], None] = print,
             python: str | Path | None = None) -> PtqStats:
    """Quantize ``onnx_in`` to INT8 QDQ ``onnx_out`` with ModelOpt (its venv's Python, as a
    subprocess), calibrated on ``batches``; ModelOpt's output lines go to ``log`` as they come.
    Raises :class:`BuildError` with the tail of ModelOpt's output when it fails or writes nothing."""
    import tempfile

    import onnx

    python = Path(python) if python else modelopt_python()
    onnx_in, onnx_out = Path(onnx_in).resolve(), Path(onnx_out).resolve()
    if not onnx_in.is_file():
        raise BuildError(f"no ONNX model at {onnx_in}")
    onnx_out.parent.mkdir(parents=True, exist_ok=True)
    onnx_out.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="rankserve-modelopt-") as tmp:
        # ModelOpt gets a copy: on small models it was seen rewriting its input file in place (a
        # served model.onnx no longer matched its checksum), and the caller's file must not change
        source = onnx_files.copy(onnx_in, Path(tmp) / "input.onnx")
        npz = calibration_npz(Path(tmp) / "calibration.npz", batches)
        argv = ptq_command(python, source, onnx_out, npz, settings, calibration_shapes(batches),
                           external_data=onnx_files.needs_external_data(source))
        tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        started = time.perf_counter()
        try:  # stderr merged into stdout: ModelOpt logs its progress on stderr, in order with any print
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    errors="replace", cwd=tmp, env=_child_env())
        except OSError as exc:
            raise BuildError(f"could not start ModelOpt ({python}): {exc}") from None
        with proc:
            for line in proc.stdout:
                line = line.rstrip("\n")
                tail.append(line)
                log(line)
            code = proc.wait()
        seconds = time.perf_counter() - started
    if code != 0 or not onnx_out.is_file():
        why = f"exit status {code}" if code != 0 else f"exit status 0 but no {onnx_out}"
        raise BuildError(f"ModelOpt INT8 PTQ failed ({why}); last output lines:\n" + "\n".join(tail))
    written = [onnx_out.parent / loc for loc in onnx_files.external_locations(onnx_out)]  # ModelOpt's "X_data"
    model = onnx.load(str(onnx_out))
    rewired = fp32_residuals(model) if settings.fp32_residual else 0
    onnx_files.save(model, onnx_out)  # the one layout: a single file, or X.data
    for stale in written:
        if stale != onnx_files.data_path(onnx_out):
            stale.unlink(missing_ok=True)
    if rewired:
        log(f"rankserve: {rewired} residual Add inputs read the unquantized tensor (fp32_residual)")
    quantized, total = quantized_matmuls(model)
    return PtqStats(quantized, total, onnx_opset(model), seconds, tuple(argv), rewired)
