"""``rankserve build``: the checked steps from a ranker directory to a Triton model repository.

export -> numeric check against PyTorch -> variants (optimize, check, accuracy gate, runtime by
measurement) -> lay out (stage code, tokenizer, configs) -> manifest.
Nothing in the output is touched until the export has passed its check.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
import shutil
import tempfile
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Callable

from rankserve import __version__, api
from rankserve.builder import configs, memory, onnx_files
from rankserve.builder.consistency import repository_problems, require_consistent
from rankserve.builder.export import check_onnx, check_serving, export_onnx, load_ranker
from rankserve.errors import BuildError
from rankserve.data.catalog import Dataset
from rankserve.settings import BuildSettings, RuntimeSettings

MANIFEST = "manifest.json"
def _stage_sources() -> Path:
    """The tracked stage adapters (``<stage>/1/model.py``): package data of an installed wheel
    (``rankserve/model_repository``, see setup.py), else the checkout's ``model_repository/``
    (editable installs)."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "model_repository"
    return installed if installed.is_dir() else package.parents[1] / "model_repository"


STAGE_SOURCES = _stage_sources()
"""Where the stage adapters are read from; the CPU rank adapter serves every CPU variant."""

_VERSIONED = ("torch", "transformers", "tokenizers", "onnx", "onnxruntime", "numpy", "nvidia-pytriton")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "rankserve": __version__}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def install_stage(name: str, out: Path, source_stage: str | None = None) -> Path:
    """Copy the tracked ``model.py`` of a stage into ``out/<name>/1/`` (no-op when building in place)."""
    src = STAGE_SOURCES / (source_stage or name) / "1" / "model.py"
    if not src.exists():
        raise BuildError(f"stage adapter {src} is missing: reinstall rankserve (the wheel ships the adapters)")
    version_dir = out / name / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    dst = version_dir / "model.py"
    if dst.resolve() != src.resolve():
        shutil.copyfile(src, dst)
    return version_dir


def write_serving_tokenizer(hf_tokenizer, path: Path) -> Path:
    """Save the fast tokenizer as ``tokenizer.json`` with its pad token and no fixed truncation
    (the tokenize stage applies ``max_length`` from its settings)."""
    backend = hf_tokenizer.backend_tokenizer
    backend.no_truncation()
    backend.enable_padding(pad_id=hf_tokenizer.pad_token_id, pad_token=hf_tokenizer.pad_token)
    backend.save(str(path))
    return path


def _clear_stale_models(out: Path, keep: set[str]) -> None:
    """Remove generated model folders of an earlier build that this build does not produce."""
    tracked = {api.TOKENIZE_MODEL, api.RANK_MODEL, api.POSTPROCESS_MODEL}
    for config in out.glob("*/config.pbtxt"):
        name = config.parent.name
        if name in keep:
            continue
        if name in tracked:
            config.unlink()
        else:
            shutil.rmtree(config.parent)


