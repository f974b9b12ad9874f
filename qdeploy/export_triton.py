"""``qdeploy export triton BUNDLE -o REPO``: a Triton Inference Server model repository from a bundle.

Every servable artifact becomes a Triton model, the FP32 reference its own model at the end, each with a
``config.pbtxt`` (names, data types, dims, ``max_batch_size``, dynamic batching, an instance group)::

    REPO/
      README.md                      the fallback order and budgets, for the operator
      qdeploy_fallback.json          the same, for programs
      <prefix>-<artifact id>/        one model per servable artifact, in the bundle's fallback order
        config.pbtxt
        1/model.onnx | model.plan | model.pt
      <prefix>-reference/            the FP32 reference (the final fallback)

- ONNX artifacts -> ``onnxruntime_onnx``; ``KIND_GPU`` when the artifact was built for the CUDA provider, else
  ``KIND_CPU``. External weights (``*.onnx.data``) are copied beside ``model.onnx``.
- TensorRT artifacts -> ``tensorrt_plan`` when the bundle holds a built engine (``engine.plan``, written by
  ``qdeploy build-engine``); ``max_batch_size`` stays within the engine's optimization profile. A simulated
  TensorRT artifact (no engine) is skipped, with the reason.
- TorchScript artifacts (``.ts``) -> ``pytorch_libtorch``. The tensors keep the bundle's names, so one client
  request fits every model of the chain. Triton's PyTorch backend binds TorchScript inputs by forward-argument
  name when every config input is one, else by ``<name>__<index>``, else by the order of the config (outputs:
  by ``<name>__<index>``, else by order; that last rule since Triton 22.06). The export works out which rule
  the backend will apply to these names and checks that it binds every tensor to the position the artifact
  was verified with; if not, the artifact is skipped with the reason.
- Everything else (TFLite, ``torch.export`` programs ``.pt2``, the ``reference`` backend's simulation oracle)
  is skipped, with the reason printed and written to the repository.

The repository is written into a staging folder beside ``REPO``, validated, then renamed into place; an
existing non-empty ``REPO`` is refused (``force`` replaces a previous export). Validation, before anything is
renamed into place: every ``config.pbtxt`` is parsed into Triton's own ``inference.ModelConfig`` message (the
``model_config_pb2`` module that ships in ``tritonclient``; an unknown field fails), and every model file is
loaded (ONNX in onnxruntime, TorchScript in ``torch.jit``; an engine's Q/DQ ONNX, which it was built from, in
onnxruntime) and its input and output names, data types and dims must equal the config's; where the bundle's
warm-up samples fit the declared shapes, the model also runs a batch of them (TorchScript: batches of 1 and 3)
and its outputs must have the declared data types and dims. A model file that fails this before anything is
written is skipped with the reason (the FP32 reference: the export fails); a repository that fails it after
writing is never moved into place (:class:`TritonValidationError`, exit 1). The schema check needs
``tritonclient`` (no grpcio: its ``model_config_pb2`` module is loaded from its file).

Triton serves each model on its own and does not fall back between them: the chain's order is for the
operator (or a client) to follow; ``qdeploy serve`` follows it by itself.
"""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .bundle import Bundle, commit
from .errors import BundleError, QDeployError

FALLBACK_FILE = "qdeploy_fallback.json"
README_FILE = "README.md"
CONFIG_FILE = "config.pbtxt"
VERSION_DIR = "1"
DEFAULT_MAX_BATCH = 32
MODEL_FILES = {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan", "pytorch_libtorch": "model.pt"}
TRITONCLIENT_PIN = "tritonclient==2.73.0"

# numpy dtype names (the manifest's), onnxruntime type strings and torch dtypes -> Triton data types
NUMPY_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "bfloat16": "TYPE_BF16",
               "int8": "TYPE_INT8", "int16": "TYPE_INT16", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
               "uint8": "TYPE_UINT8", "uint16": "TYPE_UINT16", "uint32": "TYPE_UINT32", "uint64": "TYPE_UINT64",
               "bool": "TYPE_BOOL", "object": "TYPE_STRING", "str": "TYPE_STRING"}
ORT_TYPES = {"tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16", "tensor(double)": "TYPE_FP64",
             "tensor(bfloat16)": "TYPE_BF16", "tensor(int8)": "TYPE_INT8", "tensor(int16)": "TYPE_INT16",
             "tensor(int32)": "TYPE_INT32", "tensor(int64)": "TYPE_INT64", "tensor(uint8)": "TYPE_UINT8",
             "tensor(uint16)": "TYPE_UINT16", "tensor(uint32)": "TYPE_UINT32", "tensor(uint64)": "TYPE_UINT64",
             "tensor(bool)": "TYPE_BOOL", "tensor(string)": "TYPE_STRING"}
ONNX_TYPES = {"FLOAT": "TYPE_FP32", "FLOAT16": "TYPE_FP16", "DOUBLE": "TYPE_FP64", "BFLOAT16": "TYPE_BF16"}
TORCH_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "bfloat16": "TYPE_BF16",
               "int8": "TYPE_INT8", "int16": "TYPE_INT16", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
               "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}

