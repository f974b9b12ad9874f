"""The build paths of the torch backend: PT2E static INT8 (x86), FX static INT8 (fbgemm/onednn/qnnpack),
dynamic INT8 (Linear/LSTM), float (fp32/fp16/bf16, CPU or CUDA) and pre-quantized (converted QAT) models."""
from __future__ import annotations

import contextlib
import copy
import operator
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
    """(module path -> fp16/bf16 for 16-bit layers, module path -> precision for every non-int8 layer; a tensor
    layer, an add, by its layer name)."""
    modules = q.module_names(plan.model.torch_module)
    floats, keep = {}, {}
    for name, prec in plan.layer_precisions.items():
        if plan.model.layers[name].kind == "tensor":
            if prec != "int8":
                keep[name] = prec
            continue
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

    floats, keep = _split(plan)
    if floats:  # 16-bit layers change the graph (casts around them): export and observe it afresh
        gm = q.export_for_quantization(q.with_float_layers(module, floats), example, "the model")
        prepared = prepare_pt2e(gm, _quantizer(plan, keep))
        n, reused = _calibrate(plan, prepared, example), False
    else:
        prepared, n, reused = _prepared_from_cache(plan, module, example, keep)
    converted = convert_pt2e(prepared)
    out = _save_program(converted, example, workdir / "model.pt2")
    return out, {"compile": True, "calibration_samples": n, "observer": plan.spec.activations.method,
                 "observers_reused": reused, **plan.state.get("ranges_report", {})}


def _quantizer(plan: Plan, keep: dict[str, str]) -> Any:
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer

    quantizer = X86InductorQuantizer().set_global(q.pt2e_config(plan.spec, plan.target))
    for path in keep:
        quantizer.set_module_name_qconfig(path, None)
    return quantizer


def _tensor_layers(plan: Plan, keep: dict[str, str]) -> set[str]:
    """The tensor layers (adds) among ``keep``'s names; the rest are module paths."""
    return {n for n in keep if (layer := plan.model.layers.get(n)) is not None and layer.kind == "tensor"}


def _calibrate(plan: Plan, prepared: torch.fx.GraphModule, example: tuple) -> int:
    """Calibrate the observers of ``prepared``: with the core's ranges (``plan.ranges``) wherever an observer's
    tensor is found in the reference (:func:`qdeploy.torch_bridge.calibrate`), on the calibration data for the
    rest. Records how in ``plan.state["ranges_report"]``."""
    from qdeploy.backend import calibrate_observers

    ranges = plan.ranges.ranges if plan.ranges is not None else None
    n, report = calibrate_observers(prepared, calibration_batches(plan, example[0].shape[0]),
                          [i.name for i in plan.model.inputs], plan.model.onnx_path, ranges)
    plan.state["ranges_report"] = report
    return n


_CALIBRATED: list[tuple[tuple, torch.fx.GraphModule, torch.fx.GraphModule, int, tuple]] = []
"""One entry: ``(key, exported graph, the graph prepared with every layer quantized and calibrated, samples)``.
A fallback run builds many trials of one model with one spec and one calibration set; only which layers stay
float changes. A prepared PT2E graph computes in float whatever is annotated (observers only watch), so every
trial's observers see exactly what the fully quantized graph's saw: the export and the calibration pass (about
3 s and 13 s of a 40 s EfficientNet-Lite0 trial here) are done once per run instead of once per trial."""


def release() -> None:
    """Drop the cached graphs (the core calls the backend's ``release`` when a fallback run ends)."""
    _CALIBRATED.clear()


def _cache_key(plan: Plan, module: torch.nn.Module, example: tuple) -> tuple:
    import json

    return (id(module), id(plan.state.get("data")), tuple(e.shape for e in example), plan.target.label,
            json.dumps(plan.spec.to_dict(), default=repr, sort_keys=True))


