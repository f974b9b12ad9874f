"""qdeploy backend for ONNX Runtime: static INT8 in QDQ format, dynamic INT8 for MatMul/Gemm, FP16.

Built on ``onnxruntime.quantization``: qdeploy's calibrated ranges are handed to ``quantize_static`` as its
own calibration cache (``calibration_cache_path``), so ORT places the Q/DQ nodes and computes scales and
zero points itself. Layers the spec or the fallback loop keep in float go to ``nodes_to_exclude`` (INT8) or
``node_block_list`` (FP16). Never QOperator with s8 activations, never dynamic quantization of convolutions:
both were measured slower than FP32 on x86.
"""
from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pluggy

from qdeploy.backend import Artifact, Backend, Capabilities, OrtRunner, Plan, quiet, threads_of
from qdeploy.spec import summarize_precision
from qdeploy.errors import BackendError

hookimpl = pluggy.HookimplMarker("qdeploy")
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
DYNAMIC_OPS = ("MatMul", "Gemm")
RENAMING_FUSIONS = ("MatMulAddFusion", "GemmActivationFusion", "GemmSumFusion", "GemmTransposeFusion",
                    "MatMulScaleFusion", "MatmulTransposeFusion")
"""onnxruntime fusions that replace a layer's node by a new one: off while pre-processing for quantization."""
STATIC_OPS = {
    # convolutional graphs: the weighted ops plus what onnxruntime fuses into integer kernels around them
    # (QLinearConv chains through Relu/Clip/pools, QLinearAdd for residuals, QLinearConcat, QLinearSigmoid);
    # never Softmax, LayerNormalization, Where or Gather: that is where accuracy goes and no speed comes back
    "cnn": ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Concat", "Relu", "Clip", "LeakyRelu",
            "Sigmoid", "HardSigmoid", "MaxPool", "AveragePool", "GlobalAveragePool", "Resize", "Transpose",
            "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Split", "Slice", "Pad"),
    # transformers: MatMul/Gemm only; the residual Adds, the normalisations, Softmax and the mask arithmetic
    # stay float (quantizing them is what breaks transformer INT8)
    "transformer": ("MatMul", "Gemm"),
}


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    artifact_suffix = ".onnx"

    def capabilities(self, target: Any) -> Capabilities:
        provider = target.option("provider", "cpu")
        verified = "gpu" if provider == "cuda" else "runtime"
        try:
            import onnxruntime as ort
        except ImportError as exc:
            return Capabilities(False, f"onnxruntime is not importable: {exc}")
        if provider not in PROVIDERS:
            return Capabilities(False, f"unknown provider {provider!r}; known: {', '.join(PROVIDERS)}")
        available = ort.get_available_providers()
        if PROVIDERS[provider] not in available:
            hint = " (install onnxruntime-gpu instead of onnxruntime, never both, on a machine with an NVIDIA GPU)" \
                if provider == "cuda" else ""
            return Capabilities(False, f"{PROVIDERS[provider]} is not available in onnxruntime "
                                f"{ort.__version__} here (has {', '.join(available)}){hint}")
        return Capabilities(True, precisions=("int8", "fp16", "fp32"), granularities=("per_tensor", "per_channel"),
                            model_formats=("onnx",), activation_modes=("static", "dynamic"), weight_bits=(8,),
                            verified_on=verified)

    def advise(self, model: Any, spec: Any, target: Any) -> list[str]:
        notes = []
        convs = [n for n, l in model.layers.items() if l.op_type in ("Conv", "ConvTranspose")]
        if spec.activations.mode == "dynamic" and convs:
            notes.append(f"dynamic INT8 leaves the {len(convs)} convolution(s) in FP32: dynamic quantization of "
                         f"convolutions was measured 8-11x slower than FP32 in onnxruntime on x86")
        if spec.precision == "fp16" and target.option("provider", "cpu") == "cpu":
            notes.append("FP16 runs 0.6-0.75x the speed of FP32 in onnxruntime on x86 CPUs (measured): a size "
                         "format here, not a speed one")
        return notes

    def quantized_tensors(self, model: Any, spec: Any, target: Any) -> list[str]:
        """Static INT8 of a convolutional graph quantizes residual Adds, gates' Muls and Concats (QLinearAdd,
        QLinearMul, QLinearConcat); excluding one node keeps it float and ``_float_inputs`` hands it the float
        tensors. Transformers and dynamic INT8 quantize none."""
        if spec.activations.mode != "static" or model.prequantized:
            return []
        return [n for n, layer in model.layers.items()
                if layer.kind == "tensor" and layer.op_type in STATIC_OPS[model.family]]

    def translate(self, model: Any, spec: Any, target: Any, layer_precisions: dict[str, str]) -> Plan:
        lp = dict(layer_precisions)
        used = set(lp.values())
        if model.prequantized:  # a converted QAT model, a quantized export: deploy it as it is, never re-quantize
            if used - {"int8"} and spec.precision != "fp32":
                raise BackendError(f"this model is already quantized (it has {', '.join(model.prequantized)} nodes): "
                                   f"its layers' precisions are fixed by them", "PRECISION_UNSUPPORTED")
            return Plan(self.name, model, spec, target, {n: "int8" for n in lp}, state={"prequantized": True})
        reasons: dict[str, str] = {}
        if "int8" in used and ({"fp16", "bf16"} & used):
            for name, p in lp.items():  # the core records each change as a PRECISION_UNSUPPORTED event
                if p in ("fp16", "bf16"):
                    lp[name] = "fp32"
                    reasons[name] = f"onnxruntime cannot mix INT8 and {p.upper()} layers in one model"
            used = set(lp.values())
        if used & {"bf16", "fp8"}:
            raise BackendError(f"onnxruntime builds int8/fp16/fp32 only, not {sorted(used & {'bf16', 'fp8'})}",
                               "PRECISION_UNSUPPORTED")
        mode = spec.activations.mode
        if "int8" in used and mode == "dynamic":
            for name, p in lp.items():  # never dynamic INT8 for convolutions (measured slow)
                layer = model.layers[name]
                if p != "int8":
                    continue
                if layer.op_type not in DYNAMIC_OPS:
                    lp[name] = "fp32"
                    reasons[name] = (f"dynamic INT8 in onnxruntime is for {'/'.join(DYNAMIC_OPS)} only "
                                     f"({layer.op_type} measured slower than FP32); use static activations")
                elif not layer.weight:
                    lp[name] = "fp32"
                    reasons[name] = ("dynamic INT8 quantizes weights: an activation x activation MatMul has none "
                                     "and stays FP32 (use static activations to quantize it)")
        if "int8" in used and mode == "static":
            recipe = STATIC_OPS[model.family]
            for name, p in lp.items():
                layer = model.layers[name]
                if p == "int8" and layer.op_type not in recipe:
                    lp[name] = "fp32"
                    reasons[name] = f"the {model.family} recipe keeps {layer.op_type} in float"
        if "int8" in used and mode == "none":
            raise BackendError("weight-only INT8 is not an onnxruntime format; use static or dynamic activations",
                               "PRECISION_UNSUPPORTED")
        return Plan(self.name, model, spec, target, lp, reasons=reasons)

    def build(self, plan: Plan, workdir: Path) -> Artifact:
        workdir.mkdir(parents=True, exist_ok=True)
        out = workdir / "model.onnx"
        lp = plan.layer_precisions
        used = set(lp.values()) or {"fp32"}
        float_nodes = [plan.model.layers[n].node for n, p in lp.items() if p == "fp32"]
        meta: dict[str, Any] = {"provider": plan.target.option("provider", "cpu")}
        if plan.state.get("prequantized"):
            shutil.copyfile(plan.model.onnx_path, out)
            meta["format"] = "qdq-prequantized"
        elif "int8" in used and plan.spec.activations.mode == "static":
            self._static(plan, out, float_nodes, workdir)
            meta["format"] = "qdq"
            meta["qdq"] = plan.state["qdq"]
        elif "int8" in used:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            # transformers: the embedding tables too (Gather of a weight, stored int8 and dequantized on lookup),
            # most of a small encoder's size
            dynamic_ops = list(DYNAMIC_OPS) + (["Gather"] if plan.model.family == "transformer" else [])

            with quiet(""):  # ORT logs a pre-processing hint at WARNING on every call
                quantize_dynamic(str(plan.model.onnx_path), str(out), op_types_to_quantize=dynamic_ops,
                                 per_channel=plan.spec.weights.granularity.type == "per_channel",
                                 weight_type=QuantType.QInt8, nodes_to_exclude=float_nodes,
                                 # 7-bit weights where the profile says the CPU's u8 x s8 kernels saturate (AVX2)
                                 reduce_range=bool(plan.target.option("reduce_range", False)),
                                 extra_options={"WeightSymmetric": plan.spec.weights.symmetric})
            meta["format"] = "dynamic"
            meta["dynamic_op_types"] = dynamic_ops
        elif "fp16" in used:
            import onnx
            from onnxruntime.transformers.float16 import convert_float_to_float16

            proto = convert_float_to_float16(onnx.load(str(plan.model.onnx_path)), keep_io_types=True,
                                             node_block_list=float_nodes or None)
            onnx.save(proto, str(out))
            meta["format"] = "fp16"
        else:
            shutil.copyfile(plan.model.onnx_path, out)
            meta["format"] = "fp32"
        if meta["format"] != "fp32":
            _strip_debug_metadata(out)
        return Artifact(out, "int8" if plan.state.get("prequantized") else summarize_precision(lp), lp, meta,
                        events=list(plan.state.get("events", [])))

    def _static(self, plan: Plan, out: Path, float_nodes: list[str], workdir: Path) -> None:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        if plan.ranges is None:
            raise BackendError("static INT8 needs calibrated ranges; pass calibration data", "BUILD_FAILED")
        spec, target, model = plan.spec, plan.target, plan.model
        recipe = STATIC_OPS[model.family]
        # a node is quantized only where every float activation it reads or writes has a finite range; the
        # rest stay float (onnxruntime would write a scale of inf, or refuse a tensor without a range)
        source = _preprocessed(Path(model.onnx_path), workdir, [layer.node for layer in model.layers.values()])
        unranged = sorted(n for n, (op, ts) in _float_io(source).items()
                          if op in recipe and any(t not in plan.ranges.ranges for t in ts))
        exclude = sorted(set(float_nodes) | set(unranged))
        cache = ort_calibration_cache(plan.ranges.ranges, workdir / "calibration.json")
        act_type = QuantType.QInt8 if target.activation_dtype == "int8" else QuantType.QUInt8
        per_channel = spec.weights.granularity.type == "per_channel"
        if per_channel and model.opset < 13:  # intake could not upgrade the graph: per-tensor, said
            per_channel = False
            plan.state.setdefault("events", []).append((
                "GRANULARITY_UNSUPPORTED", f"per-channel weights need opset 13 and this graph is opset {model.opset} "
                f"(onnx's version converter could not upgrade it): weights quantized per tensor"))
        with quiet(""):  # ORT logs a pre-processing hint at WARNING on every call
            quantize_static(
                str(source), str(out), calibration_data_reader=None, calibration_cache_path=cache,
                quant_format=QuantFormat.QDQ, activation_type=act_type, weight_type=QuantType.QInt8,
                per_channel=per_channel, op_types_to_quantize=list(recipe),
                reduce_range=bool(target.option("reduce_range", False)), nodes_to_exclude=exclude,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"ActivationSymmetric": spec.activations.symmetric,
                               "WeightSymmetric": spec.weights.symmetric})
        rewired = _float_inputs(out, source, float_nodes)
        plan.state["qdq"] = {"recipe": model.family, "op_types": list(recipe),
                             "float_for_unranged_input": unranged[:50], "float_for_unranged_count": len(unranged),
                             "float_inputs_of_float_layers": rewired}

    def runner(self, path: Path, meta: Mapping[str, Any]) -> OrtRunner:
        provider = meta.get("provider", "cpu")
        providers = [PROVIDERS[provider], "CPUExecutionProvider"] if provider != "cpu" else None
        return OrtRunner(path, providers, threads=threads_of(meta))