TFLITE_REASON = ("Triton Inference Server has no TensorFlow Lite backend in NVIDIA's builds; serve this artifact "
                 "with `qdeploy serve` or LiteRT on the device")
PT2_REASON = ("a torch.export program (.pt2) that qdeploy compiles with Inductor when it loads it; Triton's PyTorch "
              "backend serves TorchScript (pytorch_libtorch) and AOTInductor packages (torch_aoti), not this: serve "
              "it with `qdeploy serve`")
ORACLE_REASON = ("the reference backend's fake-quantized graph is the verification oracle (verified_on simulated), "
                 "not a deployment: it never serves")


class TritonValidationError(QDeployError):
    """The repository the export wrote fails its own validation: a failed check (exit 1), nothing renamed into
    place."""

    exit_code = 1


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # TYPE_FP32 ...
    shape: tuple[int, ...]  # the full shape, batch first where there is one; -1 for a dynamic dimension


@dataclass
class TritonModel:
    """One model of the repository (an artifact, or the FP32 reference when ``artifact`` is None)."""

    name: str
    platform: str
    source: Path  # the file copied to <name>/1/<model file>
    inputs: list[Tensor]
    outputs: list[Tensor]
    max_batch_size: int
    kind: str  # KIND_CPU | KIND_GPU
    count: int
    position: int  # 1-based place in the fallback chain
    artifact: dict[str, Any] | None
    check_file: Path  # what the validation loads (the model file; an engine's Q/DQ ONNX)
    notes: list[str] = field(default_factory=list)
    extra_files: list[str] = field(default_factory=list)  # external data, relative to the model file's folder
    checked: str = ""  # how the validation checked it, for the operator

    @property
    def model_file(self) -> str:
        return MODEL_FILES[self.platform]

    @property
    def label(self) -> str:
        return self.artifact["id"] if self.artifact else "reference (FP32)"


@dataclass
class Skipped:
    artifact: str
    backend: str
    position: int
    reason: str


@dataclass
class TritonExport:
    """What :func:`export_triton` wrote: the repository, its models in fallback order and what it skipped."""

    path: Path
    models: list[TritonModel]
    skipped: list[Skipped]
    fallback: dict[str, Any]


