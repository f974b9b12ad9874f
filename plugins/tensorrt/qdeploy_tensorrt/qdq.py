"""The explicitly quantized (Q/DQ) ONNX graph that TensorRT builds an INT8 / FP8 engine from, and a checker of
TensorRT's rules for it.

The rules, from NVIDIA's TensorRT Developer Guide, "Working with Quantized Types" (sections "Explicit
Quantization", "Q/DQ Layer-Placement Recommendations"; docs.nvidia.com/deeplearning/tensorrt/latest/
inference-library/work-quantized-types.html) and the operator reference for Quantize/Dequantize
(docs.nvidia.com/deeplearning/tensorrt/operators/docs/Quantize.html):

R1  Symmetric quantization only: "the zero_point must only contain zero-valued coefficients"; INT8 is signed.
R2  Scales are positive build-time constants: a scalar (per-tensor) or a 1-D tensor (per-channel).
R3  Per-channel scales for weights only, on the output-channel axis of the weighted layer (K of a
    convolution's KCRS kernel, axis 0; axis 1 of a transposed convolution's CKRS kernel; N of a GEMM's B);
    activations are per-tensor.
R4  "Quantize all inputs of weighted operations (Convolution, Transposed Convolution and GEMM)": the
    activation input and the weights of each INT8 layer come from a DequantizeLinear.
R5  "By default, do not quantize the outputs of weighted operations": TensorRT fuses a following Q into
    the layer when the next layer wants INT8, and keeps BN/ReLU fusions ("do not simulate batch-normalization
    and ReLU fusions") -- so no Q/DQ between a Conv/Gemm/MatMul and its ReLU/Clip; a weighted op's output is
    quantized only as the input of the next INT8 weighted layer (R4: a linear bottleneck's projection conv
    feeding the next block's conv) or as an Add's residual input (R6).
R6  "Quantize the residual input in skip connections": an Add fed by an INT8 weighted layer gets a Q/DQ on
    its other (residual) input, so TensorRT can fuse the addition into the convolution's epilogue.
R7  Weights may be float with a Q->DQ pair (TensorRT quantizes them at build time) or INT8 with a DQ.
    Biases stay float (TensorRT does not take INT32-quantized biases in Q/DQ networks).
R8  FP8 (E4M3, sm_89+): the same placement, with FLOAT8E4M3FN zero points (0) and scales from the scheme in
    "Quantization Schemes" (x_q = castToFp8(clip(x / s, -448, 448))): s = amax / 448; weights per tensor or
    per output channel, activations per tensor; QuantizeLinear with an FP8 zero point needs ONNX opset 19.
    Every input pair of one layer has that layer's type (an INT8 layer's pairs are INT8, an FP8 layer's FP8).

ONNX Runtime's ``quantize_static`` writes the graph (QDQ format, symmetric QInt8 activations and weights,
per-channel weights, float weights with Q/DQ pairs, one Q/DQ pair per consumer, unquantized biases, no Q/DQ
on weighted-op outputs); qdeploy's calibrated ranges reach it through its own calibration cache. R6 is the
one rule ORT's placement does not follow (quantizing ``Add`` would also put Q/DQ on the Conv output, against
R5), so :func:`add_residual_qdq` inserts those pairs afterwards. FP8 layers are placed by the same call and
their pairs then retyped (:func:`retype_fp8`): ORT's own FP8 mode sizes scales from a Gaussian fit of the
standard deviation, not from TensorRT's amax / 448, and needs its Distribution calibrator.
"""
from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from qdeploy.backend import (ensure_opset, fp8_scale, fp8_zero_point, insert_qdq,  # R3: output-channel axis
                             output_channel_axis, quiet)

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def write_qdq_model(reference: Path, out: Path, ranges: Mapping[str, tuple[float, float]],
                    int8_nodes: Iterable[str], per_channel: bool, workdir: Path,
                    fp8_nodes: Iterable[str] = (), float_adds: Collection[str] = ()) -> dict[str, Any]:
    """Write the Q/DQ ONNX of ``reference`` with ``int8_nodes`` (ONNX node names of weighted layers) in INT8,
    ``fp8_nodes`` in FP8 E4M3 and every other node in float; the Adds of ``float_adds`` (node names) get no
    residual pair (R6), so TensorRT runs them in float after their layer. Returns a summary (counts of Q/DQ
    pairs, residual pairs added)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    fp8_nodes = list(fp8_nodes)
    int8_only = list(int8_nodes)
    int8_nodes = int8_only + fp8_nodes  # placed together; the FP8 layers' pairs are retyped below
    proto = onnx.load(str(reference))
    weighted = [n.name for n in proto.graph.node if n.op_type in WEIGHTED_OPS]
    cache = workdir / "calibration_cache.json"
    ort_calibration_cache(ranges, cache)
    with quiet(""):
        quantize_static(
            str(reference), str(out), calibration_data_reader=None, calibration_cache_path=cache,
            quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            op_types_to_quantize=list(WEIGHTED_OPS), nodes_to_quantize=int8_nodes,
            nodes_to_exclude=[n for n in weighted if n not in int8_nodes], per_channel=per_channel,
            reduce_range=False, calibrate_method=CalibrationMethod.MinMax,
            extra_options={
                "ActivationSymmetric": True, "WeightSymmetric": True,            # R1
                "AddQDQPairToWeight": True,                                      # R7: float weights + Q/DQ
                "DedicatedQDQPair": True,                                        # one pair per consumer
                "QDQOpTypePerChannelSupportToAxis": {"MatMul": -1},              # R3: N axis of B
                "QuantizeBias": False,                                           # R7
                "OpTypesToExcludeOutputQuantization": list(WEIGHTED_OPS),        # R5
            })
    proto = onnx.load(str(out))
    unused: set[str] = set()
    if fp8_nodes:
        proto = ensure_opset(proto, 19)  # R8
        unused = retype_fp8(proto, ranges, set(fp8_nodes))
    residual = add_residual_qdq(proto, ranges, set(int8_only), set(fp8_nodes), set(float_adds))
    _unquantize_inputs(proto, set(float_adds))
    for node in proto.graph.node:  # exporter debug metadata: not needed by TensorRT, a few % of the size
        del node.metadata_props[:]
        node.doc_string = ""
    keep = [t for t in proto.graph.initializer if t.name not in unused]  # the INT8 scales FP8 pairs replaced
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    onnx.save(proto, str(out))
    counts = {op: sum(n.op_type == op for n in proto.graph.node) for op in QDQ_OPS}
    return {"quantize_nodes": counts["QuantizeLinear"], "dequantize_nodes": counts["DequantizeLinear"],
            "residual_qdq": residual, "int8_layers": len(int8_only), "fp8_layers": len(fp8_nodes)}


def _links(proto: Any) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """``(producer, consumers)``: the node writing each tensor, and the nodes reading it."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return producer, consumers


