"""ONNX models on disk, one layout for every size: ``X.onnx`` alone, or ``X.onnx`` with its weights
in ONE file ``X.onnx.data`` beside it when the model is large (:data:`WEIGHTS_FILE_MIN_BYTES`, and
always over protobuf's 2 GB limit).

Every step of the build writes and copies models through these functions, so a ranker of any size
travels the same way: the export, each variant, the repository layout (``model.onnx`` +
``model.onnx.data``), the manifest's checksums and the checks before serving.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

from rankserve.errors import BuildError

PROTOBUF_LIMIT = 2**31 - 1
"""Largest serialized protobuf message: a model over it must keep its weights outside the graph."""
INLINE_MARGIN = 64 * 2**20
"""Headroom below the limit: a model this close to it is written with external data as well (the
graph, names and shapes also count, and quantizers add scales)."""
WEIGHTS_FILE_MIN_BYTES = 256 * 2**20
"""A model this large keeps its weights in the weights file even when one protobuf could hold it:
the runtimes map that file instead of parsing the weights out of the graph into their own memory.
Measured on the 560M ranker's dynamic-INT8 model (536 MB) in ONNX Runtime 1.32: session 3.1 s and
876 MB resident as one file, 0.8 s and 367 MB with the weights file. Below this size the single
file costs under half a second and is simpler to handle."""


def data_path(path: Path) -> Path:
    """The one external-data file a model at ``path`` may have: ``<name>.data`` beside it."""
    return path.with_name(path.name + ".data")


def external_locations(path: str | Path) -> list[str]:
    """The external-data files the graph at ``path`` refers to (relative names), without reading weights."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return sorted({entry.value for t in _tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL
                   for entry in t.external_data if entry.key == "location"})


def model_files(path: str | Path) -> list[Path]:
    """The model file and every external-data file it needs (all must travel together)."""
    path = Path(path)
    return [path] + [path.parent / loc for loc in external_locations(path)]


def model_bytes(path: str | Path) -> int:
    """Size on disk of the model with its weights."""
    return sum(p.stat().st_size for p in model_files(path) if p.exists())


def _tensors(model):
    """Every tensor of the model that may hold weights: initializers and Constant attributes, in
    subgraphs too."""
    from onnx.external_data_helper import _get_all_tensors

    return _get_all_tensors(model)


def _too_big(size: int) -> bool:
    """Whether a model of ``size`` bytes keeps its weights outside the graph: it is large, or too
    close to the protobuf limit (read at call time: tests lower the limits to take the large-model
    path with a tiny model)."""
    return size >= min(WEIGHTS_FILE_MIN_BYTES, PROTOBUF_LIMIT - INLINE_MARGIN)


def needs_external_data(path: str | Path) -> bool:
    """Whether the model at ``path`` takes the weights-file layout, so tools must write external data
    (they must over 2 GB; under it, writing the layout directly saves a rewrite)."""
    return _too_big(model_bytes(path))


def _same_mode(path: Path) -> Path:
    """Give the weights file the graph's permissions: onnx.save_model, ONNX Runtime's quantizers and
    temporary files create it 0600, which a server running as another user (a container, a pod)
    cannot read, while the graph beside it follows the umask."""
    data = data_path(path)
    if data.exists():
        os.chmod(data, stat.S_IMODE(path.stat().st_mode))
    return path


def save(model, path: str | Path) -> Path:
    """Write ``model`` (weights in memory) to ``path``: a single file when it is small, else the
    graph in ``path`` and every weight over 1 KiB in ``path.data``.
    A stale data file of an earlier model at ``path`` is removed."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = data_path(path)
    data.unlink(missing_ok=True)
    if not _too_big(model.ByteSize()):
        onnx.save_model(model, str(path))
    else:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    return _same_mode(path)


def normalize(path: str | Path) -> Path:
    """Rewrite a model some tool wrote (PyTorch's exporter writes one file per weight over 2 GB;
    quantizers write their own names) into the one layout: single file, or ``path.data``. Loads the
    weights once; a model already in the layout is left alone."""
    import onnx

    path = Path(path)
    locations = external_locations(path)
    small = not needs_external_data(path)
    if (not locations and small) or (locations == [data_path(path).name] and not small):
        return _same_mode(path)
    model = onnx.load(str(path), load_external_data=True)
    stale = [path.parent / loc for loc in locations if loc != data_path(path).name]
    save(model, path)
    del model
    for file in stale:
        file.unlink(missing_ok=True)
    return path


def copy(src: str | Path, dst: str | Path) -> Path:
    """Copy a model and its weights to ``dst`` (its data file becomes ``dst.data``), without
    loading the weights: the graph's external-data references are renamed, the data file copied."""
    import onnx

    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    locations = external_locations(src)
    if not locations:
        shutil.copyfile(src, dst)
        data_path(dst).unlink(missing_ok=True)
        return dst
    if len(locations) != 1:
        raise BuildError(f"{src} keeps its weights in {len(locations)} files; normalize it first (one data file)")
    missing = src.parent / locations[0]
    if not missing.exists():
        raise BuildError(f"{src} needs its weights file {missing}, which does not exist")
    model = onnx.load(str(src), load_external_data=False)
    for tensor in _tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = data_path(dst).name
    # data first, graph last: a reader never sees a graph whose weights are not there yet
    with tempfile.NamedTemporaryFile(dir=dst.parent, prefix=".copy-", delete=False) as tmp:
        pass
    try:
        shutil.copyfile(missing, tmp.name)
        os.replace(tmp.name, data_path(dst))
    finally:
        Path(tmp.name).unlink(missing_ok=True)
    onnx.save_model(model, str(dst))
    return _same_mode(dst)


def check(path: str | Path) -> None:
    """The ONNX checker on a model of any size (by path: it reads external data itself)."""
    import onnx

    onnx.checker.check_model(str(path))
