"""TensorRT engines for GPU hosts.

Everything that decides something (profiles, names, file names per compute capability, the
manifest record, the portability check) is plain Python and tested on any machine. The TensorRT
calls (``build_engine``, ``run_engine``) are thin, written against the TensorRT 10 Python API, and
need an NVIDIA GPU with the ``tensorrt`` package: in the TensorRT container of the release that
matches the Triton image (see ``docker-compose.yml``).
"""

from __future__ import annotations

import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from rankserve import api
from rankserve.errors import BuildError
from rankserve.settings import EngineProfile, EngineSettings

# The ONNX variant each engine precision is parsed from: FP16 kernels from the FP16 ONNX (LayerNorm
# and Softmax kept FP32 inside it), INT8 from the QDQ ONNX (explicit quantization).
SOURCE_VARIANT = {"fp16": "fp16", "int8": "int8"}
AMPERE = (8, 0)


def engine_model_name(precision: str) -> str:
    return f"{api.RANK_MODEL}_trt_{precision}"


def engine_ensemble_name(precision: str) -> str:
    return f"{api.RANKER_MODEL}_trt_{precision}"


def plan_filename(compute_capability: str) -> str:
    """``model.sm86.plan`` for compute capability 8.6: one engine per GPU type in one model folder,
    picked by Triton through ``cc_model_filenames``."""
    major, minor = _cc(compute_capability)
    return f"model.sm{major}{minor}.plan"


def profile_shapes(profile: EngineProfile, input_names: Sequence[str]) -> dict[str, tuple[tuple[int, int], ...]]:
    """(min, opt, max) shape of every input in one optimization profile."""
    return {name: (tuple(profile.min), tuple(profile.opt), tuple(profile.max)) for name in input_names}


def profile_for(settings: EngineSettings, pairs: int, tokens: int) -> int:
    """Index of the first profile that accepts a [pairs, tokens] batch (Triton chooses likewise
    among the profiles an instance lists); ``BuildError`` when none does."""
    for i, profile in enumerate(settings.profiles):
        if profile.covers(pairs, tokens):
            return i
    raise BuildError(f"no optimization profile accepts {pairs} pairs x {tokens} tokens: "
                     f"{[(p.name, p.min, p.max) for p in settings.profiles]}")


@dataclass(frozen=True)
class GpuFacts:
    name: str
    compute_capability: str


def parse_nvidia_smi(text: str) -> list[GpuFacts]:
    """Rows of ``nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader``."""
    gpus = []
    for line in text.strip().splitlines():
        name, _, cc = line.rpartition(",")
        if not name or not cc.strip():
            raise BuildError(f"unexpected nvidia-smi output line: {line!r}")
        _cc(cc.strip())
        gpus.append(GpuFacts(name.strip(), cc.strip()))
    return gpus


def local_gpus() -> list[GpuFacts]:
    """The GPUs of this host, from ``nvidia-smi``; empty when there is none."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return parse_nvidia_smi(out.stdout) if out.returncode == 0 and out.stdout.strip() else []


def engine_record(precision: str, tensorrt_version: str, gpu: GpuFacts, settings: EngineSettings,
                  plan_file: str, sha256: str, check: dict) -> dict:
    """What the manifest keeps about one engine, for the portability check before serving."""
    return {
        "precision": precision,
        "source_variant": SOURCE_VARIANT[precision],
        "tensorrt_version": tensorrt_version,
        "gpu": asdict(gpu),
        "plan_file": plan_file,
        "sha256": sha256,
        "profiles": [asdict(p) for p in settings.profiles],
        "hardware_compatibility": settings.hardware_compatibility,
        "version_compatible": settings.version_compatible,
        "check": check,
    }


def check_portability(record: dict, tensorrt_version: str, gpu: GpuFacts) -> None:
    """Refuse, with the reason, an engine the given TensorRT and GPU cannot run: the message Triton
    would otherwise give is "unable to create TensorRT engine"."""
    built, here = _version(record["tensorrt_version"]), _version(tensorrt_version)
    if record.get("version_compatible"):
        if built[0] != here[0] or here < built:
            raise BuildError(f"engine {record['plan_file']} was built with TensorRT {record['tensorrt_version']} "
                             f"(version-compatible); this server has {tensorrt_version}: it needs TensorRT "
                             f"{built[0]}.x at or above the build's. Rebuild the engines in the matching TensorRT container.")
    elif built[:2] != here[:2]:
        raise BuildError(f"engine {record['plan_file']} was built with TensorRT {record['tensorrt_version']}; this server "
                         f"has {tensorrt_version}. Engines only load in the TensorRT release that built them: rebuild "
                         f"in the TensorRT container that matches the Triton image.")
    built_cc, here_cc = _cc(record["gpu"]["compute_capability"]), _cc(gpu.compute_capability)
    if record.get("hardware_compatibility") == "ampere_plus":
        if here_cc < AMPERE:
            raise BuildError(f"engine {record['plan_file']} is built for Ampere or newer GPUs; {gpu.name} has compute "
                             f"capability {gpu.compute_capability}")
    elif built_cc != here_cc:
        raise BuildError(f"engine {record['plan_file']} was built on {record['gpu']['name']} (compute capability "
                         f"{record['gpu']['compute_capability']}); {gpu.name} has {gpu.compute_capability}. Build an "
                         f"engine on this GPU type (one file per compute capability, cc_model_filenames).")


def usable_engine(records: Sequence[dict], tensorrt_version: str, gpu: GpuFacts) -> dict:
    """The engine record among ``records`` (one per GPU type) that this TensorRT and GPU can run;
    ``BuildError`` naming every engine's reason otherwise."""
    reasons = []
    for record in records:
        try:
            check_portability(record, tensorrt_version, gpu)
            return record
        except BuildError as exc:
            reasons.append(str(exc))
    raise BuildError("no engine can run here:\n  " + "\n  ".join(reasons or ["no engine was built"]))