def retype_fp8(proto: Any, ranges: Mapping[str, tuple[float, float]], fp8_nodes: set[str]) -> set[str]:
    """R8: turn the input Q/DQ pairs of ``fp8_nodes`` into FP8 E4M3 pairs with scale amax / 448: the
    activation's calibrated range, the weight's own maximum per tensor or per output channel (the pair's
    axis), each with its own scale and zero point. A pair that an INT8 layer also reads (a weight shared by
    two layers: ORT splits only activation pairs per consumer) is cloned first, so a tensor feeding an INT8
    and an FP8 layer keeps both types; other readers (a residual Add) follow the FP8 layer. Returns the
    initializer names that no node reads any more (the INT8 scales the FP8 pairs replaced)."""
    from onnx import TensorProto, helper, numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    producer, readers = _links(proto)

    def read_by_another_layer(tensor: str, node: Any) -> bool:
        """Another weighted layer that is not FP8 (an INT8 one) reads it: that pair must keep its type."""
        return any(r is not node and r.op_type in WEIGHTED_OPS and r.name not in fp8_nodes
                   for r in readers.get(tensor, []))
    replaced: set[str] = set()
    retyped: set[str] = set()
    for node in list(proto.graph.node):
        if node.name not in fp8_nodes:
            continue
        for k, t in enumerate(node.input[:2]):
            dq = producer.get(t)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue  # check_rules reports the missing pair (R4)
            q = producer.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear":
                continue  # check_rules reports the missing pair (R4)
            if q.output[0] in retyped:
                continue  # already FP8: another FP8 layer reads the same pair
            src = q.input[0]
            old = numpy_helper.to_array(inits[dq.input[1]])
            if src in inits:
                w = numpy_helper.to_array(inits[src])
                if old.size > 1:
                    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1) % w.ndim
                    amax = np.abs(w).max(axis=tuple(i for i in range(w.ndim) if i != axis))
                else:
                    amax = np.abs(w).max()
            elif src in ranges:
                lo, hi = ranges[src]
                amax = max(-lo, hi)
            else:
                continue
            tag = f"{src}__fp8_{node.name}_in{k}"
            qparams = [f"{tag}_scale", f"{tag}_zero_point"]
            replaced.update(dq.input[1:3])
            if read_by_another_layer(dq.output[0], node) or len(readers.get(q.output[0], [])) > 1:  # clone
                attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
                idx = list(proto.graph.node).index(node)
                proto.graph.node.insert(idx, helper.make_node("DequantizeLinear", [f"{tag}_q", *qparams],
                                                              [f"{tag}_dq"], name=f"{tag}_DequantizeLinear",
                                                              **attrs))
                proto.graph.node.insert(idx, helper.make_node("QuantizeLinear", [src, *qparams], [f"{tag}_q"],
                                                              name=f"{tag}_QuantizeLinear", **attrs))
                readers[t] = [r for r in readers[t] if r is not node]
                node.input[k] = f"{tag}_dq"
                retyped.add(f"{tag}_q")
            else:
                for n in (q, dq):  # the graph's own nodes (repeated-field members): edited in place
                    n.input[1], n.input[2] = qparams
                retyped.add(q.output[0])
            scale = fp8_scale(amax).astype(np.float32).reshape(old.shape)
            zero = np.broadcast_to(fp8_zero_point(), old.shape).copy()
            proto.graph.initializer.extend([numpy_helper.from_array(scale, qparams[0]),
                                            numpy_helper.from_array(zero, qparams[1])])
    for vi in proto.graph.value_info:  # shape inference recorded the codes as INT8
        if vi.name in retyped:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT8E4M3FN
    still_read = {i for n in proto.graph.node for i in n.input}
    return replaced - still_read