# --------------------------------------------------------------------------------------------------------------
def model_config_pb2() -> Any:
    """Triton's ``model_config_pb2`` (the ``inference.ModelConfig`` schema) from the installed ``tritonclient``,
    loaded from its file: ``tritonclient.grpc``'s package import needs grpcio, the schema module does not."""
    name = "tritonclient.grpc.model_config_pb2"
    if name in sys.modules:
        return sys.modules[name]
    private = "qdeploy._triton_model_config_pb2"
    if private in sys.modules:
        return sys.modules[private]
    hint = f"install it with `pip install {TRITONCLIENT_PIN}` (no grpcio needed)"
    try:
        spec = importlib.util.find_spec("tritonclient")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise QDeployError(f"export triton validates every config.pbtxt against Triton's model-config schema, "
                           f"which ships in tritonclient, and tritonclient is not installed: {hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
    if not path.is_file():
        raise QDeployError(f"the installed tritonclient has no grpc/model_config_pb2.py (Triton's model-config "
                           f"schema); {hint}")
    module_spec = importlib.util.spec_from_file_location(private, path)
    assert module_spec is not None and module_spec.loader is not None  # a .py file always has both
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # e.g. protobuf older than the generated code needs
        import google.protobuf
        raise QDeployError(f"cannot load Triton's model-config schema from {path} with protobuf "
                           f"{google.protobuf.__version__}: {type(exc).__name__}: {exc}") from None
    sys.modules[private] = module
    return module


def parse_config(text: str, where: str = CONFIG_FILE) -> Any:
    """``text`` parsed into Triton's ``ModelConfig``; an unknown field or a bad value is a TritonValidationError."""
    from google.protobuf import text_format

    message = model_config_pb2().ModelConfig()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        raise TritonValidationError(f"{where} is not a valid Triton model config: {exc}") from None
    return message


# --------------------------------------------------------------------------------------------------------------
def export_triton(bundle: str | Path | Bundle, output: str | Path, *, name: str | None = None,
                  max_batch_size: int | None = None, instances: int = 1, force: bool = False,
                  echo: Callable[[str], None] | None = None) -> TritonExport:
    """Write the Triton model repository of ``bundle`` at ``output`` (see the module doc).

    ``name``: the prefix of the model names (default: the bundle folder's name, as ``qdeploy serve`` names the
    model). ``max_batch_size``: the largest batch Triton's dynamic batcher forms (default: the batch size the
    bundle's latencies, and so its chain order, were measured at; 0: no batching); models whose shapes have no
    dynamic batch dimension get 0. ``instances``: model instances per device. ``force``: replace ``output``
    if it is a previous export."""
    say = echo or (lambda _msg: None)
    if max_batch_size is not None and (isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int)
                                       or max_batch_size < 0):
        raise QDeployError(f"max_batch_size {max_batch_size!r} must be a whole number >= 0 (0: no batching)")
    if isinstance(instances, bool) or not isinstance(instances, int) or instances < 1:
        raise QDeployError(f"instances {instances!r} must be a whole number >= 1 (model instances per device)")
    if not isinstance(bundle, Bundle):
        bundle = Bundle.load(bundle)  # a missing path or a folder that is no bundle: exit 2; tampered: 1
    else:
        bundle.check_integrity()
    model_config_pb2()  # no schema, no export: fail before any work
    out = Path(output)
    if out.resolve().is_relative_to(bundle.path.resolve()):
        raise QDeployError(f"output {out} is inside the bundle {bundle.path}, which lists every file it holds; write "
                           f"the repository to another -o folder")
    _check_output(out, force)
    prefix = _model_name(name or bundle.path.resolve().name)
    if not prefix:
        raise QDeployError(f"model name prefix {name!r} has no usable character; use letters, digits, '-', '_' or '.'")

    models, skipped = _plan(bundle, prefix, max_batch_size, instances)
    samples = bundle.stored_inputs()
    kept = []
    for model in models:  # check each model file against its config before writing anything
        problem = _check_model(model, _config_text(model, bundle), model.check_file, samples)
        if problem is None:
            kept.append(model)
        elif model.artifact is None:
            raise BundleError(f"bundle {bundle.path}: the FP32 reference does not match the bundle's declared inputs "
                              f"and outputs: {problem}; deploy again")
        else:
            skipped.append(Skipped(model.artifact["id"], model.artifact["backend"], model.position, problem))
    models = kept
    skipped.sort(key=lambda s: s.position)
    for s in skipped:
        say(f"skipped {s.artifact} ({s.backend}): {s.reason}")

    staging = _staging(out)
    try:
        fallback = _write(staging, bundle, models, skipped, prefix)
        _validate(staging, models, samples)
        commit(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return TritonExport(out, models, skipped, fallback)


def _check_output(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise QDeployError(f"output {out} exists and is a file; choose another -o folder")
    if out.is_dir() and any(out.iterdir()):
        if force and (out / FALLBACK_FILE).is_file():
            return
        why = ("it is not a qdeploy Triton export, so --force does not replace it" if force else
               "use --force to replace a previous export" if (out / FALLBACK_FILE).is_file() else
               "choose another -o folder or empty it")
        raise QDeployError(f"output folder {out} is not empty; {why}")


def _staging(out: Path) -> Path:
    from .bundle import staging_beside

    return staging_beside(out, "a model repository")


def _model_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")


# --------------------------------------------------------------------------------------------------------------
def _contract(items: list[dict[str, Any]], what: str, bundle: Bundle) -> list[Tensor]:
    tensors = []
    for item in items:
        dtype = NUMPY_TYPES.get(str(item.get("dtype", "float32")))
        if dtype is None:
            raise BundleError(f"bundle {bundle.path}: {what} {item['name']!r} has dtype {item.get('dtype')!r}, "
                              f"which has no Triton data type")
        tensors.append(Tensor(item["name"], dtype, tuple(-1 if d is None else int(d) for d in item["shape"])))
    return tensors


def _plan(bundle: Bundle, prefix: str, max_batch: int | None,
          instances: int) -> tuple[list[TritonModel], list[Skipped]]:
    m = bundle.manifest
    inputs = _contract(m["model"]["inputs"], "input", bundle)
    outputs = _contract(m["model"]["outputs"], "output", bundle)
    batchable = all(t.shape and t.shape[0] == -1 for t in inputs + outputs)
    if max_batch is None:
        max_batch = int((m.get("latency_measured_on") or {}).get("batch") or DEFAULT_MAX_BATCH)
    mbs = max_batch if batchable else 0
    device = (m.get("profile", {}).get("data") or {}).get("device", "cpu")
    models: list[TritonModel] = []
    skipped: list[Skipped] = []
    names = set()
    for i, art in enumerate(bundle.artifacts, start=1):
        routed = _route(bundle, art, prefix, inputs, outputs, mbs, instances, i)
        if isinstance(routed, str):
            skipped.append(Skipped(art["id"], art["backend"], i, routed))
        else:
            if routed.name in names:  # two ids that differ only in characters a model name cannot hold
                routed.name = f"{routed.name}-{i}"
            models.append(routed)
            names.add(routed.name)
    ref_name = f"{prefix}-reference"
    if ref_name in names:
        ref_name = f"{prefix}-reference-fp32"
    kind = "KIND_GPU" if device == "gpu" else "KIND_CPU"
    ref = TritonModel(ref_name, "onnxruntime_onnx", bundle.reference_path, inputs, outputs, mbs, kind, instances,
                      len(bundle.artifacts) + 1, None, bundle.reference_path,
                      notes=["the FP32 reference: the final fallback, and what every artifact was verified against"])
    if device not in ("cpu", "gpu"):
        ref.notes.append(f"Triton has no instance kind for the profile's device ({device}); the reference runs on "
                         f"the CPU")
    ref.extra_files = _external_data(ref.source)
    models.append(ref)
    return models, skipped


def _route(bundle: Bundle, art: dict[str, Any], prefix: str, inputs: list[Tensor], outputs: list[Tensor],
           mbs: int, instances: int, position: int) -> TritonModel | str:
    """The Triton model for one artifact, or the reason it has none."""
    meta = art.get("meta") or {}
    path = bundle.path / art["path"]
    name = _model_name(f"{prefix}-{art['id']}")
    if art["backend"] == "reference":
        return ORACLE_REASON
    if path.is_file() and path.suffix == ".onnx":
        kind = "KIND_GPU" if meta.get("provider") in ("cuda", "tensorrt") else "KIND_CPU"
        model = TritonModel(name, "onnxruntime_onnx", path, inputs, outputs, mbs, kind, instances, position, art,
                            path)
        model.extra_files = _external_data(path)
        if art.get("verified_on") == "simulated":
            model.notes.append("verified by simulation only: its runtime was not on the host that deployed it")
        return model
    if path.is_dir() and art["backend"] == "tensorrt":
        engine = meta.get("engine")
        engine_file = meta.get("engine", {}).get("engine") if isinstance(engine, dict) else engine
        if not engine_file or not (path / engine_file).is_file():
            return ("no TensorRT engine in the bundle: it was verified by simulation (TensorRT was not on the host "
                    "that deployed it), and a Triton model needs the engine. Build it on the target GPU with "
                    "`qdeploy build-engine BUNDLE`, then export again")
        qdq = path / str(meta.get("onnx") or "model_qdq.onnx")
        if not qdq.is_file():
            return f"the TensorRT artifact has no {qdq.name} to check the engine's inputs and outputs against"
        config = {}
        if (path / str(meta.get("build_config") or "build_config.json")).is_file():
            config = json.loads((path / str(meta.get("build_config") or "build_config.json")).read_text())
        tmbs, note = _engine_batch(config.get("shapes") or {}, inputs, mbs)
        if isinstance(tmbs, str):
            return tmbs
        model = TritonModel(name, "tensorrt_plan", path / engine_file, inputs, outputs, tmbs, "KIND_GPU", instances,
                            position, art, qdq, notes=[note] if note else [])
        gpu, trt = meta.get("gpu"), meta.get("tensorrt_version")
        model.notes.append(f"engine built{f' with TensorRT {trt}' if trt else ''}{f' on {gpu}' if gpu else ''}: the "
                           f"server's TensorRT must be that version and its GPU that model (an engine is not portable)")
        return model
    if path.is_file() and path.suffix == ".ts":
        kind = "KIND_GPU" if meta.get("device") == "cuda" else "KIND_CPU"
        model = TritonModel(name, "pytorch_libtorch", path, inputs, outputs, mbs, kind, instances, position, art,
                            path)
        if meta.get("quantized_engine"):
            model.notes.append(f"quantized TorchScript ({meta.get('engine', 'fbgemm')} kernels): needs a libtorch "
                               f"build with that quantized engine (x86 for fbgemm)")
        return model
    if path.suffix == ".tflite":
        return TFLITE_REASON
    if path.suffix == ".pt2":
        return PT2_REASON
    return (f"no Triton backend for {art['backend']} artifacts ({path.suffix or 'a folder'}); serve it with "
            f"`qdeploy serve`")


def _engine_batch(shapes: dict[str, Any], inputs: list[Tensor], mbs: int) -> tuple[int | str, str]:
    """The engine's ``max_batch_size`` (within its optimization profile), or the reason it cannot have one."""
    if not shapes:
        return mbs, ""
    lows = {s["min"][0] for s in shapes.values() if s.get("min")}
    highs = {s["max"][0] for s in shapes.values() if s.get("max")}
    fixed = all(s.get("min") == s.get("max") for s in shapes.values())
    if mbs == 0 or fixed:
        if mbs and fixed:
            return 0, "the engine's shapes are fixed: no batching"
        return 0, ""
    if lows != {1} or len(highs) != 1:
        return (f"the engine's optimization profile (batch {sorted(lows)} to {sorted(highs)}) does not start at "
                f"batch 1 for every input, which Triton's batching needs", "")
    high = highs.pop()
    if high < mbs:
        return high, f"max_batch_size {high}: the engine's optimization profile ends there"
    return mbs, ""


def _external_data(onnx_path: Path) -> list[str]:
    """The external-data files an ONNX model references (relative to its folder), which travel with it."""
    import onnx

    try:
        proto = onnx.load(str(onnx_path), load_external_data=False)
    except Exception:
        return []  # the check that follows loads it in onnxruntime and says what is wrong
    found = []
    for init in proto.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in init.external_data if e.key == "location"), None)
            if loc and loc not in found:
                found.append(loc)
    return found


