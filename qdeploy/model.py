"""Model intake: an ONNX file, a PyTorch module (``file.py:factory``, ``package.module:attr``, an ``nn.Module``
or a ``torch.export`` ``.pt2``) -> one canonical FP32 reference ONNX plus a layer map.

The layer map gives every quantizable layer one stable name (the PyTorch module path when the model came
from PyTorch, else the ONNX node name); spec overrides, reports and the fallback loop all use that name.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .backend import TENSOR_OPS, quiet
from .errors import ModelError

QUANTIZABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger",
                 "QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "DynamicQuantizeMatMul")
"""Op types that mean the model already carries its own quantization."""
DEBUG_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node")
MIN_OPSET = 13
"""Per-channel DequantizeLinear (an ``axis`` attribute) needs opset 13: older graphs are upgraded on intake."""
_ONNX_TO_NUMPY = {1: "float32", 10: "float16", 11: "float64", 16: "bfloat16", 6: "int32", 7: "int64", 2: "uint8",
                  3: "int8", 9: "bool"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int | None, ...]
    dtype: str


@dataclass(frozen=True)
class LayerInfo:
    """A quantizable layer: its stable ``name``, ONNX ``op_type`` and node, weight initializer (or ``""``),
    and its activation input and output tensors."""

    name: str
    op_type: str
    node: str
    weight: str
    input: str
    output: str
    activations: tuple[str, ...] = ()
    """Every activation (non-initializer) input of the node: two for an activation x activation MatMul."""

    @property
    def kind(self) -> str:
        """``weighted`` (a Conv/Gemm/MatMul with a weight), ``activation`` (an activation x activation MatMul)
        or ``tensor`` (a weightless op of :data:`TENSOR_OPS`: what is quantized are its input tensors)."""
        if self.op_type in TENSOR_OPS:
            return "tensor"
        return "weighted" if self.weight else "activation"


@dataclass
class ModelHandle:
    """The FP32 reference (``onnx_path``, a single self-contained file) and everything known about it."""

    onnx_path: Path
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    layers: dict[str, LayerInfo]
    source: str
    format: str  # "onnx" or "torch"
    sha256: str
    torch_module: Any = field(default=None, repr=False)
    notes: list[str] = field(default_factory=list)
    """What intake changed in the graph (Constants folded, opset upgraded), for the manifest and console."""
    prequantized: tuple[str, ...] = ()
    """The quantized op types the model already holds (empty for an FP32 model)."""
    opset: int = 0
    op_types: dict[str, int] = field(default_factory=dict)

    @property
    def family(self) -> str:
        """``transformer`` for a graph with no convolution whose weighted layers are MatMul/Gemm and which has
        a Softmax (attention); ``cnn`` otherwise. Recipes that pay differ between the two."""
        if self.op_types.get("Conv", 0) or self.op_types.get("ConvTranspose", 0):
            return "cnn"
        weighted = any(l.weight and l.op_type in ("MatMul", "Gemm") for l in self.layers.values())
        return "transformer" if weighted and self.op_types.get("Softmax", 0) else "cnn"

    @property
    def formats(self) -> tuple[str, ...]:
        """Formats a backend may take this model in (a PyTorch model is also available as ONNX)."""
        return ("torch", "onnx") if self.torch_module is not None else ("onnx",)

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "format": self.format, "sha256": self.sha256,
                "inputs": [asdict(i) for i in self.inputs], "outputs": [asdict(o) for o in self.outputs],
                "layers": {k: {**asdict(v), "kind": v.kind} for k, v in self.layers.items()}, "opset": self.opset,
                "intake": list(self.notes), "prequantized": list(self.prequantized)}


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_shape(text: str | tuple | list | None) -> tuple[int, ...] | None:
    if text is None or isinstance(text, (tuple, list)):
        return tuple(text) if text is not None else None
    try:
        dims = tuple(int(d) for d in str(text).lower().replace(",", "x").split("x"))
    except ValueError:
        raise ModelError(f"--input-shape {text!r} is not a shape; write it like 1x3x32x32") from None
    if not dims or any(d <= 0 for d in dims):
        raise ModelError(f"--input-shape {text!r} must have positive dimensions, like 1x3x32x32")
    return dims


def load_model(model: Any, reference_path: Path, input_shape: Any = None) -> ModelHandle:
    """Load ``model`` and write the FP32 reference ONNX to ``reference_path``."""
    shape = parse_shape(input_shape)
    if isinstance(model, (str, Path)):
        text = str(model)
        if text.endswith(".onnx"):
            return _from_onnx_file(Path(text), reference_path)
        if text.endswith(".pt2"):
            return _from_torch(_load_pt2(Path(text)), text, reference_path, shape)
        if text.endswith(TORCHSCRIPT_SUFFIXES):
            return _from_torchscript(Path(text), reference_path, shape)
        if text.endswith((".tflite", ".lite")):
            raise ModelError(f"model {text}: a .tflite file is a deployment format, not an input: qdeploy quantizes "
                             f"from the FP32 original; give its .onnx or PyTorch source (the tflite backend "
                             f"writes .tflite artifacts from it)")
        if ":" in text:
            return _from_torch(_load_factory(text), text, reference_path, shape)
        raise ModelError(f"model {text!r}: give an .onnx file, a .pt2 file, a TorchScript file (.pt/.ts), or a "
                         f"PyTorch factory as file.py:function or package.module:attr")
    if type(model).__module__.startswith("onnx") and hasattr(model, "graph"):
        import onnx
        reference_path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(reference_path))
        return _from_onnx_file(reference_path, reference_path, source="<onnx.ModelProto>")
    if hasattr(model, "state_dict") and callable(model):
        return _from_torch(model, f"<{type(model).__name__}>", reference_path, shape)
    raise ModelError(f"cannot use a {type(model).__name__} as a model: pass an ONNX path, a torch nn.Module or "
                     f"a factory string")


# --- ONNX ---------------------------------------------------------------------------------------------------
def _from_onnx_file(path: Path, reference_path: Path, source: str | None = None) -> ModelHandle:
    import onnx

    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    try:
        proto = onnx.load(str(path))  # also loads external weights (.onnx.data) from the same folder
        onnx.checker.check_model(proto)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"model file {path} is not a valid ONNX model: {first}") from None
    sha = sha256_file(path)
    return _finish(proto, reference_path, source or str(path), "onnx", sha, None)


def _finish(proto: Any, reference_path: Path, source: str, fmt: str, sha: str, module: Any) -> ModelHandle:
    import onnx

    seen: set[str] = set()
    for i, node in enumerate(proto.graph.node):  # every node gets a unique name: backends address nodes by it
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)
    for node in proto.graph.node:  # exporter stack traces: paths of the exporting machine, no use downstream
        keep = [p for p in node.metadata_props if p.key not in DEBUG_METADATA]
        if len(keep) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(keep)
    prequantized = tuple(sorted({n.op_type for n in proto.graph.node if n.op_type in QUANTIZED_OPS}))
    proto, notes = normalize(proto, upgrade=not prequantized)
    reference_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(reference_path))
    inits = {t.name for t in proto.graph.initializer}
    graph_inputs = [i for i in proto.graph.input if i.name not in inits]
    return ModelHandle(reference_path, [_tensor_info(i) for i in graph_inputs],
                       [_tensor_info(o) for o in proto.graph.output], layer_map(proto), source, fmt, sha, module,
                       notes=notes, prequantized=prequantized, opset=opset_of(proto),
                       op_types=dict(Counter(n.op_type for n in proto.graph.node)))


def opset_of(proto: Any) -> int:
    """The model's version of the default ONNX domain."""
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def normalize(proto: Any, upgrade: bool = True) -> tuple[Any, list[str]]:
    """Put a real-world graph into the form every backend expects, without changing its function:

    * weights stored as ``Constant`` nodes (Paddle2ONNX writes every weight so) become initializers, so that a
      weight is quantized as a weight (int8, per channel) and never as an activation;
    * an ``Identity`` of an initializer is bypassed (its consumers read the initializer);
    * a default-domain opset below :data:`MIN_OPSET` is upgraded with onnx's version converter (per-channel
      DequantizeLinear needs 13); a graph the converter cannot upgrade keeps its opset (backends then fall
      back to per-tensor weights, with an event).

    Returns the graph and one note per change."""
    import onnx
    from onnx import numpy_helper

    notes: list[str] = []
    graph = proto.graph
    outputs = {o.name for o in graph.output}
    folded = []
    for node in list(graph.node):
        if node.op_type != "Constant" or len(node.attribute) != 1 or node.output[0] in outputs:
            continue
        value = _constant_value(node.attribute[0])
        if value is None:
            continue
        graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        graph.node.remove(node)
        folded.append(node.name)
    if folded:
        notes.append(f"{len(folded)} Constant node(s) folded into initializers (weights stored as nodes)")
    inits = {t.name for t in graph.initializer}
    alias = {n.output[0]: n.input[0] for n in graph.node
             if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs}
    if alias:
        for node in list(graph.node):
            if node.op_type == "Identity" and node.output[0] in alias:
                graph.node.remove(node)
                continue
            for i, name in enumerate(node.input):
                if name in alias:
                    node.input[i] = alias[name]
        notes.append(f"{len(alias)} Identity node(s) of initializers bypassed")
    renamed = _rename_counter_clashes(graph)
    if renamed:
        notes.append(f"{renamed} tensor(s) renamed whose name is another tensor's name plus digits (onnxruntime's "
                     f"quantizer appends counters to names and would wire them to the wrong tensor)")
    version = opset_of(proto)
    if upgrade and 0 < version < MIN_OPSET:
        from onnx import version_converter

        try:
            converted = version_converter.convert_version(proto, MIN_OPSET)
            onnx.checker.check_model(converted)
        except Exception as exc:  # noqa: BLE001 -- the converter's failures have no common type
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            notes.append(f"opset {version} kept: onnx's version converter cannot upgrade it to {MIN_OPSET} "
                         f"({first}); per-channel weights need opset {MIN_OPSET}")
        else:
            proto = converted
            notes.append(f"opset {version} upgraded to {MIN_OPSET} (per-channel DequantizeLinear needs it)")
    return proto, notes