def add_residual_qdq(proto: Any, ranges: Mapping[str, tuple[float, float]], int8_nodes: set[str],
                     fp8_nodes: Collection[str] = frozenset(), float_adds: Collection[str] = frozenset()) -> list[str]:
    """R6: Q/DQ on the residual input of every Add whose other input is the output of an INT8 (FP8) weighted
    layer, of that layer's type, but those of ``float_adds`` (kept float by the plan). Returns the residual
    tensors that got a pair."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    inits = {t.name for t in proto.graph.initializer}
    added: list[str] = []
    for node in list(proto.graph.node):
        if node.op_type != "Add" or len(node.input) != 2 or any(i in inits for i in node.input) \
                or node.name in float_adds:
            continue
        srcs = [producer.get(i) for i in node.input]
        fused = [i for i, s in enumerate(srcs) if s is not None and s.op_type in WEIGHTED_OPS
                 and (s.name in int8_nodes or s.name in fp8_nodes)]
        if len(fused) != 1:
            continue
        r = 1 - fused[0]
        tensor, src = node.input[r], srcs[r]
        if (src is not None and src.op_type == "DequantizeLinear") or tensor not in ranges:
            continue
        lo, hi = ranges[tensor]
        amax = max(abs(lo), abs(hi), 1e-12)
        layer = srcs[fused[0]]
        assert layer is not None  # fused holds only inputs that a weighted layer produces
        if layer.name in fp8_nodes:  # R8
            scale, zero = np.array(fp8_scale(amax), np.float32), fp8_zero_point()
        else:  # R1: symmetric, zero point 0
            scale, zero = np.array(amax / 127.0, np.float32), np.array(0, np.int8)
        insert_qdq(proto, node, r, scale, zero, f"{tensor}__residual_{node.name}")
        added.append(tensor)
    return added


def _unquantize_inputs(proto: Any, names: set[str]) -> None:
    """The nodes ``names`` read float tensors: an input that ``quantize_static`` wired through a dedicated Q/DQ pair
    (because another reader of the tensor is quantized) is wired back to the tensor, and the pair removed."""
    producer, consumers = _links(proto)
    dead: set[str] = set()
    for node in proto.graph.node:
        if node.name not in names:
            continue
        for k, t in enumerate(node.input):
            dq = producer.get(t)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear":
                continue
            node.input[k] = q.input[0]
            if len(consumers.get(dq.output[0], [])) == 1 and len(consumers.get(q.output[0], [])) == 1:
                dead |= {dq.name, q.name}
    keep = [n for n in proto.graph.node if n.name not in dead]
    del proto.graph.node[:]
    proto.graph.node.extend(keep)


def check_rules(proto: Any, int8_nodes: Iterable[str], float_nodes: Iterable[str] = (),
                fp8_nodes: Iterable[str] = (), unranged: Iterable[str] = (),
                float_adds: Collection[str] = ()) -> list[str]:
    """Every way ``proto`` breaks R1-R8 for the given INT8, float (promoted) and FP8 weighted nodes; empty if
    none. ``unranged`` tensors (inf/NaN or mask fills on the calibration data) cannot be quantized: an Add
    whose residual input is one of them is not fused by TensorRT and runs in float, which R6 allows; so does
    an Add of ``float_adds``, which the plan keeps float."""
    import ml_dtypes

    from onnx import numpy_helper

    skip = set(unranged)
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    consts = {n.output[0]: numpy_helper.to_array(a.t) for n in proto.graph.node if n.op_type == "Constant"
              for a in n.attribute if a.name == "value"}
    inits.update(consts)
    nodes = {n.name: n for n in proto.graph.node}
    producer, consumers = _links(proto)
    problems: list[str] = []

    def qdq_axis(n: Any) -> int:
        return next((a.i for a in n.attribute if a.name == "axis"), 1)

    for n in proto.graph.node:
        if n.op_type not in QDQ_OPS:
            continue
        scale = inits.get(n.input[1])
        if scale is None:
            problems.append(f"R2 {n.name}: scale {n.input[1]!r} is not a constant")
            continue
        if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            problems.append(f"R2 {n.name}: scales must be positive and finite")
        if scale.ndim > 1:
            problems.append(f"R2 {n.name}: scale has rank {scale.ndim}; TensorRT takes a scalar or a 1-D tensor")
        if len(n.input) > 2 and n.input[2]:
            zp = inits.get(n.input[2])
            if (zp is None or zp.dtype not in (np.int8, ml_dtypes.float8_e4m3fn)
                    or np.any(zp.astype(np.float32) != 0)):
                problems.append(f"R1 {n.name}: zero point must be an all-zero INT8 or FP8 E4M3 constant, got "
                                f"{None if zp is None else (zp.dtype.name, np.unique(zp).tolist()[:4])}")
        data = n.input[0]
        is_weight = data in inits or (producer.get(data) is not None and producer[data].op_type == "QuantizeLinear"
                                      and producer[data].input[0] in inits)
        if scale.size > 1 and not is_weight:
            problems.append(f"R3 {n.name}: per-channel scales on activation {data!r}; activations are per-tensor")
        if scale.size > 1 and n.op_type == "DequantizeLinear":
            w = inits.get(data if data in inits else producer[data].input[0])
            for c in consumers.get(n.output[0], []):
                if c.op_type in WEIGHTED_OPS and len(c.input) > 1 and c.input[1] == n.output[0] and w is not None:
                    want = output_channel_axis(c, w.ndim)
                    if qdq_axis(n) % w.ndim != want:
                        problems.append(f"R3 {n.name}: per-channel axis {qdq_axis(n)} for {c.op_type} {c.name}; "
                                        f"the output-channel axis is {want}")
    # R4 is about weighted layers: a tensor layer's (an Add's) precision shows in its residual pair (R6)
    int8_nodes, fp8_nodes = [[n for n in names if n not in nodes or nodes[n].op_type in WEIGHTED_OPS]
                             for names in (int8_nodes, fp8_nodes)]
    quantized = set(int8_nodes) | set(fp8_nodes)
    if fp8_nodes and next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0) < 19:
        problems.append("R8: FP8 Q/DQ needs ONNX opset 19 or later")
    for name in int8_nodes + fp8_nodes:
        n = nodes.get(name)
        if n is None:
            problems.append(f"R4 {name}: no such node in the graph")
            continue
        code_dtype = ml_dtypes.float8_e4m3fn if name in fp8_nodes else np.int8
        for k, t in enumerate(n.input[:2]):
            src = producer.get(t)
            if src is None or src.op_type != "DequantizeLinear":
                problems.append(f"R4 {name}: input {k} ({t!r}) does not come from a DequantizeLinear")
                continue
            zp = inits.get(src.input[2]) if len(src.input) > 2 and src.input[2] else None
            if zp is not None and zp.dtype != code_dtype:
                problems.append(f"R8 {name}: input {k} is dequantized from {zp.dtype.name}, the layer is "
                                f"{np.dtype(code_dtype).name}")
        for t in n.output:
            for c in consumers.get(t, []):
                if c.op_type != "QuantizeLinear":
                    continue
                # a Q on a weighted op's output is right only as the next quantized weighted layer's input (R4,
                # TensorRT fuses it into this layer's epilogue) or an Add's residual input (R6); in front of
                # anything else (ReLU, Clip, BN) it breaks the fusions TensorRT would make (R5)
                readers = [r for dq in consumers.get(c.output[0], []) if dq.op_type == "DequantizeLinear"
                           for r in consumers.get(dq.output[0], [])]
                bad = [r for r in readers if not ((r.op_type in WEIGHTED_OPS and r.name in quantized)
                                                  or r.op_type == "Add")]
                if bad or not readers:
                    problems.append(f"R5 {name}: output {t!r} is quantized in front of "
                                    f"{', '.join(sorted({r.op_type for r in bad})) or 'nothing'} "
                                    f"(Q/DQ after a weighted op breaks TensorRT's fusions)")
    int8 = set(int8_nodes) | set(fp8_nodes)
    for name in float_nodes:
        n = nodes.get(name)
        if n is None:
            continue
        for t in n.input[:2]:
            src = producer.get(t)
            if src is not None and src.op_type == "DequantizeLinear":
                problems.append(f"{name}: kept in float by the plan but its input {t!r} comes from a DequantizeLinear")
    for n in proto.graph.node:
        if n.op_type != "Add" or len(n.input) != 2 or n.name in float_adds:
            continue
        srcs = [producer.get(i) for i in n.input]
        fused = [i for i, s in enumerate(srcs) if s is not None and s.name in int8 and s.op_type in WEIGHTED_OPS]
        if len(fused) == 1:
            other, layer = srcs[1 - fused[0]], srcs[fused[0]]
            assert layer is not None  # fused holds only inputs that a quantized layer produces
            residual = n.input[1 - fused[0]]
            if residual not in inits and residual not in skip and (other is None or other.op_type != "DequantizeLinear"):
                problems.append(f"R6 {n.name}: residual input {n.input[1 - fused[0]]!r} of an Add fed by quantized "
                                f"{layer.name} has no Q/DQ")
    return problems


def with_float_rounding(proto: Any, nodes: Mapping[str, str]) -> Any:
    """For the simulation only: round the float inputs and outputs of ``nodes`` (ONNX node name -> ``fp16`` or
    ``bf16``) through that type with Cast pairs, as a TensorRT layer pinned to that precision stores them."""
    from onnx import TensorProto, helper

    to = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
    for node in list(proto.graph.node):
        if node.name not in nodes:
            continue
        dtype = to[nodes[node.name]]
        for k, t in enumerate(node.input):
            if not t:
                continue
            tag = f"{t}__{nodes[node.name]}_{node.name}_in{k}"
            idx = list(proto.graph.node).index(node)
            proto.graph.node.insert(idx, helper.make_node("Cast", [f"{tag}_low"], [f"{tag}_back"], to=TensorProto.FLOAT,
                                                          name=f"{tag}_Cast_back"))
            proto.graph.node.insert(idx, helper.make_node("Cast", [t], [f"{tag}_low"], to=dtype, name=f"{tag}_Cast"))
            node.input[k] = f"{tag}_back"
        for k, t in enumerate(node.output):
            raw = f"{t}__{nodes[node.name]}_raw"
            idx = list(proto.graph.node).index(node)
            node.output[k] = raw
            proto.graph.node.insert(idx + 1, helper.make_node("Cast", [f"{raw}_low"], [t], to=TensorProto.FLOAT,
                                                              name=f"{raw}_Cast_back"))
            proto.graph.node.insert(idx + 1, helper.make_node("Cast", [raw], [f"{raw}_low"], to=dtype,
                                                              name=f"{raw}_Cast"))
    return proto


def ort_calibration_cache(ranges: Mapping[str, tuple[float, float]], path: Path) -> Path:
    """qdeploy's calibrated ``(lo, hi)`` ranges in onnxruntime's calibration-cache format, so that
    ``quantize_static(..., calibration_cache_path=path)`` quantizes with them instead of calibrating again.
    (onnxruntime's format, so it lives with the plugins that call onnxruntime's quantizer.)"""
    import numpy as np
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    save_tensors_data(TensorsData(CalibrationMethod.MinMax, {
        n: TensorData(lowest=np.array(lo, np.float32), highest=np.array(hi, np.float32))
        for n, (lo, hi) in ranges.items()}), path)
    return path