def _preprocessed(reference: Path, workdir: Path, nodes: list[str]) -> Path:
    """The reference after onnxruntime's basic graph optimisations (BatchNormalization folded into the
    convolution, constants folded, Identity removed), which ``quantize_static`` asks for. Fusions that rename
    a layer's node (MatMul+Add -> Gemm) are off; if a layer's node is gone all the same, the reference is used
    as it is (layer names address nodes). A fused convolution writes the tensor its BatchNormalization wrote,
    so the calibrated ranges still apply."""
    import onnx
    import onnxruntime as ort

    out = workdir / "preprocessed.onnx"
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(out)
    opts.log_severity_level = 3
    ort.InferenceSession(str(reference), opts, providers=["CPUExecutionProvider"],
                         disabled_optimizers=list(RENAMING_FUSIONS))
    kept = {n.name for n in onnx.load(str(out), load_external_data=False).graph.node}
    return out if set(nodes) <= kept else reference


def _float_io(path: Path) -> dict[str, tuple[str, list[str]]]:
    """Per node: its op type and the float activation tensors it reads and writes (not initializers, not
    integer or boolean tensors such as shapes, ids and masks), by onnx's shape inference."""
    import onnx

    proto = onnx.load(str(path))
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    inits = {t.name for t in proto.graph.initializer}
    return {n.name: (n.op_type, [t for t in list(n.input) + list(n.output)
                                 if t and t not in inits and types.get(t) == onnx.TensorProto.FLOAT])
            for n in proto.graph.node}


