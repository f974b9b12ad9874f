"""The built-in ``reference`` backend: the spec's numerics exactly, and nothing else.

Its artifact is the FP32 reference with the core's fake quantization applied (:func:`qdeploy.simulate.simulated_model`):
each quantized layer's weight quantized and dequantized as the spec says (bits, symmetry, per tensor / channel /
group), and a Q/DQ pair with the calibrated range on its activation input. It runs in onnxruntime as the float
arithmetic the ONNX standard defines (basic optimisations only, never this CPU's integer kernels), so it says
what the spec *means*, independent of any runtime's kernels: the oracle the other backends are compared with,
and what the core's tests run on with every plugin disabled. ``verified_on`` is ``simulated``: it never serves.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .backend import Artifact, Backend, Capabilities, OrtRunner, Plan, threads_of
from .errors import BackendError
from .spec import QUANTIZED, summarize_precision


class ReferenceRunner(OrtRunner):
    """The fake-quantized graph, Q/DQ as float arithmetic; ``simulated``: verification only."""

    simulated = True

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        from .simulate import ORT_FP8_DISABLED_OPTIMIZERS

        super().__init__(path, threads=threads, disabled_optimizers=ORT_FP8_DISABLED_OPTIMIZERS, basic_only=True)


class ReferenceBackend(Backend):
    name = "reference"
    artifact_suffix = ".onnx"

    def capabilities(self, target: Any) -> Capabilities:
        return Capabilities(True, precisions=("int8", "fp8", "fp32"),
                            granularities=("per_tensor", "per_channel", "per_group"), model_formats=("onnx",),
                            activation_modes=("static", "none"), weight_bits=(2, 3, 4, 5, 6, 7, 8),
                            verified_on="simulated", oracle=True)

    def translate(self, model: Any, spec: Any, target: Any, layer_precisions: dict[str, str]) -> Plan:
        if model.prequantized:
            raise BackendError(f"the reference simulates quantizing an FP32 model; this one is already quantized "
                               f"({', '.join(model.prequantized)})", "MODEL_FORMAT_UNSUPPORTED")
        kinds = {p for p in layer_precisions.values() if p in QUANTIZED}
        if len(kinds) > 1:
            raise BackendError(f"the reference simulates one quantized type per artifact, not {sorted(kinds)}",
                               "PRECISION_UNSUPPORTED")
        return Plan(self.name, model, spec, target, dict(layer_precisions))

    def build(self, plan: Plan, workdir: Path) -> Artifact:
        import onnx

        from .simulate import simulated_model

        quantized = [n for n, p in plan.layer_precisions.items() if p in QUANTIZED]
        if quantized and plan.spec.activations.mode == "static" and plan.ranges is None:
            raise BackendError("static INT8 needs calibrated ranges; pass calibration data", "BUILD_FAILED")
        kind = plan.layer_precisions[quantized[0]] if quantized else "int8"
        workdir.mkdir(parents=True, exist_ok=True)
        out = workdir / "model.onnx"
        onnx.save(simulated_model(plan.model, plan.spec, plan.ranges, quantized, kind), str(out))
        lp = plan.layer_precisions
        return Artifact(out, summarize_precision(lp), dict(lp), {"format": "fake-quant"})

    def runner(self, path: Path, meta: Mapping[str, Any]) -> ReferenceRunner:
        return ReferenceRunner(path, threads_of(meta))
