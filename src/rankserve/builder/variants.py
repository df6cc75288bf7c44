"""Build every requested variant of the rank model, check it, gate it, and measure which runtime
serves it fastest.

Each variant is an ONNX file plus the CPU runtime (ONNX Runtime or OpenVINO, with its precision)
that serves it. A variant enters the repository only after its checks and the accuracy gate pass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from rankserve.builder.export import LoadedRanker, check_onnx, export_onnx, load_ranker
from rankserve.data.catalog import Dataset
from rankserve.errors import BuildError
from rankserve.optimize import smoothquant, transforms
from rankserve.optimize.bench import pairs_per_second, workload_batches
from rankserve.optimize.calibration import calibration_pairs, fixed_length_batches
from rankserve.optimize.gate import GateResult, gate, require
from rankserve.optimize.report import native_matrix_units
from rankserve.settings import BuildSettings, RuntimeSettings
from rankserve.stages.rank import create_ranker, rank_batch
from rankserve.stages.tokenize import encode_pairs

SPEED_BATCH = 32
FP16_ATOL = 2e-2


def dynamic_weight_type(setting: str, units: set[str]) -> str:
    """``s8``, ``s7`` or ``u8`` for ``int8_dynamic`` on a CPU with ``units`` (see :attr:`QuantSettings.dynamic_weights`)."""
    if setting != "auto":
        return setting
    return "s8" if "int8" in units else "s7"


def cpu_has_bf16_units() -> bool:
    """True where OpenVINO reports native BF16 support (AMX or AVX512-BF16)."""
    try:
        import openvino as ov

        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # noqa: BLE001 - no OpenVINO or no such property: no BF16 path
        return False


@dataclass
class VariantBuild:
    name: str
    onnx: Path
    runtime: RuntimeSettings
    precision: str
    gate: GateResult | None  # None only for a plain FP32 build without evaluation data
    speed: dict[str, float]  # runtime label -> pairs/s at batch 32, workload lengths
    notes: dict = field(default_factory=dict)
    served_on_cpu: bool = True

    @property
    def pairs_per_s(self) -> float:
        return max(self.speed.values()) if self.speed else 0.0

    def to_dict(self) -> dict:
        return {
            "runtime": self.runtime.runtime,
            "inference_precision": self.runtime.inference_precision,
            "cache_optimized_model": self.runtime.cache_optimized_model,
            "precision": self.precision,
            "gate": self.gate.to_dict() if self.gate else None,
            "build_speed_pairs_per_s": {k: round(v, 1) for k, v in self.speed.items()},
            "served_on_cpu": self.served_on_cpu,
            **self.notes,
        }


class VariantBuilder:
    """Shared state for one build: the FP32 export, the data, the serving tokenizer, the reference."""

    def __init__(self, ranker: LoadedRanker, fp32_onnx: Path, dataset: Dataset, settings: BuildSettings,
                 tokenizer, work: Path, log: Callable[[str], None] = print) -> None:
        self.ranker, self.fp32_onnx, self.dataset, self.settings = ranker, fp32_onnx, dataset, settings
        self.tokenizer, self.work, self.log = tokenizer, work, log
        self.requests = [encode_pairs(tokenizer, q, t) for q, t in workload_batches(dataset, SPEED_BATCH, 4)]
        by_query = dataset.by_query()  # each held-out query's request, encoded once for every variant's gate
        self.heldout = {q.query_id: encode_pairs(tokenizer, q.text, [dataset.products[j.product_id].text for j in by_query[q.query_id]])
                        for q in dataset.split("heldout")}
        self.reference = self._alone_scores(create_ranker(fp32_onnx, RuntimeSettings(), settings.ort))

    # -- helpers ---------------------------------------------------------------------------
    def _alone_scores(self, scorer) -> dict[int, np.ndarray]:
        """Each held-out query's request scored on its own."""
        return {qid: scorer.score(encoded) for qid, encoded in self.heldout.items()}

    def _speed(self, onnx: Path, runtime: RuntimeSettings) -> float:
        scorer = create_ranker(onnx, runtime, self.settings.ort)
        return pairs_per_second(lambda: [scorer.score(r) for r in self.requests], SPEED_BATCH * len(self.requests), repeats=3)

    def _choose_runtime(self, onnx: Path, candidates: list[RuntimeSettings]) -> tuple[RuntimeSettings, dict[str, float]]:
        speed = {}
        for rt in candidates:
            label = rt.runtime if rt.inference_precision == "f32" else f"{rt.runtime}-{rt.inference_precision}"
            speed[label] = self._speed(onnx, rt)
        best = max(zip(speed.values(), candidates), key=lambda x: x[0])[1]
        return best, speed

    def _cpu_runtimes(self) -> list[RuntimeSettings]:
        return [RuntimeSettings(runtime=r) for r in self.settings.runtimes]

    def _gate(self, name: str, onnx: Path, runtime: RuntimeSettings, pruned: bool = False) -> GateResult:
        """The gate on each held-out query scored alone, and again in served dynamic batches."""
        scorer = create_ranker(onnx, runtime, self.settings.ort)
        g = self.settings.gate
        alone = self._alone_scores(scorer)
        result = gate(name, self.dataset, alone, self.reference, g.max_ndcg_drop_pruned if pruned else g.max_ndcg_drop,
                      g.k, strict=g.strict)
        served = self._served_scores(scorer)
        moved = max(float(np.abs(alone[q] - served[q]).max()) for q in alone) if alone else 0.0
        return result.with_served(gate(name, self.dataset, served, self.reference, result.max_drop, g.k), moved,
                                  g.strict, g.require_batch_invariance, g.batch_invariance_atol)

    def _served_scores(self, scorer) -> dict[int, np.ndarray]:
        """Held-out scores as the rank stage computes them under load: the requests of
        ``served_batch_queries`` queries in one dynamic batch (:func:`rank_batch`, the served code)."""
        ids = list(self.heldout)
        group = self.settings.gate.served_batch_queries
        out: dict[int, np.ndarray] = {}
        for i in range(0, len(ids), group):
            chunk = ids[i:i + group]
            outcomes = rank_batch(scorer, [self.heldout[q] for q in chunk], self.settings.batching.max_batch_tokens,
                                  self.settings.tokenize.max_candidates)
            for q, o in zip(chunk, outcomes):
                if isinstance(o, Exception):
                    raise BuildError(f"scoring held-out query {q} in a served batch failed: {o}")
                out[q] = next(iter(o.values()))[:, 0]
        return out

    def _calibration_batches(self, ranker: LoadedRanker) -> list:
        q = self.settings.quant
        pairs = calibration_pairs(self.dataset, q.calibration_pairs, seed=self.settings.check.seed)
        return fixed_length_batches(ranker.tokenizer, pairs, q.calibration_length, 32, ranker.input_names)

    def _finish(self, name: str, onnx: Path, candidates: list[RuntimeSettings], precision: str,
                pruned: bool = False, notes: dict | None = None) -> VariantBuild:
        runtime, speed = self._choose_runtime(onnx, candidates)
        result = require(self._gate(name, onnx, runtime, pruned))
        self.log(f"      {result.describe()}")
        self.log(f"      runtime: {runtime.runtime} {runtime.inference_precision} (pairs/s at batch {SPEED_BATCH}: "
                 + ", ".join(f"{k} {v:.0f}" for k, v in speed.items()) + ")")
        return VariantBuild(name, onnx, runtime, precision, result, speed, notes or {})

    def _int8_ladder(self, name: str, src: Path, ranker: LoadedRanker, pruned: bool) -> VariantBuild:
        batches = self._calibration_batches(ranker)
        last: GateResult | None = None
        for step, exclude in transforms.mixed_precision_ladder(transforms.weight_matmuls(src)):
            dst = self.work / f"{name}.onnx"
            transforms.qdq_int8(src, dst, batches, self.settings.quant, exclude)
            runtime, speed = self._choose_runtime(dst, self._cpu_runtimes())
            runtime = dataclasses.replace(runtime, cache_optimized_model=False)  # see RuntimeSettings
            last = self._gate(name, dst, runtime, pruned)
            self.log(f"      QDQ INT8 ({step}, {self.settings.quant.method} calibration on "
                     f"{self.settings.quant.calibration_pairs} pairs): {last.describe()}")
            if last.passed:
                self.log(f"      runtime: {runtime.runtime} (pairs/s at batch {SPEED_BATCH}: "
                         + ", ".join(f"{k} {v:.0f}" for k, v in speed.items()) + ")")
                quantized, total = _quantized_matmuls(dst)
                notes = {"calibration": dataclasses.asdict(self.settings.quant), "mixed_precision": step,
                         "fp32_layers": exclude, "format": "QDQ (symmetric, per-channel weights)",
                         "quantizer": "onnxruntime quantize_static", "quantized_matmuls": quantized, "weight_matmuls": total}
                return VariantBuild(name, dst, runtime, "int8", last, speed, notes)
        require(last)  # raises with the last (least aggressive) attempt's figures
        raise AssertionError("unreachable")

    # -- variants --------------------------------------------------------------------------
    def fp32(self) -> VariantBuild:
        return self._finish("fp32", self.fp32_onnx, self._cpu_runtimes(), "fp32")

    def fused(self) -> VariantBuild:
        config = self.ranker.model.config
        if config.model_type != "bert":
            raise BuildError(f"variant 'fused' needs a BERT-family ranker, got model_type {config.model_type!r}")
        dst, stats = transforms.fuse(self.fp32_onnx, self.work / "fused.onnx", config.num_attention_heads, config.hidden_size)
        checks = check_onnx(self.ranker, dst, self.settings.check)
        self.log(f"      fused {stats}; max abs diff vs PyTorch {max(c.max_abs_diff for c in checks):.2e}")
        return self._finish("fused", dst, [RuntimeSettings()], "fp32", notes={"fusions": stats})

    def int8(self) -> VariantBuild:
        return self._int8_ladder("int8", self.fp32_onnx, self.ranker, pruned=False)

    def int8_dynamic(self) -> VariantBuild:
        q = self.settings.quant
        units = native_matrix_units()
        weights = dynamic_weight_type(q.dynamic_weights, units)
        self.log(f"      weights {weights.upper()} (dynamic_weights={q.dynamic_weights}; "
                 f"this CPU {'has' if 'int8' in units else 'has no'} VNNI/AMX-INT8)")
        src, notes = self.fp32_onnx, {"weights": weights, "smoothquant": None}
        if q.smooth_alpha is not None:
            src = self.work / "int8_dynamic_smoothed.onnx"
            stats = smoothquant.smooth(self.fp32_onnx, src, self._calibration_batches(self.ranker), q.smooth_alpha,
                                       only=transforms.weight_matmuls(self.fp32_onnx))  # the head stays as it is
            notes["smoothquant"] = stats
            self.log(f"      SmoothQuant alpha {q.smooth_alpha} on {stats['groups']} MatMul inputs ({q.calibration_pairs} "
                     f"calibration pairs): activation max/mean channel {stats['activation_max_over_mean']['before']} -> "
                     f"{stats['activation_max_over_mean']['after']} (median)")
        dst = transforms.dynamic_int8(src, self.work / "int8_dynamic.onnx", weights)
        return self._finish("int8_dynamic", dst, [RuntimeSettings()], "int8 (dynamic)", notes=notes)

    def bf16(self) -> VariantBuild:
        if not cpu_has_bf16_units():
            raise BuildError("variant 'bf16' needs a CPU with BF16 matrix units (AMX or AVX512-BF16); this one has none")
        return self._finish("bf16", self.fp32_onnx, [RuntimeSettings("openvino", "bf16")], "bf16")

    def fp16(self) -> VariantBuild:
        dst = transforms.fp16(self.fp32_onnx, self.work / "fp16.onnx")
        checks = check_onnx(self.ranker, dst, dataclasses.replace(self.settings.check, atol=FP16_ATOL))
        self.log(f"      FP16 on ONNX Runtime CPU: max abs diff vs PyTorch {max(c.max_abs_diff for c in checks):.2e} (limit {FP16_ATOL})")
        result = require(self._gate("fp16", dst, RuntimeSettings()))
        self.log(f"      {result.describe()}")
        return VariantBuild("fp16", dst, RuntimeSettings(), "fp16", result, {}, {"target": "gpu (TensorRT)"}, served_on_cpu=False)

    def int8_trt(self) -> VariantBuild:
        """The QDQ model TensorRT builds its INT8 engine from, made by NVIDIA's own quantizer
        (ModelOpt ONNX PTQ, calibrated on CPU, in its own venv) and held to the engine's strict
        gate: every encoder Linear quantized, NDCG@10 within 0.5% of FP32, top-10 overlap >= 0.95."""
        from rankserve.optimize import modelopt_ptq

        s = self.settings.modelopt
        batches = modelopt_ptq.calibration_batches(self.dataset, self.ranker.tokenizer, self.ranker.input_names, s,
                                                   seed=self.settings.check.seed)
        dst = self.work / "int8_trt.onnx"
        self.log(f"      ModelOpt INT8 PTQ: {s.calibration_method} calibration on {s.calibration_pairs} pairs, "
                 f"excluded op types {list(s.op_types_to_exclude)}, attention matmuls {'FP32' if s.disable_mha_qdq else 'INT8'}")
        stats = modelopt_ptq.quantize(self.fp32_onnx, dst, batches, s, log=lambda line: self.log(f"        | {line}"))
        self.log(f"      {stats.quantized_matmuls}/{stats.weight_matmuls} weight MatMuls quantized in {stats.seconds:.0f} s")
        if stats.quantized_matmuls != stats.weight_matmuls:
            raise BuildError(f"ModelOpt quantized {stats.quantized_matmuls} of {stats.weight_matmuls} weight MatMuls: every Linear must be INT8")
        scorer = create_ranker(dst, RuntimeSettings(), self.settings.ort)
        result = require(gate("int8_trt", self.dataset, self._alone_scores(scorer), self.reference,
                              **self.settings.gate.for_engine("int8")))
        self.log(f"      {result.describe()}")
        return VariantBuild("int8_trt", dst, RuntimeSettings(), "int8", result, {},
                            {"target": "gpu (TensorRT INT8 engine)", "quantizer": "nvidia-modelopt ONNX PTQ",
                             "modelopt": dataclasses.asdict(s), **stats.to_dict(), "format": "QDQ (symmetric, per-channel weights)"},
                            served_on_cpu=False)

    def _pruned_ranker(self) -> LoadedRanker:
        p = self.settings.prune
        key = hashlib.sha256(
            json.dumps({"ranker": str(self.ranker.source.resolve()), "files": _dir_digest(self.ranker.source),
                        "prune": dataclasses.asdict(p)}, sort_keys=True).encode()
        ).hexdigest()[:16]
        cached = self.work / f"pruned-{key}"
        if not (cached / "config.json").exists():
            from rankserve.optimize.prune import distill, prune_layers

            layers = getattr(self.ranker.model.config, "num_hidden_layers", "?")
            self.log(f"      pruning {layers} -> {len(p.keep_layers)} layers (keeping {list(p.keep_layers)}), distilling from FP32")
            student = prune_layers(self.ranker.model, p.keep_layers)
            losses = distill(student, self.ranker.model, self.ranker.tokenizer, self.dataset, p)
            tmp = self.work / f"pruned-{key}.tmp"
            student.save_pretrained(tmp, safe_serialization=True)
            self.ranker.tokenizer.save_pretrained(tmp)
            (tmp / "distillation.json").write_text(json.dumps({"first_mse": losses[0], "last_mse": float(np.mean(losses[-20:]))}))
            shutil.rmtree(cached, ignore_errors=True)
            tmp.rename(cached)
        else:
            self.log(f"      reusing the distilled pruned ranker in {cached}")
        return load_ranker(cached, self.settings)

    def _pruned_onnx(self) -> tuple[LoadedRanker, Path]:
        if not hasattr(self, "_pruned"):
            student = self._pruned_ranker()
            dst = export_onnx(student, self.work / "pruned.onnx", self.settings.opset)
            check_onnx(student, dst, self.settings.check)
            self._pruned = (student, dst)
        return self._pruned

    def pruned(self) -> VariantBuild:
        _, dst = self._pruned_onnx()
        return self._finish("pruned", dst, self._cpu_runtimes(), "fp32", pruned=True,
                            notes={"kept_layers": list(self.settings.prune.keep_layers)})

    def pruned_int8(self) -> VariantBuild:
        student, dst = self._pruned_onnx()
        build = self._int8_ladder("pruned_int8", dst, student, pruned=True)
        build.notes["kept_layers"] = list(self.settings.prune.keep_layers)
        return build

    def build(self, name: str) -> VariantBuild | None:
        """Build one variant (its time logged); ``None`` when the machine cannot run it (logged, not an error)."""
        started = time.perf_counter()
        try:
            return self._build(name)
        finally:
            self.log(f"      ({name}: {time.perf_counter() - started:.0f} s)")

    def _build(self, name: str) -> VariantBuild | None:
        self.log(f"    variant {name}")
        if name == "bf16" and not cpu_has_bf16_units():
            self.log("      skipped: this CPU has no BF16 matrix units (AMX / AVX512-BF16)")
            return None
        if name == "int8_trt":
            from rankserve.optimize.modelopt_ptq import modelopt_python

            try:
                modelopt_python()
            except BuildError as exc:  # the TensorRT INT8 engine needs it; CPU serving does not
                self.log(f"      skipped: {exc}")
                return None
        return getattr(self, name)()