def _rename_counter_clashes(graph: Any) -> int:
    """Rename each inner tensor named like another tensor plus a digit suffix (``conv1d_25`` and
    ``conv1d_252``, as tf2onnx writes them) to ``<name>_t``; graph inputs and outputs keep their names."""
    import re

    names = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output if o}
    keep = {i.name for i in graph.input} | {o.name for o in graph.output}
    clash = {}
    for name in names - keep:
        stem = re.sub(r"\d+$", "", name)
        if stem != name and any(name[:k] in names for k in range(len(stem), len(name))):
            clash[name] = f"{name}_t"
    if not clash:
        return 0
    for t in graph.initializer:
        t.name = clash.get(t.name, t.name)
    for vi in graph.value_info:
        vi.name = clash.get(vi.name, vi.name)
    for node in graph.node:
        for i, x in enumerate(node.input):
            node.input[i] = clash.get(x, x)
        for i, x in enumerate(node.output):
            node.output[i] = clash.get(x, x)
    return len(clash)


def _constant_value(attr: Any) -> np.ndarray | None:
    """The array a Constant node's single attribute holds (None for a sparse or string constant)."""
    from onnx import AttributeProto, numpy_helper

    if attr.name == "value" and attr.type == AttributeProto.TENSOR:
        return numpy_helper.to_array(attr.t)
    scalar = {"value_float": np.float32, "value_int": np.int64}
    lists = {"value_floats": np.float32, "value_ints": np.int64}
    if attr.name in scalar:
        return np.array(attr.f if attr.name == "value_float" else attr.i, scalar[attr.name])
    if attr.name in lists:
        return np.array(list(attr.floats if attr.name == "value_floats" else attr.ints), lists[attr.name])
    return None


