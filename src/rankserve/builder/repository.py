"""``rankserve build``: the checked steps from a ranker directory to a Triton model repository.

export -> numeric check against PyTorch -> variants (optimize, check, accuracy gate, runtime by
measurement) -> lay out (stage code, tokenizer, configs) -> manifest.
Nothing in the output is touched until the export has passed its check.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import re
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
MANIFEST_FORMAT = 2
"""Format 2 lists every file of every model folder (config, stage code, weights, warmup inputs)
with its checksum; format 1 (no ``manifest_format``) left out ``model.py`` and the config's content."""
BYTECODE_DIR = "__pycache__"
"""Where a stub caches the compiled ``model.py``: never listed, removed before each start
(:func:`remove_bytecode`)."""
_MODEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


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


def _previous_models(out: Path) -> set[str]:
    """The model folders the manifest of an earlier build in ``out`` says rankserve made (any
    manifest format; none when there is no readable manifest)."""
    try:
        models = json.loads((out / MANIFEST).read_text()).get("models")
    except (OSError, ValueError, AttributeError):
        return set()
    return {name for name in models if isinstance(name, str)} if isinstance(models, dict) else set()


def _clear_stale_models(out: Path, keep: set[str]) -> None:
    """Remove the model folders of an earlier build that this build does not produce: only those
    the earlier manifest lists (rankserve made them). Any other folder (another team's model, a
    folder without a manifest entry) is refused with nothing deleted: serving refuses unlisted
    model folders anyway."""
    tracked = {api.TOKENIZE_MODEL, api.RANK_MODEL, api.POSTPROCESS_MODEL}
    previous = _previous_models(out)
    stale, foreign = [], []
    for folder in sorted(p for p in out.iterdir() if p.is_dir()):
        if folder.name in keep and not folder.is_symlink():
            continue
        (stale if folder.name in previous and not folder.is_symlink() else foreign).append(folder)
    if foreign:
        raise BuildError(f"{out} holds folders no earlier rankserve build made (its {MANIFEST} does not list them): "
                         f"{', '.join(p.name for p in foreign)}; nothing was deleted. A repository rankserve serves holds only "
                         "the models it built: move them out, or build into another folder")
    for folder in stale:
        if folder.name in tracked and (folder / "config.pbtxt").exists():
            (folder / "config.pbtxt").unlink()
        else:
            shutil.rmtree(folder)


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
            log("[4/5] variants: skipped (fp32 only; other variants, the accuracy gate and the runtime choice by "
                "measurement need --data)")
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
        strict_rule = (f"the fastest loaded variant passing the strict gate: NDCG@{settings.gate.k} within "
                       f"{100 * settings.gate.max_ndcg_drop:g}% of FP32 and top-{settings.gate.k} overlap >= "
                       f"{settings.gate.min_top_k_overlap:g}")
        why = ("named by --default" if settings.default_variant else
               "the only variant built: the FP32 reference" if dataset is None else strict_rule)
        if not settings.default_variant and not is_strict(default):
            raise BuildError(f"none of the loaded variants {list(served)} passes the strict gate ({strict_rule.split(': ', 1)[1]}): "
                             "load one that does (fp32 always does), or name the default with --default")
        model_configs = configs.cpu_repository(settings, {n: b.runtime for n, b in served.items()}, default.name)
        log(f"[5/5] laying out {out}: loaded {list(served)}, default ranker = {default.name} "
            f"({build_speed(default)}; {why})")
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
        "manifest_format": MANIFEST_FORMAT,
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


def build_speed(build) -> str:
    """The build's measured speed of a variant, or that none was measured (a build without --data
    times nothing: printing 0 pairs/s would read as a measurement)."""
    return f"{build.pairs_per_s:.0f} pairs/s at build" if build.speed else "speed not measured: no --data"


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
    total = memory.shared_bytes(settings.tokenize.instances) + sum(estimates[n] for n in names)
    if settings.memory_budget_bytes and total > settings.memory_budget_bytes:
        raise BuildError(f"the loaded variants {names} need an estimated {memory.format_bytes(total)}, more than the budget "
                         f"of {memory.format_bytes(settings.memory_budget_bytes)} (per variant: "
                         + ", ".join(f"{n} {memory.format_bytes(estimates[n])}" for n in estimates)
                         + f"; server, tokenize and postprocess {memory.format_bytes(memory.shared_bytes(settings.tokenize.instances))}); "
                         "load fewer or smaller variants (--load int8_dynamic), or raise --memory-budget")
    by_name = {b.name: b for b in cpu}
    return {n: by_name[n] for n in names}, estimates


