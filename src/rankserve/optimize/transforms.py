"""ONNX-to-ONNX transforms: INT8 (QDQ static, dynamic), FP16, ONNX Runtime transformer fusion."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Sequence

from rankserve.builder import onnx_files
from rankserve.optimize.calibration import BatchReader, calibration_stride
from rankserve.settings import QuantSettings


HEAD = re.compile(r"/(score|classifier|head)/")
"""The classification head (a MatMul in decoders and ModernBERT; a Gemm in BERT): one logit per
pair, left in FP32."""
FFN_OUT = re.compile(r"(/layer\.\d+/output/dense/|/ffn/lin2/|/mlp/down_proj/|/mlp/Wo/)")
"""FFN output projections: BERT/RoBERTa/XLM-R/DeBERTa, DistilBERT, Llama-style decoders (Qwen, Gemma,
Mistral, Phi-3), ModernBERT."""
ATTN_OUT = re.compile(r"(/attention/output/dense/|/attention/out_lin/|/self_attn/o_proj/|/attn/Wo/)")
"""Attention output projections of the same families."""


def weight_matmuls(model_path: str | Path) -> list[str]:
    """MatMul nodes with a weight (initializer) input, the head excepted: the layers INT8
    quantization targets."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type == "MatMul" and any(i in initializers for i in n.input) and not HEAD.search(n.name)]


def mixed_precision_ladder(matmuls: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Steps from full INT8 towards keeping the most sensitive layers in FP32.

    The FFN output projections (after GELU/SiLU, with the widest activation range) go first, then
    the attention output projections.
    """
    ffn_out = [n for n in matmuls if FFN_OUT.search(n)]
    attn_out = [n for n in matmuls if ATTN_OUT.search(n)]
    return [("all weight MatMuls", []), ("FFN output in FP32", ffn_out), ("FFN and attention output in FP32", ffn_out + attn_out)]


def qdq_int8(
    src: str | Path, dst: str | Path, batches: list, settings: QuantSettings, exclude: Sequence[str] = ()
) -> Path:
    """Static INT8 in QDQ form: symmetric activations and per-channel symmetric weights, the form
    TensorRT takes for explicit quantization and ONNX Runtime / OpenVINO run on CPU."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[settings.method]
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True}
    if settings.method == "percentile":
        extra["CalibPercentile"] = settings.percentile
    nodes = [n for n in weight_matmuls(src) if n not in set(exclude)]
    stride = calibration_stride(batches, activation_floats_per_token(src, nodes))
    if stride:
        extra["CalibStridedMinMax"] = stride  # despite its name: slices the reader for every calibrator
    large = onnx_files.needs_external_data(src)
    with tempfile.TemporaryDirectory(dir=Path(dst).parent) as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True, save_as_external_data=large,
                          all_tensors_to_one_file=True, external_data_location=onnx_files.data_path(pre).name)
        quantize_static(
            str(pre), str(dst), BatchReader(batches), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=method,
            op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes, extra_options=extra, use_external_data_format=large,
        )
    return onnx_files.normalize(dst)


def activation_floats_per_token(model_path: str | Path, matmuls: Sequence[str]) -> int:
    """Values per token that calibrating ``matmuls`` keeps: the width of each one's activation input
    (its weight's first dimension), each distinct input counted once."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    dims = {i.name: list(i.dims) for i in model.graph.initializer}
    wanted, seen = set(matmuls), {}
    for node in model.graph.node:
        if node.name in wanted:
            weight = next((i for i in node.input if i in dims), None)
            activation = next((i for i in node.input if i not in dims), None)
            if weight and activation and dims[weight]:
                seen[activation] = dims[weight][0]
    return sum(seen.values())


DYNAMIC_WEIGHT_TYPES = {"s8": ("QInt8", False), "s7": ("QInt8", True), "u8": ("QUInt8", False)}
"""``int8_dynamic`` weights: ONNX Runtime quant type and ``reduce_range`` (7-bit values in INT8 storage)."""


def dynamic_int8(src: str | Path, dst: str | Path, weights: str = "s8") -> Path:
    """ONNX Runtime dynamic INT8: per-channel ``weights`` (``s8``, ``s7``: S8 holding 7-bit values, or
    ``u8``), activations quantized to U8 per batch at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quant_type, reduce_range = DYNAMIC_WEIGHT_TYPES[weights]
    quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=getattr(QuantType, quant_type),
                     reduce_range=reduce_range, use_external_data_format=onnx_files.needs_external_data(src))
    return onnx_files.normalize(dst)


FP16_KEEP_FP32 = ("LayerNormalization", "Softmax", "Pow", "ReduceMean", "Sqrt", "Div", "Erf")
"""Ops left in FP32 in the FP16 model: normalization and softmax statistics overflow or lose precision in FP16."""


def fp16(src: str | Path, dst: str | Path) -> Path:
    """FP16 weights and compute for GPUs, FP32 inputs/outputs and the usual FP32 exceptions."""
    import onnx
    from onnxruntime.transformers import float16

    src = Path(src)
    if not onnx_files.needs_external_data(src):
        model = float16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=True, op_block_list=list(FP16_KEEP_FP32))
        return onnx_files.save(model, dst)
    # Over 2 GB the converter's own shape inference fails (it serializes the whole model): shapes
    # are inferred by path first (next to src, so the graph finds its weights file), then converted.
    with tempfile.TemporaryDirectory(dir=src.parent) as tmp:
        inferred = Path(tmp) / src.name
        onnx.shape_inference.infer_shapes_path(str(src), str(inferred))
        model = onnx.load(str(inferred), load_external_data=False)
    onnx.external_data_helper.load_external_data_for_model(model, str(src.parent))
    model = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=list(FP16_KEEP_FP32), disable_shape_infer=True)
    return onnx_files.save(model, dst)


def fuse(src: str | Path, dst: str | Path, num_heads: int, hidden_size: int) -> tuple[Path, dict]:
    """ONNX Runtime's transformer fusions (Attention, EmbedLayerNormalization, SkipLayerNormalization, BiasGelu)."""
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden_size)
    optimized.save_model_to_file(str(dst), use_external_data_format=onnx_files.needs_external_data(src), all_tensors_to_one_file=True)
    onnx_files.normalize(dst)
    stats = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
    return Path(dst), stats