def build_repository(
    ranker_dir: str | Path,
    out: str | Path,
    settings: BuildSettings = BuildSettings(),
    log: Callable[[str], None] = print,
    dataset: Dataset | None = None,
    work_dir: str | Path | None = None,
) -> dict:
    """Build the CPU model repository for ``ranker_dir`` into ``out``; returns the manifest.

    Variants other than ``fp32`` need ``dataset`` (calibration pairs and held-out queries for the
    accuracy gate). ``work_dir`` keeps intermediate files (and the distilled pruned ranker) between
    builds; by default they go to a temporary folder.
    """
    from rankserve.builder.variants import VariantBuild, VariantBuilder, best_cpu_variant, is_strict
    from rankserve.stages.tokenize import load_tokenizer

    out = Path(out)
    started = time.perf_counter()
    if dataset is None and settings.variants != ("fp32",):
        raise BuildError(f"variants {list(settings.variants)} need --data: calibration pairs and held-out queries for the accuracy gate")
    log(f"[1/5] loading ranker from {ranker_dir}")
    ranker = load_ranker(ranker_dir, settings)
    parameters = int(sum(p.numel() for p in ranker.model.parameters()))
    log(f"      {type(ranker.model).__name__} ({ranker.model.config.model_type}: {ranker.family}"
        f"{', not among the tested architectures: the checks below decide' if ranker.family == 'untested' else ''}), "
        f"{parameters / 1e6:.1f}M parameters, inputs {list(ranker.input_names)}")
    with tempfile.TemporaryDirectory(prefix="rankserve-build-") as tmp:
        work = Path(work_dir) if work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        fp32_onnx = work / "fp32.onnx"
        log(f"[2/5] exporting to ONNX (opset {settings.opset}, dynamic batch and sequence axes)")
        export_onnx(ranker, fp32_onnx, settings.opset)
        log(f"[3/5] checking ONNX Runtime against PyTorch at (batch, length) {list(settings.check.shapes)}")
        checks = check_onnx(ranker, fp32_onnx, settings.check)
        worst = max(c.max_abs_diff for c in checks)
        log(f"      max abs difference {worst:.2e} <= {settings.check.atol:g}, rankings identical")
        tokenizer_json = write_serving_tokenizer(ranker.tokenizer, Path(tmp) / "tokenizer.json")
        serving_diff = check_serving(ranker, fp32_onnx, load_tokenizer(tokenizer_json, settings.tokenize), settings.batching,
                                     settings.check.atol)
        log(f"      served path (serving tokenizer, rank stage batching and re-padding) vs PyTorch on each pair alone: "
            f"max abs difference {serving_diff:.2e}")
        if dataset is None:
            builds = [VariantBuild("fp32", fp32_onnx, RuntimeSettings(), "fp32", None, {})]
        else:
            log(f"[4/5] variants {list(settings.variants)}: build, check, accuracy gate on "
                f"{len(dataset.split('heldout'))} held-out queries, runtime by measurement")
            builder = VariantBuilder(ranker, fp32_onnx, dataset, settings, load_tokenizer(tokenizer_json, settings.tokenize), work, log)
            builds = [b for b in (builder.build(v) for v in settings.variants) if b is not None]
        best_cpu_variant(builds)  # raises when no CPU variant passed
        hidden = hidden_size(ranker.model.config)
        served, estimates = _loaded_variants(builds, settings, hidden, log, ranker.tokenizer)
        default = next(iter(served.values()))  # the named variant, else the fastest loaded one passing the strict gate
        why = ("named by --default" if settings.default_variant else
               f"the fastest loaded variant passing the strict gate: NDCG@{settings.gate.k} within "
               f"{100 * settings.gate.max_ndcg_drop:g}% of FP32 and top-{settings.gate.k} overlap >= {settings.gate.min_top_k_overlap:g}")
        if not settings.default_variant and not is_strict(default):
            raise BuildError(f"none of the loaded variants {list(served)} passes the strict gate ({why.split(': ', 1)[1]}): "
                             "load one that does (fp32 always does), or name the default with --default")
        model_configs = configs.cpu_repository(settings, {n: b.runtime for n, b in served.items()}, default.name)
        log(f"[5/5] laying out {out}: loaded {list(served)}, default ranker = {default.name} "
            f"({default.pairs_per_s:.0f} pairs/s at build; {why})")
        out.mkdir(parents=True, exist_ok=True)
        _clear_stale_models(out, set(model_configs))
        for name, b in served.items():
            rank_name = configs.rank_model_name(name, default.name)
            onnx_files.copy(b.onnx, install_stage(rank_name, out, source_stage=api.RANK_MODEL) / "model.onnx")
        tokenize_dir = install_stage(api.TOKENIZE_MODEL, out)
        shutil.copyfile(tokenizer_json, tokenize_dir / "tokenizer.json")
    install_stage(api.POSTPROCESS_MODEL, out)
    for name, config in model_configs.items():
        if config.platform == "ensemble":
            (out / name / "1").mkdir(parents=True, exist_ok=True)  # ensembles need a version dir
        (out / name / "config.pbtxt").write_text(configs.to_text(config))
        shutil.rmtree(out / name / configs.WARMUP_DIR, ignore_errors=True)
        configs.write_warmup(out / name, config, settings)
    require_consistent(repository_problems(out))  # each config against its ONNX file, ensembles wired
    estimate = memory.estimate_repository(out, hidden)
    memory.require_budget(estimate, settings.memory_budget_bytes, f"the repository {out}")
    log(f"      estimated memory when served: {memory.format_bytes(estimate.total)}"
        + (f" (budget {memory.format_bytes(settings.memory_budget_bytes)})" if settings.memory_budget_bytes else ""))
    if settings.batching.scheduling == "deadline":
        log(f"      rank scheduling: deadline ({settings.batching.deadline_slowdown:g} x time alone); Triton's queue time no "
            "longer shows the rank stage's wait, so an autoscaler on it (deploy/kubernetes HPA) will not scale out")

    source = Path(ranker_dir).resolve()
    manifest = {
        "rankserve_version": __version__,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "target": settings.target,
        "build_seconds": round(time.perf_counter() - started, 1),
        "ranker": {
            "source": str(source),
            "architecture": type(ranker.model).__name__,
            "model_type": ranker.model.config.model_type,
            "family": ranker.family,
            "parameters": parameters,
            "hidden_size": hidden,
            "inputs": list(ranker.input_names),
            "files": {p.name: sha256(p) for p in sorted(source.iterdir()) if p.is_file()},
        },
        "models": {name: model_entry(out, name) for name in model_configs},
        "default_variant": default.name,
        "default_rule": "named" if settings.default_variant else "fastest strict",
        "variants": {
            b.name: {
                "rank_model": configs.rank_model_name(b.name, default.name) if b.name in served else None,
                "ensemble": configs.ranker_model_name(b.name) if b.name in served else None,
                "loaded": b.name in served,
                "estimated_memory_bytes": estimates.get(b.name),
                "onnx_sha256": sha256(b.onnx) if b.onnx.exists() else None,
                "onnx_bytes": onnx_files.model_bytes(b.onnx) if b.onnx.exists() else None,
                "external_data": bool(onnx_files.external_locations(b.onnx)) if b.onnx.exists() else None,
                **b.to_dict(),
            }
            for b in builds
        },
        "skipped_variants": [v for v in settings.variants if v not in {b.name for b in builds}],
        "serving": {"loaded": list(served), "memory_budget_bytes": settings.memory_budget_bytes, "estimate": estimate.to_dict()},
        "opset": settings.opset,
        "numeric_check": {"atol": settings.check.atol, "shapes": [asdict(c) for c in checks],
                          "served_path_max_abs_diff": serving_diff},
        "versions": _versions(),
        "settings": settings.to_dict(),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"done in {manifest['build_seconds']} s: {len(model_configs)} models, manifest {out / MANIFEST}")
    return manifest