def _float_inputs(path: Path, source: Path, float_nodes: list[str]) -> int:
    """A layer kept in float reads float activations: each input that ``quantize_static`` wired through a
    QuantizeLinear -> DequantizeLinear pair (because the producer is quantized) is wired back to the tensor the
    reference reads there. Where the quantizer folded a ReLU/Clip into the pair's range (the pair's clamp being the
    activation, its output name given to the node before it), the activation is put back in float for this
    reader. Pairs left without a reader are removed. Otherwise a promoted layer still sees INT8 noise on its input
    -- not what promoting it means, nor what the sensitivity measured. Returns the number of inputs rewired."""
    import onnx

    proto = onnx.load(str(path))
    g = proto.graph
    wanted = set(float_nodes)
    ref = onnx.load(str(source), load_external_data=False).graph
    original = {n.name: list(n.input) for n in ref.node if n.name in wanted}
    wrote = {o: n for n in ref.node for o in n.output}
    writes = {o: n.name for n in g.node for o in n.output} | {i.name: "" for i in g.input}
    ref_inits = {t.name: t for t in ref.initializer}
    inits = {t.name for t in g.initializer}
    rewired = 0
    added: dict[str, str] = {}  # folded activation output -> its float copy
    nodes = []
    for node in g.node:
        nodes.append(node)
        before = original.get(node.name)
        if before is None or len(before) != len(node.input):
            continue
        for i, (x, want) in enumerate(zip(node.input, before)):
            if x == want or want not in writes:
                continue
            src = wrote.get(want)
            if writes[want] == (src.name if src is not None else ""):  # the reference's own tensor
                node.input[i] = want
                rewired += 1
            elif src is not None and src.op_type in ("Relu", "Clip") and src.input[0] not in writes and \
                    all(t in ref_inits or not t for t in src.input[1:]):
                # folded: ``want`` is now written before the activation; the activation runs again, in float
                if want not in added:
                    copy = onnx.NodeProto()
                    copy.CopyFrom(src)
                    copy.name = f"{src.name}_float"
                    copy.input[0] = want
                    del copy.output[:]
                    copy.output.append(f"{want}_float")
                    for t in src.input[1:]:
                        if t and t not in inits:
                            g.initializer.append(ref_inits[t])
                            inits.add(t)
                    nodes.insert(len(nodes) - 1, copy)  # just before its reader: after what writes ``want``
                    added[want] = copy.output[0]
                node.input[i] = added[want]
                rewired += 1
    if not rewired:
        return 0
    if added:
        kept = [onnx.NodeProto() for _ in nodes]
        for dst, src in zip(kept, nodes):
            dst.CopyFrom(src)
        del g.node[:]
        g.node.extend(kept)
    outputs = {o.name for o in g.output}

    def read(nodes: Any) -> set[str]:  # every name a node reads, subgraphs (If/Loop bodies) included
        names = set()
        for n in nodes:
            names.update(n.input)
            for a in n.attribute:
                for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    names |= read(sub.node)
        return names

    while True:  # drop Q/DQ nodes nobody reads any more (their scale/zero-point initializers stay, unused)
        live = read(g.node) | outputs
        dead = [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in live for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    onnx.save(proto, str(path))
    return rewired


def _strip_debug_metadata(path: Path) -> None:
    """Drop the exporter's per-node debug metadata (source lines, class hierarchies) and inferred shapes: not
    needed to run the artifact, and a few percent of a small model's size. The layer map lives in the manifest."""
    import onnx

    proto = onnx.load(str(path))
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del proto.graph.value_info[:]  # inferred shapes from pre-processing: onnxruntime infers them again
    onnx.save(proto, str(path))



@hookimpl
def qdeploy_register_backends(register: Any) -> None:
    register(OnnxRuntimeBackend())


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
