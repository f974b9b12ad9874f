"""qdeploy backend for PyTorch: static INT8 (PT2E + Inductor on the x86 engine; FX graph mode on fbgemm,
onednn and qnnpack), dynamic INT8 for Linear/LSTM, FP16/BF16 (CPU, and CUDA when a GPU is present), and
quantization-aware training (:mod:`qdeploy_torch.qat`) whose result every backend can deploy.

Engine per profile entry: ``engine`` option (``x86`` default on CPU) or ``device = "cuda"``. The x86 engine
quantizes with torchao's ``prepare_pt2e``/``convert_pt2e`` and the ``X86InductorQuantizer`` configured from the
spec (:mod:`qdeploy_torch.quantize`), saves a ``torch.export`` program (``.pt2``) and runs it through
``torch.compile`` with Inductor freezing, which lowers the Q/DQ pattern to oneDNN INT8 kernels
(:mod:`qdeploy_torch.runner`). fbgemm/onednn/qnnpack use FX graph mode on torch's quantized engines and save
TorchScript (their packed weights cannot be exported). Layers the spec or the fallback loop keep in
fp32/bf16/fp16 stay out of quantization (``set_module_name_qconfig(name, None)``), the 16-bit ones wrapped
to run in their dtype.
"""
from __future__ import annotations

import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pluggy

from qdeploy.backend import Artifact, Backend, Capabilities, Plan
from qdeploy.errors import BackendError

hookimpl = pluggy.HookimplMarker("qdeploy")
DYNAMIC_OPS = ("Gemm", "MatMul")


