"""The build paths of the torch backend: PT2E static INT8 (x86), FX static INT8 (fbgemm/onednn/qnnpack),
dynamic INT8 (Linear/LSTM), float (fp32/fp16/bf16, CPU or CUDA) and pre-quantized (converted QAT) models."""
from __future__ import annotations

import contextlib
import copy
import zipfile
from pathlib import Path
from typing import Any

import torch

from qdeploy.backend import Artifact, Plan
from qdeploy.backend import quiet as backend_quiet
from qdeploy.spec import summarize_precision
from qdeploy.errors import BackendError

from . import quantize as q

DEFAULT_BATCH = 32


def quiet():
    """torch.ao / torchao warn of deprecations and log hints on every call; keep the user's console clean."""
    return backend_quiet("torch", "torchao", "torch.export", "torch._dynamo")


def example_inputs(plan: Plan, batch: int) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn((batch,) + tuple(d or 1 for d in i.shape[1:])).to(getattr(torch, i.dtype))
                 for i in plan.model.inputs)


def calibration_batches(plan: Plan, batch: int):
    data = plan.state.get("data")
    if data is None:
        raise BackendError("static INT8 needs calibration data; pass --calib", "BUILD_FAILED")
    for x, _ in data.batches(batch):
        yield tuple(torch.from_numpy(x[i.name]) for i in plan.model.inputs)


def build(plan: Plan, workdir: Path) -> Artifact:
    path = plan.state["path"]
    batch = int(plan.target.option("batch", DEFAULT_BATCH))
    meta: dict[str, Any] = {"path": path, "engine": plan.state["engine"], "device": plan.state["device"],
                            "batch": batch, "threads": int(plan.target.option("threads", 0)), "input_names": [i.name for i in plan.model.inputs],
                            "output_names": [o.name for o in plan.model.outputs],
                            "sample_shapes": {i.name: [d or 1 for d in i.shape[1:]] for i in plan.model.inputs}}
    module = plan.model.torch_module
    with contextlib.suppress(NotImplementedError):  # a loaded torch.export program is already in eval form
        module.eval()
    example = example_inputs(plan, batch)
    with quiet():
        if path == "pt2e":
            out, extra = _pt2e(plan, module, example, workdir)
        elif path == "fx":
            out, extra = _fx(plan, module, example, workdir)
        elif path == "dynamic":
            out, extra = _dynamic(plan, module, example, workdir)
        elif path == "prequantized":
            out, extra = _save_program(module, example, workdir / "model.pt2"), {"compile": True}
        else:
            out, extra = _float(plan, module, example, workdir)
    meta.update(extra)
    meta.setdefault("format", "pt2" if out.suffix == ".pt2" else "torchscript")
    lp = plan.layer_precisions
    return Artifact(out, summarize_precision(lp) if lp else plan.spec.precision, lp, meta)


def _split(plan: Plan) -> tuple[dict[str, str], dict[str, str]]:
    """(module path -> fp16/bf16 for 16-bit layers, module path -> precision for every non-int8 layer)."""
    modules = q.module_names(plan.model.torch_module)
    floats, keep = {}, {}
    for name, prec in plan.layer_precisions.items():
        path = q.torch_layer(name, modules)
        if path is None or prec == "int8":
            continue
        keep[path] = prec
        if prec in q.FLOAT_DTYPES:
            floats[path] = prec
    return floats, keep


def _save_program(module: torch.nn.Module, example: tuple, out: Path) -> Path:
    """Export and save a self-contained ``.pt2``: unused float weights dropped (convert_pt2e leaves the FP32
    originals beside their int8 copies), no sample inputs, entries deflated (the graph is verbose JSON)."""
    if isinstance(module, torch.fx.GraphModule):
        prune_unused(module)
    ep = q.export(module, example, "the model")
    with contextlib.suppress(Exception):
        ep.example_inputs = None
    raw = out.parent / "uncompressed" / out.name  # the archive's inner folder is named after the file
    raw.parent.mkdir(exist_ok=True)
    torch.export.save(ep, str(raw))
    with zipfile.ZipFile(raw) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    raw.unlink()
    raw.parent.rmdir()
    return out


def prune_unused(gm: torch.fx.GraphModule) -> None:
    """Delete parameters and buffers no graph node reads."""
    gm.graph.eliminate_dead_code()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name in used:
            continue
        owner_path, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        delattr(owner, attr)
    gm.recompile()


