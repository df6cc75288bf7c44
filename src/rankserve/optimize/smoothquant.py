"""SmoothQuant (Xiao et al., 2023) for dynamic INT8: per-input-channel scales move the activations'
outlier channels into the weights, so the per-tensor 8-bit range of each activation fits its bulk.

For a MatMul ``X @ W``, ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` and ``(X / s) @ (s W)`` is the
same product. ``s W`` is folded into the weight; ``X / s`` is a ``Mul`` on the MatMul's branch only
(BERT is post-LayerNorm: the LayerNorm output that feeds Q, K and V is also the residual, so the scale
cannot go into the LayerNorm). MatMuls reading one activation (Q, K, V) share one scale.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from rankserve.builder import onnx_files

SCALE_LIMITS = (1e-2, 1e2)
"""Scales are clipped to this range: a channel that never fires (max 0) keeps a finite weight."""


@dataclass(frozen=True)
class SmoothGroup:
    activation: str
    """The tensor the MatMuls read (their first input)."""
    matmuls: tuple[str, ...]
    weights: tuple[str, ...]
    """Each MatMul's weight initializer (``[in, out]``)."""


def matmul_groups(model, only: Iterable[str] | None = None) -> list[SmoothGroup]:
    """Weight MatMuls (those named in ``only``, if given) grouped by the activation they read, less
    groups whose weights something else reads too (tied weights: scaling them would change that)."""
    initializers = {i.name for i in model.graph.initializer}
    wanted, found, readers = None if only is None else set(only), {}, {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.name)
        if (node.op_type == "MatMul" and (wanted is None or node.name in wanted) and node.input[1] in initializers
                and node.input[0] not in initializers):
            found.setdefault(node.input[0], []).append(node)
    return [SmoothGroup(a, tuple(n.name for n in ns), tuple(n.input[1] for n in ns)) for a, ns in found.items()
            if all(readers[n.input[1]] <= {m.name for m in ns} for n in ns)]


def activation_absmax(model_path: str | Path, batches: Iterable[Mapping[str, np.ndarray]],
                      tensors: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-channel (last axis) max |x| of each of ``tensors`` over every token of ``batches``, padding
    included: served batches are padded too, and padding rows count in each batch's dynamic range."""
    import onnx
    import onnxruntime as ort

    path = Path(model_path)
    model = onnx.load(str(path), load_external_data=False)
    outputs = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                              for t in tensors if t not in outputs)
    out: dict[str, np.ndarray] = {}
    # beside the model: its external weights must sit in the probe's own directory (ONNX Runtime
    # refuses data paths that leave it, symbolic links included)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.stem}-probe-", suffix=".onnx", delete=False) as f:
        probe = Path(f.name)
    try:
        onnx.save(model, str(probe))
        session = ort.InferenceSession(str(probe), providers=["CPUExecutionProvider"])
        for batch in batches:
            for name, value in zip(tensors, session.run(list(tensors), dict(batch))):
                m = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
                out[name] = np.maximum(out[name], m) if name in out else m
    finally:
        probe.unlink(missing_ok=True)
    return out


def smoothing_scales(act_max: np.ndarray, weight_max: np.ndarray, alpha: float) -> np.ndarray:
    """``max|X_j|^alpha / max|W_j|^(1 - alpha)`` per input channel, clipped to :data:`SCALE_LIMITS`."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    scales = np.maximum(act_max, 1e-5) ** alpha / np.maximum(weight_max, 1e-5) ** (1.0 - alpha)
    return np.clip(scales, *SCALE_LIMITS).astype(np.float32)


def smooth(src: str | Path, dst: str | Path, batches: list, alpha: float, only: Iterable[str] | None = None) -> dict:
    """Write ``src`` with the MatMuls named in ``only`` (default: every weight MatMul) smoothed to
    ``dst`` (the same outputs up to rounding). Returns the groups smoothed and the median over groups
    of each activation's max/mean channel range, before and after."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    groups = matmul_groups(model, only)
    act = activation_absmax(src, batches, [g.activation for g in groups])
    init = {i.name: i for i in model.graph.initializer}
    by_name = {node.name: node for node in model.graph.node}
    spread_before, spread_after, muls = [], [], {}
    for k, g in enumerate(groups):
        weights = [numpy_helper.to_array(init[w]) for w in g.weights]
        scales = smoothing_scales(act[g.activation], np.max([np.abs(w).max(axis=1) for w in weights], axis=0), alpha)
        for name, w in zip(g.weights, weights):
            init[name].CopyFrom(numpy_helper.from_array((w * scales[:, None]).astype(w.dtype), name))
        scale_name, smoothed = f"smoothquant_{k}_scale", f"{g.activation}_smoothed"
        model.graph.initializer.append(numpy_helper.from_array((1.0 / scales).astype(np.float32), scale_name))
        muls[g.matmuls[0]] = onnx.helper.make_node("Mul", [g.activation, scale_name], [smoothed], name=f"/smoothquant/{k}/Mul")
        for m in g.matmuls:
            by_name[m].input[0] = smoothed
        spread_before.append(float(act[g.activation].max() / max(act[g.activation].mean(), 1e-12)))
        after = act[g.activation] / scales
        spread_after.append(float(after.max() / max(after.mean(), 1e-12)))
    nodes = []
    for node in model.graph.node:  # each Mul right before the first MatMul of its group
        if node.name in muls:
            nodes.append(muls[node.name])
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx_files.save(model, dst)
    return {"alpha": alpha, "groups": len(groups),
            "activation_max_over_mean": {"before": round(float(np.median(spread_before)), 1) if groups else None,
                                         "after": round(float(np.median(spread_after)), 1) if groups else None}}