def _tensor_info(vi: Any) -> TensorInfo:
    tt = vi.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim)
    return TensorInfo(vi.name, dims, _ONNX_TO_NUMPY.get(tt.elem_type, "float32"))


def layer_map(proto: Any) -> dict[str, LayerInfo]:
    """One stable name per quantizable node: the PyTorch module path when the exporter recorded it. Weighted
    layers are named by their module; a tensor layer (:data:`TENSOR_OPS`) by its module and op
    (``blocks.3/add``, ``#2`` for a second one), or its node name."""
    inits = {t.name for t in proto.graph.initializer}
    floats = _float_tensors(proto) if any(n.op_type in TENSOR_OPS for n in proto.graph.node) else set()
    layers: dict[str, LayerInfo] = {}
    for node in proto.graph.node:
        tensor = node.op_type in TENSOR_OPS
        if node.op_type not in QUANTIZABLE_OPS and not tensor:
            continue
        acts = tuple(x for x in node.input if x and x not in inits)
        if tensor and (len([x for x in acts if x in floats]) < TENSOR_OPS[node.op_type]
                       or any(x not in floats for x in acts) or node.output[0] not in floats):
            continue  # shape arithmetic (int64), an Add of a bias, a Mul by a constant
        name = node.name
        weight = "" if tensor else next((x for x in node.input[1:2] if x in inits), "")
        meta = {p.key: p.value for p in node.metadata_props}
        scopes = meta.get("pkg.torch.onnx.name_scopes")
        module = ""
        if scopes:
            parts = [s.strip(" '\"") for s in scopes.strip("[]").split(",")]
            module = parts[-2] if len(parts) >= 2 else ""
        if weight.endswith(".weight"):  # a PyTorch parameter keeps its module path (even when BN was folded in)
            name = weight[: -len(".weight")]
        elif tensor and scopes:  # "/add" for one in the root module's own forward
            name = f"{module}/{node.op_type.lower()}"
        elif module:
            name = module
        base, k = name, 1
        while name in layers:
            k += 1
            name = f"{base}#{k}"
        layers[name] = LayerInfo(name, node.op_type, node.name, weight, node.input[0], node.output[0], acts)
    return layers


