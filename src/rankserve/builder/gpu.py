"""``rankserve build --target gpu``: TensorRT engines next to a CPU build, checked and gated.

Runs on the GPU host, in the TensorRT container that matches the Triton image. It starts from a
repository the CPU build laid out (its manifest lists the FP16 and QDQ INT8 ONNX variants with
checksums, kept in the work directory) and adds ``rank_trt_<precision>`` (one plan per GPU type)
and ``ranker_trt_<precision>`` to it.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

from rankserve import api
from rankserve.builder import configs
from rankserve.builder.consistency import ensemble_problems, onnx_signature, require_consistent, tensorrt_problems
from rankserve.builder.engine import (SOURCE_VARIANT, build_engine, compare_to_reference, engine_model_name,
                                      engine_record, local_gpus, plan_filename, profile_for, run_engine,
                                      tensorrt_version)
from rankserve.builder.repository import (MANIFEST, build_hint, install_stage, model_entry, recorded_ranker, sha256,
                                          verify_repository)
from rankserve.data.catalog import Dataset
from rankserve.errors import BuildError
from rankserve.optimize.gate import gate, require
from rankserve.settings import BuildSettings, EngineProfile, EngineSettings, RuntimeSettings
from rankserve.stages.rank import create_ranker
from rankserve.stages.tokenize import encode_pairs, load_tokenizer


def checked_onnx(manifest: dict, work: Path, variant: str) -> Path:
    """``work/<variant>.onnx``, the CPU build's file of that variant, checked against the SHA-256
    its manifest records (a file changed or rebuilt since is refused)."""
    record = manifest["variants"].get(variant)
    path = work / f"{variant}.onnx"
    if record is None or not path.exists() or not record.get("onnx_sha256"):
        cpu_build = build_hint("model_repository", recorded_ranker(manifest),
                               f" --variants fp32,{variant} --data artifacts/data --work-dir {work}")
        raise BuildError(f"the GPU build needs the '{variant}' ONNX variant of the CPU build, with its checksum in the "
                         f"manifest: build it first (`make build`, or {cpu_build}"
                         + ("; int8_trt needs the ModelOpt venv: `make modelopt`" if variant == "int8_trt" else "")
                         + ")")
    if sha256(path) != record["onnx_sha256"]:
        raise BuildError(f"{path} does not match the checksum the manifest records for '{variant}'; rebuild the CPU variants")
    return path


def _source_onnx(manifest: dict, work: Path, precision: str) -> Path:
    """The ONNX file an engine of ``precision`` is built from, checked."""
    return checked_onnx(manifest, work, SOURCE_VARIANT[precision])


def build_gpu_repository(repo: Path, work: Path, dataset: Dataset, settings: BuildSettings,
                         log: Callable[[str], None] = print) -> dict:
    manifest = verify_repository(repo)
    checked_onnx(manifest, work, "fp32")  # the inputs first (checked again when used): a clear error before any GPU work
    for precision in settings.engine.precisions:
        _source_onnx(manifest, work, precision)
    gpus = local_gpus()
    if not gpus:
        raise BuildError("no NVIDIA GPU is visible (nvidia-smi): build the engines on the GPU host, "
                         "e.g. `docker compose run --rm build`")
    try:
        version = tensorrt_version()
    except ImportError:
        raise BuildError("TensorRT is not installed here: build the engines in the TensorRT container "
                         "that matches the Triton image (`docker compose run --rm build`)") from None
    gpu = gpus[0]
    log(f"TensorRT {version} on {gpu.name} (compute capability {gpu.compute_capability})")
    # the held-out queries, tokenized as tokenize_gpu will serve them: padded to the profiles' widths
    tokenize = configs.gpu_tokenize_settings(settings)
    tokenizer = load_tokenizer(repo / api.TOKENIZE_MODEL / "1" / "tokenizer.json", tokenize)
    by_query = dataset.by_query()
    heldout = [(q.query_id, encode_pairs(tokenizer, q.text, [dataset.products[j.product_id].text for j in by_query[q.query_id]],
                                         tokenize.buckets))
               for q in dataset.split("heldout")]
    for _, feeds in heldout:
        profile_for(settings.engine, *feeds["input_ids"].shape)  # a clear error before TensorRT's own
    fp32 = create_ranker(checked_onnx(manifest, work, "fp32"), RuntimeSettings(), settings.ort)  # the reference scores
    reference = {qid: fp32.score(feeds) for qid, feeds in heldout}
    engines = manifest.setdefault("engines", {})
    for precision in settings.engine.precisions:
        source = _source_onnx(manifest, work, precision)
        signature = onnx_signature(source)  # the engine's inputs and outputs are the ONNX file's
        config = configs.tensorrt_rank_model(engine_model_name(precision), settings, signature.input_names)
        require_consistent(tensorrt_problems(config, signature))  # before spending minutes on the engine
        started = time.perf_counter()
        plan = build_engine(source, precision, settings.engine, work / "trt" / "timing.cache", log)
        build_seconds = round(time.perf_counter() - started, 1)
        outputs = run_engine(plan, [{n: feeds[n] for n in signature.input_names} for _, feeds in heldout], settings.engine)
        scores = {qid: out for (qid, _), out in zip(heldout, outputs)}
        check = compare_to_reference(np.concatenate(list(scores.values())), np.concatenate(list(reference.values())),
                                     settings.engine.tolerance(precision), precision)
        result = require(gate(f"trt_{precision}", dataset, scores, reference, **settings.gate.for_engine(precision)))
        log(f"      max abs diff vs ONNX Runtime FP32 {check['max_abs_diff']:.3g} (limit {check['tolerance']:g}); {result.describe()}")
        folder = repo / engine_model_name(precision) / "1"
        folder.mkdir(parents=True, exist_ok=True)
        name = plan_filename(gpu.compute_capability, settings.engine.hardware_compatibility)
        (folder / name).write_bytes(plan)
        record = engine_record(precision, version, gpu, settings.engine, f"{engine_model_name(precision)}/1/{name}",
                               sha256(folder / name), {**check, "gate": result.to_dict()}, signature.input_names)
        record.update(build_seconds=build_seconds, plan_bytes=len(plan))
        others = [r for r in engines.get(precision, []) if r["plan_file"] != record["plan_file"]]
        engines[precision] = others + [record]
    tokenize_dir = install_stage(configs.GPU_TOKENIZE_MODEL, repo, source_stage=api.TOKENIZE_MODEL)
    shutil.copyfile(repo / api.TOKENIZE_MODEL / "1" / "tokenizer.json", tokenize_dir / "tokenizer.json")
    layout_gpu_models(repo, manifest, settings)
    log(f"engines {sorted(r['plan_file'] for records in engines.values() for r in records)} in {repo}; manifest {repo / MANIFEST}")
    return manifest


def layout_gpu_models(repo: Path, manifest: dict, settings: BuildSettings) -> None:
    """Write the configs of the TensorRT models and ensembles the manifest's engines call for,
    check them (ensemble wiring against the CPU models already there), record them, save the manifest."""
    models = configs.gpu_models(settings, manifest["engines"])
    existing = {p.parent.name: configs.parse(p) for p in repo.glob("*/config.pbtxt")}
    require_consistent(ensemble_problems({**existing, **models}))
    for name, config in models.items():
        (repo / name / "1").mkdir(parents=True, exist_ok=True)
        (repo / name / "config.pbtxt").write_text(configs.to_text(config))
        manifest["models"][name] = model_entry(repo, name)
    (repo / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def bench_engines(repo: Path, log: Callable[[str], None] = print) -> dict:
    """``rankserve engine-bench``, in the TensorRT container: every engine family of the repository
    that runs on this GPU, measured at :func:`bench_grid` shapes through Polygraphy."""
    from rankserve.builder.engine import bench_engine, bench_grid, usable_engine

    manifest = verify_repository(repo)
    gpus = local_gpus()
    if not gpus:
        raise BuildError("no NVIDIA GPU is visible (nvidia-smi): measure the engines on the GPU host")
    version = tensorrt_version()
    engines = []
    for precision, records in sorted(manifest.get("engines", {}).items()):
        record = usable_engine(records, version, gpus[0])
        settings = EngineSettings(profiles=tuple(EngineProfile(p["name"], tuple(p["min"]), tuple(p["opt"]), tuple(p["max"]))
                                                 for p in record["profiles"]))
        log(f"measuring {record['plan_file']} at {len(bench_grid(settings))} shapes")
        rows = bench_engine((repo / record["plan_file"]).read_bytes(), settings, record["inputs"], bench_grid(settings))
        engines.append({**{k: record.get(k) for k in ("precision", "plan_file", "build_seconds", "plan_bytes", "tensorrt_version")}, "grid": rows})
    return {"tensorrt": version, "gpu": {"name": gpus[0].name, "compute_capability": gpus[0].compute_capability}, "engines": engines}