def model_files(folder: Path) -> list[Path]:
    """Every file of a model folder Triton or its stub may read (config, stage code, weights,
    warmup inputs, any other), sorted; ``__pycache__`` left out (see :func:`remove_bytecode`).
    A symbolic link to a folder is refused (a link to a file is listed as the file)."""
    files = []
    for root, dirs, names in os.walk(folder):
        for d in list(dirs):
            if (Path(root) / d).is_symlink():
                raise BuildError(f"{Path(root) / d} is a symbolic link to a folder: a model folder holds its own files")
        dirs[:] = sorted(d for d in dirs if d != BYTECODE_DIR)
        files += [Path(root) / n for n in names]
    return sorted(files)


def model_entry(repo: Path, name: str) -> dict:
    """A model's manifest entry: the checksum of every file of its folder, config and ``model.py``
    included (``refresh_configs`` renews the entries of the configs and adapters it rewrites)."""
    return {"config": f"{name}/config.pbtxt",
            "files": {p.relative_to(repo).as_posix(): sha256(p) for p in model_files(repo / name)}}


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


RANKER_PLACEHOLDER = "RANKER_DIR"


def build_hint(out: str | Path, ranker: str | Path | None = None, extra: str = "") -> str:
    """A ``rankserve build`` command that works as printed (``--ranker`` is required): with the
    ranker directory when known (an earlier manifest records it), else :data:`RANKER_PLACEHOLDER`,
    which the hint explains."""
    known = ranker is not None and Path(ranker).is_dir()
    command = f"`rankserve build --ranker {ranker if known else RANKER_PLACEHOLDER} --out {out}{extra}`"
    return command if known else (f"{command} ({RANKER_PLACEHOLDER}: your Hugging Face cross-encoder directory; "
                                  "`make demo` trains the demo's into artifacts/ranker)")


def recorded_ranker(manifest: object) -> str | None:
    ranker = manifest.get("ranker") if isinstance(manifest, dict) else None
    source = ranker.get("source") if isinstance(ranker, dict) else None
    return source if isinstance(source, str) else None


def _invalid(path: Path, why: str) -> BuildError:
    return BuildError(f"{path} is not a valid rankserve manifest: {why}; rebuild the repository")


def _manifest_models(manifest: object, path: Path) -> dict[str, dict]:
    """The ``models`` of a format-2 manifest, each name, path and checksum checked for shape: a
    name is one plain folder name, a path relative inside its model's folder (no ``..``)."""
    if not isinstance(manifest, dict):
        raise _invalid(path, "not a JSON object")
    if manifest.get("manifest_format") != MANIFEST_FORMAT:
        raise BuildError(f"{path} was written by an older rankserve (manifest format {manifest.get('manifest_format', 1)}, "
                         f"this version checks format {MANIFEST_FORMAT}, which covers each model's code and config): "
                         f"rebuild with {build_hint(path.parent, recorded_ranker(manifest))}")
    models = manifest.get("models")
    if not isinstance(models, dict) or not models:
        raise _invalid(path, "'models' must be an object naming at least one model")
    for name, entry in models.items():
        if not _MODEL_NAME.match(name):
            raise _invalid(path, f"model name {name!r} is not a plain folder name")
        if not isinstance(entry, dict) or not isinstance(entry.get("files"), dict):
            raise _invalid(path, f"models.{name} must be an object with 'config' and 'files'")
        if entry.get("config") != f"{name}/config.pbtxt" or entry["config"] not in entry["files"]:
            raise _invalid(path, f"models.{name}.config must be '{name}/config.pbtxt', listed in its files")
        for rel, digest in entry["files"].items():
            parts = rel.split("/") if isinstance(rel, str) else []
            if (rel.startswith("/") or len(parts) < 2 or parts[0] != name
                    or any(p in ("", ".", "..") for p in parts)):
                raise _invalid(path, f"models.{name}: {rel!r} is not a path inside the model's folder {name}/")
            if not isinstance(digest, str) or not _SHA256.match(digest):
                raise _invalid(path, f"models.{name}: the checksum of {rel} is not a SHA-256 hex digest")
    return models