def _pt2e(plan: Plan, module: torch.nn.Module, example: tuple, workdir: Path) -> tuple[Path, dict]:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer

    floats, keep = _split(plan)
    model = q.with_float_layers(module, floats) if floats else copy.deepcopy(module)
    gm = q.export_for_quantization(model, example, "the model")
    quantizer = X86InductorQuantizer().set_global(q.pt2e_config(plan.spec, plan.target))
    for path in keep:
        quantizer.set_module_name_qconfig(path, None)
    prepared = prepare_pt2e(gm, quantizer)
    n = 0
    for xs in calibration_batches(plan, example[0].shape[0]):
        prepared(*xs)
        n += len(xs[0])
    converted = convert_pt2e(prepared)
    out = _save_program(converted, example, workdir / "model.pt2")
    return out, {"compile": True, "calibration_samples": n, "observer": plan.spec.activations.method}


def _fx(plan: Plan, module: torch.nn.Module, example: tuple, workdir: Path) -> tuple[Path, dict]:
    from torch.ao.quantization import QConfigMapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    engine = plan.state["engine"]
    torch.backends.quantized.engine = engine
    floats, keep = _split(plan)
    model = q.with_float_layers(module, floats) if floats else copy.deepcopy(module)
    qmap = QConfigMapping().set_global(q.fx_qconfig(plan.spec, plan.target))
    for path in keep:
        qmap.set_module_name(path, None)
    try:
        prepared = prepare_fx(model.eval(), qmap, example)
    except Exception as exc:
        raise BackendError(f"FX graph mode cannot trace the model for the {engine} engine: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}", "OP_UNSUPPORTED") from None
    n = 0
    with torch.no_grad():
        for xs in calibration_batches(plan, example[0].shape[0]):
            prepared(*xs)
            n += len(xs[0])
    converted = convert_fx(prepared)
    out = workdir / "model.ts"
    _save_script(converted, example, out)
    return out, {"compile": False, "quantized_engine": True, "calibration_samples": n,
                 "observer": plan.spec.activations.method}


def _save_script(module: torch.nn.Module, example: tuple, out: Path) -> None:
    """Trace, freeze and save; then drop the archive's ``*.debug_pkl`` entries: stack traces with the paths of
    this machine, which the loader does not need (a tenth of a small model's size, and it varied by path)."""
    import zipfile

    with torch.no_grad():
        traced = torch.jit.trace(module.eval(), example, check_trace=False)
        frozen = torch.jit.freeze(traced)
    raw = out.with_suffix(".debug.ts")
    frozen.save(str(raw))
    with zipfile.ZipFile(raw) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            if not info.filename.endswith(".debug_pkl"):
                dst.writestr(info, src.read(info.filename))
    raw.unlink()


def _dynamic(plan: Plan, module: torch.nn.Module, example: tuple, workdir: Path) -> tuple[Path, dict]:
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    engine = plan.state["engine"]
    torch.backends.quantized.engine = engine
    qconfig = per_channel_dynamic_qconfig if plan.spec.weights.granularity.type == "per_channel" \
        else default_dynamic_qconfig
    modules = q.module_names(module)
    spec: dict[Any, Any] = {}
    for name, prec in plan.layer_precisions.items():
        path = q.torch_layer(name, modules)
        if prec == "int8" and path is not None and isinstance(modules[path], torch.nn.Linear):
            spec[path] = qconfig
    recurrent = [p for p, m in modules.items() if isinstance(m, (torch.nn.LSTM, torch.nn.GRU))]
    for path in recurrent:  # recurrent layers are not in the ONNX layer map; the spec's precision applies
        if plan.spec.precision == "int8":
            spec[path] = qconfig
    quantized = quantize_dynamic(copy.deepcopy(module).eval(), spec, dtype=torch.qint8)
    out = workdir / "model.ts"
    _save_script(quantized, example, out)
    return out, {"compile": False, "quantized_engine": True, "dynamic_layers": sorted(spec)}


def _float(plan: Plan, module: torch.nn.Module, example: tuple, workdir: Path) -> tuple[Path, dict]:
    device = plan.state["device"]
    floats, _ = _split(plan)
    precisions = set(plan.layer_precisions.values()) or {plan.spec.precision}
    whole = precisions & set(q.FLOAT_DTYPES)
    model: torch.nn.Module
    if len(precisions) == 1 and whole:  # the whole model in fp16/bf16, float32 in and out
        model = q.Cast(module, q.FLOAT_DTYPES[whole.pop()])
    else:
        model = q.with_float_layers(module, floats) if floats else copy.deepcopy(module)
    model = model.to(device).eval()
    example = tuple(x.to(device) for x in example)
    out = _save_program(model, example, workdir / "model.pt2")
    return out, {"compile": device == "cpu"}