def hidden_size(config) -> int:
    """The ranker's hidden width (``dim`` in DistilBERT), for the working-memory estimate."""
    return int(getattr(config, "hidden_size", None) or getattr(config, "dim", None) or 1024)


def _loaded_variants(builds: list, settings: BuildSettings, hidden: int, log: Callable[[str], None],
                     ranker_tokenizer=None) -> tuple[dict, dict[str, int]]:
    """The CPU variants the repository loads, the default first (see ``BuildSettings.load`` and
    :func:`~rankserve.builder.variants.default_order`), and the estimated memory of every CPU
    variant; refuses a set that does not fit the budget."""
    from rankserve.builder.variants import default_order

    cpu = default_order(builds, settings.default_variant)
    vocab = len(ranker_tokenizer) if ranker_tokenizer is not None else None
    estimates = memory.variant_bytes({b.name: memory.model_weights(b.onnx, vocab) for b in cpu},
                                     {b.name: (b.runtime.runtime, b.runtime.inference_precision) for b in cpu},
                                     settings.rank_instances, settings.batching.max_batch_tokens, hidden, settings.ort.prepack_weights)
    names = memory.choose_loaded(settings.load, estimates, [b.name for b in cpu], settings.memory_budget_bytes,
                                 settings.auto_load_limit_bytes)
    for b in cpu:
        log(f"      {b.name:<13} {memory.format_bytes(estimates[b.name]):>10} estimated when served  "
            f"{'loaded' if b.name in names else 'not loaded (built and gated; --load ' + b.name + ' serves it)'}")
    total = memory.shared_bytes() + sum(estimates[n] for n in names)
    if settings.memory_budget_bytes and total > settings.memory_budget_bytes:
        raise BuildError(f"the loaded variants {names} need an estimated {memory.format_bytes(total)}, more than the budget "
                         f"of {memory.format_bytes(settings.memory_budget_bytes)} (per variant: "
                         + ", ".join(f"{n} {memory.format_bytes(estimates[n])}" for n in estimates)
                         + f"; server, tokenize and postprocess {memory.format_bytes(memory.shared_bytes())}); "
                         "load fewer or smaller variants (--load int8_dynamic), or raise --memory-budget")
    by_name = {b.name: b for b in cpu}
    return {n: by_name[n] for n in names}, estimates


def model_entry(repo: Path, name: str) -> dict:
    """A model's manifest entry: its config and the checksums of its version files (a model over
    2 GB: its weights file too) and warmup inputs (the tracked ``model.py`` adapters excluded: they
    follow the code, and ``refresh_configs`` renews them)."""
    files = [p for p in sorted((repo / name / "1").iterdir()) if p.is_file() and p.suffix != ".py"]
    files += sorted(p for p in (repo / name / configs.WARMUP_DIR).glob("*") if p.is_file())
    return {"config": f"{name}/config.pbtxt", "files": {str(p.relative_to(repo)): sha256(p) for p in files}}