# --------------------------------------------------------------------------------------------------------------
def _quote(text: str) -> str:
    from google.protobuf import text_encoding

    return '"' + text_encoding.CEscape(text, as_utf8=True) + '"'


def _dims(model: TritonModel, t: Tensor) -> tuple[int, ...]:
    return t.shape[1:] if model.max_batch_size > 0 else t.shape


def _config_text(model: TritonModel, bundle: Bundle) -> str:
    from . import __version__

    art = model.artifact
    what = f"artifact {art['id']} ({art['backend']}, {art['precision']})" if art else "the FP32 reference"
    lines = [f"# qdeploy {__version__} export of bundle {bundle.path.resolve().name}: {what}, fallback position "
             f"{model.position}; see ../{README_FILE} and ../{FALLBACK_FILE}",
             f"name: {_quote(model.name)}", f"platform: {_quote(model.platform)}",
             f"max_batch_size: {model.max_batch_size}"]
    for key, tensors in (("input", model.inputs), ("output", model.outputs)):
        lines.append(f"{key} [")
        for j, t in enumerate(tensors):
            dims = _dims(model, t)
            lines += ["  {", f"    name: {_quote(t.name)}", f"    data_type: {t.dtype}",
                      f"    dims: [ {', '.join(str(d) for d in dims)} ]" if dims else
                      "    dims: [ 1 ]\n    reshape: { shape: [ ] }",  # a scalar per sample: Triton's spelling
                      "  }" + ("," if j < len(tensors) - 1 else "")]
        lines.append("]")
    if model.max_batch_size > 0:
        lines.append("dynamic_batching { }")
    lines += ["instance_group [", "  {", f"    count: {model.count}", f"    kind: {model.kind}", "  }", "]"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------
def _check_model(model: TritonModel, text: str, path: Path, samples: dict[str, np.ndarray]) -> str | None:
    """Parse ``text`` into Triton's ModelConfig (an unknown field raises TritonValidationError: that is a bug of
    this exporter, never a skip) and load ``path`` in its runtime: None when the file matches the config, else
    what differs."""
    cfg = parse_config(text, f"{model.name}/{CONFIG_FILE}")
    if cfg.name != model.name:
        raise TritonValidationError(f"{model.name}/{CONFIG_FILE} names the model {cfg.name!r}; Triton needs the "
                                    f"folder's name")
    if model.platform == "pytorch_libtorch":
        return _check_torchscript(cfg, path, samples, model)
    return _check_onnx(cfg, path, samples, model)


def _declared(cfg: Any, key: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, data type, dims the model sees: ``reshape`` when there is one) of the config's inputs or outputs."""
    dtype_name = model_config_pb2().DataType.Name
    return [(t.name, dtype_name(t.data_type), tuple(t.reshape.shape if t.HasField("reshape") else t.dims))
            for t in getattr(cfg, key)]


def _full(cfg: Any, dims: tuple[int, ...]) -> tuple[int, ...]:
    return (-1, *dims) if cfg.max_batch_size > 0 else dims


def _batch_feed(cfg: Any, samples: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray] | None:
    """``size`` rows of the warm-up samples for the config's inputs; None when they cannot feed it (no samples,
    or no batching and a fixed shape the samples do not have)."""
    feed = {}
    for name, _, dims in _declared(cfg, "input"):
        x = samples.get(name)
        if x is None or len(x) == 0:
            return None
        if cfg.max_batch_size > 0:
            feed[name] = np.ascontiguousarray(x[:size])
        elif len(dims) == x.ndim and dims[0] > 0 and len(x) >= dims[0]:
            feed[name] = np.ascontiguousarray(x[:dims[0]])
        else:
            return None
    return feed


def _check_onnx(cfg: Any, path: Path, samples: dict[str, np.ndarray], model: TritonModel) -> str | None:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        if model.platform != "tensorrt_plan":
            return f"onnxruntime cannot load {path.name}: {why}"
        # a Q/DQ graph onnxruntime's CPU kernels do not take (FP8, say) still names the engine's inputs/outputs
        io = _onnx_graph_io(path)
        if isinstance(io, str):
            return io
        problem = _compare_io(cfg, io, "the Q/DQ ONNX graph")
        model.checked = (f"the engine is not loaded here (TensorRT serves it); the Q/DQ ONNX it was built from, read "
                         f"with onnx (onnxruntime cannot load it: {why}): names, data types and dims match the config")
        return problem
    loaded = ("the engine is not loaded here (TensorRT serves it); the Q/DQ ONNX it was built from, loaded in "
              "onnxruntime" if model.platform == "tensorrt_plan" else "loaded in onnxruntime")
    io = {key: [(t.name, ORT_TYPES.get(t.type, t.type),
                 tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (t.shape or []))) for t in found]
          for key, found in (("input", session.get_inputs()), ("output", session.get_outputs()))}
    problem = _compare_io(cfg, io, "onnxruntime")
    if problem:
        return problem
    feed = _batch_feed(cfg, samples, min(2, cfg.max_batch_size) if cfg.max_batch_size > 0 else 0)
    if feed is None:
        model.checked = f"{loaded}: names, data types and dims match the config (no sample run)"
        return None
    try:
        outs = session.run(None, feed)
    except Exception as exc:
        return (f"onnxruntime fails on a batch of {len(next(iter(feed.values())))} of the bundle's warm-up samples: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
    problem = _check_outputs(cfg, outs, len(next(iter(feed.values()))), _numpy_type)
    model.checked = (f"{loaded}: names, data types and dims match the config; ran a batch of "
                     f"{len(next(iter(feed.values())))} warm-up samples")
    return problem


def _compare_io(cfg: Any, io: dict[str, list[tuple[str, str, tuple[int, ...]]]], where: str) -> str | None:
    for key in ("input", "output"):
        want = [(n, dt, _full(cfg, dims)) for n, dt, dims in _declared(cfg, key)]
        if io[key] != want:
            return (f"its {key}s in {where} are {_show(io[key])}, the config declares {_show(want)} (with the batch "
                    f"dimension as -1)")
    return None


def _onnx_graph_io(path: Path) -> dict[str, list[tuple[str, str, tuple[int, ...]]]] | str:
    """The graph's declared inputs (initializers excluded) and outputs, read with onnx (no runtime)."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:
        return f"onnx cannot read {path.name}: {type(exc).__name__}: {exc}"
    inits = {i.name for i in graph.initializer}
    io: dict[str, list[tuple[str, str, tuple[int, ...]]]] = {}
    for key, values in (("input", [v for v in graph.input if v.name not in inits]), ("output", list(graph.output))):
        io[key] = []
        for v in values:
            t = v.type.tensor_type
            name = onnx.TensorProto.DataType.Name(t.elem_type)
            dtype = ONNX_TYPES.get(name, f"TYPE_{name}")
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
            io[key].append((v.name, dtype, dims))
    return io


def _numpy_type(value: Any) -> str:
    name = np.asarray(value).dtype.name
    return NUMPY_TYPES.get(name, name)


def _check_outputs(cfg: Any, outs: list[Any], batch: int, dtype_of: Callable[[Any], str]) -> str | None:
    want = _declared(cfg, "output")
    if len(outs) != len(want):
        return f"it returns {len(outs)} output(s), the config declares {len(want)}"
    for (name, dtype, dims), value in zip(want, outs):
        shape = tuple(value.shape)
        got = dtype_of(value)
        if got != dtype:
            return f"output {name!r} comes out as {got}, the config declares {dtype}"
        full = _full(cfg, dims)
        ok = len(shape) == len(full) and all(w == -1 or w == s for w, s in zip(full, shape))
        if cfg.max_batch_size > 0 and ok:
            ok = shape[0] == batch
        if not ok:
            return (f"output {name!r} has shape {list(shape)} on a batch of {batch}, the config declares dims "
                    f"{list(dims)}{' after the batch' if cfg.max_batch_size > 0 else ''}")
    return None


def _libtorch_binding(names: list[str], forward_args: list[str] | None) -> tuple[str, list[int]]:
    """How Triton's PyTorch backend binds config tensor ``names`` to TorchScript positions: (rule, position per
    name). Inputs (``forward_args`` given): by forward-argument name when every name is one; else by
    ``<name>__<index>`` when every name has that form; else by the config's order. Outputs: by
    ``<name>__<index>``, else by order (the backend's GetNamingConvention)."""
    if forward_args is not None and all(n in forward_args for n in names):
        return "forward-argument names", [forward_args.index(n) for n in names]
    indices = []
    for n in names:
        cut = n.find("__")
        tail = n[cut + 2:] if cut >= 0 else None
        if tail is None or not tail.isdigit():  # the backend also takes an empty tail as an index: 0
            if tail == "":
                indices.append(0)
                continue
            return "the config's order", list(range(len(names)))
        indices.append(int(tail))
    return "<name>__<index>", indices


def _check_torchscript(cfg: Any, path: Path, samples: dict[str, np.ndarray], model: TritonModel) -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed here, so the TorchScript file's inputs and outputs cannot be checked"
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        return f"torch.jit cannot load {path.name}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    try:
        arguments = list(module.forward.schema.arguments)[1:]  # without self
    except Exception as exc:
        return f"its forward() has no readable TorchScript schema ({type(exc).__name__}: {exc})"
    forward_args = [a.name for a in arguments]
    odd = [f"{a.name}: {a.type}" for a in arguments if str(a.type) != "Tensor"]
    if odd:
        return (f"its forward() takes {', '.join(odd)}; qdeploy exports TorchScript whose inputs are all tensors "
                f"(Triton's PyTorch backend also takes one Dict[str, Tensor], which qdeploy does not verify)")
    inputs = _declared(cfg, "input")
    outputs = _declared(cfg, "output")
    if len(forward_args) != len(inputs):
        return f"its forward() takes {len(forward_args)} argument(s) ({', '.join(forward_args)}), the bundle has " \
               f"{len(inputs)} input(s)"
    rules = {}
    for key, tensors, args in (("input", inputs, forward_args), ("output", outputs, None)):
        rules[key], positions = _libtorch_binding([n for n, _, _ in tensors], args)
        if positions != list(range(len(tensors))):
            return (f"Triton's PyTorch backend would bind its {key}s {[n for n, _, _ in tensors]} by "
                    f"{rules[key]} to positions {positions}, not in the order the artifact was verified with: the "
                    f"names cannot be mapped reliably")
    ran = []
    sizes = (1, min(3, cfg.max_batch_size)) if cfg.max_batch_size > 1 else (cfg.max_batch_size,)
    for size in sizes:
        feed = _batch_feed(cfg, samples, size)
        if feed is None:
            break
        for n, dtype, _ in inputs:
            if TORCH_TYPES.get(feed[n].dtype.name) != dtype:
                return f"input {n!r}: the config declares {dtype}, which torch cannot take as the model's samples " \
                       f"({feed[n].dtype.name})"
        try:
            with torch.no_grad():
                result = module(*(torch.from_numpy(feed[n]) for n, _, _ in inputs))
        except Exception as exc:
            return (f"torch.jit fails on a batch of {len(next(iter(feed.values())))} of the bundle's warm-up samples "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0]}): Triton's dynamic batcher sends any batch "
                    f"size up to max_batch_size")
        outs = list(result) if isinstance(result, (tuple, list)) else [result]
        if not all(isinstance(o, torch.Tensor) for o in outs):
            return "its forward() returns something other than a tensor or a tuple of tensors"
        problem = _check_outputs(cfg, outs, len(next(iter(feed.values()))),
                                 lambda t: TORCH_TYPES.get(str(t.dtype).replace("torch.", ""), str(t.dtype)))
        if problem:
            return problem
        ran.append(str(len(next(iter(feed.values())))))
    ran_text = (f"; ran batches of {' and '.join(ran)} warm-up samples: the outputs match the config" if ran
                else " (no sample run)")
    model.checked = (f"loaded in torch.jit: forward() takes {len(inputs)} tensor(s), bound by {rules['input']} "
                     f"(outputs by {rules['output']}){ran_text}")
    return None


