"""The spec's numerics, executable: fake quantization of an ONNX graph, and per-layer sensitivity.

:func:`qparams` maps a range to scale and zero point (symmetric or asymmetric, any bit width);
:func:`fp8_scale` and :func:`fake_quant_fp8` do the same for FP8 E4M3 (symmetric, scale = amax / 448, the
scheme TensorRT defines: ``castToFp8(clip(x / s, -448, 448))``);
:func:`fake_quant_weight` quantizes and dequantizes a weight per tensor / channel / group;
:func:`simulated_model` writes an FP32 ONNX where chosen layers see fake-quantized weights and Q/DQ on their
activation input. The fallback loop ranks layers with it (:mod:`qdeploy.sensitivity`): one layer quantized
at a time, the damage measured on the budget output. It runs on onnxruntime, which the core already needs.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from .calibration import ActivationRanges
from .model import LayerInfo, ModelHandle, opset_of
from .spec import PerChannel, PerGroup, QuantSpec, WeightSpec


def qparams(lo: float | np.ndarray, hi: float | np.ndarray, bits: int = 8, symmetric: bool = False,
            signed: bool = True) -> tuple[np.ndarray, np.ndarray, int, int]:
    """``(scale, zero_point, qmin, qmax)`` for the range [lo, hi] (widened to include 0).

    Symmetric: zero point 0 (or the unsigned midpoint) and a range of ±max(|lo|, |hi|) mapped onto
    ``[-(2^(b-1)-1), 2^(b-1)-1]`` (the restricted range TensorRT and NNAPI use). Asymmetric: the full range.
    """
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    if signed:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        qmin, qmax = 0, 2 ** bits - 1
    if symmetric:
        if signed:
            qmin = -qmax
        amax = np.maximum(-lo, hi)
        scale = np.maximum(amax / ((qmax - qmin) / 2), 1e-12)
        zp = np.full_like(scale, 0 if signed else (qmax + 1) // 2)
    else:
        scale = np.maximum((hi - lo) / (qmax - qmin), 1e-12)
        zp = np.clip(np.round(qmin - lo / scale), qmin, qmax)
    return scale, zp, qmin, qmax


def fake_quant(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    return ((np.clip(np.round(x / scale) + zp, qmin, qmax) - zp) * scale).astype(x.dtype)


FP8_E4M3_MAX = 448.0
"""The largest finite FP8 E4M3 (``float8_e4m3fn``) value."""


ORT_FP8_DISABLED_OPTIMIZERS = ("ReluQuantRewrite", "ClipQuantRewrite")
"""onnxruntime graph rewrites that are wrong on FP8 Q/DQ graphs; sessions that run one turn them off.
``ReluQuantRewrite`` drops a Relu in front of a QuantizeLinear whose zero point it takes for the type's lowest
value (right for asymmetric INT8, where Q clamps at 0); with an FP8 zero point negatives survive. Measured on
onnxruntime 1.32 CPU, the digits CNN all in FP8: cosine to FP32 0.825 with the rewrite, 0.999 without it (and
with every optimization off). ``ClipQuantRewrite`` (a Clip/ReLU6 in front of a QuantizeLinear) refuses the
session outright on an FP8 zero point ("Unexpected data type for QuantizeLinear input y_zero_point of 17")."""


def has_fp8_qdq(proto: Any) -> bool:
    """True when some initializer is an FP8 E4M3 tensor (the zero points of FP8 Q/DQ pairs)."""
    from onnx import TensorProto

    return any(t.data_type == TensorProto.FLOAT8E4M3FN for t in proto.graph.initializer)


def fp8_scale(amax: float | np.ndarray) -> np.ndarray:
    """FP8 E4M3 scale for a symmetric range of ±amax: amax maps onto the largest finite code, 448."""
    return np.maximum(np.asarray(amax, dtype=np.float64) / FP8_E4M3_MAX, 1e-12)


def fake_quant_fp8(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Quantize to FP8 E4M3 (clip to ±448, round to nearest even, as ONNX QuantizeLinear and TensorRT do) and
    dequantize. ``ml_dtypes`` (a dependency of onnx) does the rounding."""
    import ml_dtypes

    q = np.clip(x / scale, -FP8_E4M3_MAX, FP8_E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)
    return (q.astype(np.float64) * scale).astype(x.dtype)


def fp8_zero_point() -> np.ndarray:
    """The zero point of an FP8 Q/DQ pair: a ``float8_e4m3fn`` zero (it also sets the pair's type)."""
    import ml_dtypes

    return np.zeros((), ml_dtypes.float8_e4m3fn)


def ensure_opset(proto: Any, version: int) -> Any:
    """``proto`` converted to at least ``version`` of the default ONNX domain (FP8 QuantizeLinear needs 19) by
    onnx's own version converter; unchanged when it is already there."""
    import onnx
    from onnx import version_converter

    if opset_of(proto) >= version:
        return proto
    converted = version_converter.convert_version(proto, version)
    onnx.checker.check_model(converted)
    return converted


def output_channel_axis(node: Any, weight_rank: int) -> int:
    """The output-channel axis of a weighted ONNX node's weight (non-negative): 0 for Conv and Gemm with
    transB=1, 1 for ConvTranspose and Gemm with transB=0, the last axis for MatMul."""
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul":
        return weight_rank - 1
    return 0