def wait_for_manifest(repo: str | Path, timeout_s: float, poll_s: float = 5.0, log=print) -> Path:
    """Wait up to ``timeout_s`` for ``repo``'s manifest to appear (a release another Job is still
    publishing), saying so every minute; returns its path, or raises ``BuildError`` at the timeout."""
    path = Path(repo) / MANIFEST
    start = last = time.monotonic()
    if not path.exists():
        log(f"waiting up to {timeout_s:.0f} s for {path}")
    while not path.exists():
        waited = time.monotonic() - start
        if waited >= timeout_s:
            raise BuildError(f"{path} did not appear within {timeout_s:.0f} s: is the release published "
                             "(and, on GPU nodes, are its engines built)?")
        if time.monotonic() - last >= 60:
            log(f"still waiting for {path} ({waited:.0f} of {timeout_s:.0f} s)")
            last = time.monotonic()
        time.sleep(min(poll_s, max(timeout_s - waited, 0.01)))
    return path


def verify_repository(repo: str | Path) -> dict:
    """Check that every file the manifest lists is present with its checksum; returns the manifest."""
    repo = Path(repo)
    path = repo / MANIFEST
    if not path.exists():
        raise BuildError(f"{repo} has no {MANIFEST}: build it with `rankserve build --out {repo}`")
    try:
        manifest = json.loads(path.read_text())
        models = manifest["models"]
    except (ValueError, KeyError) as exc:
        raise BuildError(f"{path} is not a valid rankserve manifest: {exc}") from None
    for name, entry in models.items():
        if not (repo / entry["config"]).exists():
            raise BuildError(f"{repo / entry['config']} is missing; rebuild the repository")
        for rel, digest in entry["files"].items():
            file = repo / rel
            if not file.exists():
                raise BuildError(f"{file} is missing; rebuild the repository")
            if sha256(file) != digest:
                raise BuildError(f"{file} does not match its checksum in {path}; rebuild the repository")
        onnx = repo / name / "1" / "model.onnx"
        try:  # weights beside the graph must be covered by the checksums too
            needs = onnx_files.model_files(onnx)[1:] if onnx.exists() else []
        except Exception:  # noqa: BLE001 - not a readable ONNX graph: the server names the model that fails to load
            needs = []
        for needed in needs:
            if str(needed.relative_to(repo)) not in entry["files"]:
                raise BuildError(f"{onnx} needs its weights file {needed.name}, which {path} does not list; "
                                 "rebuild the repository")
    return manifest


def expected_configs(manifest: dict, settings: BuildSettings) -> dict[str, str]:
    """The ``config.pbtxt`` text of every model, as this version of rankserve generates it for the
    variants, runtimes and default the manifest records."""
    runtimes = {name: RuntimeSettings(v["runtime"], v["inference_precision"],
                                      cache_optimized_model=v.get("cache_optimized_model", True))
                for name, v in manifest["variants"].items() if v.get("rank_model")}
    models = configs.cpu_repository(settings, runtimes, manifest["default_variant"])
    if manifest.get("engines"):  # a GPU build added TensorRT models next to these
        models.update(configs.gpu_models(settings, manifest["engines"]))
    return {name: configs.to_text(config) for name, config in models.items()}


def refresh_configs(repo: str | Path, settings: BuildSettings) -> list[str]:
    """Rewrite the configs and stage adapters that differ from what this version generates (e.g.
    after an upgrade that changed batching), leaving model files and manifest alone; returns the
    models rewritten. Refuses when the set of models differs: that needs a rebuild."""
    repo = Path(repo)
    manifest = verify_repository(repo)
    expected = expected_configs(manifest, settings)
    if set(expected) != set(manifest["models"]):
        raise BuildError(f"{repo} holds other models than this version lays out; rebuild the repository")
    changed = []
    for name, text in expected.items():
        adapter = repo / name / "1" / "model.py"
        stage = next((s for s in (api.RANK_MODEL, api.TOKENIZE_MODEL) if name.startswith(f"{s}_")), name)
        source = STAGE_SOURCES / stage / "1" / "model.py"
        stale_adapter = adapter.exists() and source.exists() and adapter.read_bytes() != source.read_bytes()
        if (repo / name / "config.pbtxt").read_text() != text or stale_adapter:
            (repo / name / "config.pbtxt").write_text(text)
            configs.write_warmup(repo / name, configs.parse(text), settings)
            if stale_adapter:
                install_stage(name, repo, source_stage=stage)
            changed.append(name)
    return changed