def tensorrt_version_from_libraries(paths: Sequence[str]) -> str | None:
    """The TensorRT runtime version from library file names (``libnvinfer.so.10.5.0``): the Triton
    image carries TensorRT as libraries, without its Python package."""
    versions = []
    for path in paths:
        name = Path(path).name
        if name.startswith("libnvinfer.so."):
            parts = name[len("libnvinfer.so."):].split(".")
            if len(parts) == 3 and all(p.isdigit() for p in parts):
                versions.append(tuple(int(p) for p in parts))
    return ".".join(map(str, max(versions))) if versions else None


def server_tensorrt_version() -> str | None:
    import glob

    try:
        return tensorrt_version()
    except ImportError:
        return tensorrt_version_from_libraries(
            glob.glob("/usr/lib/x86_64-linux-gnu/libnvinfer.so.*") + glob.glob("/usr/local/tensorrt/lib/libnvinfer.so.*"))


def check_repository_engines(manifest: dict, tensorrt: str | None, gpus: Sequence[GpuFacts]) -> list[str]:
    """Before serving: every engine family in the manifest must have an engine this server's
    TensorRT and every one of its GPUs can run. Returns one line per (precision, GPU) that can;
    raises ``BuildError`` naming what cannot."""
    engines = manifest.get("engines", {})
    if not engines:
        return []
    if tensorrt is None:
        raise BuildError("the repository holds TensorRT engines but no TensorRT runtime was found on this server")
    if not gpus:
        raise BuildError("the repository holds TensorRT engines but no NVIDIA GPU is visible (nvidia-smi)")
    lines = []
    for precision, records in sorted(engines.items()):
        for gpu in gpus:
            record = usable_engine(records, tensorrt, gpu)
            lines.append(f"{engine_model_name(precision)}: {record['plan_file']} runs on {gpu.name} "
                         f"(compute capability {gpu.compute_capability}) with TensorRT {tensorrt}")
    return lines


def compare_to_reference(engine_scores: np.ndarray, reference: np.ndarray, tolerance: float, precision: str) -> dict:
    """The post-build numeric check of an engine against ONNX Runtime FP32 on the same inputs."""
    diff = float(np.max(np.abs(np.asarray(engine_scores, dtype=np.float32).reshape(-1) - np.asarray(reference).reshape(-1))))
    same_order = bool(np.array_equal(np.argsort(-np.asarray(engine_scores).reshape(-1), kind="stable"),
                                     np.argsort(-np.asarray(reference).reshape(-1), kind="stable")))
    if not diff <= tolerance:
        raise BuildError(f"TensorRT {precision} engine differs from ONNX Runtime FP32 by {diff:.3g} "
                         f"(limit {tolerance:g}); the engine is not laid out")
    return {"max_abs_diff": diff, "tolerance": tolerance, "same_order": same_order}


# ---- the TensorRT calls: thin, need a GPU and the `tensorrt` package --------------------------

def build_engine(onnx_path: Path, precision: str, settings: EngineSettings, timing_cache: Path,
                 log: Callable[[str], None] = print) -> bytes:
    """Parse the ONNX file and build a serialized engine (TensorRT 10 Python API)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mib << 20)
    config.builder_optimization_level = settings.builder_optimization_level
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    else:  # the QDQ nodes carry the INT8 scales; FP16 lets the layers between them run in half precision
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)
    if settings.hardware_compatibility == "ampere_plus":
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    if settings.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    for profile_settings in settings.profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, mid, hi) in profile_shapes(profile_settings, names).items():
            profile.set_shape(name, lo, mid, hi)
        config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache.exists() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    log(f"      building the TensorRT {precision} engine ({len(settings.profiles)} profiles, "
        f"workspace {settings.workspace_mib} MiB, timing cache {timing_cache})")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"TensorRT failed to build the {precision} engine from {onnx_path}")
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    timing_cache.write_bytes(memoryview(config.get_timing_cache().serialize()))
    return bytes(serialized)


def run_engine(plan: bytes, batches: Sequence[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """Run a serialized engine on host arrays, one logits vector per batch (Polygraphy's runner,
    shipped with TensorRT, manages the device buffers and picks the profile)."""
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    with TrtRunner(EngineFromBytes(plan)) as runner:
        return [np.asarray(runner.infer(feeds)[api.LOGITS.name], dtype=np.float32).reshape(-1) for feeds in batches]


def tensorrt_version() -> str:
    import tensorrt as trt

    return trt.__version__


def _version(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(".")[:3])
    except ValueError:
        raise BuildError(f"unreadable TensorRT version {text!r}") from None


def _cc(text: str) -> tuple[int, int]:
    try:
        major, minor = text.strip().split(".")
        return int(major), int(minor)
    except ValueError:
        raise BuildError(f"unreadable compute capability {text!r} (expected like 8.6)") from None