def weight_axis(layer: LayerInfo, node: Any, spec_axis: int, weight_rank: int) -> int:
    """The per-channel axis for a layer's weight: the spec's axis for Conv, the output-channel axis otherwise."""
    return spec_axis if layer.op_type == "Conv" else output_channel_axis(node, weight_rank)


def fake_quant_weight(w: np.ndarray, ws: WeightSpec, axis: int, precision: str = "int8") -> np.ndarray:
    """Quantize-dequantize ``w`` as the spec says (bits, symmetric, per tensor/channel/group); with
    ``precision="fp8"``, to FP8 E4M3 with the spec's granularity (always symmetric)."""
    g = ws.granularity
    if precision == "fp8":
        if isinstance(g, PerChannel) and w.ndim > 1:
            red = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
            return fake_quant_fp8(w, fp8_scale(np.abs(w).max(red, keepdims=True)))
        return fake_quant_fp8(w, fp8_scale(np.abs(w).max()))
    if isinstance(g, PerGroup):
        axis = axis % w.ndim
        moved = np.moveaxis(w, axis, 0)
        flat = moved.reshape(moved.shape[0], -1)
        size = g.group_size
        pad = (-flat.shape[1]) % size
        padded = np.pad(flat, ((0, 0), (0, pad)))
        groups = padded.reshape(flat.shape[0], -1, size)
        s, z, lo_q, hi_q = qparams(groups.min(2, keepdims=True), groups.max(2, keepdims=True), ws.bits, ws.symmetric)
        out = fake_quant(groups, s, z, lo_q, hi_q).reshape(flat.shape[0], -1)[:, :flat.shape[1]]
        return np.moveaxis(out.reshape(moved.shape), 0, axis)
    if isinstance(g, PerChannel) and w.ndim > 1:
        axis = axis % w.ndim
        red = tuple(i for i in range(w.ndim) if i != axis)
        s, z, lo_q, hi_q = qparams(w.min(red, keepdims=True), w.max(red, keepdims=True), ws.bits, ws.symmetric)
        return fake_quant(w, s, z, lo_q, hi_q)
    s, z, lo_q, hi_q = qparams(w.min(), w.max(), ws.bits, ws.symmetric)
    return fake_quant(w, s, z, lo_q, hi_q)


def simulated_model(model: ModelHandle, spec: QuantSpec, ranges: ActivationRanges | None,
                    layers: Iterable[str], precision: str = "int8") -> Any:
    """An ONNX ModelProto of the reference in which ``layers`` are fake-quantized as ``spec`` says, in
    ``precision`` (``int8``, or ``fp8``: E4M3 weights and FP8 Q/DQ pairs on the activation inputs)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(model.onnx_path))
    if precision == "fp8":
        proto = ensure_opset(proto, 19)
    nodes = {n.name: n for n in proto.graph.node}
    inits = {t.name: t for t in proto.graph.initializer}
    static = ranges if spec.activations.mode == "static" else None  # the ranges static activations use, if any
    for name in layers:
        layer = model.layers[name]
        node = nodes[layer.node]
        if layer.weight and layer.weight in inits:
            w = numpy_helper.to_array(inits[layer.weight])
            axis = weight_axis(layer, node, spec.weights.granularity.axis
                               if isinstance(spec.weights.granularity, PerChannel) else 0, w.ndim)
            new = numpy_helper.from_array(fake_quant_weight(w, spec.weights, axis, precision),
                                          name=f"{layer.weight}__fq_{name}")
            proto.graph.initializer.append(new)
            node.input[1] = new.name
        if static is None:
            continue
        # every activation the layer reads: one for a Conv, two for an activation x activation MatMul or an Add
        for index, tensor in enumerate(list(node.input)):
            if tensor not in (layer.activations or (layer.input,)) or tensor not in static.ranges:
                continue
            lo, hi = static.get(tensor)
            if precision == "fp8":
                scale, zp = np.array(fp8_scale(max(-lo, hi)), np.float32), fp8_zero_point()
            else:
                sym = spec.activations.symmetric
                s, z, _, _ = qparams(lo, hi, 8, sym, signed=sym)
                scale, zp = np.array(s, np.float32), np.array(z, np.int8 if sym else np.uint8)
            insert_qdq(proto, node, index, scale, zp, f"{tensor}__fq_{name}_{index}")
    return proto


def insert_qdq(proto: Any, node: Any, index: int, scale: np.ndarray, zero_point: np.ndarray, tag: str) -> None:
    """Put a QuantizeLinear/DequantizeLinear pair in front of input ``index`` of ``node`` (scale and zero
    point become initializers named after ``tag``; only this consumer sees the quantized tensor)."""
    from onnx import helper, numpy_helper

    tensor = node.input[index]
    proto.graph.initializer.extend([numpy_helper.from_array(scale, f"{tag}_scale"),
                                    numpy_helper.from_array(zero_point, f"{tag}_zero_point")])
    q = helper.make_node("QuantizeLinear", [tensor, f"{tag}_scale", f"{tag}_zero_point"], [f"{tag}_q"],
                         name=f"{tag}_QuantizeLinear")
    dq = helper.make_node("DequantizeLinear", [f"{tag}_q", f"{tag}_scale", f"{tag}_zero_point"], [f"{tag}_dq"],
                          name=f"{tag}_DequantizeLinear")
    idx = list(proto.graph.node).index(node)
    proto.graph.node.insert(idx, dq)
    proto.graph.node.insert(idx, q)
    node.input[index] = f"{tag}_dq"
