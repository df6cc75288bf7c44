"""The serving host's cache of what the CPU runtimes make from a model before its first request.

``RANKSERVE_CACHE_DIR`` names a writable folder of the serving host (not the portable, read-only
repository). Under it, OpenVINO keeps its compiled models (``openvino/``, its own ``CACHE_DIR``) and
ONNX Runtime its optimized models (``onnxruntime/<key>/``): the graph after the session's graph
optimizations, with the weights matrices already packed for this CPU's kernels in the weights file
(``session.save_external_prepacked_constant_initializers``). A later session maps that file and
skips both the optimizations and the packing, and every process serving the model shares the packed
pages. Measured on the 560M ranker's dynamic-INT8 model (ONNX Runtime 1.32, 2 cores): session
0.35 s from the cache against 0.95 s, 36 MB private memory at load against 332 MB, same speed.

Both are only valid on the machine kind that made them (the packing depends on the CPU's
instructions; ONNX Runtime warns that a fully optimized model is hardware specific). The key of an
ONNX Runtime entry therefore covers the CPU's feature flags, the runtime's version, the session
settings that change the saved graph and the model itself; any other entry is never read. An
entry is written to a temporary folder and renamed into place, so a reader sees a whole entry or
none; an entry that fails to load is skipped and the model loaded as if there were no cache. The
folder may be deleted at any time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import tempfile
from pathlib import Path

CACHE_ENV = "RANKSERVE_CACHE_DIR"
MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "model.onnx.data"

log = logging.getLogger("rankserve.cache")


def cache_dir(environ=os.environ) -> Path | None:
    value = environ.get(CACHE_ENV)
    return Path(value) if value else None


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The instruction-set flags of this CPU (the kernels ONNX Runtime packs weights for)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.machine() + " " + platform.processor()


HASHED_BYTES = 64 * 2**20
"""Model files up to this size are identified by their bytes; larger ones (weights files) by size and
modification time, which a rebuild or a copy that keeps times still tells apart (nanoseconds)."""


def ort_key(model_path: str | Path, session_settings: dict[str, str], runtime_version: str,
            flags: str | None = None) -> str:
    """The entry's name: the model's files (bytes, or size and modification time when large), the
    runtime's version, the CPU's flags and the settings that change the optimized graph."""
    model_path = Path(model_path)
    weights = model_path.with_name(model_path.name + ".data")  # the layout's one weights file (rankserve.builder.onnx_files)
    digest = hashlib.sha256()
    for file in [model_path] + ([weights] if weights.exists() else []):
        st = file.stat()
        if st.st_size <= HASHED_BYTES:
            digest.update(file.read_bytes())
        else:
            digest.update(f"{file.name} {st.st_size} {st.st_mtime_ns}\n".encode())
    digest.update(f"onnxruntime {runtime_version}\n{flags if flags is not None else cpu_flags()}\n".encode())
    for key in sorted(session_settings):
        digest.update(f"{key}={session_settings[key]}\n".encode())
    return digest.hexdigest()[:32]


def ort_session(model_path: str | Path, make_options, settings: dict[str, str], root: Path | None):
    """An ONNX Runtime CPU session for ``model_path`` with the options ``make_options()`` returns;
    through the cache under ``root`` when given. ``settings`` are the options that change the
    optimized graph (level, prepacking). Returns ``(session, source)``: source is ``"cache"``
    (loaded from an entry), ``"cached"`` (made from the model, entry written) or ``"model"`` (no
    cache, or it could not be used: the reason is logged, the model loads as without a cache)."""
    import onnxruntime as ort

    def session(path, options):
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])

    def uncached(reason: str | None = None):
        if reason:
            log.warning("rankserve cache: %s; loading %s without the cache", reason, model_path)
        return session(model_path, make_options()), "model"

    if root is None or make_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL:
        return uncached()
    try:
        entry = root / "onnxruntime" / ort_key(model_path, settings, ort.__version__)
    except OSError as exc:
        return uncached(f"cannot read the model's files ({exc})")
    if (entry / MODEL_FILE).exists():
        options = make_options()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # already applied
        try:
            return session(entry / MODEL_FILE, options), "cache"
        except Exception as exc:  # a damaged entry
            return uncached(f"entry {entry} failed to load ({exc})")
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=entry.parent, prefix=".new-"))
    except OSError as exc:
        return uncached(f"{root} is not writable ({exc})")
    try:
        options = make_options()
        options.optimized_model_filepath = str(staging / MODEL_FILE)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", WEIGHTS_FILE)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        if settings.get("prepack_weights") == "True":
            options.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
        options.log_severity_level = 3  # its "hardware specific" warning: the key holds this CPU's flags
        try:
            made = session(model_path, options)
        except Exception as exc:  # e.g. the disk filled while writing
            return uncached(f"writing an entry failed ({exc})")
        os.chmod(staging, 0o755)
        try:
            os.rename(staging, entry)
        except OSError:  # another instance wrote the same entry first
            pass
        return made, "cached"
    finally:
        shutil.rmtree(staging, ignore_errors=True)