def _prepared_from_cache(plan: Plan, module: torch.nn.Module, example: tuple,
                         keep: dict[str, str]) -> tuple[torch.fx.GraphModule, int, bool]:
    """This trial's prepared graph with calibrated observers, and whether the observers were reused: those of
    the cached fully quantized graph, matched by the edge they watch; calibrated afresh when any observer of
    this trial watches an edge the cached graph did not (its annotation moved), so the result is always what
    a fresh calibration gives."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    key = _cache_key(plan, module, example)
    entry = next((e for e in _CALIBRATED if e[0] == key), None)
    cached = entry is not None
    if entry is None:
        _CALIBRATED.clear()  # one model at a time: the previous entry's graphs are released
        exported = q.export_for_quantization(copy.deepcopy(module), example, "the model")
        full = prepare_pt2e(copy.deepcopy(exported), _quantizer(plan, {}))
        n = _calibrate(plan, full, example)
        entry = (key, exported, full, n, (module, plan.state.get("data"), plan.state.get("ranges_report", {})))
        _CALIBRATED.append(entry)  # module and data alive while cached: their ids stay theirs
    _, exported, full, n, (_, _, report) = entry
    plan.state["ranges_report"] = report
    if not keep:
        return copy.deepcopy(full), n, cached
    prepared = prepare_pt2e(copy.deepcopy(exported), _quantizer(plan, keep))
    if _transfer_observers(full, prepared):
        return prepared, n, True
    return prepared, _calibrate(plan, prepared, example), False


def _observers(gm: torch.fx.GraphModule) -> dict[tuple, str]:
    """``(watched node, its non-observer users)`` -> observer module name, for every observer call."""
    out: dict[tuple, str] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and str(node.target).startswith("activation_post_process"):
            users = tuple(sorted(u.name for u in node.users))
            out[(node.args[0].name, users)] = str(node.target)
    return out


def _transfer_observers(source: torch.fx.GraphModule, dest: torch.fx.GraphModule) -> bool:
    """Copy the calibrated observers of ``source`` into ``dest`` where both watch the same edge; False (``dest``
    unchanged) unless every observer of ``dest`` found its calibrated twin."""
    have, want = _observers(source), _observers(dest)
    if not set(want) <= set(have):
        return False
    pairs: dict[str, str] = {}
    for edge, target in want.items():
        if pairs.setdefault(target, have[edge]) != have[edge]:  # one observer shared by edges observed apart
            return False
    for target, src in pairs.items():
        if type(getattr(dest, target)) is not type(getattr(source, src)):
            return False
    for target, src in pairs.items():
        setattr(dest, target, copy.deepcopy(getattr(source, src)))
    return True


def _fx(plan: Plan, module: torch.nn.Module, example: tuple, workdir: Path) -> tuple[Path, dict]:
    from torch.ao.quantization import QConfigMapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    engine = plan.state["engine"]
    torch.backends.quantized.engine = engine
    floats, keep = _split(plan)
    model = q.with_float_layers(module, floats) if floats else copy.deepcopy(module)
    qmap = QConfigMapping().set_global(q.fx_qconfig(plan.spec, plan.target))
    adds = _tensor_layers(plan, keep)
    for path in keep:
        if path not in adds:
            qmap.set_module_name(path, None)
    for name in adds:  # the k-th add of the module's forward ("module/add#k")
        scope, _, rest = name.rpartition("/")
        k = int(rest.partition("#")[2] or 1)
        for op in (operator.add, torch.add):
            qmap.set_module_name_object_type_order(scope, op, k - 1, None)
    folded = q.fold_functional_batchnorm(model.eval())  # model is this build's own copy
    try:
        prepared = prepare_fx(model, qmap, example)
    except Exception as exc:
        raise BackendError(f"FX graph mode cannot trace the model for the {engine} engine: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}", "OP_UNSUPPORTED") from None
    clamped = q.observe_after_clamps(prepared)
    n = _calibrate(plan, prepared, example)
    converted = convert_fx(prepared)
    out = workdir / "model.ts"
    _save_script(converted, example, out)
    return out, {"compile": False, "quantized_engine": True, "calibration_samples": n,
                 "observer": plan.spec.activations.method, "batchnorm_folded": folded,
                 "observed_after_clamp": clamped, **plan.state.get("ranges_report", {})}


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
