"""qdeploy backend for NVIDIA TensorRT: explicitly quantized (Q/DQ) INT8 and FP8 engines with FP16/BF16/FP32
layers.

The artifact is a folder: ``model_qdq.onnx`` (the explicitly quantized graph, see :mod:`.qdq` for TensorRT's
placement rules), ``build_config.json`` (builder flags, layer precision constraints, optimization profile),
``trtexec.txt`` (the equivalent ``trtexec`` line), ``build_engine.sh`` and, when TensorRT and a GPU are present,
``engine.plan`` with its ``timing.cache``. Without TensorRT the build records ``BACKEND_UNAVAILABLE`` and the
artifact is verified by running the same Q/DQ graph in onnxruntime: its runner says ``simulated``, so a
server falls back along the profile's chain. ``qdeploy build-engine BUNDLE`` builds the engine later, on the
target GPU.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pluggy

from qdeploy.backend import Artifact, Backend, Capabilities, OrtRunner, Plan, Runner, ort_disabled_optimizers
from qdeploy.errors import BackendError
from qdeploy.spec import PRECISIONS, PerGroup, summarize_precision

from .engine import (BUILD_CONFIG, BUILD_SCRIPT, BUILDER_FLAGS, DEFAULT_WORKSPACE_MB, ENGINE, TRTEXEC, MIN_CC,
                     TrtRunner, build_engine, fast_precisions, shapes_for, tensorrt_status, trtexec_command)
from .qdq import WEIGHTED_OPS, check_rules, with_float_rounding, write_qdq_model

hookimpl = pluggy.HookimplMarker("qdeploy")
SIMULATION_NOTE = ("verified by running the same Q/DQ graph in onnxruntime on the CPU (simulated): TensorRT's fused "
                   "INT8/FP8 kernels, and the FP16 kernels it may pick for float layers without a precision "
                   "constraint, can differ from this simulation")
#: Precisions this backend builds: INT8 and FP8 (E4M3) as Q/DQ layers, the rest as layer precisions.
BUILDS = ("int8", "fp8", "fp16", "bf16", "fp32")
QUANTIZED = ("int8", "fp8")


class TensorRTBackend(Backend):
    name = "tensorrt"

    def capabilities(self, target: Any) -> Capabilities:
        try:
            import onnxruntime  # noqa: F401  (writes and simulates the Q/DQ graph)
        except ImportError as exc:
            return Capabilities(False, f"onnxruntime is needed to write and simulate the Q/DQ ONNX: {exc}")
        usable, reason, _, _ = tensorrt_status()
        fast = fast_precisions(getattr(target, "compute_capability", ""))
        return Capabilities(True, reason=reason, precisions=tuple(p for p in PRECISIONS if p in fast and p in BUILDS),
                            granularities=("per_tensor", "per_channel"), model_formats=("onnx",),
                            activation_modes=("static",), weight_bits=(8,),
                            verified_on="gpu" if usable else "simulated")

    def advise(self, model: Any, spec: Any, target: Any) -> list[str]:
        notes = []
        usable, reason, _, gpu = tensorrt_status()
        cc = getattr(target, "compute_capability", "")
        if not usable:
            notes.append(f"no TensorRT engine is built here ({reason}); the bundle carries the Q/DQ ONNX, "
                         f"build_config.json and the trtexec line: run `qdeploy build-engine BUNDLE` on the target")
        elif cc and f"sm_{cc.replace('.', '')}" not in gpu:
            notes.append(f"this host's GPU is {gpu} but the profile is sm_{cc.replace('.', '')}: an engine built here "
                         f"runs on this GPU model only; rebuild it on the target with `qdeploy build-engine`")
        if "fp8" in fast_precisions(cc) and spec.precision != "fp8" and "fp8" not in spec.fallback.ladder:
            notes.append("this GPU has FP8 (E4M3) tensor cores: precision = \"fp8\" in the spec builds FP8 Q/DQ "
                         "layers (or put fp8 on the fallback ladder after int8)")
        for p in ("bf16", "fp8"):
            if p in target.fast and p not in fast_precisions(cc):
                need = ".".join(map(str, MIN_CC[p]))
                notes.append(f"the profile lists {p} as fast but compute capability {cc or 'unknown'} has no {p} "
                             f"tensor cores (needs sm_{need.replace('.', '')}+): not used")
        import onnx
        ops = sorted({n.op_type for n in onnx.load(str(model.onnx_path), load_external_data=False).graph.node}
                     - set(WEIGHTED_OPS))
        if ops:
            flt = "FP16 (FP16 builder flag)" if "fp16" in fast_precisions(cc) else "FP32"
            q = spec.precision.upper() if spec.precision in QUANTIZED else "INT8"
            notes.append(f"ops without weights ({', '.join(ops)}) take {q} only where TensorRT fuses them with "
                         f"neighbouring Q/DQ; elsewhere they run in {flt}")
        return notes

    def quantized_tensors(self, model: Any, spec: Any, target: Any) -> list[str]:
        """The residual Adds (R6): an Add one of whose inputs a weighted layer writes and the other an activation
        gets a Q/DQ pair on that residual input, so TensorRT fuses the addition into the layer's epilogue; one
        kept float gets none and runs in float after its layer. Other Adds are never quantized here."""
        if spec.precision not in QUANTIZED or model.prequantized:
            return []
        writer = {l.output: l for l in model.layers.values() if l.kind != "tensor"}
        return [n for n, l in model.layers.items() if l.kind == "tensor" and l.op_type == "Add"
                and len(l.activations) == 2 and sum(a in writer for a in l.activations) == 1]

    def translate(self, model: Any, spec: Any, target: Any, layer_precisions: dict[str, str]) -> Plan:
        integer_ops = sorted(set(model.prequantized) - {"QuantizeLinear", "DequantizeLinear"})
        if integer_ops:
            raise BackendError(f"TensorRT does not run {', '.join(integer_ops)} (it takes explicit quantization as "
                               f"QuantizeLinear/DequantizeLinear pairs): deploy this already-quantized model with "
                               f"onnxruntime, or give its FP32 original", "OP_UNSUPPORTED")
        lp = dict(layer_precisions)
        used = set(lp.values())
        bad = used - set(BUILDS)
        if bad:
            raise BackendError(f"TensorRT backend builds {', '.join(BUILDS)} layers, not {sorted(bad)}",
                               "PRECISION_UNSUPPORTED")
        allowed = fast_precisions(getattr(target, "compute_capability", ""))
        slow = used - set(allowed)
        if slow:
            raise BackendError(f"{sorted(slow)} has no fast kernels on compute capability "
                               f"{target.compute_capability} (runs {', '.join(allowed)})", "PRECISION_UNSUPPORTED")
        events: list[tuple[str, str]] = []
        quantized = sorted(used & set(QUANTIZED), key=QUANTIZED.index)
        if quantized:
            w, act = spec.weights, spec.activations
            kinds = "/".join(q.upper() for q in quantized)
            if act.mode not in ("static", "auto"):  # auto resolves to static here: there is no dynamic INT8
                raise BackendError(f"TensorRT explicit quantization needs static activation scales, not "
                                   f"{act.mode!r}", "PRECISION_UNSUPPORTED")
            if w.bits != 8 or isinstance(w.granularity, PerGroup):
                raise BackendError(f"TensorRT {kinds} takes 8-bit per-tensor or per-channel weights, not "
                                   f"{w.bits}-bit {w.granularity.type}", "GRANULARITY_UNSUPPORTED")
            asym = [k for k, s in (("weights", w.symmetric), ("activations", act.symmetric)) if not s]
            if asym:  # the profile should have said symmetric-only; TensorRT has zero point 0, always
                msg = (f"asymmetric {' and '.join(asym)} are not supported by TensorRT {kinds} (zero point must be "
                       f"0); translated to symmetric")
                if spec.fallback.policy == "strict":
                    raise BackendError(msg + " (refused: policy is strict)", "GRANULARITY_UNSUPPORTED")
                events.append(("GRANULARITY_UNSUPPORTED", msg))
        return Plan(self.name, model, spec, target, lp, state={"events": events})

    def calibrate(self, plan: Plan, ranges: Any, data: Any) -> Plan:
        """Keep the ranges, and the sample shape of the data: it fixes the dimensions the model leaves dynamic
        beyond the batch (an engine's optimization profile needs them)."""
        plan.ranges = ranges
        if data is not None:
            first, _ = next(data.batches(1))
            plan.state["data_shapes"] = {k: [int(d) for d in v.shape[1:]] for k, v in first.items()}
        return plan

    def build(self, plan: Plan, workdir: Path) -> Artifact:
        folder = workdir / "tensorrt"
        folder.mkdir(parents=True, exist_ok=True)
        model, lp, target = plan.model, plan.layer_precisions, plan.target
        weighted = {n: p for n, p in lp.items() if model.layers[n].kind != "tensor"}
        int8_nodes = [model.layers[n].node for n, p in weighted.items() if p == "int8"]
        fp8_nodes = [model.layers[n].node for n, p in weighted.items() if p == "fp8"]
        float_adds = [model.layers[n].node for n, p in lp.items() if n not in weighted and p not in QUANTIZED]
        float_layers = {n: p for n, p in weighted.items() if p not in QUANTIZED}
        events = list(plan.state.get("events", []))
        meta: dict[str, Any] = {"compute_capability": target.compute_capability, "build_config": BUILD_CONFIG}
        if int8_nodes or fp8_nodes:
            if plan.ranges is None:
                raise BackendError("INT8/FP8 need calibrated activation ranges; pass calibration data",
                                   "BUILD_FAILED")
            onnx_name = "model_qdq.onnx"
            summary = write_qdq_model(model.onnx_path, folder / onnx_name, plan.ranges.ranges, int8_nodes,
                                      plan.spec.weights.granularity.type == "per_channel", workdir, fp8_nodes,
                                      float_adds)
            import onnx
            problems = check_rules(onnx.load(str(folder / onnx_name)), int8_nodes,
                                   [model.layers[n].node for n in float_layers], fp8_nodes, plan.ranges.nonfinite,
                                   float_adds)
            if problems:
                raise BackendError("the Q/DQ graph breaks TensorRT's rules: " + "; ".join(problems), "BUILD_FAILED")
            meta["qdq"] = summary
            meta["symmetric_range_cost"] = symmetric_cost(plan.ranges.ranges,
                                                          [model.layers[n].input for n, p in weighted.items()
                                                           if p == "int8"])
        else:
            onnx_name = "model.onnx"
            shutil.copyfile(model.onnx_path, folder / onnx_name)
        used = set(lp.values())
        fast = fast_precisions(target.compute_capability)
        flags = [BUILDER_FLAGS[p] for p in ("int8", "fp8", "bf16") if p in used]
        if "fp16" in fast and "fp16" in target.supported:  # float layers without a constraint may use FP16
            flags.insert(len([p for p in ("int8", "fp8") if p in used]), "FP16")
        constraints = [{"layer": n, "node": model.layers[n].node, "precision": p}
                       for n, p in float_layers.items()]
        config = {
            "onnx": onnx_name, "target": target.label, "compute_capability": target.compute_capability,
            "builder_flags": flags, "precision_constraints": constraints, "layer_precisions": lp,
            "workspace_mb": int(target.option("workspace_mb", DEFAULT_WORKSPACE_MB)),
            "shapes": shapes_for([{"name": i.name, "shape": list(i.shape)} for i in model.inputs],
                                 int(target.option("opt_batch", 32)), int(target.option("max_batch", 256)),
                                 plan.state.get("data_shapes", {})),
            "timing_cache": "timing.cache",
        }
        (folder / BUILD_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        line = trtexec_command(config)
        (folder / TRTEXEC).write_text(f"# run inside this folder, on the target GPU, with TensorRT installed\n{line}\n")
        script = folder / BUILD_SCRIPT
        script.write_text(_build_script(line))
        script.chmod(0o755)
        meta.update({"onnx": onnx_name, "builder_flags": flags, "precision_constraints": constraints, "engine": None})
        usable, reason, _, _ = tensorrt_status()
        if usable:
            meta.update(build_engine(folder, config))
        else:
            events.append(("BACKEND_UNAVAILABLE", f"TensorRT engine not built: {reason}. The artifact carries "
                           f"{onnx_name}, {BUILD_CONFIG} and the trtexec line; build it on the target "
                           f"(sm_{target.compute_capability.replace('.', '')}) with `qdeploy build-engine BUNDLE`. "
                           f"Accuracy here is {SIMULATION_NOTE}"))
            meta["simulation"] = SIMULATION_NOTE
        return Artifact(folder, summarize_precision(lp), lp, meta, events)

    def runner(self, path: Path, meta: Mapping[str, Any]) -> Runner:
        path = Path(path)
        if (path / ENGINE).is_file() and tensorrt_status()[0]:
            return TrtRunner(path / ENGINE)
        onnx_name = meta.get("onnx") or ("model_qdq.onnx" if (path / "model_qdq.onnx").is_file() else "model.onnx")
        if not (path / onnx_name).is_file():
            raise BackendError(f"{path} holds no {onnx_name}: not a TensorRT artifact folder", "LOAD_FAILED")
        return SimulatedRunner(path / onnx_name, meta.get("precision_constraints", []))


class SimulatedRunner(OrtRunner):
    """The artifact's Q/DQ graph in onnxruntime on the CPU, FP16/BF16-constrained layers rounded through
    Cast: good for verification here, never for serving (``simulated``). Q/DQ pairs run as float arithmetic
    (basic optimisations only), never through this CPU's integer kernels: their saturation on AVX2 without VNNI
    is this host's, not the GPU's (measured: EfficientNet-Lite0 top-1 agreement 0.33 fused vs 0.90 unfused)."""

    simulated = True

    def __init__(self, path: Path, constraints: list[Mapping[str, str]]) -> None:
        import onnx

        rounded = [c for c in constraints if c["precision"] in ("fp16", "bf16")]
        proto = onnx.load(str(path))
        disabled = ort_disabled_optimizers(proto)  # FP8 pairs: no onnxruntime rewrite that is wrong for them
        if not rounded:
            super().__init__(path, disabled_optimizers=disabled, basic_only=True)
            return
        with tempfile.TemporaryDirectory(prefix="qdeploy-trt-sim-") as tmp:
            sim = Path(tmp) / "sim.onnx"
            onnx.save(with_float_rounding(proto, {c["node"]: c["precision"] for c in rounded}), str(sim))
            super().__init__(sim, disabled_optimizers=disabled, basic_only=True)


def symmetric_cost(ranges: Mapping[str, tuple[float, float]], tensors: list[str]) -> dict[str, Any]:
    """How much coarser symmetric INT8 (zero point 0, step amax/127) is than asymmetric (step (hi-lo)/255) on
    the quantized activations: the worst tensor and the median step ratio (2.0 for a ReLU output)."""
    ratios = {}
    for t in dict.fromkeys(tensors):
        if t not in ranges:
            continue
        lo, hi = min(ranges[t][0], 0.0), max(ranges[t][1], 0.0)
        if hi - lo <= 0:
            continue
        ratios[t] = (max(-lo, hi) / 127.0) / ((hi - lo) / 255.0)
    if not ratios:
        return {}
    worst = max(ratios, key=lambda t: ratios[t])
    vals = sorted(ratios.values())
    return {"median_step_ratio": round(vals[len(vals) // 2], 3), "worst_tensor": worst,
            "worst_step_ratio": round(ratios[worst], 3)}


def _build_script(trtexec_line: str) -> str:
    return f"""#!/bin/sh
# Build this artifact's TensorRT engine on the target GPU (TensorRT installed), verify it and update the
# bundle's manifest. This folder is <bundle>/artifacts/<id>.
set -e
here="$(cd "$(dirname "$0")" && pwd)"
exec qdeploy build-engine "$here/../.." --artifact "$(basename "$here")" "$@"
# Without qdeploy, the same engine (no verification, manifest not updated):
#   cd "$here" && {trtexec_line}
"""


@hookimpl
def qdeploy_register_backends(register: Any) -> None:
    register(TensorRTBackend())


@hookimpl
def qdeploy_add_commands(subparsers: Any) -> None:
    from .cli import add_build_engine
    add_build_engine(subparsers)
