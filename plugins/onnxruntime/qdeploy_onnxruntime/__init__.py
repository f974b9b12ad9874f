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

from qdeploy.backend import Artifact, Backend, Capabilities, OrtRunner, Plan, quiet
from qdeploy.errors import BackendError
from qdeploy.fallback import summarize_precision

hookimpl = pluggy.HookimplMarker("qdeploy")
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
DYNAMIC_OPS = ("MatMul", "Gemm")


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

    def translate(self, model: Any, spec: Any, target: Any, layer_precisions: dict[str, str]) -> Plan:
        lp = dict(layer_precisions)
        used = set(lp.values())
        if _prequantized(model.onnx_path):  # e.g. a converted QAT model: deploy its own Q/DQ, never re-quantize
            if used - {"int8"} and spec.precision != "fp32":
                raise BackendError("this model is already quantized (it has QuantizeLinear/DequantizeLinear nodes): "
                                   "its layers' precisions are fixed by them", "PRECISION_UNSUPPORTED")
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
            for name, layer in model.layers.items():  # never dynamic INT8 for convolutions (measured slow)
                if lp[name] == "int8" and layer.op_type not in DYNAMIC_OPS:
                    lp[name] = "fp32"
                    reasons[name] = (f"dynamic INT8 in onnxruntime is for {'/'.join(DYNAMIC_OPS)} only "
                                     f"({layer.op_type} measured slower than FP32); use static activations")
        if "int8" in used and mode == "none":
            raise BackendError("weight-only INT8 is not an onnxruntime format; use static or dynamic activations",
                               "PRECISION_UNSUPPORTED")
        return Plan(self.name, model, spec, target, lp, state={"layer_reasons": reasons})

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
        elif "int8" in used:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            with quiet(""):  # ORT logs a pre-processing hint at WARNING on every call
                quantize_dynamic(str(plan.model.onnx_path), str(out), op_types_to_quantize=list(DYNAMIC_OPS),
                                 per_channel=plan.spec.weights.granularity.type == "per_channel",
                                 weight_type=QuantType.QInt8, nodes_to_exclude=float_nodes,
                                 extra_options={"WeightSymmetric": plan.spec.weights.symmetric})
            meta["format"] = "dynamic"
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
        return Artifact(out, summarize_precision(lp), lp, meta)

    def _static(self, plan: Plan, out: Path, float_nodes: list[str], workdir: Path) -> None:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        if plan.ranges is None:
            raise BackendError("static INT8 needs calibrated ranges; pass calibration data", "BUILD_FAILED")
        spec, target = plan.spec, plan.target
        cache = plan.ranges.save_ort_cache(workdir / "calibration.json")  # qdeploy's ranges, ORT's cache format
        act_type = QuantType.QInt8 if target.activation_dtype == "int8" else QuantType.QUInt8
        with quiet(""):  # ORT logs a pre-processing hint at WARNING on every call
            quantize_static(
                str(plan.model.onnx_path), str(out), calibration_data_reader=None, calibration_cache_path=cache,
                quant_format=QuantFormat.QDQ, activation_type=act_type, weight_type=QuantType.QInt8,
                per_channel=spec.weights.granularity.type == "per_channel",
                reduce_range=bool(target.option("reduce_range", False)), nodes_to_exclude=float_nodes,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"ActivationSymmetric": spec.activations.symmetric,
                               "WeightSymmetric": spec.weights.symmetric})

    def runner(self, path: Path, meta: Mapping[str, Any]) -> OrtRunner:
        provider = meta.get("provider", "cpu")
        providers = [PROVIDERS[provider], "CPUExecutionProvider"] if provider != "cpu" else None
        return OrtRunner(path, providers)


def _prequantized(path: Path) -> bool:
    """True when the model already carries its quantization as Q/DQ nodes (a converted QAT model)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node)


def _strip_debug_metadata(path: Path) -> None:
    """Drop the exporter's per-node debug metadata (source lines, class hierarchies): not needed to run the
    artifact, and a few percent of a small model's size. The layer map lives in the manifest."""
    import onnx

    proto = onnx.load(str(path))
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    onnx.save(proto, str(path))



@hookimpl
def qdeploy_register_backends(register: Any) -> None:
    register(OnnxRuntimeBackend())