def _show(items: list[tuple[str, str, tuple[int, ...]]]) -> str:
    return ", ".join(f"{n} {dt} {list(d)}" for n, dt, d in items)


# --------------------------------------------------------------------------------------------------------------
def _write(staging: Path, bundle: Bundle, models: list[TritonModel], skipped: list[Skipped], prefix: str) -> dict:
    for model in models:
        folder = staging / model.name / VERSION_DIR
        folder.mkdir(parents=True)
        shutil.copyfile(model.source, folder / model.model_file)
        for rel in model.extra_files:
            src = model.source.parent / rel
            if src.is_file() and (src.resolve().is_relative_to(bundle.path.resolve())):
                (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, folder / rel)
        (staging / model.name / CONFIG_FILE).write_text(_config_text(model, bundle))
    fallback = _fallback(bundle, models, skipped, prefix)
    (staging / FALLBACK_FILE).write_text(json.dumps(fallback, indent=2) + "\n")
    (staging / README_FILE).write_text(_readme(fallback))
    return fallback


def _validate(staging: Path, models: list[TritonModel], samples: dict[str, np.ndarray]) -> None:
    """Check the repository as written: every config.pbtxt parses into Triton's ModelConfig and matches its
    model file, loaded from the repository; nothing else is a model folder."""
    by_name = {m.name: m for m in models}
    folders = sorted(p.name for p in staging.iterdir() if p.is_dir())
    if folders != sorted(by_name):
        raise TritonValidationError(f"the repository's model folders {folders} are not the planned models "
                                    f"{sorted(by_name)}")
    for name in folders:
        model = by_name[name]
        config = staging / name / CONFIG_FILE
        path = staging / name / VERSION_DIR / model.model_file
        if not config.is_file() or not path.is_file():
            raise TritonValidationError(f"{name}: {CONFIG_FILE} or {VERSION_DIR}/{model.model_file} is missing")
        check = path if model.check_file == model.source else model.check_file
        problem = _check_model(model, config.read_text(), check, samples)
        if problem:
            raise TritonValidationError(f"{name}/{CONFIG_FILE} does not match {check.name}: {problem}")


