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
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .backend import quiet
from .errors import ModelError

QUANTIZABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
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

    @property
    def formats(self) -> tuple[str, ...]:
        """Formats a backend may take this model in (a PyTorch model is also available as ONNX)."""
        return ("torch", "onnx") if self.torch_module is not None else ("onnx",)

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "format": self.format, "sha256": self.sha256,
                "inputs": [asdict(i) for i in self.inputs], "outputs": [asdict(o) for o in self.outputs],
                "layers": {k: asdict(v) for k, v in self.layers.items()}}


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
    reference_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(reference_path))
    inits = {t.name for t in proto.graph.initializer}
    graph_inputs = [i for i in proto.graph.input if i.name not in inits]
    return ModelHandle(reference_path, [_tensor_info(i) for i in graph_inputs],
                       [_tensor_info(o) for o in proto.graph.output], layer_map(proto), source, fmt, sha, module)


def _tensor_info(vi: Any) -> TensorInfo:
    tt = vi.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim)
    return TensorInfo(vi.name, dims, _ONNX_TO_NUMPY.get(tt.elem_type, "float32"))


def layer_map(proto: Any) -> dict[str, LayerInfo]:
    """One stable name per quantizable node: the PyTorch module path when the exporter recorded it."""
    inits = {t.name for t in proto.graph.initializer}
    layers: dict[str, LayerInfo] = {}
    for node in proto.graph.node:
        if node.op_type not in QUANTIZABLE_OPS:
            continue
        name = node.name
        weight = next((x for x in node.input[1:2] if x in inits), "")
        meta = {p.key: p.value for p in node.metadata_props}
        scopes = meta.get("pkg.torch.onnx.name_scopes")
        if weight.endswith(".weight"):  # a PyTorch parameter keeps its module path (even when BN was folded in)
            name = weight[: -len(".weight")]
        elif scopes:
            parts = [s.strip(" '\"") for s in scopes.strip("[]").split(",")]
            if len(parts) >= 2 and parts[-2]:
                name = parts[-2]
        base, k = name, 1
        while name in layers:
            k += 1
            name = f"{base}#{k}"
        layers[name] = LayerInfo(name, node.op_type, node.name, weight, node.input[0], node.output[0])
    return layers


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
    tmp = reference_path.with_suffix(".export.onnx")
    try:
        with quiet("torch.onnx", "torch.export"):
            n_out = len(result) if isinstance(result, (tuple, list)) else 1
            names = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
            torch.onnx.export(module, (example,), str(tmp), dynamo=True, input_names=["input"], output_names=names,
                              dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False)
        proto = onnx.load(str(tmp))
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


def random_inputs(model: ModelHandle, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i.name: rng.standard_normal((batch,) + tuple(d or 1 for d in i.shape[1:])).astype(i.dtype)
            for i in model.inputs}
