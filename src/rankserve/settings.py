"""Settings as frozen, validated dataclasses, with named presets.

Every knob of the build and of the served pipeline lives here. ``config.pbtxt`` files are generated
from these objects (see :mod:`rankserve.builder.configs`), and the stage adapters read them back from
the model configuration's ``parameters`` through :func:`from_parameters`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, TypeVar

from rankserve.errors import ConfigError

T = TypeVar("T")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
RUNTIMES = ("onnxruntime", "openvino")
CPU_VARIANTS = ("fp32", "fused", "int8", "int8_dynamic", "bf16", "pruned", "pruned_int8")
GPU_VARIANTS = ("fp16", "int8_trt")
"""Built on the CPU host, served by TensorRT engines: fp16, and int8_trt (ModelOpt QDQ, the INT8 engine's source)."""
VARIANTS = CPU_VARIANTS + GPU_VARIANTS


@dataclass(frozen=True)
class TokenizeSettings:
    """How (query, product text) pairs become model inputs."""

    max_length: int = 128
    """Pairs longer than this many tokens are truncated (longest side first: the product text)."""
    max_candidates: int = 1000
    """Largest number of candidate texts one request may carry."""
    max_text_bytes: int = 4096
    """Largest UTF-8 size of the query (longer: rejected) and of what is read of one candidate text
    (longer: cut there, on a character boundary; ``max_length`` tokens take far fewer bytes)."""
    pad_buckets: str = ""
    """Comma-separated token widths (e.g. ``64,128``): each request is padded up to the smallest one
    that holds its longest pair, so requests share a few shapes (the TensorRT rank stage batches only
    equal shapes). Empty: pad to the longest pair (the CPU stage batches ragged requests)."""

    instances: int = 2
    """Tokenize instances (Python stubs, ~50 MiB each). Two, because with one and a bounded queue
    (:attr:`queue_size`) Triton 2.51 held requests in that queue for up to 0.5 s whenever the rank
    stage was refusing (overload: refusals that should take milliseconds took 0.5 s; measured in
    ``tests/e2e/test_served_batching.py``, 3 of 3 runs with one instance, 0 of 3 with two)."""
    queue_size: int = 32
    """Requests the tokenize stage may hold waiting; beyond it Triton refuses at once
    ("exceeds maximum queue size", the SDK's ``Overloaded``). Each waiting request holds its body
    (up to :attr:`max_request_bytes`) in the server: 32 bounds that at 131 MB with the defaults.
    0: unbounded."""

    @property
    def buckets(self) -> tuple[int, ...]:
        return tuple(int(w) for w in self.pad_buckets.split(",")) if self.pad_buckets else ()

    @property
    def max_request_bytes(self) -> int:
        """The largest serialized ``texts`` tensor accepted (a 4-byte length before each text):
        ``max_candidates`` texts of ``max_text_bytes``. Larger ones are refused before any text is
        decoded; a few longer texts may still come (and be cut) within that total."""
        return self.max_candidates * (4 + self.max_text_bytes)

    @property
    def max_encoded_bytes(self) -> int:
        """The largest encoded request: three INT64 tensors of ``max_candidates`` x ``max_length``."""
        return 3 * self.max_candidates * self.max_length * 8

    def __post_init__(self) -> None:
        _require(8 <= self.max_length <= 512, f"max_length must be in [8, 512], got {self.max_length}")
        try:
            buckets = self.buckets
        except ValueError:
            raise ConfigError(f"pad_buckets must be comma-separated integers, got {self.pad_buckets!r}") from None
        _require(not buckets or (list(buckets) == sorted(set(buckets)) and buckets[0] >= 1 and buckets[-1] >= self.max_length),
                 f"pad_buckets must ascend and the last must hold max_length ({self.max_length}), got {self.pad_buckets!r}")
        _require(1 <= self.max_candidates <= 100_000, f"max_candidates must be in [1, 100000], got {self.max_candidates}")
        _require(self.max_text_bytes >= 16, f"max_text_bytes must be >= 16, got {self.max_text_bytes}")
        _require(self.queue_size >= 0, f"queue_size must be >= 0, got {self.queue_size}")
        _require(1 <= self.instances <= 64, f"instances must be in [1, 64], got {self.instances}")


@dataclass(frozen=True)
class OrtSettings:
    """ONNX Runtime session options of the CPU rank stage."""

    intra_op_threads: int = 0
    """0: the runtime's default (one thread per core), or the CPUs a container limit allows when fewer."""
    inter_op_threads: int = 1
    graph_optimization: str = "all"
    prepack_weights: bool = True
    """False: matrices are used in place from the mapped weights file of a model in that layout
    (256 MiB or more) instead of copied into prepacked buffers, so the rank stage's instances
    (processes) share one copy and a session is created in 0.4 s instead of 4 s (measured, 560M
    FP32); the cost is each call's packing (measured within this machine's noise). A model in a
    single file is read into each process either way. With the host's runtime cache, prepacked
    matrices are mapped from the cache entry and shared as well."""

    def __post_init__(self) -> None:
        _require(self.intra_op_threads >= 0, "intra_op_threads must be >= 0")
        _require(self.inter_op_threads >= 1, "inter_op_threads must be >= 1")
        _require(
            self.graph_optimization in ("disable", "basic", "extended", "all"),
            f"graph_optimization must be disable|basic|extended|all, got {self.graph_optimization!r}",
        )


SCHEDULING = ("arrival", "deadline")
TAIL_REFERENCES = ("fifo", "deadline")


@dataclass(frozen=True)
class BatchingSettings:
    """How the rank stage batches pairs across concurrent requests (Triton dynamic batching)."""

    max_batch_tokens: int = 1024
    """Token budget of one model call: pairs x longest pair of the call."""
    max_queue_delay_us: int = 2000
    """How long Triton may hold a request to batch it with others."""
    max_queue_size: int = 16
    """Requests the rank stage may hold waiting; beyond it Triton refuses at once ("exceeds maximum
    queue size", the SDK's ``Overloaded``) instead of letting latency grow without bound. Measured
    at 8x saturation with 96 closed-loop users (2 cores): 64 let accepted requests wait 13 s (p50),
    16 cut that to 4.4 s; at 70% of saturation 16 refused nothing. 0: unbounded. With
    ``scheduling="deadline"`` it bounds the requests the stage holds unfinished."""
    scheduling: str = "arrival"
    """``arrival``: Triton's queue; each dynamic batch is scored to its end (smaller requests of the
    batch first), so a short list that arrives meanwhile waits for all of it. ``deadline``: the stage
    keeps its own queue and each model call takes the pairs of the earliest deadlines (arrival +
    ``deadline_slowdown`` x the request's time alone), so a short list waits for one call rather than
    a whole long list, and long lists are overtaken (loadtest/README.md has the trade-off, measured)."""
    deadline_slowdown: float = 4.0
    """``deadline`` scheduling: a request's deadline is its arrival plus this many times its
    estimated time alone (its tokens over the stage's measured tokens/s)."""

    def __post_init__(self) -> None:
        _require(self.max_batch_tokens >= 64, "max_batch_tokens must be >= 64")
        _require(self.scheduling in SCHEDULING, f"scheduling must be one of {'|'.join(SCHEDULING)}, got {self.scheduling!r}")
        _require(1.0 <= self.deadline_slowdown <= 1000.0, "deadline_slowdown must be in [1, 1000]")
        _require(self.max_queue_size >= 0, "max_queue_size must be >= 0")
        _require(0 <= self.max_queue_delay_us <= 1_000_000, "max_queue_delay_us must be in [0, 1e6]")


@dataclass(frozen=True)
class WarmupSettings:
    """Triton ``model_warmup`` of each CPU rank model: before the model reports ready, its instance
    scores ``pairs`` one-pair requests of ``tokens`` tokens, so the runtime's first-call work (memory
    arena, shape-specific kernels) is not paid by the first real request."""

    pairs: int = 4
    tokens: int = 16
    """Small on purpose: the one-time work does not depend on the batch, the compute does (32 pairs
    of 32 tokens would add 10 s to the ready time of a 560M-parameter FP32 ranker on 2 cores).
    0 pairs: no warmup."""

    def __post_init__(self) -> None:
        _require(0 <= self.pairs <= 1000, "warmup pairs must be in [0, 1000]")
        _require(1 <= self.tokens <= 512, "warmup tokens must be in [1, 512]")


@dataclass(frozen=True)
class RuntimeSettings:
    """Which CPU runtime the rank stage runs a variant's ONNX model with."""

    runtime: str = "onnxruntime"
    inference_precision: str = "f32"
    """OpenVINO only: ``bf16`` runs matrix products on the CPU's BF16 units (AMX / AVX512-BF16)."""
    openvino_cache_capacity: int = 256
    """OpenVINO only: most input shapes whose compiled kernels its CPU plugin keeps
    (``CPU_RUNTIME_CACHE_CAPACITY``; OpenVINO's default, 5000, let a served rank stage grow from
    0.2 to 3 GB: every batch has its own (pairs, tokens) shape). 0 keeps none."""
    cache_optimized_model: bool = True
    """ONNX Runtime only: keep the optimized model in the host's runtime cache when the server has
    one (:mod:`rankserve.stages.runtime_cache`). The build turns it off for static (QDQ) INT8
    models: loaded from the cache, the 560M ranker's QDQ model held 1,227 MB in its rank stub
    against 533 MB loaded from the repository (dynamic INT8: 417 MB against 422 MB)."""

    def __post_init__(self) -> None:
        _require(self.runtime in RUNTIMES, f"runtime must be one of {RUNTIMES}, got {self.runtime!r}")
        _require(self.openvino_cache_capacity >= 0, "openvino_cache_capacity must be >= 0")
        _require(self.inference_precision in ("f32", "bf16"), "inference_precision must be f32 or bf16")
        _require(self.runtime == "openvino" or self.inference_precision == "f32", "bf16 inference needs the openvino runtime")


@dataclass(frozen=True)
class CheckSettings:
    """The numeric check of the exported ONNX model against PyTorch."""

    shapes: tuple[tuple[int, int], ...] = ((1, 8), (4, 32), (16, 64), (3, 128))
    """(batch, sequence length) pairs checked on fresh random inputs."""
    atol: float = 1e-4
    seed: int = 1234

    def __post_init__(self) -> None:
        _require(len(self.shapes) > 0, "at least one check shape is needed")
        for b, n in self.shapes:
            _require(b >= 1 and n >= 4, f"check shape ({b}, {n}) must have batch >= 1 and length >= 4")
        _require(0 < self.atol < 1, f"atol must be in (0, 1), got {self.atol}")


DYNAMIC_WEIGHTS = ("auto", "s8", "s7", "u8")
SMOOTH_ALPHA = 0.9


@dataclass(frozen=True)
class QuantSettings:
    """INT8 post-training quantization (QDQ, symmetric, per-channel weights: TensorRT's explicit form)."""

    calibration_pairs: int = 512
    """Real (query, product) pairs from the training split used to calibrate activations."""
    method: str = "percentile"
    percentile: float = 99.99
    calibration_length: int = 64
    """Calibration batches are padded to this length (the histogram methods need one shape)."""
    dynamic_weights: str = "auto"
    """Weight type of ``int8_dynamic``: ``s8`` (ONNX Runtime's U8S8, the fastest), ``s7`` (the same
    kernel, weights in 7 bits: ``reduce_range``), ``u8`` (U8U8) or ``auto``: S8 where the build host
    has VNNI or AMX-INT8, S7 elsewhere. Without VNNI, x86 runs U8S8 with VPMADDUBSW, whose 16-bit
    sums of two u8 x s8 products saturate (ONNX Runtime's quantization guide); 7-bit weights keep
    them in range. Measured on the demo ranker on an AVX2 host (no smoothing): top-10 overlap with
    FP32 0.945 with S8, 0.953 with S7, 0.957 with U8, and U8S8 runs faster than U8U8. The choice
    follows the build host: build on the CPU kind that serves."""
    smooth_alpha: float | None = SMOOTH_ALPHA
    """SmoothQuant migration strength for ``int8_dynamic`` (``None``: off): each weight MatMul's
    input channels are divided by ``max|X|^a / max|W|^(1-a)`` (measured on the calibration pairs)
    and its weight rows multiplied by the same, so one per-tensor INT8 scale fits the activations.
    Measured on the demo ranker (AVX2 host, S7 weights), NDCG@10 drop and top-10 overlap in served
    batches: none -0.6%, 0.948 (fails the strict gate); a=0.5 -0.5%, 0.948; 0.6 -0.6%, 0.967; 0.7
    +0.1%, 0.969; 0.8 -0.4%, 0.972; 0.9 -0.1%, 0.975 (NNCF's transformer default is 0.95). Costs one
    elementwise Mul per MatMul input, about 4% of the run time there."""

    def __post_init__(self) -> None:
        _require(self.calibration_pairs >= 8, "calibration_pairs must be >= 8")
        _require(self.smooth_alpha is None or 0.0 < self.smooth_alpha < 1.0, f"smooth_alpha must be in (0, 1) or None, got {self.smooth_alpha}")
        _require(self.dynamic_weights in DYNAMIC_WEIGHTS, f"dynamic_weights must be one of {DYNAMIC_WEIGHTS}, got {self.dynamic_weights!r}")
        _require(self.method in CALIBRATION_METHODS, f"method must be one of {CALIBRATION_METHODS}, got {self.method!r}")
        _require(90.0 <= self.percentile < 100.0, "percentile must be in [90, 100)")
        _require(8 <= self.calibration_length <= 512, "calibration_length must be in [8, 512]")


@dataclass(frozen=True)
class PruneSettings:
    """Structured pruning (keep a subset of layers) and distillation from the FP32 ranker."""

    keep_layers: tuple[int, ...] = (0, 2, 4, 5)
    epochs: int = 2
    queries_per_step: int = 4
    learning_rate: float = 3e-4
    label_weight: float = 1.0
    """Weight of the labels' ranking loss next to the MSE to the teacher's scores."""
    max_length: int = 64
    seed: int = 11
    length_chunk: int = 16
    """As :attr:`TrainSettings.length_chunk`."""

    def __post_init__(self) -> None:
        _require(self.length_chunk >= 0, "length_chunk must be >= 0 (0 = no chunks)")
        _require(len(self.keep_layers) >= 1, "keep_layers must keep at least one layer")
        _require(list(self.keep_layers) == sorted(set(self.keep_layers)), "keep_layers must be increasing and unique")
        _require(self.epochs >= 1 and self.queries_per_step >= 1, "epochs and queries_per_step must be >= 1")


@dataclass(frozen=True)
class GateSettings:
    """The accuracy gate every variant must pass on held-out queries."""

    max_ndcg_drop: float = 0.01
    """Largest relative NDCG@10 drop below the FP32 ranker (0.01 = 1%)."""
    min_top_k_overlap: float = 0.95
    """With ``max_ndcg_drop``, the strict gate the default ``ranker`` must pass: its top-k must
    share at least this fraction with FP32's on the held-out queries. A pruned MiniLM passed the 2%
    NDCG gate with overlap 0.89 (Kendall tau 0.70) and put a TV stand 4th for "outdoor welcome
    rug". Variants passing only their own gate are built and served under their names."""
    max_ndcg_drop_pruned: float = 0.02
    """The same for pruned variants (fewer layers cost some quality by design)."""
    k: int = 10
    max_ndcg_drop_int8_engine: float = 0.005
    min_top_k_overlap_int8_engine: float = 0.95
    """The TensorRT INT8 engine and the QDQ model it is built from keep the FP32 ranking: NDCG@k
    within 0.5% and top-k overlap with FP32 of at least 0.95 on the held-out queries."""
    served_batch_queries: int = 4
    """The CPU variants are also scored as the rank stage serves them under load: the requests of
    this many held-out queries in one dynamic batch (token-budget calls, each padded to its longest
    pair). The strict gate must hold there too, and the build records how far a pair's score moves
    with its batch neighbours: not at all for FP32, by up to 1.06 logits for dynamic INT8, whose
    activation scale is taken over the whole batch tensor."""
    require_batch_invariance: bool = False
    """Strict only if a pair's score does not move with its batch neighbours (at most
    ``batch_invariance_atol``): the same request then always gets the same ranking, under any load.
    Off by default: dynamic INT8 keeps its quality in served batches but not its exact scores."""
    batch_invariance_atol: float = 1e-3

    def __post_init__(self) -> None:
        _require(self.served_batch_queries >= 1 and self.batch_invariance_atol > 0,
                 "served_batch_queries must be >= 1 and batch_invariance_atol > 0")
        _require(0 <= self.max_ndcg_drop < 1 and 0 <= self.max_ndcg_drop_pruned < 1
                 and 0 <= self.max_ndcg_drop_int8_engine < 1, "NDCG drops must be in [0, 1)")
        _require(0 <= self.min_top_k_overlap_int8_engine <= 1 and 0 <= self.min_top_k_overlap <= 1,
                 "top-k overlap limits must be in [0, 1]")
        _require(self.k >= 1, "k must be >= 1")

    @property
    def strict(self) -> tuple[float, float]:
        """(max NDCG drop, min top-k overlap) of the strict gate: ``gate(strict=...)``."""
        return (self.max_ndcg_drop, self.min_top_k_overlap)

    def for_engine(self, precision: str) -> dict[str, float]:
        """The gate limits of a TensorRT engine of ``precision``: ``gate()`` keyword arguments."""
        if precision == "int8":
            return {"max_drop": self.max_ndcg_drop_int8_engine, "min_overlap": self.min_top_k_overlap_int8_engine, "k": self.k}
        return {"max_drop": self.max_ndcg_drop, "k": self.k}


MODELOPT_CALIBRATION_METHODS = ("max", "entropy")
"""ModelOpt's INT8 calibrators (it has no percentile calibration for ONNX)."""
MODELOPT_HIGH_PRECISION_DTYPES = ("fp32", "fp16", "bf16")
MODELOPT_OP_TYPES = ("Add", "AveragePool", "BatchNormalization", "Clip", "Conv", "ConvTranspose", "Gemm",
                     "GlobalAveragePool", "MatMul", "MaxPool", "Mul")
"""The op types ModelOpt's INT8 mode can quantize (and so the ones worth excluding)."""
_MODELOPT_EPS = ("cpu", "trt", "NvTensorRtRtx")


def _modelopt_ep(ep: str) -> bool:
    if ep in _MODELOPT_EPS:
        return True
    kind, _, index = ep.partition(":")
    return kind in ("cuda", "dml") and index.isdigit()


@dataclass(frozen=True)
class ModelOptSettings:
    """ModelOpt ONNX INT8 PTQ options. The defaults are the placement measured best on the demo
    ranker (95 held-out queries, 4 calibration subsets): every encoder Linear quantized; the residual
    Adds, the residual stream and the attention score MatMuls (Q.K^T, softmax.V) left in FP32; max
    calibration on 512 pairs padded to 64 tokens. NDCG@10 drop 0.27-0.36% vs FP32, top-10 overlap
    0.949-0.957 (without ``fp32_residual``: 0.58-0.85%, 0.946-0.949)."""

    calibration_method: str = "max"
    """``max`` (absolute max, what TensorRT's explicit INT8 expects) or ``entropy`` (KL-divergence)."""
    op_types_to_exclude: tuple[str, ...] = ("Add",)
    """Op types ModelOpt must not quantize. Quantizing the residual Adds cost ~13% NDCG@10."""
    disable_mha_qdq: bool = True
    """No Q/DQ on the attention MatMuls (activation x activation): the Linears stay quantized."""
    calibration_eps: tuple[str, ...] = ("cpu",)
    """Execution providers ModelOpt calibrates with, in priority order; ``cpu`` needs no GPU."""
    high_precision_dtype: str = "fp32"
    """Dtype of what stays unquantized (ModelOpt's own default converts it to fp16)."""
    calibration_pairs: int = 512
    """Real (query, product) pairs from the training split that calibrate the activations."""
    calibration_length: int = 64
    """Token width every calibration pair is padded (or truncated) to: ModelOpt reads one array per input."""
    calibration_batch: int = 32
    """Pairs per calibration step."""
    fp32_residual: bool = True
    """After ModelOpt: residual Adds read the unquantized tensor instead of the Q/DQ pair ModelOpt
    shares between a LayerNorm output and the next Linears (its Q/DQ stays on the Linears' input);
    measured on the demo ranker: NDCG@10 drop 0.58% -> 0.32%, top-10 overlap 0.947 -> 0.957."""

    def __post_init__(self) -> None:
        _require(self.calibration_method in MODELOPT_CALIBRATION_METHODS,
                 f"calibration_method must be one of {MODELOPT_CALIBRATION_METHODS}, got {self.calibration_method!r}")
        _require(isinstance(self.op_types_to_exclude, tuple), "op_types_to_exclude must be a tuple")
        unknown = [t for t in self.op_types_to_exclude if t not in MODELOPT_OP_TYPES]
        _require(not unknown, f"op_types_to_exclude: {unknown} are not op types ModelOpt quantizes ({', '.join(MODELOPT_OP_TYPES)})")
        _require(len(set(self.op_types_to_exclude)) == len(self.op_types_to_exclude), "op_types_to_exclude has duplicates")
        _require("MatMul" not in self.op_types_to_exclude, "excluding MatMul would leave every encoder Linear in FP32")
        _require(isinstance(self.calibration_eps, tuple) and len(self.calibration_eps) >= 1,
                 "calibration_eps must be a non-empty tuple")
        bad = [ep for ep in self.calibration_eps if not _modelopt_ep(ep)]
        _require(not bad, f"calibration_eps: {bad} are not ModelOpt execution providers (cpu, trt, cuda:N, dml:N, NvTensorRtRtx)")
        _require(self.high_precision_dtype in MODELOPT_HIGH_PRECISION_DTYPES,
                 f"high_precision_dtype must be one of {MODELOPT_HIGH_PRECISION_DTYPES}, got {self.high_precision_dtype!r}")
        _require(isinstance(self.disable_mha_qdq, bool), "disable_mha_qdq must be a bool")
        _require(isinstance(self.fp32_residual, bool), "fp32_residual must be a bool")
        _require(self.calibration_pairs >= 8, f"calibration_pairs must be >= 8, got {self.calibration_pairs}")
        _require(8 <= self.calibration_length <= 512, f"calibration_length must be in [8, 512], got {self.calibration_length}")
        _require(1 <= self.calibration_batch <= self.calibration_pairs,
                 f"calibration_batch must be in [1, calibration_pairs], got {self.calibration_batch}")


ENGINE_PRECISIONS = ("fp16", "int8")
HARDWARE_COMPATIBILITY = ("none", "ampere_plus")


@dataclass(frozen=True)
class EngineProfile:
    """One TensorRT optimization profile: (pairs, tokens) shapes the engine accepts, and the shape it
    is tuned for. Every input (``input_ids``, ``attention_mask``, ``token_type_ids``) gets the same."""

    name: str
    min: tuple[int, int]
    opt: tuple[int, int]
    max: tuple[int, int]

    def __post_init__(self) -> None:
        _require(bool(self.name) and self.name.isidentifier(), f"profile name must be an identifier, got {self.name!r}")
        for axis, label in ((0, "pairs"), (1, "tokens")):
            lo, mid, hi = self.min[axis], self.opt[axis], self.max[axis]
            _require(1 <= lo <= mid <= hi, f"profile {self.name}: {label} must satisfy 1 <= min <= opt <= max, got {lo}, {mid}, {hi}")

    def covers(self, pairs: int, tokens: int) -> bool:
        return self.min[0] <= pairs <= self.max[0] and self.min[1] <= tokens <= self.max[1]


@dataclass(frozen=True)
class EngineSettings:
    """TensorRT engines for GPU hosts (``rankserve build --target gpu``)."""

    precisions: tuple[str, ...] = ENGINE_PRECISIONS
    """``fp16`` builds from the FP16/FP32 ONNX with FP16 kernels allowed; ``int8`` from the QDQ ONNX
    (explicit quantization: TensorRT follows the Q/DQ nodes)."""
    profiles: tuple[EngineProfile, ...] = (
        # The demo's pairs are 36-47 tokens: most requests fall in `short`; `long` covers the rest.
        EngineProfile("short", min=(1, 1), opt=(128, 48), max=(1000, 64)),
        EngineProfile("long", min=(1, 1), opt=(64, 128), max=(1000, 128)),
    )
    workspace_mib: int = 4096
    """Scratch memory TensorRT may use while choosing kernels."""
    builder_optimization_level: int = 3
    hardware_compatibility: str = "none"
    """``ampere_plus``: one engine for every Ampere or newer GPU (slower than a per-GPU engine)."""
    version_compatible: bool = False
    """An engine that later TensorRT 10 runtimes can load (with the lean runtime inside)."""
    max_abs_diff_fp16: float = 0.05
    max_abs_diff_int8: float = 0.5
    """Largest logit difference from ONNX Runtime FP32 on fresh inputs after the build (the accuracy
    gate on held-out queries decides the rest)."""

    def __post_init__(self) -> None:
        _require(bool(self.precisions) and all(p in ENGINE_PRECISIONS for p in self.precisions)
                 and len(set(self.precisions)) == len(self.precisions), f"precisions must be distinct, from {ENGINE_PRECISIONS}")
        _require(bool(self.profiles), "at least one optimization profile is needed")
        names = [p.name for p in self.profiles]
        _require(len(set(names)) == len(names), f"profile names must be unique, got {names}")
        batch = {p.max[0] for p in self.profiles}
        _require(len(batch) == 1, f"every profile must accept the same largest batch (the model's max_batch_size), got {sorted(batch)}")
        _require(all(p.min[0] == 1 for p in self.profiles), "every profile must accept a batch of one pair")
        _require(self.workspace_mib >= 256, "workspace_mib must be >= 256")
        _require(0 <= self.builder_optimization_level <= 5, "builder_optimization_level must be in [0, 5]")
        _require(self.hardware_compatibility in HARDWARE_COMPATIBILITY, f"hardware_compatibility must be one of {HARDWARE_COMPATIBILITY}")
        _require(self.max_abs_diff_fp16 > 0 and self.max_abs_diff_int8 > 0, "tolerances must be > 0")

    @property
    def max_pairs(self) -> int:
        return self.profiles[0].max[0]

    @property
    def max_tokens(self) -> int:
        return max(p.max[1] for p in self.profiles)

    def tolerance(self, precision: str) -> float:
        return {"fp16": self.max_abs_diff_fp16, "int8": self.max_abs_diff_int8}[precision]


@dataclass(frozen=True)
class BuildSettings:
    """Everything ``rankserve build`` needs besides the ranker directory and the output path."""

    target: str = "cpu"
    opset: int = 17
    tokenize: TokenizeSettings = field(default_factory=TokenizeSettings)
    ort: OrtSettings = field(default_factory=OrtSettings)
    check: CheckSettings = field(default_factory=CheckSettings)
    rank_instances: int = 1
    """Instances of the rank stage (each holds one inference session)."""
    variants: tuple[str, ...] = ("fp32",)
    quant: QuantSettings = field(default_factory=QuantSettings)
    prune: PruneSettings = field(default_factory=PruneSettings)
    gate: GateSettings = field(default_factory=GateSettings)
    runtimes: tuple[str, ...] = RUNTIMES
    """CPU runtimes tried for each variant; the fastest that passes the checks serves it."""
    batching: BatchingSettings = field(default_factory=BatchingSettings)
    warmup: WarmupSettings = field(default_factory=WarmupSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    modelopt: ModelOptSettings = field(default_factory=ModelOptSettings)
    """NVIDIA ModelOpt INT8 PTQ of the QDQ model the TensorRT INT8 engine is built from (``int8_trt``)."""
    load: str = "auto"
    """Which CPU variants the repository loads: ``all``, a comma-separated list, or ``auto``: all
    of them when together they fit the memory budget (``auto_load_limit_bytes`` without one), else
    only the fastest. The others are built, gated and recorded in the manifest, not laid out."""
    memory_budget_bytes: int = 0
    """Host memory the served repository may take, estimated from its files (0: no budget); the
    build refuses a set of loaded variants that does not fit."""
    auto_load_limit_bytes: int = 4 * 2**30
    """``load=auto`` without a budget: above this, only the default variant is loaded."""
    response_cache: bool = True
    """Mark the public ensembles (``ranker``, ``ranker_<variant>``, ``ranker_trt_<precision>``)
    ``response_cache { enable: true }``. It takes effect only on a server started with a cache
    (``rankserve serve --response-cache SIZE``, tritonserver ``--cache-config``); without one Triton
    ignores it. Triton 2.51 caches the ensemble as a whole (a hit skips tokenize, rank and
    postprocess); its Python steps could be cached too, but an ensemble hit already skips them."""
    default_variant: str | None = None
    """The variant served as ``ranker``. None: the fastest loaded variant that passes the strict
    gate (``GateSettings.min_top_k_overlap``). Naming one (``--default pruned_int8``) makes it the
    default even when it passes only its own, looser gate."""

    def __post_init__(self) -> None:
        _require(self.target in ("cpu", "gpu"), f"target must be cpu or gpu, got {self.target!r}")
        if self.target == "gpu":  # every request the tokenizer lets through must fit an engine profile
            _require(self.engine.max_tokens >= self.tokenize.max_length,
                     f"the engine profiles must reach tokenize.max_length ({self.tokenize.max_length} tokens), got {self.engine.max_tokens}")
            _require(self.engine.max_pairs >= self.tokenize.max_candidates,
                     f"the engine profiles must accept tokenize.max_candidates ({self.tokenize.max_candidates}) pairs, got {self.engine.max_pairs}")
        unknown = [v for v in self.variants if v not in VARIANTS]
        _require(not unknown, f"unknown variants {unknown}; choose from {list(VARIANTS)}")
        _require(len(self.variants) > 0 and len(set(self.variants)) == len(self.variants), "variants must be non-empty and unique")
        _require(all(r in RUNTIMES for r in self.runtimes) and self.runtimes, f"runtimes must be a subset of {RUNTIMES}")
        _require(14 <= self.opset <= 20, f"opset must be in [14, 20], got {self.opset}")
        _require(self.rank_instances >= 1, "rank_instances must be >= 1")
        _require(self.warmup.tokens <= self.tokenize.max_length, "warmup tokens must be <= tokenize.max_length")
        _require(self.batching.scheduling != "deadline" or not self.batching.max_queue_size
                 or self.batching.max_queue_size >= self.warmup.pairs,
                 f"deadline scheduling bounds the rank stage at max_queue_size unfinished requests; it must be >= the "
                 f"warmup's {self.warmup.pairs} one-pair requests (or 0), got {self.batching.max_queue_size}")
        _require(self.default_variant is None or self.default_variant in CPU_VARIANTS,
                 f"default_variant must be one of {list(CPU_VARIANTS)}, got {self.default_variant!r}")
        loads = [v.strip() for v in self.load.split(",") if v.strip()]
        _require(self.load in ("auto", "all") or (loads and all(v in CPU_VARIANTS for v in loads)),
                 f"load must be auto, all or comma-separated CPU variants {list(CPU_VARIANTS)}, got {self.load!r}")
        _require(self.memory_budget_bytes >= 0 and self.auto_load_limit_bytes > 0,
                 "memory_budget_bytes must be >= 0 and auto_load_limit_bytes > 0")
        _require(
            max(n for _, n in self.check.shapes) <= self.tokenize.max_length,
            "every check length must be <= tokenize.max_length",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DataSettings:
    """The demo catalog and labels generated around the WANDS queries."""

    seed: int = 13
    heldout_fraction: float = 0.2
    exact_per_query: int = 3
    partial_per_query: int = 4
    hard_negatives_per_query: int = 5
    easy_negatives_per_query: int = 8

    def __post_init__(self) -> None:
        _require(0 < self.heldout_fraction < 1, "heldout_fraction must be in (0, 1)")
        for name in ("exact_per_query", "partial_per_query", "hard_negatives_per_query", "easy_negatives_per_query"):
            _require(getattr(self, name) >= 1, f"{name} must be >= 1")


@dataclass(frozen=True)
class TrainSettings:
    """Fine-tuning of the demo cross-encoder."""

    epochs: int = 2
    queries_per_step: int = 2
    """Each step scores every candidate of this many queries (pointwise + listwise loss)."""
    learning_rate: float = 5e-5
    warmup_fraction: float = 0.1
    max_length: int = 64
    seed: int = 7
    threads: int = 0
    """0 keeps PyTorch's default (one per core)."""
    frozen_layers: int = 1
    """The embeddings and this many bottom encoder layers stay as pre-trained (the word vectors
    always do): the backward pass stops above them."""
    dropout: bool = False
    """Keep the encoder's dropout while training. Off by default: its random masks took 22% of each
    step on 2 cores. Measured cost of the faster defaults together (no dropout, one frozen layer):
    held-out NDCG@10 0.9853 against 0.9876, and dynamic INT8 a little further from FP32."""
    length_chunk: int = 16
    """Each step's pairs run sorted by length, this many at a time, each chunk padded to its own
    longest pair (0 = one padded batch)."""

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, "epochs must be >= 1")
        _require(self.frozen_layers >= 0, "frozen_layers must be >= 0")
        _require(self.length_chunk >= 0, "length_chunk must be >= 0 (0 = no chunks)")
        _require(self.queries_per_step >= 1, "queries_per_step must be >= 1")
        _require(0 < self.learning_rate < 1, "learning_rate must be in (0, 1)")
        _require(0 <= self.warmup_fraction < 1, "warmup_fraction must be in [0, 1)")
        _require(8 <= self.max_length <= 512, "max_length must be in [8, 512]")


MIN_RESPONSE_CACHE_BYTES = 4096
"""Smallest response cache accepted: Triton's local cache refuses to start below a few hundred
bytes (100 B: "Could not initialize buffer"; measured with 2.51), and 4 KiB holds four
100-candidate answers."""


@dataclass(frozen=True)
class ServeSettings:
    """The embedded tritonserver."""

    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    ready_timeout_s: float = 180.0
    exit_timeout_s: int = 30
    log_verbose: int = 0
    shm_default_bytes: int = 16 * 2**20
    """Each Python-backend stub's shared-memory region, sized so the largest request fits (1,000
    pairs x 128 tokens x 3 int64 tensors is 3 MB; 1,000 texts of 4 KB, 4 MB): regions never grow
    while serving. Tmpfs pages are only allocated when touched."""
    health_interval_s: float = 1.0
    """How often ``rankserve serve`` checks the server and every Python-backend stub."""
    restart_grace_s: float = 5.0
    """How long a broken server (a stub died) gets to finish in-flight requests before it is killed."""
    max_restarts: int = 5
    restart_window_s: float = 600.0
    """At most ``max_restarts`` restarts within any ``restart_window_s`` of servers that broke
    before taking a request (a crash loop at start); past that, serve gives up. A server that had
    taken requests and then broke is restarted without spending this budget (a client able to crash
    a stub must not take the service down for good): see ``server.supervisor.RestartPolicy``."""
    restart_backoff_s: float = 1.0
    """The wait before a restart, doubled with each failure in a row up to ``restart_backoff_max_s``
    (the streak ends once a server stays up that long). 0: restart at once."""
    restart_backoff_max_s: float = 30.0
    cache_dir: str | None = None
    """A writable folder of this host where the CPU runtimes keep what they make from a model before
    its first request, reused at the next load (``RANKSERVE_CACHE_DIR`` of the stubs; see
    :mod:`rankserve.stages.runtime_cache`). None: whatever the environment already says."""
    response_cache_bytes: int = 0
    """Triton's response cache (its ``local`` cache: one buffer of this many bytes in the server
    process, shared by every cacheable model, least recently used answers evicted when full): a
    repeated request (same model, query, texts, top_k) is answered from memory without running the
    pipeline. 0 (the default): no cache. A 100-candidate answer takes about 1 KB. Answers cannot go
    stale under ``rankserve serve``: its server never reloads a model (model control ``none``) and
    a restart empties the cache (see the README, "Response cache")."""
    drain_timeout_s: float = 10.0
    """The bound on requests in flight when ``rankserve serve`` stops (SIGTERM, Ctrl-C) and, with
    ``--releases``, after a switch: new connections are refused at once, each open one is closed as
    soon as it is between requests (gRPC: sent GOAWAY, closed once its calls are done), the rest at
    this timeout (their clients get a connection error the SDKs retry); then tritonserver stops."""

    def __post_init__(self) -> None:
        ports = (self.http_port, self.grpc_port, self.metrics_port)
        for p in ports:
            _require(0 < p < 65536, f"port {p} out of range")
        _require(len(set(ports)) == 3, f"http, grpc and metrics ports must differ, got {ports}")
        _require(self.ready_timeout_s > 0, "ready_timeout_s must be > 0")
        _require(self.exit_timeout_s >= 1, "exit_timeout_s must be >= 1")
        _require(self.health_interval_s > 0, "health_interval_s must be > 0")
        _require(self.shm_default_bytes >= 2**20, "shm_default_bytes must be >= 1 MiB")
        _require(self.restart_grace_s >= 0, "restart_grace_s must be >= 0")
        _require(self.max_restarts >= 0, "max_restarts must be >= 0")
        _require(self.restart_window_s > 0, "restart_window_s must be > 0")
        _require(0 <= self.restart_backoff_s <= self.restart_backoff_max_s,
                 "restart_backoff_s must be >= 0 and <= restart_backoff_max_s")
        _require(self.drain_timeout_s >= 0, "drain_timeout_s must be >= 0")
        _require(self.response_cache_bytes == 0 or self.response_cache_bytes >= MIN_RESPONSE_CACHE_BYTES,
                 f"response_cache_bytes must be 0 (off) or >= {MIN_RESPONSE_CACHE_BYTES}, got {self.response_cache_bytes}")


def stub_region_bytes(tokenize: TokenizeSettings, batching: BatchingSettings) -> int:
    """The shared-memory region a Python-backend stub needs for the largest request accepted, so
    regions never grow while serving (``shm-default-byte-size``): tokenize holds one request's
    ``texts`` and query and writes its encoded pairs; the rank stage reads the encoded pairs of one
    dynamic batch (at most ``max_candidates`` pairs), or under ``deadline`` scheduling keeps up to
    ``max_queue_size`` requests' tensors while it works; plus 1 MiB of the backend's bookkeeping."""
    encoded = tokenize.max_encoded_bytes
    tokenize_stub = tokenize.max_request_bytes + 4 + tokenize.max_text_bytes + encoded
    held = max(1, batching.max_queue_size) if batching.scheduling == "deadline" else 1
    rank_stub = held * encoded + 4 * tokenize.max_candidates
    return max(tokenize_stub, rank_stub) + 2**20


LOADTEST_SCENARIOS = ("random", "zipf")


@dataclass(frozen=True)
class LoadTestSettings:
    """A Locust run against the ranker and the SLOs that decide its verdict."""

    users: int = 4
    spawn_rate: float = 2.0
    duration_s: int = 60
    protocol: str = "http"
    model: str = "ranker"
    candidates_mean: float = 100.0
    """Mean candidate-list size; sizes are log-normal around it, clipped to [1, candidates_max]."""
    candidates_max: int = 500
    candidates_sigma: float = 0.6
    """Spread of the log-normal list sizes (0: every list has ``candidates_mean`` candidates)."""
    seed: int = 5
    rate_per_s: float = 0.0
    """0: every user sends its next request as soon as the last one is answered (closed loop, finds
    saturation); > 0: the users together send a Poisson stream of this many requests per second."""
    slo_p95_ms: float = 2000.0
    """p95 latency of the successful requests."""
    slo_max_failure_ratio: float = 0.0
    """The error budget: failed requests / all requests (0: any failure breaks the SLO)."""
    slo_min_successes: int = 10
    """Fewest successful requests whose latency and throughput the verdict will judge; a run with
    fewer fails as too small to judge."""
    stop_after_failing_s: float = 10.0
    """Stop the run early once every request answered in this many seconds failed (0: never)."""
    slo_max_tail_ratio: float = 0.0
    """p99 / p50 ceiling (0: not checked). Withdrawn as a default target: under Poisson arrivals with
    log-normal list sizes no server can keep it (loadtest/README.md); kept for users who want it."""
    slo_tail_vs_ideal: bool = False
    """At a paced load: p99 of every list-size bucket no worse than the ideal single FIFO server's p99
    for the same arrivals, sizes and measured speed (:mod:`rankserve.loadtest.tail`)."""
    slo_max_slowdown_p99: float = 0.0
    """At a paced load: p99 of each request's latency over its own zero-load latency, per list-size
    bucket (0: not checked)."""
    tail_reference: str = "fifo"
    """The ideal server ``slo_tail_vs_ideal`` compares with: ``fifo`` (whole requests in arrival
    order: the reference for ``scheduling="arrival"``) or ``deadline`` (calls of 32 pairs, earliest
    deadline first, deadlines at the default 4 x time alone: the reference for a rank stage built
    with ``--scheduling deadline``).
    Both are reported (:mod:`rankserve.loadtest.policies`)."""
    runs: int = 1
    """Paced runs after the saturation run (their requests are pooled for the tail figures)."""
    retries: int = 0
    """SDK retries per request (0: a server that is down counts as failures at once)."""
    retry_backoff_s: float = 0.2
    window_s: int = 60
    """Length of the windows the per-request timeline is cut into (latency and failures per window)."""
    slo_max_p95_drift: float = 0.0
    """Most relative change of p95 between the first and the last full window (0: not checked)."""
    slo_max_rss_growth: float = 0.0
    """Most relative growth of the server's resident memory from the first to the last window (0: not checked)."""
    slo_max_shm_growth: float = 0.0
    """The same for its Python-backend shared memory in /dev/shm (0: not checked)."""
    scenario: str = "random"
    """``random``: each request a random WANDS query and a fresh random candidate list. ``zipf``:
    query popularity follows Zipf's law with exponent ``zipf_s`` over the WANDS queries (in an order
    shuffled by ``seed``), and each query always comes with the same candidate list (drawn once per
    query from ``seed``, with the usual list-size distribution): head-heavy, repeated traffic."""
    zipf_s: float = 1.0
    """Exponent of the ``zipf`` scenario: the k-th most popular query is asked with probability
    proportional to 1 / k**s (0: every query equally often)."""

    @property
    def rate_per_user(self) -> float:
        return self.rate_per_s / self.users

    def __post_init__(self) -> None:
        _require(self.users >= 1 and self.spawn_rate > 0 and self.duration_s >= 1, "users, spawn_rate, duration_s must be positive")
        _require(self.candidates_sigma >= 0 and self.rate_per_s >= 0 and self.slo_max_tail_ratio >= 0,
                 "candidates_sigma, rate_per_s and slo_max_tail_ratio must be >= 0")
        _require(self.protocol in ("http", "grpc"), f"protocol must be http or grpc, got {self.protocol!r}")
        _require(1 <= self.candidates_mean <= self.candidates_max, "candidates_mean must be in [1, candidates_max]")
        _require(self.slo_p95_ms > 0 and 0 <= self.slo_max_failure_ratio <= 1, "SLOs: p95 > 0, failure ratio in [0, 1]")
        _require(self.slo_min_successes >= 1 and self.stop_after_failing_s >= 0,
                 "slo_min_successes must be >= 1 and stop_after_failing_s >= 0")
        _require(self.retries >= 0 and self.retry_backoff_s >= 0 and self.window_s >= 1, "retries, retry_backoff_s >= 0, window_s >= 1")
        _require(min(self.slo_max_p95_drift, self.slo_max_rss_growth, self.slo_max_shm_growth) >= 0, "drift and growth SLOs must be >= 0")
        _require(self.slo_max_slowdown_p99 == 0 or self.slo_max_slowdown_p99 >= 1, "slo_max_slowdown_p99 must be 0 (off) or >= 1")
        _require(self.tail_reference in TAIL_REFERENCES, f"tail_reference must be one of {TAIL_REFERENCES}, got {self.tail_reference!r}")
        _require(1 <= self.runs <= 20, "runs must be in [1, 20]")
        _require(self.scenario in LOADTEST_SCENARIOS, f"scenario must be one of {LOADTEST_SCENARIOS}, got {self.scenario!r}")
        _require(0 <= self.zipf_s <= 10, f"zipf_s must be in [0, 10], got {self.zipf_s}")


BASELINE_PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class BaselineSettings:
    """The bench's headline baseline (:mod:`rankserve.bench.batched_service`): the service a team
    would run without Triton, a FastAPI server over the PyTorch model with a dynamic batcher."""

    max_pairs: int = 32
    """Largest model call, in pairs: the batcher takes up to this many queued pairs, in arrival order,
    across requests (a larger request is split over several calls)."""
    max_wait_ms: float = 2.0
    """How long a call that is not full may wait for more pairs, from the arrival of its oldest pair
    (the served rank model's ``max_queue_delay``: 2 ms). Under load the queue is never short of pairs."""
    max_length: int = 128
    """Pairs are truncated to this many tokens (longest side first), as the served tokenizer does;
    the bench passes the repository's ``tokenize.max_length``."""
    precision: str = "auto"
    """``bf16`` (autocast to bfloat16), ``fp32``, or ``auto``: bf16 where the CPU has BF16 units
    (``avx512_bf16`` or ``amx_bf16``), else fp32."""
    threads: int = 0
    """Torch intra-op threads; 0: one per CPU this process may use."""
    sort_by_length: bool = True
    """Queue each request's pairs shortest first (scores are returned in the caller's order), so a
    call's padding to its longest pair wastes less; requests keep their arrival order."""
    max_candidates: int = 1000
    """Largest number of texts one request may carry (the served limit)."""

    def __post_init__(self) -> None:
        _require(1 <= self.max_pairs <= 4096, f"max_pairs must be in [1, 4096], got {self.max_pairs}")
        _require(0 <= self.max_wait_ms <= 1000, f"max_wait_ms must be in [0, 1000], got {self.max_wait_ms}")
        _require(8 <= self.max_length <= 512, f"max_length must be in [8, 512], got {self.max_length}")
        _require(self.precision in BASELINE_PRECISIONS, f"precision must be one of {BASELINE_PRECISIONS}, got {self.precision!r}")
        _require(self.threads >= 0, f"threads must be >= 0, got {self.threads}")
        _require(self.max_candidates >= 1, f"max_candidates must be >= 1, got {self.max_candidates}")


PRESETS: dict[str, BuildSettings] = {
    # The demo ranker: pairs are short (WANDS queries + product titles), 128 tokens covers them all.
    "default": BuildSettings(),
    # A quick build for tests: a single rank instance, fewer check shapes.
    "tiny": BuildSettings(
        tokenize=TokenizeSettings(max_length=64),
        engine=EngineSettings(profiles=(
            EngineProfile("short", min=(1, 1), opt=(16, 24), max=(1000, 32)),
            EngineProfile("long", min=(1, 1), opt=(8, 64), max=(1000, 64)),
        )),
        check=CheckSettings(shapes=((1, 8), (4, 24), (7, 64))),
        quant=QuantSettings(calibration_pairs=64),
        prune=PruneSettings(keep_layers=(1,), queries_per_step=16, learning_rate=1e-3),
        # a random tiny model has no quality to keep: its gate only checks the plumbing
        gate=GateSettings(max_ndcg_drop=1.0 - 1e-9, max_ndcg_drop_pruned=1.0 - 1e-9, max_ndcg_drop_int8_engine=1.0 - 1e-9,
                          min_top_k_overlap_int8_engine=0.0, min_top_k_overlap=0.0),
    ),
}


def preset(name: str) -> BuildSettings:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown build preset {name!r}; choose one of {sorted(PRESETS)}") from None


def from_parameters(cls: type[T], parameters: Mapping[str, Any]) -> T:
    """Rebuild a flat settings dataclass from Triton ``parameters`` (``{"k": {"string_value": "v"}}``).

    Keys not in ``cls`` are ignored, missing keys keep their defaults, values are converted to the
    field's type and then validated by the dataclass itself.
    """
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in parameters:
            continue
        raw = parameters[f.name]
        value = raw.get("string_value") if isinstance(raw, Mapping) else raw
        default = getattr(cls(), f.name)
        if isinstance(default, bool):
            if str(value) not in ("True", "False", "true", "false", "1", "0"):
                raise ConfigError(f"parameter {f.name}={value!r} is not a valid bool")
            kwargs[f.name] = str(value) in ("True", "true", "1")
            continue
        try:
            kwargs[f.name] = type(default)(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"parameter {f.name}={value!r} is not a valid {type(default).__name__}") from exc
    return cls(**kwargs)


def to_parameters(settings: Any) -> dict[str, str]:
    """The flat fields of a settings dataclass as Triton string parameters."""
    return {f.name: str(getattr(settings, f.name)) for f in dataclasses.fields(settings)}