# --------------------------------------------------------------------------------------------------------------
def _fallback(bundle: Bundle, models: list[TritonModel], skipped: list[Skipped], prefix: str) -> dict[str, Any]:
    from . import __version__

    m = bundle.manifest
    by_id = {mod.artifact["id"]: mod for mod in models if mod.artifact}
    why = {s.artifact: s.reason for s in skipped}
    ref = next(mod for mod in models if mod.artifact is None)
    budget = (m.get("spec") or {}).get("budget") or {}

    def triton(mod: TritonModel) -> dict[str, Any]:
        return {"model": mod.name, "platform": mod.platform, "file": f"{mod.name}/{VERSION_DIR}/{mod.model_file}",
                "max_batch_size": mod.max_batch_size, "dynamic_batching": mod.max_batch_size > 0,
                "instance_group": {"kind": mod.kind, "count": mod.count}, "validated": mod.checked,
                "notes": mod.notes}

    chain = []
    for i, art in enumerate(bundle.artifacts, start=1):
        b = art.get("budget") or {}
        entry = {"position": i, "artifact": art["id"], "backend": art["backend"], "target": art.get("target"),
                 "precision": art.get("precision"), "verified_on": art.get("verified_on"),
                 "budget": {"passed": b.get("passed"), "metric": b.get("metric"), "value": b.get("value"),
                            "bound": b.get("budget"), "mode": b.get("mode"), "threshold": b.get("threshold"),
                            "output": b.get("output")},
                 "latency_ms": art.get("latency_ms"), "size_bytes": art.get("size_bytes"),
                 "chain_reason": art.get("chain_reason"),
                 "triton": triton(by_id[art["id"]]) if art["id"] in by_id else None,
                 "skipped": why.get(art["id"])}
        chain.append(entry)
    ref_metrics = (m.get("reference") or {}).get("metrics") or {}
    chain.append({"position": len(chain) + 1, "artifact": "reference", "backend": "onnxruntime", "precision": "fp32",
                  "verified_on": "runtime", "final_fallback": True,
                  "budget": {"passed": None, "metric": budget.get("metric"),
                             "value": ref_metrics.get(budget.get("metric")), "bound": None},
                  "latency_ms": (m.get("reference") or {}).get("latency_ms"),
                  "size_bytes": (m.get("reference") or {}).get("size_bytes"),
                  "chain_reason": "the FP32 reference: the final fallback", "triton": triton(ref), "skipped": None})
    return {
        "qdeploy_version": __version__,
        "bundle": {"path": str(bundle.path.resolve()), "name": bundle.path.resolve().name,
                   "model_source": (m.get("model") or {}).get("source"), "created": m.get("created"),
                   "profile": (m.get("profile") or {}).get("name"),
                   "device": ((m.get("profile") or {}).get("data") or {}).get("device")},
        "budget": {k: budget.get(k) for k in ("metric", "mode", "threshold", "output")}
        | {"output": m.get("budget_output", budget.get("output"))},
        "model_prefix": prefix,
        "serving_order": [e["triton"]["model"] for e in chain if e["triton"]],
        "chain": chain,
        "skipped": [{"artifact": s.artifact, "backend": s.backend, "position": s.position, "reason": s.reason}
                    for s in skipped],
        "note": ("Triton serves each model on its own and does not fall back between them: send requests to the "
                 "first model of serving_order and move to the next when it fails or drifts (`qdeploy serve "
                 "BUNDLE` does this by itself, with the drift guard). Every model takes the same tensor names."),
    }


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("" if value is None else str(value))