def verify_repository(repo: str | Path, current_adapters: bool = False) -> dict:
    """Check that the repository holds exactly what its manifest lists: every folder Triton would
    load is a listed model, every file of a model folder is listed, every listed file is present
    with its checksum and inside the repository (symbolic links resolved); returns the manifest.

    ``current_adapters``: a stage adapter (``model.py``) equal to this version's tracked one is
    accepted whatever its recorded checksum (for :func:`refresh_configs`, which re-records it)."""
    repo = Path(repo)
    path = repo / MANIFEST
    if not path.exists():
        raise BuildError(f"{repo} has no {MANIFEST}: build it with {build_hint(repo)}")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise BuildError(f"{path} is not a valid rankserve manifest: {exc}") from None
    models = _manifest_models(manifest, path)
    root = repo.resolve()
    unlisted = sorted(p.name for p in repo.iterdir() if p.is_dir() and p.name not in models)
    if unlisted:
        raise BuildError(f"{repo} holds model folders {path} does not list: {', '.join(unlisted)} (Triton would load them "
                         "unchecked); remove them or rebuild the repository")
    for name, entry in models.items():
        folder = repo / name
        if folder.is_symlink() or not folder.is_dir():
            raise BuildError(f"{folder} is missing (or a symbolic link); rebuild the repository")
        for rel, digest in entry["files"].items():
            file = repo / rel
            if not file.is_file():
                raise BuildError(f"{file} is missing; rebuild the repository")
            if not file.resolve().is_relative_to(root):
                raise BuildError(f"{file} points outside the repository ({file.resolve()}); rebuild the repository")
            if sha256(file) != digest and not (current_adapters and _is_current_adapter(repo, rel)):
                raise BuildError(f"{file} does not match its checksum in {path}; rebuild the repository")
        onnx = folder / "1" / "model.onnx"
        try:  # weights beside the graph must be covered by the checksums too
            needs = onnx_files.model_files(onnx)[1:] if onnx.exists() else []
        except Exception:  # noqa: BLE001 - not a readable ONNX graph: the server names the model that fails to load
            needs = []
        for needed in needs:
            if not needed.resolve().is_relative_to(root) or needed.relative_to(repo).as_posix() not in entry["files"]:
                raise BuildError(f"{onnx} needs its weights file {needed.name}, which {path} does not list; "
                                 "rebuild the repository")
        extra = [p for p in model_files(folder) if p.relative_to(repo).as_posix() not in entry["files"]]
        if extra:
            raise BuildError(f"{extra[0]} is not listed in {path} (Triton would load it unchecked); "
                             "remove it or rebuild the repository")
    return manifest


def _stage_of(name: str) -> str:
    return next((s for s in (api.RANK_MODEL, api.TOKENIZE_MODEL) if name.startswith(f"{s}_")), name)


def _is_current_adapter(repo: Path, rel: str) -> bool:
    name, *rest = rel.split("/")
    source = STAGE_SOURCES / _stage_of(name) / "1" / "model.py"
    return rest == ["1", "model.py"] and source.is_file() and (repo / rel).read_bytes() == source.read_bytes()


def remove_bytecode(repo: str | Path) -> list[Path]:
    """Remove every ``__pycache__`` folder of ``repo``'s model folders; the folders removed.

    The Python-backend stub imports ``model.py`` with an isolated interpreter (``-I``: the
    ``PYTHONDONTWRITEBYTECODE`` and ``PYTHONPYCACHEPREFIX`` of its environment are ignored), so it
    reads and writes ``<version>/__pycache__`` beside the verified source; bytecode whose header
    matches the source's size and time would run instead of it. Removed before every start, the
    stub compiles the verified source afresh. Refuses (BuildError) when one cannot be removed."""
    removed = []
    for cache in sorted(Path(repo).glob(f"*/**/{BYTECODE_DIR}")):
        if not cache.is_dir() or cache.is_symlink():
            continue
        try:
            for attempt in range(3):  # another server's stubs on the same repository may be writing or removing it too
                try:
                    shutil.rmtree(cache)
                    break
                except FileNotFoundError:
                    if not cache.exists():
                        break
                except OSError:
                    if attempt == 2 or not cache.exists():
                        raise
                    time.sleep(0.1)
        except OSError as exc:
            raise BuildError(f"cannot remove {cache} ({exc.strerror}): the server could run that bytecode instead of the "
                             "verified model.py; remove it, or serve a copy of the repository") from None
        removed.append(cache)
    return removed


def verify_for_start(repo: str | Path) -> dict:
    """What runs before each start of tritonserver on ``repo``: :func:`verify_repository`, then
    :func:`remove_bytecode`; returns the manifest."""
    manifest = verify_repository(repo)
    remove_bytecode(repo)
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
    after an upgrade that changed batching), leaving model files alone, and record them in the
    manifest; returns the models rewritten. Refuses when the set of models differs: that needs a
    rebuild. An adapter that already equals this version's (a repository built in place, in the
    checkout's ``model_repository/``, after a pull) is accepted and recorded."""
    repo = Path(repo)
    manifest = verify_repository(repo, current_adapters=True)
    expected = expected_configs(manifest, settings)
    if set(expected) != set(manifest["models"]):
        raise BuildError(f"{repo} holds other models than this version lays out; rebuild the repository")
    changed = []
    for name, text in expected.items():
        adapter = repo / name / "1" / "model.py"
        stage = _stage_of(name)
        source = STAGE_SOURCES / stage / "1" / "model.py"
        stale_adapter = adapter.exists() and source.exists() and adapter.read_bytes() != source.read_bytes()
        if (repo / name / "config.pbtxt").read_text() != text or stale_adapter:
            (repo / name / "config.pbtxt").write_text(text)
            configs.write_warmup(repo / name, configs.parse(text), settings)
            if stale_adapter:
                install_stage(name, repo, source_stage=stage)
            changed.append(name)
    entries = {name: model_entry(repo, name) for name in manifest["models"]}
    if entries != manifest["models"]:
        manifest["models"] = entries
        (repo / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return changed
