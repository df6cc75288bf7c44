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
# and Softmax kept FP32 inside it), INT8 from the QDQ ONNX NVIDIA ModelOpt made for TensorRT
# (explicit quantization; `int8_trt`, gated strictly), not the ONNX Runtime ladder's CPU model.
SOURCE_VARIANT = {"fp16": "fp16", "int8": "int8_trt"}
DEFAULT_PLAN = "model.plan"
"""The plan Triton loads on a GPU whose compute capability ``cc_model_filenames`` does not list."""
AMPERE = (8, 0)


def engine_model_name(precision: str) -> str:
    return f"{api.RANK_MODEL}_trt_{precision}"


def engine_ensemble_name(precision: str) -> str:
    return f"{api.RANKER_MODEL}_trt_{precision}"


def plan_filename(compute_capability: str, hardware_compatibility: str = "none") -> str:
    """``model.sm86.plan`` for compute capability 8.6: one engine per GPU type in one model folder,
    picked by Triton through ``cc_model_filenames``. A hardware-compatible engine (``ampere_plus``)
    runs on every Ampere or newer GPU: it is ``model.plan``, the file Triton loads on a GPU whose
    compute capability ``cc_model_filenames`` does not list."""
    major, minor = _cc(compute_capability)
    if hardware_compatibility != "none":
        return DEFAULT_PLAN
    return f"model.sm{major}{minor}.plan"


def profile_shapes(profile: EngineProfile, input_names: Sequence[str]) -> dict[str, tuple[tuple[int, int], ...]]:
    """(min, opt, max) shape of every input in one optimization profile."""
    return {name: (tuple(profile.min), tuple(profile.opt), tuple(profile.max)) for name in input_names}


