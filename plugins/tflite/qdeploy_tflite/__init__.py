"""qdeploy backend for TFLite / LiteRT: full-integer INT8, dynamic-range INT8, FP16 and FP32 ``.tflite`` files.

Conversion goes through litert-torch (the PyTorch -> LiteRT converter), so this backend takes PyTorch models
only. Full-integer INT8 uses litert-torch's PT2E quantizer with qdeploy's own observers (the spec's
calibration method: minmax, moving average, percentile, entropy, MSE) on qdeploy's calibration data; the
spec's weight granularity picks per-channel or per-tensor weights, symmetric activations give zero point 0
(NNAPI). Layers the spec or the fallback loop keep in float are left out of the quantizer, so they run as
float ops between a dequantize and a quantize. Dynamic-range INT8 is the PT2E dynamic recipe; FP16 stores
weights as float16 (ai-edge-quantizer's float casting). Model input and output stay float unless the target
asks for ``io_dtype = "int8"`` (Edge TPU); then their scale and zero point go into the artifact's metadata
and the runner quantizes inputs and dequantizes outputs, so verification compares in float.

Artifacts run on the LiteRT interpreter (``ai-edge-litert``) with XNNPACK, its default CPU delegate. When
only ``tflite-runtime`` is installed it is used for what it can run (see :func:`interpreter_class`).
"""
from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pluggy

from qdeploy.backend import Artifact, Backend, Capabilities, Plan, Runner, quiet, threads_of
from qdeploy.spec import summarize_precision
from qdeploy.errors import BackendError

from . import flatbuffer

hookimpl = pluggy.HookimplMarker("qdeploy")
FLOAT_PRECISIONS = ("fp16", "bf16", "fp32")
# ops that are part of a float boundary, not float compute
BOUNDARY_OPS = {"QUANTIZE", "DEQUANTIZE"}
LAYOUT_OPS = {"RESHAPE", "TRANSPOSE", "SQUEEZE", "EXPAND_DIMS"}


# --- runtimes -------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def interpreter_class() -> tuple[Any, str, str]:
    """``(Interpreter class or None, runtime name, reason)``: LiteRT first, then tflite-runtime.

    tflite-runtime 2.14 (its last release) needs numpy<2, cannot load current dynamic-range models and runs
    INT8 slower than FP32; it is used only when LiteRT is missing, for full-integer and FP32 models."""
    try:
        from ai_edge_litert.interpreter import Interpreter
        return Interpreter, "ai-edge-litert", ""
    except Exception as exc:  # noqa: BLE001 - any import failure means "not usable here"
        litert_err = f"{type(exc).__name__}: {exc}"
    try:
        from tflite_runtime.interpreter import Interpreter
        return Interpreter, "tflite-runtime", ""
    except ImportError as exc:
        if "tflite_runtime" not in str(exc):  # installed, but broken (numpy 2 for 2.14)
            return None, "", (f"tflite-runtime is installed but cannot be imported ({exc}); its last release "
                              f"needs numpy<2: install ai-edge-litert (LiteRT) instead")
    except Exception as exc:  # noqa: BLE001
        return None, "", (f"tflite-runtime is installed but cannot be imported ({type(exc).__name__}: {exc}); "
                          f"install ai-edge-litert (LiteRT) instead")
    return None, "", f"no LiteRT interpreter: install ai-edge-litert ({litert_err})"


@functools.lru_cache(maxsize=1)
def converter_status() -> str:
    """'' when litert-torch imports, else why not."""
    try:
        with quiet("torch", "torchao", "litert_torch", "absl", "jax", "ai_edge_quantizer"), _native_stderr_muted():
            import litert_torch  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"litert-torch is not importable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return ""


@contextlib.contextmanager
def _native_stderr_muted():
    """Collect what C++ code writes straight to file descriptor 2 while the block runs; yields a dict whose
    ``"text"`` holds it afterwards. Importing litert-torch makes TensorFlow and torchao print INFO lines there
    (oneDNN notices, absl's InitializeLog warning, optional CUDA kernels not found) that TF_CPP_MIN_LOG_LEVEL
    does not silence, and the interpreter announces its XNNPACK delegate: they would open every
    `qdeploy check` and `deploy`. Errors still raise; callers add the collected text to their message."""
    out = {"text": ""}
    if threading.current_thread() is not threading.main_thread():
        # fd 2 is the whole process's: a server loading a runner in a background thread must not swallow
        # what its other threads log meanwhile; there the INFO lines are left alone
        yield out
        return
    try:
        saved = os.dup(2)
    except OSError:  # no stderr descriptor (embedded interpreters): nothing to collect
        yield out
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            out["text"] = sink.read().decode(errors="replace")


