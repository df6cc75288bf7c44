"""``rankserve build``: the checked steps from a ranker directory to a Triton model repository.

export -> numeric check against PyTorch -> lay out (stage code, tokenizer, configs) -> manifest.
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
from rankserve.builder import configs
from rankserve.builder.export import check_onnx, export_onnx, load_ranker
from rankserve.errors import BuildError
from rankserve.settings import BuildSettings

MANIFEST = "manifest.json"
STAGE_SOURCES = Path(__file__).resolve().parents[3] / "model_repository"
"""The tracked stage adapters (``<stage>/1/model.py``); the CPU rank adapter serves every CPU variant."""

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


def _install_stage(name: str, out: Path, source_stage: str | None = None) -> Path:
    """Copy the tracked ``model.py`` of a stage into ``out/<name>/1/`` (no-op when building in place)."""
    src = STAGE_SOURCES / (source_stage or name) / "1" / "model.py"
    if not src.exists():
        raise BuildError(f"stage adapter {src} is missing: run the build from a rankserve checkout")
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


def build_repository(
    ranker_dir: str | Path,
    out: str | Path,
    settings: BuildSettings = BuildSettings(),
    log: Callable[[str], None] = print,
) -> dict:
    """Build the CPU model repository for ``ranker_dir`` into ``out``; returns the manifest."""
    out = Path(out)
    started = time.perf_counter()
    log(f"[1/4] loading ranker from {ranker_dir}")
    ranker = load_ranker(ranker_dir, settings)
    with tempfile.TemporaryDirectory(prefix="rankserve-build-") as tmp:
        onnx_tmp = Path(tmp) / "model.onnx"
        log(f"[2/4] exporting to ONNX (opset {settings.opset}, dynamic batch and sequence axes)")
        export_onnx(ranker, onnx_tmp, settings.opset)
        log(f"[3/4] checking ONNX Runtime against PyTorch at (batch, length) {list(settings.check.shapes)}")
        checks = check_onnx(ranker, onnx_tmp, settings.check)
        worst = max(c.max_abs_diff for c in checks)
        log(f"      max abs difference {worst:.2e} <= {settings.check.atol:g}, rankings identical")
        log(f"[4/4] laying out the model repository in {out}")
        out.mkdir(parents=True, exist_ok=True)
        rank_dir = _install_stage(api.RANK_MODEL, out)
        shutil.move(str(onnx_tmp), rank_dir / "model.onnx")
    tokenize_dir = _install_stage(api.TOKENIZE_MODEL, out)
    write_serving_tokenizer(ranker.tokenizer, tokenize_dir / "tokenizer.json")
    _install_stage(api.POSTPROCESS_MODEL, out)
    (out / api.RANKER_MODEL / "1").mkdir(parents=True, exist_ok=True)  # ensembles need a version dir
    model_configs = configs.cpu_repository(settings)
    for name, config in model_configs.items():
        (out / name / "config.pbtxt").write_text(configs.to_text(config))

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
            "parameters": int(sum(p.numel() for p in ranker.model.parameters())),
            "inputs": list(ranker.input_names),
            "files": {p.name: sha256(p) for p in sorted(source.iterdir()) if p.is_file()},
        },
        "models": {
            name: {
                "config": f"{name}/config.pbtxt",
                "files": {
                    str(p.relative_to(out)): sha256(p)
                    for p in sorted((out / name / "1").iterdir())
                    if p.is_file() and p.suffix != ".py"
                },
            }
            for name in model_configs
        },
        "rank": {"model": api.RANK_MODEL, "runtime": "onnxruntime", "precision": "fp32", "opset": settings.opset},
        "numeric_check": {"atol": settings.check.atol, "shapes": [asdict(c) for c in checks]},
        "versions": _versions(),
        "settings": settings.to_dict(),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"done in {manifest['build_seconds']} s: {len(model_configs)} models, manifest {out / MANIFEST}")
    return manifest


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
    return manifest