def _readme(fb: dict[str, Any]) -> str:
    b = fb["bundle"]
    budget = fb["budget"]
    lines = [f"# Triton model repository of bundle `{b['name']}`", "",
             f"Written by qdeploy {fb['qdeploy_version']} from `{b['path']}` ({b['model_source']}, profile "
             f"`{b['profile']}`, device {b['device']}). Accuracy budget: `{budget['metric']}` on output "
             f"`{budget['output']}`, {budget['mode']} threshold {budget['threshold']}.", "",
             "Start it with `tritonserver --model-repository=<this folder>`. Triton serves each model on its own "
             "and does not fall back between them: send requests to the first model below and move down the list "
             "when it fails or drifts (`qdeploy serve BUNDLE` does this by itself). Every model takes the same "
             "tensor names. The same, for programs: `qdeploy_fallback.json`.", "",
             "## Fallback order", "",
             "| # | artifact | Triton model | platform | instances | max batch | budget | metric value | bound "
             "| why here |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for e in fb["chain"]:
        t, bud = e["triton"], e["budget"]
        verdict = ("final fallback" if e.get("final_fallback") else
                   "pass" if bud["passed"] else "FAIL" if bud["passed"] is False else "")
        if e.get("verified_on") == "simulated":
            verdict += " (simulated)"
        served = (f"`{t['model']}` | {t['platform']} | {t['instance_group']['count']} {t['instance_group']['kind']} | "
                  f"{t['max_batch_size']}" if t else "skipped | | |")
        lines.append(f"| {e['position']} | {e['artifact']} | {served} | {verdict} | {_fmt(bud['value'])} | "
                     f"{_fmt(bud['bound'])} | {e.get('chain_reason') or ''} |")
    if fb["skipped"]:
        lines += ["", "## Skipped artifacts", ""]
        lines += [f"- `{s['artifact']}` ({s['backend']}): {s['reason']}" for s in fb["skipped"]]
    lines += ["", "## Models", ""]
    for e in fb["chain"]:
        t = e["triton"]
        if not t:
            continue
        lines.append(f"- `{t['model']}` ({t['platform']}, `{t['file']}`): {t['validated']}.")
        lines += [f"  {note[:1].upper()}{note[1:]}." for note in t["notes"]]
    if any(e["triton"] and e["triton"]["platform"] == "pytorch_libtorch" for e in fb["chain"]):
        lines += ["", "TorchScript models keep the bundle's tensor names; Triton's PyTorch backend binds them to "
                      "the forward() arguments and return values by the rule named above (by the config's order "
                      "needs Triton 22.06 or later)."]
    return "\n".join(lines) + "\n"