def _native_error(text: str) -> str:
    """The last line of collected native output that is not an INFO/WARNING notice, or ''."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("INFO:", "I0000", "WARNING:", "W0000"))]
    return lines[-1] if lines else ""




def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


# --- the backend ----------------------------------------------------------------------------------------------
class TFLiteBackend(Backend):
    name = "tflite"
    artifact_suffix = ".tflite"

    def capabilities(self, target: Any) -> Capabilities:
        interp, runtime, reason = interpreter_class()
        if interp is None:
            return Capabilities(False, reason)
        why = converter_status()
        if why:
            return Capabilities(False, f"{why}; install litert-torch (plugins/tflite) to convert PyTorch models")
        if runtime == "tflite-runtime":  # old runtime: no current dynamic-range models, no FP16 weights
            return Capabilities(True, precisions=("int8", "fp32"), granularities=("per_tensor", "per_channel"),
                                model_formats=("torch",), activation_modes=("static",), weight_bits=(8,),
                                weight_symmetric_only=True)
        return Capabilities(True, precisions=("int8", "fp16", "fp32"), granularities=("per_tensor", "per_channel"),
                            model_formats=("torch",), activation_modes=("static", "dynamic", "none"),
                            weight_bits=(8,), verified_on="runtime", weight_symmetric_only=True)

    def advise(self, model: Any, spec: Any, target: Any) -> list[str]:
        notes = []
        if interpreter_class()[1] == "tflite-runtime":
            notes.append("only tflite-runtime is installed: it runs INT8 slower than FP32 and cannot load "
                         "dynamic-range models; install ai-edge-litert (LiteRT)")
        if spec.precision == "int8" and spec.activations.mode != "static":
            notes.append("dynamic-range INT8 keeps activations in float: smaller, but not an accelerator format "
                         "(NNAPI/Edge TPU need full-integer models)")
        return notes

    def translate(self, model: Any, spec: Any, target: Any, layer_precisions: dict[str, str]) -> Plan:
        if getattr(model, "torch_module", None) is None:
            raise BackendError("litert-torch converts PyTorch models only; this model is ONNX",
                               "MODEL_FORMAT_UNSUPPORTED")
        lp = dict(layer_precisions)
        used = set(lp.values()) or {spec.precision}
        bad = used - {"int8", "fp16", "fp32"}
        if bad:
            raise BackendError(f"TFLite builds int8/fp16/fp32 only, not {sorted(bad)}", "PRECISION_UNSUPPORTED")
        mode = spec.activations.mode
        full_integer = bool(target.full_integer_only)
        if "int8" in used and full_integer and mode != "static":
            raise BackendError(f"this device runs full-integer models only, but activations.mode is {mode!r} "
                               f"(dynamic-range INT8 keeps activations in float); use mode = \"static\"",
                               "PRECISION_UNSUPPORTED")
        if full_integer and used & set(FLOAT_PRECISIONS):
            floats = sorted(n for n, p in lp.items() if p != "int8")
            raise BackendError(f"layers {floats} would run in float, which this device cannot (full-integer "
                               f"only)", "PRECISION_UNSUPPORTED")
        modules = dict(model.torch_module.named_modules())
        reasons: dict[str, str] = {}
        if "int8" in used:
            kind = "static" if mode == "static" else "dynamic"
            missing = [n for n, p in lp.items() if p != "int8" and n not in modules]
            if missing:
                raise BackendError(f"layers {missing} have no PyTorch module of that name, so litert-torch cannot "
                                   f"keep them in float", "PRECISION_UNSUPPORTED")
            for n, p in lp.items():  # float layers inside an INT8 model run in FP32 (TFLite has no mixed FP16)
                if p == "fp16":
                    lp[n] = "fp32"  # the core records the change as a PRECISION_UNSUPPORTED event
                    reasons[n] = "a TFLite INT8 model keeps its float layers in FP32 (no FP16 layers beside INT8)"
        elif "fp16" in used:
            kind = "fp16"
        else:
            kind = "fp32"
        io_dtype = target.option("io_dtype", "float32")
        if io_dtype not in ("float32", "int8"):
            raise BackendError(f"target option io_dtype={io_dtype!r}: use \"float32\" or \"int8\"", "BUILD_FAILED")
        state = {"kind": kind, "io_dtype": io_dtype if kind == "static" else "float32",
                 "float_modules": sorted(n for n, p in lp.items() if p != "int8"), "full_integer": full_integer}
        return Plan(self.name, model, spec, target, lp, state=state, reasons=reasons)

    def calibrate(self, plan: Plan, ranges: Any, data: Any) -> Plan:
        plan.ranges = ranges
        plan.state["data"] = data  # this backend observes through PT2E, with qdeploy's own observers
        return plan

    def build(self, plan: Plan, workdir: Path) -> Artifact:
        from . import convert

        workdir.mkdir(parents=True, exist_ok=True)
        out = workdir / "model.tflite"
        kind = plan.state["kind"]
        events: list[tuple[str, str]] = []
        if kind == "static" and plan.state.get("data") is None:
            raise BackendError("full-integer INT8 needs calibration data; pass --calib", "BUILD_FAILED")
        if kind in ("static", "dynamic") and not plan.spec.weights.symmetric:
            events.append(("GRANULARITY_UNSUPPORTED", "TFLite INT8 weights are symmetric (zero point 0); "
                           "asymmetric weights were built symmetric"))
        try:
            with quiet("torch", "torchao", "litert_torch", "absl", "jax", "ai_edge_quantizer"):
                data = convert.convert(plan, kind)
        except BackendError:
            raise
        except Exception as exc:  # noqa: BLE001 - the converter's message, not its traceback
            raise BackendError(f"litert-torch could not convert the model ({kind}): {_first_line(exc)}",
                               "BUILD_FAILED") from exc
        model = flatbuffer.read(data)
        if plan.state["io_dtype"] != "int8":
            flatbuffer.float_io(model)
        data = flatbuffer.write(model)
        out.write_bytes(data)
        info = flatbuffer.describe(flatbuffer.read(data))
        float_ops = [op for op in info["ops"] if op["float"] and op["name"] not in BOUNDARY_OPS | LAYOUT_OPS]
        meta: dict[str, Any] = {
            "format": {"static": "full-integer int8", "dynamic": "dynamic-range int8", "fp16": "fp16 weights",
                       "fp32": "fp32"}[kind],
            "inputs": [_io_meta(t, i) for t, i in zip(info["inputs"], plan.model.inputs)],
            "outputs": [_io_meta(t, o) for t, o in zip(info["outputs"], plan.model.outputs)],
            "layout": "NCHW (the PyTorch model's own; the converter adds the NHWC transposes inside)",
            "converter": f"litert-torch {_version('litert-torch')}", "runtime": interpreter_class()[1],
            "float_ops": sorted({op["name"] for op in float_ops}),
            "float_layers": plan.state["float_modules"],
            "verified_on": verified_on(plan.target),
        }
        if kind == "static":
            meta["calibration"] = {"method": plan.spec.activations.method, "observer": "qdeploy",
                                   "activation_symmetric": plan.spec.activations.symmetric,
                                   "weights": plan.spec.weights.granularity.type,
                                   **plan.state.get("ranges_report", {})}
        if plan.state["io_dtype"] == "int8":
            not_int = [t["name"] for t in info["inputs"] + info["outputs"] if t["dtype"] != "int8"]
            if not_int:
                events.append(("PRECISION_UNSUPPORTED", f"model input/output {not_int} stayed float; this device "
                               f"needs int8 input and output"))
        if plan.state["full_integer"] and float_ops:
            names = ", ".join(sorted({op["name"] for op in float_ops}))
            events.append(("PRECISION_UNSUPPORTED", f"{len(float_ops)} op(s) run in float ({names}): not "
                           f"full-integer, so they would fall back to the host CPU on this device"))
        return Artifact(out, summarize_precision(plan.layer_precisions) if kind in ("static", "dynamic")
                        else kind, plan.layer_precisions, meta, events)

    def runner(self, path: Path, meta: Mapping[str, Any]) -> LiteRTRunner:
        return LiteRTRunner(path, meta)


#: The profile's ``delegate`` option -> the device the artifact is meant for.
TARGET_DEVICES = {"xnnpack": "cpu-xnnpack", "nnapi": "nnapi", "edgetpu": "edge-tpu"}
RUNTIME_NAMES = {"ai-edge-litert": "litert", "tflite-runtime": "tflite-runtime"}


def verified_on(target: Any) -> dict[str, str]:
    """Where this backend's verification runs, against where the artifact is meant to run: always the LiteRT
    interpreter (or tflite-runtime) on this host's CPU with XNNPACK, its default delegate; the Edge TPU compiler
    and the NNAPI delegate never run here. ``target_device`` is the profile's ``delegate``; ``note`` is set when
    the two differ, so a report can say the numbers are the CPU kernels', not the accelerator's."""
    runtime = interpreter_class()[1]
    delegate = str(target.option("delegate", "xnnpack"))
    where = {"runtime": RUNTIME_NAMES.get(runtime, runtime), "device": "cpu-xnnpack",
             "target_device": TARGET_DEVICES.get(delegate, delegate)}
    if where["target_device"] != where["device"]:
        where["note"] = (f"verified on {runtime}'s CPU kernels (XNNPACK) on this host, not on the "
                         f"{where['target_device']} (its {delegate} delegate did not run here)")
    return where


def _io_meta(t: dict[str, Any], info: Any) -> dict[str, Any]:
    out = {"name": info.name, "tflite_name": t["name"], "dtype": t["dtype"], "shape": t["shape"]}
    if t["dtype"] in ("int8", "uint8", "int16"):
        out["scale"], out["zero_point"] = t["scale"], t["zero_point"]
    return out


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


# --- the runner -----------------------------------------------------------------------------------------------
class LiteRTRunner(Runner):
    """A .tflite file on the LiteRT interpreter (XNNPACK on): named float arrays in the user's layout in, named
    float arrays out. INT8 model inputs are quantized with the model's own scale and zero point, INT8 outputs
    dequantized; a model with NHWC inputs gets its NCHW feed transposed."""

    def __init__(self, path: str | Path, meta: Mapping[str, Any] | None = None, threads: int | None = None) -> None:
        interp, runtime, reason = interpreter_class()
        if interp is None:
            raise BackendError(reason, "LOAD_FAILED")
        meta = meta or {}
        threads = threads or threads_of(meta) or int(os.environ.get("QDEPLOY_TFLITE_THREADS", "0")) or None
        error = None
        with _native_stderr_muted() as native:
            try:
                self.interpreter = interp(model_path=str(path), num_threads=threads)
                self.interpreter.allocate_tensors()
            except Exception as exc:  # noqa: BLE001
                error = exc
        if error is not None:
            detail = _native_error(native["text"])
            raise BackendError(f"{runtime} cannot load {Path(path).name}: {_first_line(error)}"
                               + (f" ({detail})" if detail else ""), "LOAD_FAILED") from error
        self.runtime = runtime
        self.inputs = self.interpreter.get_input_details()
        self.outputs = self.interpreter.get_output_details()
        names_in = [m["name"] for m in meta.get("inputs", [])]
        names_out = [m["name"] for m in meta.get("outputs", [])]
        self.input_names = names_in if len(names_in) == len(self.inputs) else [d["name"] for d in self.inputs]
        self.output_names = names_out if len(names_out) == len(self.outputs) else [d["name"] for d in self.outputs]
        self.expected = {m["name"]: tuple(m.get("shape", ())) for m in meta.get("inputs", [])}
        self.max_batch = int(self.inputs[0]["shape"][0]) if len(self.inputs[0]["shape"]) else None

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        it = self.interpreter
        for name, d in zip(self.input_names, self.inputs):
            x = np.asarray(feed[name])
            want = tuple(int(s) for s in d["shape"])
            if x.ndim == 4 and want[1:] != x.shape[1:] and want[1:] == (x.shape[2], x.shape[3], x.shape[1]):
                x = x.transpose(0, 2, 3, 1)  # the user's NCHW into an NHWC model input
            if x.shape[0] != want[0]:
                it.resize_tensor_input(d["index"], [x.shape[0], *want[1:]])
                it.allocate_tensors()
                self.inputs = it.get_input_details()
            it.set_tensor(d["index"], _quantize(x, d))
        it.invoke()
        return {name: _dequantize(it.get_tensor(d["index"]), d) for name, d in zip(self.output_names, self.outputs)}

    def close(self) -> None:
        self.interpreter = None


def _quantize(x: np.ndarray, d: Mapping[str, Any]) -> np.ndarray:
    dtype = d["dtype"]
    if np.dtype(dtype).kind == "f":
        return x.astype(dtype, copy=False)
    scale, zp = d["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale) + zp, info.min, info.max).astype(dtype)


def _dequantize(y: np.ndarray, d: Mapping[str, Any]) -> np.ndarray:
    if np.dtype(d["dtype"]).kind == "f":
        return y.astype(np.float32, copy=True)
    scale, zp = d["quantization"]
    return ((y.astype(np.float32) - zp) * scale).astype(np.float32)


@hookimpl
def qdeploy_register_backends(register: Any) -> None:
    register(TFLiteBackend())