class TorchBackend(Backend):
    name = "torch"
    artifact_suffix = ".pt2"

    # --- what can run here ------------------------------------------------------------------------------
    def capabilities(self, target: Any) -> Capabilities:
        try:
            import torch
        except ImportError as exc:
            return Capabilities(False, f"torch is not importable: {exc}")
        device = target.option("device", "cpu")
        if device == "cuda":
            if not torch.cuda.is_available():
                return Capabilities(False, f"no CUDA GPU is visible to torch {torch.__version__} here "
                                    f"(torch.cuda.is_available() is False)")
            return Capabilities(True, precisions=("fp16", "bf16", "fp32"), model_formats=("torch",),
                                activation_modes=("static",), verified_on="gpu")
        if device != "cpu":
            return Capabilities(False, f"unknown device {device!r}; the torch backend runs on cpu or cuda")
        engine = target.option("engine", "x86")
        from .quantize import ENGINES, PT2E_ENGINES

        supported = torch.backends.quantized.supported_engines
        if engine not in ENGINES:
            return Capabilities(False, f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")
        if engine not in supported:
            return Capabilities(False, f"quantized engine {engine} is not built into torch {torch.__version__} "
                                f"here (has {', '.join(e for e in supported if e != 'none')})")
        if engine in PT2E_ENGINES:
            try:
                import torchao.quantization.pt2e  # noqa: F401
            except Exception as exc:
                return Capabilities(False, f"the {engine} engine quantizes with torchao PT2E, which is not "
                                    f"importable: {exc}")
        return Capabilities(True, precisions=("int8", "fp16", "bf16", "fp32"),
                            granularities=("per_tensor", "per_channel"), model_formats=("torch",),
                            activation_modes=("static", "dynamic"), weight_bits=(2, 3, 4, 5, 6, 7, 8),
                            verified_on="runtime", weight_symmetric_only=True)

    def advise(self, model: Any, spec: Any, target: Any) -> list[str]:
        from qdeploy.backend import cpu_flags

        notes = []
        engine = target.option("engine", "x86")
        device = target.option("device", "cpu")
        x86_host = platform.machine().lower() in ("x86_64", "amd64")
        if device == "cpu" and engine == "qnnpack" and x86_host:
            notes.append("qnnpack is built for ARM: on this x86 CPU its INT8 kernels were measured slower than "
                         "FP32 (see benchmarks/bench_torch.py); the artifact is verified here but is only fast on "
                         "an ARM device")
        uses = {spec.precision} | {o.precision for o in spec.overrides}
        depthwise = _depthwise_convs(getattr(model, "torch_module", None))
        if device == "cpu" and engine in SLOW_DEPTHWISE_ENGINES and depthwise and spec.precision == "int8" \
                and spec.activations.mode != "dynamic":
            notes.append(f"{len(depthwise)} depthwise convolution(s) (e.g. {depthwise[0]}) stay FP32 on the {engine} "
                         f"engine: its INT8 depthwise kernels were measured about 10x slower than FP32 (EfficientNet-"
                         f"Lite0 on an AVX2 CPU: quantized::conv2d 96% of the INT8 model's time; with them FP32 the "
                         f"model ran 1.18x faster than torch's FP32 instead of 10x slower); the x86 engine (PT2E + "
                         f"Inductor) or onnxruntime quantize them")
        if device == "cpu" and "fp16" in uses:
            notes.append("FP16 on a CPU runs through conversions, slower than FP32: a size format here")
        if device == "cpu" and "bf16" in uses and x86_host and "avx512_bf16" not in cpu_flags() \
                and "amx_bf16" not in cpu_flags():
            notes.append("this CPU has no AVX512_BF16/AMX: BF16 is emulated and slower than FP32")
        if spec.activations.mode == "dynamic":
            convs = [n for n, l in model.layers.items() if l.op_type in ("Conv", "ConvTranspose")]
            if convs:
                notes.append(f"dynamic INT8 quantizes Linear/LSTM only: the {len(convs)} convolution(s) stay FP32")
        quantized = spec.precision == "int8" or any(o.precision == "int8" for o in spec.overrides)
        if quantized and not spec.weights.symmetric and device == "cpu":
            notes.append("asymmetric weights: the torch INT8 kernels take weight zero point 0, so the weights are "
                         "quantized symmetric (GRANULARITY_UNSUPPORTED; refused under strict)")
        if spec.weights.bits < 8 and spec.activations.mode == "static":
            notes.append(f"{spec.weights.bits}-bit weights run on the INT8 kernels (int8 storage, "
                         f"{2 ** spec.weights.bits} levels): same speed and size as INT8")
        return notes

    def quantized_tensors(self, model: Any, spec: Any, target: Any) -> list[str]:
        """Static INT8 on the FX engines (fbgemm, onednn, qnnpack) quantizes every add (``quantized::add``); one
        inside the model's own modules (named ``module/add``, ``#k`` for the k-th in that forward, by the layer
        map) can stay float alone through FX's per-call qconfig. The x86 engine (PT2E) quantizes no standalone add:
        ``torch.export`` leaves adds without the source partition ``X86InductorQuantizer`` matches its
        convolution + add fusion by, so they run in float already."""
        from .quantize import PT2E_ENGINES, is_prequantized

        if spec.activations.mode != "static" or spec.precision != "int8" or model.torch_module is None \
                or target.option("device", "cpu") != "cpu" or target.option("engine", "x86") in PT2E_ENGINES \
                or is_prequantized(model.torch_module):
            return []
        modules = dict(model.torch_module.named_modules())
        return [n for n, l in model.layers.items() if l.kind == "tensor" and l.op_type == "Add" and "/" in n
                and n.rpartition("/")[0] in modules]

    # --- the four steps ----------------------------------------------------------------------------------
    def translate(self, model: Any, spec: Any, target: Any, layer_precisions: dict[str, str]) -> Plan:
        from .quantize import is_prequantized, module_names, torch_layer

        if model.torch_module is None:
            raise BackendError("the torch backend needs the PyTorch model (this one is ONNX only)",
                               "MODEL_FORMAT_UNSUPPORTED")
        lp = dict(layer_precisions)
        used = set(lp.values()) or {spec.precision}
        device = target.option("device", "cpu")
        state: dict[str, Any] = {"device": device, "engine": target.option("engine", "x86" if device == "cpu"
                                                                            else None)}
        reasons: dict[str, str] = {}
        if is_prequantized(model.torch_module):
            if used - {"int8"} and spec.precision != "fp32":
                raise BackendError("this model is already quantized (a converted QAT/PT2E graph): its layers' "
                                   "precisions are fixed by its quantize/dequantize nodes", "PRECISION_UNSUPPORTED")
            state["path"] = "prequantized"
            return Plan(self.name, model, spec, target, {n: "int8" for n in lp}, state=state)
        if "fp8" in used:
            raise BackendError("the torch backend builds int8/fp16/bf16/fp32, not fp8", "PRECISION_UNSUPPORTED")
        if device == "cuda" and "int8" in used:
            raise BackendError("INT8 on CUDA is not a torch backend path (use tensorrt)", "PRECISION_UNSUPPORTED")
        modules = module_names(model.torch_module)
        odd = [n for n, p in lp.items() if p != "int8" and "int8" in used and torch_layer(n, modules) is None
               and model.layers[n].kind != "tensor"]  # tensor layers: only those quantized_tensors named
        if odd:
            raise BackendError(f"layer(s) {odd} have no PyTorch module path, so they cannot be kept out of "
                               f"quantization one by one", "OP_UNSUPPORTED")
        if "int8" in used:
            mode = spec.activations.mode
            if mode == "none":
                raise BackendError("weight-only INT8 is not a torch CPU format; use static or dynamic activations",
                                   "PRECISION_UNSUPPORTED")
            if mode == "dynamic":
                if spec.weights.bits != 8:
                    raise BackendError(f"dynamic INT8 takes 8-bit weights, not {spec.weights.bits}-bit",
                                       "PRECISION_UNSUPPORTED")
                for name, layer in model.layers.items():  # convolutions stay fp32 under dynamic INT8
                    if lp.get(name) == "int8" and (layer.op_type not in DYNAMIC_OPS or
                                                   torch_layer(name, modules) is None):
                        lp[name] = "fp32"  # the core records the change as a PRECISION_UNSUPPORTED event
                        reasons[name] = (f"dynamic INT8 in torch quantizes Linear/LSTM/GRU only, not "
                                         f"{layer.op_type}; use static activations")
                state["path"] = "dynamic"
            else:
                from .quantize import PT2E_ENGINES, activation_qrange, check_weights

                check_weights(spec)
                activation_qrange(target)
                state["path"] = "pt2e" if state["engine"] in PT2E_ENGINES else "fx"
                if state["engine"] in SLOW_DEPTHWISE_ENGINES:  # quantize what pays, and only that
                    for name in _depthwise_layers(model, modules):
                        if lp.get(name) == "int8":
                            lp[name] = "fp32"
                            reasons[name] = SLOW_DEPTHWISE.format(engine=state["engine"])
        else:
            state["path"] = "float"
        return Plan(self.name, model, spec, target, lp, state=state, reasons=reasons)

    def calibrate(self, plan: Plan, ranges: Any, data: Any) -> Plan:
        plan.ranges = ranges
        plan.state["data"] = data  # torch observes the calibration data itself, with the spec's method
        return plan

    def release(self) -> None:
        import sys

        build = sys.modules.get(f"{__name__}.build")  # imported only once something was built
        if build is not None:
            build.release()

    def build(self, plan: Plan, workdir: Path) -> Artifact:
        from . import build as b

        workdir.mkdir(parents=True, exist_ok=True)
        return b.build(plan, workdir)

    def runner(self, path: Path, meta: Mapping[str, Any]) -> Any:
        from .runner import TorchRunner

        return TorchRunner(Path(path), meta)

    def exact_runner(self, path: Path, meta: Mapping[str, Any]) -> Any:
        """The x86 engine's exported program compiled without freezing: Inductor then runs its quantize/dequantize
        ops and convolutions as float arithmetic, exact int32 accumulation up to float rounding, what oneDNN
        computes on a VNNI CPU; its INT8 kernels on an AVX2 CPU saturate in int16 instead (EfficientNet-Lite0:
        cosine 0.917 there). Run eagerly, the same program took 1.1 s a sample here."""
        if meta.get("path") != "pt2e":
            return None
        from .runner import TorchRunner

        exact = TorchRunner(Path(path), {**meta, "exact": True})
        exact.simulated = True  # an emulation of the target's arithmetic, not the artifact's runtime: said so
        return exact

    def has_exact_form(self, plan: Plan) -> bool:
        return plan.state.get("path") == "pt2e"


@hookimpl
def qdeploy_register_backends(register: Any) -> None:
    register(TorchBackend())


@hookimpl
def qdeploy_add_commands(subparsers: Any) -> None:
    from .cli import add_qat_command

    add_qat_command(subparsers)


def _depthwise_convs(module: Any) -> list[str]:
    """Module paths of the depthwise convolutions (groups == input channels > 1) of a PyTorch model."""
    if module is None or not hasattr(module, "named_modules"):
        return []
    import torch

    return [n for n, m in module.named_modules()
            if isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels]


SLOW_DEPTHWISE_ENGINES = ("fbgemm", "onednn")
SLOW_DEPTHWISE = ("the {engine} engine keeps depthwise convolutions FP32 (its INT8 depthwise kernels were measured "
                  "about 10x slower than FP32; see `qdeploy check`)")
"""Why the FX engines keep depthwise convolutions in float: a recipe decision, like onnxruntime's per model family."""


def _depthwise_layers(model: Any, modules: dict[str, Any]) -> list[str]:
    """Layer-map names of the model's depthwise convolutions."""
    from .quantize import torch_layer

    dw = set(_depthwise_convs(model.torch_module))
    return [n for n in model.layers if torch_layer(n, modules) in dw]