def _float_tensors(proto: Any) -> set[str]:
    """The names of the graph's float32 tensors, by onnx's shape inference (empty where it fails)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 - an odd graph loses its tensor layers, never its intake
        return set()
    g = inferred.graph
    return {vi.name for vi in list(g.value_info) + list(g.input) + list(g.output)
            if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}


# --- PyTorch ------------------------------------------------------------------------------------------------
def _load_factory(text: str) -> Any:
    target, _, attr = text.rpartition(":")
    if not target or not attr:
        raise ModelError(f"model {text!r}: write a PyTorch factory as file.py:function or package.module:attr")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise ModelError(f"model file {path} does not exist")
            name = f"qdeploy_user_model_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:
                raise ModelError(f"cannot import {target}: not a Python source file")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"cannot import {target}: {type(exc).__name__}: {exc}") from None
    if not hasattr(module, attr):
        raise ModelError(f"{target} has no attribute {attr!r}")
    obj = getattr(module, attr)
    import torch

    if isinstance(obj, torch.nn.Module):
        return obj
    if not callable(obj):
        raise ModelError(f"{text} is neither an nn.Module nor a function that returns one")
    try:
        result = obj()
    except Exception as exc:
        raise ModelError(f"the model factory {text} raised {type(exc).__name__}: {exc}") from None
    if not isinstance(result, torch.nn.Module):
        raise ModelError(f"the model factory {text} returned a {type(result).__name__}, not a torch.nn.Module")
    return result


def _load_pt2(path: Path) -> Any:
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    import torch

    try:
        return torch.export.load(str(path)).module()
    except Exception as exc:
        raise ModelError(f"{path} is not a loadable torch.export program: {exc}") from None


TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript")


def _from_torchscript(path: Path, reference_path: Path, shape: tuple[int, ...] | None) -> ModelHandle:
    """A TorchScript archive (``torch.jit.save``): exported with torch's TorchScript-based ONNX exporter
    (``torch.export`` cannot trace a ScriptModule). The handle is ONNX-only: the torch and TFLite backends
    need an ``nn.Module`` they can re-trace and say so with ``MODEL_FORMAT_UNSUPPORTED``."""
    import onnx
    import torch

    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    if shape is None:
        raise ModelError(f"a TorchScript model needs --input-shape (with the batch dimension), e.g. 1x3x32x32, "
                         f"for {path}")
    try:
        module = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:
        raise ModelError(f"{path} is not a TorchScript archive ({type(exc).__name__}); save the model with "
                         f"torch.jit.save, or give a factory (file.py:function) or a torch.export .pt2") from None
    example = torch.randn(*shape)
    try:
        with torch.no_grad():
            result = module(example)
    except Exception as exc:
        raise ModelError(f"{path} fails on an input of shape {'x'.join(map(str, shape))}: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}; check --input-shape") from None
    reference_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = reference_path.with_suffix(".export.onnx")
    n_out = len(result) if isinstance(result, (tuple, list)) else 1
    names = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
    try:
        with quiet("torch.onnx"):
            torch.onnx.export(module, (example,), str(tmp), dynamo=False, input_names=["input"],
                              output_names=names, dynamic_axes={"input": {0: "batch"},
                                                                **{n: {0: "batch"} for n in names}})
        proto = onnx.load(str(tmp))
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot export the TorchScript model {path} to ONNX: {msg}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return _finish(proto, reference_path, str(path), "torchscript", sha256_file(path), None)


def _from_torch(module: Any, source: str, reference_path: Path, shape: tuple[int, ...] | None) -> ModelHandle:
    import onnx
    import torch

    if shape is None:
        raise ModelError(f"a PyTorch model needs --input-shape (with the batch dimension), e.g. 1x3x32x32, "
                         f"for {source}")
    if hasattr(module, "eval"):
        with contextlib.suppress(NotImplementedError):  # a loaded torch.export program is already in eval form
            module.eval()
    example = torch.randn(*((max(2, shape[0]),) + shape[1:]))
    try:
        with torch.no_grad():
            result = module(example)
    except Exception as exc:
        raise ModelError(f"{source} fails on an input of shape {'x'.join(map(str, shape))}: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; check "
                         f"--input-shape") from None
    reference_path.parent.mkdir(parents=True, exist_ok=True)
    cached = _export_cache_file(module, shape)
    if cached is not None and cached.is_file():  # exported before (a fan-out's other targets, a rerun)
        try:
            out = _finish(onnx.load(str(cached)), reference_path, source, "torch", "", module)
            out.sha256 = sha256_file(reference_path)
            out.torch_module = module
            out.notes.append("ONNX export reused from the cache (same weights, code and input shape)")
            return out
        except Exception:  # noqa: BLE001 - a damaged cache entry is exported again
            cached.unlink(missing_ok=True)
    tmp = reference_path.with_suffix(".export.onnx")
    try:
        with quiet("torch.onnx", "torch.export"):
            n_out = len(result) if isinstance(result, (tuple, list)) else 1
            names = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
            torch.onnx.export(module, (example,), str(tmp), dynamo=True, input_names=["input"], output_names=names,
                              dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False)
        proto = onnx.load(str(tmp))
        if cached is not None:
            with contextlib.suppress(OSError):
                cached.parent.mkdir(parents=True, exist_ok=True)
                part = cached.with_suffix(f".tmp{os.getpid()}")
                onnx.save(proto, str(part))
                part.replace(cached)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot export {source} to ONNX: {msg}") from None
    finally:
        for p in (tmp, Path(str(tmp) + ".data")):
            p.unlink(missing_ok=True)
    out = _finish(proto, reference_path, source, "torch", "", module)
    out.sha256 = sha256_file(reference_path)
    out.torch_module = module
    return out


def _export_cache_file(module: Any, shape: tuple[int, ...]) -> Path | None:
    """Where the ONNX export of ``module`` at ``shape`` is cached: keyed by its weights, its class's source code
    and structure, the sample shape and the torch version (None when the module cannot be fingerprinted)."""
    import inspect

    import torch

    try:
        h = hashlib.sha256(json.dumps([torch.__version__, list(shape[1:]), repr(module),
                                       hashlib.sha256(Path(__file__).read_bytes()).hexdigest()]).encode())
        with contextlib.suppress(OSError, TypeError):
            h.update(inspect.getsource(type(module)).encode())
        for name, t in module.state_dict().items():
            h.update(name.encode() + str((t.dtype, tuple(t.shape))).encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    except Exception:  # noqa: BLE001 - a module that cannot be fingerprinted is exported every time
        return None
    from .sensitivity import cache_dir

    return cache_dir() / "exports" / f"{h.hexdigest()[:32]}.onnx"


def random_inputs(model: ModelHandle, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i.name: rng.standard_normal((batch,) + tuple(d or 1 for d in i.shape[1:])).astype(i.dtype)
            for i in model.inputs}