def _quantized_matmuls(onnx_path: Path) -> tuple[int, int]:
    import onnx

    from rankserve.optimize.modelopt_ptq import quantized_matmuls

    return quantized_matmuls(onnx.load(str(onnx_path), load_external_data=False))


def _dir_digest(directory: Path) -> str:
    """Content digest of a model directory (names and SHA-256 of its files)."""
    from rankserve.builder.repository import sha256

    return hashlib.sha256("".join(f"{p.name}:{sha256(p)};" for p in sorted(directory.iterdir()) if p.is_file()).encode()).hexdigest()


def best_cpu_variant(builds: list[VariantBuild]) -> VariantBuild:
    served = [b for b in builds if b.served_on_cpu]
    if not served:
        raise BuildError("no CPU variant passed: nothing to serve as the default ranker")
    return max(served, key=lambda b: b.pairs_per_s)


def is_strict(b: VariantBuild) -> bool:
    """Whether the variant passed the strict gate (a plain FP32 build without evaluation data is the reference)."""
    return b.gate.strict if b.gate is not None else b.name == "fp32"


def default_order(builds: list[VariantBuild], named: str | None = None) -> list[VariantBuild]:
    """The CPU variants in the order they may become the default ``ranker``: the ``named`` one,
    then those passing the strict gate, then the others (served under their own names only), each
    group fastest first."""
    cpu = sorted((b for b in builds if b.served_on_cpu), key=lambda b: -b.pairs_per_s)
    if named is not None and named not in {b.name for b in cpu}:
        raise BuildError(f"--default {named}: not among the CPU variants built ({', '.join(b.name for b in cpu)})")
    return sorted(cpu, key=lambda b: (b.name != named, not is_strict(b)))