def profile_for(settings: EngineSettings, pairs: int, tokens: int) -> int:
    """Index of the profile Triton's TensorRT backend runs a [pairs, tokens] batch with: among the
    profiles that accept the shape, the one whose opt shape is nearest (Manhattan distance over the
    dimensions; the first on a tie); ``BuildError`` when none accepts it."""
    fitting = [(abs(pairs - p.opt[0]) + abs(tokens - p.opt[1]), i) for i, p in enumerate(settings.profiles)
               if p.covers(pairs, tokens)]
    if fitting:
        return min(fitting)[1]
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
                  plan_file: str, sha256: str, check: dict, inputs: Sequence[str] = api.MODEL_INPUT_NAMES) -> dict:
    """What the manifest keeps about one engine, for the portability check before serving and for
    its config (``inputs``: the engine's input tensors, as the ONNX file it was built from has them)."""
    return {
        "precision": precision,
        "source_variant": SOURCE_VARIANT[precision],
        "inputs": list(inputs),
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
    elif built != here:  # a plan is only guaranteed to load in the exact TensorRT build that made it
        raise BuildError(f"engine {record['plan_file']} was built with TensorRT {record['tensorrt_version']}; this server "
                         f"has {tensorrt_version}. Engines only load in the exact TensorRT version that built them (all "
                         f"four parts): rebuild in the TensorRT container that matches the Triton image, or build "
                         f"version-compatible engines (--version-compatible true).")
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


def library_tensorrt_version(library: str | None = None) -> str | None:
    """The version of the TensorRT runtime library itself (``libnvinfer``, all four parts, e.g.
    ``10.5.0.18``), as the dynamic loader finds it: the library Triton's TensorRT backend loads,
    whatever the image's layout or architecture. ``None`` when no libnvinfer loads here."""
    import ctypes

    for name in [library] if library else ["libnvinfer.so.10", "libnvinfer.so"]:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.getInferLibVersion.restype = ctypes.c_int32
        return ".".join(map(str, (*_decode_version(lib.getInferLibVersion()), _build_number(lib))))
    return None


def _decode_version(number: int) -> tuple[int, int, int]:
    """``getInferLibVersion()``: major * 10000 + minor * 100 + patch from TensorRT 10 on
    (major * 1000 + minor * 100 + patch before)."""
    if number >= 100000:
        return number // 10000, number // 100 % 100, number % 100
    return number // 1000, number // 100 % 10, number % 100


def _build_number(lib) -> int:
    import ctypes

    build = getattr(lib, "getInferLibBuildVersion", None)  # TensorRT 10 and later
    if build is None:
        return 0
    build.restype = ctypes.c_int32
    return build()


VERSION_COMPATIBLE_FLAG = "--backend-config=tensorrt,version-compatible=true"


def check_repository_engines(manifest: dict, tensorrt: str | None, gpus: Sequence[GpuFacts],
                             server_args: Sequence[str] | None = None, require: bool = False) -> list[str]:
    """Before serving: every engine family in the manifest must have an engine this server's
    TensorRT and every one of its GPUs can run, and version-compatible engines need the server flag
    that lets Triton's TensorRT backend load them (checked when ``server_args``, tritonserver's
    arguments, are given). Returns one line per (precision, GPU) that can run; raises
    ``BuildError`` naming what cannot. With ``require`` (GPU replicas), a repository without
    engines is refused too: served as it is, it would never offer the TensorRT models."""
    engines = manifest.get("engines", {})
    if not engines:
        if require:
            raise BuildError("the repository lists no TensorRT engines: serve a release whose engines are built "
                             "(the engines Job publishes it as <release>-gpu)")
        return []
    if tensorrt is None:
        raise BuildError("the repository holds TensorRT engines but no TensorRT runtime (libnvinfer) loads on this server")
    if not gpus:
        raise BuildError("the repository holds TensorRT engines but no NVIDIA GPU is visible (nvidia-smi)")
    lines = []
    for precision, records in sorted(engines.items()):
        for gpu in gpus:
            record = usable_engine(records, tensorrt, gpu)
            if record.get("version_compatible") and server_args is not None and VERSION_COMPATIBLE_FLAG not in server_args:
                raise BuildError(f"{record['plan_file']} is a version-compatible engine: tritonserver needs "
                                 f"{VERSION_COMPATIBLE_FLAG} to load it (TRT_VERSION_COMPATIBLE=true in docker compose)")
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


def run_engine(plan: bytes, batches: Sequence[dict[str, np.ndarray]], settings: EngineSettings) -> list[np.ndarray]:
    """Run a serialized engine on host arrays, one logits vector per batch (Polygraphy's runner,
    shipped with TensorRT, manages the device buffers). Each batch runs in the profile Triton would
    pick for its shape (:func:`profile_for`): the runner's default, profile 0, refuses shapes
    outside it."""
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    outputs = []
    with TrtRunner(EngineFromBytes(plan)) as runner:
        for feeds in batches:
            runner.set_profile(profile_for(settings, *feeds["input_ids"].shape))
            outputs.append(np.asarray(runner.infer(feeds)[api.LOGITS.name], dtype=np.float32).reshape(-1))
    return outputs


def synthetic_feeds(input_names: Sequence[str], pairs: int, tokens: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """[pairs, tokens] int64 inputs shaped like real batches: ids in the vocabulary's body, right
    padding of random length after the first half, zero token types."""
    mask = np.ones((pairs, tokens), np.int64)
    tail = tokens - tokens // 2 - 1
    if tail > 0:
        mask[:, tokens - tail:] = rng.integers(0, 2, (pairs, tail)).cumprod(axis=1)
    feeds = {"input_ids": np.where(mask == 1, rng.integers(1000, 20000, (pairs, tokens)), 0), "attention_mask": mask,
             "token_type_ids": np.zeros((pairs, tokens), np.int64)}
    return {n: feeds[n] for n in input_names}


def bench_grid(settings: EngineSettings, pairs: Sequence[int] = (1, 32, 128, 512), tokens: Sequence[int] = (32, 64, 128)) -> list[tuple[int, int]]:
    """The (pairs, tokens) shapes an engine is measured at: those some profile accepts."""
    return [(p, t) for p in pairs for t in tokens if any(profile.covers(p, t) for profile in settings.profiles)]


def bench_engine(plan: bytes, settings: EngineSettings, input_names: Sequence[str], grid: Sequence[tuple[int, int]],
                 iterations: int = 20) -> list[dict]:
    """Latency and throughput of an engine at each (pairs, tokens) of ``grid`` through Polygraphy's
    runner (host copies included), each shape in the profile Triton would pick."""
    import time

    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    rng = np.random.default_rng(0)
    rows = []
    with TrtRunner(EngineFromBytes(plan)) as runner:
        for pairs, tokens in grid:
            profile = profile_for(settings, pairs, tokens)
            runner.set_profile(profile)
            feeds = synthetic_feeds(input_names, pairs, tokens, rng)
            for _ in range(3):
                runner.infer(feeds)
            seconds = []
            for _ in range(iterations):
                started = time.perf_counter()
                runner.infer(feeds)
                seconds.append(time.perf_counter() - started)
            p50 = float(np.median(seconds))
            rows.append({"pairs": pairs, "tokens": tokens, "profile": settings.profiles[profile].name,
                         "p50_ms": round(1000 * p50, 3), "pairs_per_s": round(pairs / p50, 1)})
    return rows


def tensorrt_version() -> str:
    """The version of the TensorRT the build uses, read from its library like the server's."""
    import tensorrt as trt

    return library_tensorrt_version() or trt.__version__


def _version(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split("."))
    except ValueError:
        raise BuildError(f"unreadable TensorRT version {text!r}") from None


def _cc(text: str) -> tuple[int, int]:
    try:
        major, minor = text.strip().split(".")
        return int(major), int(minor)
    except ValueError:
        raise BuildError(f"unreadable compute capability {text!r} (expected like 8.6)") from None
