"""What the core computed on the ONNX reference, carried into the PyTorch module that the torch and LiteRT
backends build from, so that one spec gives one numerics on every backend:

* :func:`carry_weights` -- the accuracy transforms' weights (BatchNorm folding, CLE, bias correction,
  SmoothQuant, AdaRound): each layer's transformed weight and bias written into its module, matched by the layer
  map's module path, and checked by running both: the module must compute what the transformed ONNX computes.
* :func:`calibrate` -- the core's calibrated activation ranges: every activation observer of a prepared PT2E or
  FX graph is matched, by value on one calibration sample, to the ONNX tensor it watches, and takes that
  tensor's range. An observer without a twin keeps observing the calibration data itself.

torch is imported at the top: only code that already holds a torch module imports this module.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import QDeployError

CARRY_TOLERANCE = 1e-4
"""Largest relative L2 difference between the module with the carried weights and the transformed ONNX."""
MATCH_TOLERANCE = 1e-3
"""Largest relative L2 difference between an observer's input and the ONNX tensor it is matched to."""


class CarryError(QDeployError):
    """The transformed weights could not be written into the PyTorch module faithfully."""


def _arrays(proto: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def _consumers(proto: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for n in proto.graph.node:
        for x in n.input:
            out.setdefault(x, []).append(n)
    return out


def _attr(node: Any, name: str, default: Any) -> Any:
    import onnx

    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _bias(node: Any, inits: Mapping[str, np.ndarray], consumers: Mapping[str, list[Any]]) -> np.ndarray | None:
    """The bias a layer adds: a Conv's/Gemm's third input (a Gemm's scaled by ``beta``), or the constant of the
    Add that alone reads a MatMul's output."""
    if node.op_type in ("Conv", "Gemm"):
        b = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        return None if b is None else b * float(_attr(node, "beta", 1.0)) if node.op_type == "Gemm" else b
    users = consumers.get(node.output[0], [])
    if len(users) == 1 and users[0].op_type == "Add":
        return next((inits[x] for x in users[0].input if x in inits), None)
    return None


def _linear_weight(node: Any, w: np.ndarray) -> np.ndarray:
    """An ONNX Gemm/MatMul weight as ``nn.Linear`` stores it: (out, in)."""
    if node.op_type == "MatMul" or not _attr(node, "transB", 0):
        return w.T
    return w


def _set(module: torch.nn.Module, attr: str, value: np.ndarray | float) -> None:
    """Overwrite a parameter or buffer of ``module`` (created as a parameter when missing, e.g. a bias)."""
    current = getattr(module, attr, None)
    t = torch.from_numpy(np.array(value, np.float32))
    if current is None:
        setattr(module, attr, torch.nn.Parameter(t.clone(), requires_grad=False))
        return
    with torch.no_grad():
        current.copy_(t.reshape(current.shape).to(current.dtype))


def carry_weights(module: torch.nn.Module, reference: Any, transformed: Any, layers: Mapping[str, Any],
                  feed: Mapping[str, np.ndarray], transformed_path: str | Path) -> tuple[torch.nn.Module, list[str]]:
    """A copy of ``module`` computing what ``transformed`` (the reference ONNX after the accuracy transforms)
    computes, and the layers whose weights changed.

    Each weighted layer of ``layers`` (the reference's layer map: name -> ``LayerInfo``) whose module is an
    ``nn.Conv*``/``nn.Linear`` takes its transformed weight and bias. A BatchNorm module that reads the layer's output (seen
    with hooks) and is folded into it in the transformed ONNX (by the exporter or the transforms) is set to pass
    its input through plus the folded bias, so the module keeps its structure and every quantizer folds it back.
    Other parameters the transforms changed (a LayerNorm's scale under SmoothQuant) are copied by name. Raises
    :class:`CarryError` when a shape does not fit or the module's output on ``feed`` differs from the
    transformed ONNX's by more than :data:`CARRY_TOLERANCE`."""
    ref_w, new_w = _arrays(reference), _arrays(transformed)
    new_users = _consumers(transformed)
    new_nodes = {n.name: n for n in transformed.graph.node}
    out = copy.deepcopy(module).eval()
    modules = dict(out.named_modules())
    bns = _batchnorm_after(out, feed)
    state = dict(out.named_parameters()) | dict(out.named_buffers())
    done: list[str] = []
    written: set[str] = set()
    for name, layer in layers.items():
        if layer.kind != "weighted" or (node := new_nodes.get(layer.node)) is None:
            continue
        path = name.split("#", 1)[0]
        m = modules.get(path) if path else None
        w = new_w.get(node.input[1]) if len(node.input) > 1 else None
        if w is None or not isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)):
            if w is not None and layer.weight in ref_w and not np.array_equal(ref_w[layer.weight], w):
                raise CarryError(f"layer {name}: its weight changed but it has no nn.Conv/nn.Linear module to take it")
            continue
        changed = not (layer.weight in ref_w and np.array_equal(ref_w[layer.weight], w))
        if isinstance(m, torch.nn.Linear):
            w = _linear_weight(node, w)
        if tuple(w.shape) != tuple(m.weight.shape):
            raise CarryError(f"layer {name}: transformed weight {tuple(w.shape)} does not fit module {path} "
                             f"{tuple(m.weight.shape)}")
        b = _bias(node, new_w, new_users)
        _set(m, "weight", w)
        written.add(f"{path}.weight")
        bn_path = bns.get(path)
        folded = not any(u.op_type == "BatchNormalization" for u in new_users.get(node.output[0], []))
        if bn_path is not None and folded:  # folded into this layer (by the exporter or the transforms)
            bn = modules[bn_path]
            _set(bn, "running_mean", np.zeros(w.shape[0]))
            _set(bn, "running_var", np.full(w.shape[0], 1.0 - bn.eps))
            if bn.affine:
                _set(bn, "weight", np.ones(w.shape[0]))
                _set(bn, "bias", np.zeros(w.shape[0]) if b is None else b)
            elif b is not None:
                raise CarryError(f"layer {name}: its BatchNorm {bn_path} has no affine bias to carry the folded bias")
            if m.bias is not None:
                _set(m, "bias", np.zeros(w.shape[0]))
            written.update(f"{bn_path}.{p}" for p in ("running_mean", "running_var", "weight", "bias"))
            changed = True
        elif b is not None:
            if m.bias is None or not np.array_equal(m.bias.detach().numpy(), b.reshape(-1)):
                changed = True
            _set(m, "bias", b.reshape(-1))
        if m.bias is not None:
            written.add(f"{path}.bias")
        if changed:
            done.append(name)
    for key, value in new_w.items():  # the rest, by parameter name (a LayerNorm's scale and shift)
        if key in written or key not in state or (key in ref_w and np.array_equal(ref_w[key], value)):
            continue
        if state[key].numel() != value.size:
            raise CarryError(f"parameter {key}: transformed size {value.size} does not fit {state[key].numel()}")
        with torch.no_grad():
            state[key].copy_(torch.as_tensor(value).reshape(state[key].shape))
        done.append(key)
    _check(out, feed, transformed_path)
    return out, done


def _batchnorm_after(module: torch.nn.Module, feed: Mapping[str, np.ndarray]) -> dict[str, str]:
    """Convolution module path -> the path of the ``nn.BatchNorm*`` module (with running statistics) that reads
    its output, seen by running ``module`` once on ``feed`` with hooks (the output tensor itself is passed)."""
    names = {id(m): n for n, m in module.named_modules()}
    made: dict[int, str] = {}
    out: dict[str, str] = {}

    def conv_hook(m: Any, _args: Any, result: Any) -> None:
        if isinstance(result, torch.Tensor):
            made[id(result)] = names[id(m)]

    def bn_hook(m: Any, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor) and id(args[0]) in made and m.track_running_stats:
            out.setdefault(made[id(args[0])], names[id(m)])

    hooks = [m.register_forward_hook(conv_hook) for m in module.modules()
             if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear))]
    hooks += [m.register_forward_pre_hook(bn_hook) for m in module.modules()
              if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    try:
        with torch.no_grad():
            module(*(torch.from_numpy(np.ascontiguousarray(v[:1])) for v in feed.values()))
    finally:
        for h in hooks:
            h.remove()
    return out


def _check(module: torch.nn.Module, feed: Mapping[str, np.ndarray], onnx_path: str | Path) -> None:
    from .backend import OrtRunner

    runner = OrtRunner(onnx_path)
    try:
        want = runner.infer(dict(feed))
    finally:
        runner.close()
    with torch.no_grad():
        got = module(*(torch.from_numpy(np.ascontiguousarray(v)) for v in feed.values()))
    got_list = list(got) if isinstance(got, (tuple, list)) else [got]
    for (name, w), g in zip(want.items(), got_list):
        g = g.detach().float().numpy()
        rel = float(np.linalg.norm(g - w) / (np.linalg.norm(w) + 1e-12))
        if g.shape != w.shape or not rel <= CARRY_TOLERANCE:
            raise CarryError(f"the module with the transformed weights differs from the transformed ONNX on output "
                             f"{name}: relative L2 {rel:.2e} (tolerance {CARRY_TOLERANCE:g})")


# --- ranges --------------------------------------------------------------------------------------------------
def _observer_nodes(gm: torch.fx.GraphModule) -> dict[str, torch.nn.Module]:
    """Module name -> activation observer, for each observer a prepared PT2E/FX graph calls on an activation
    (not on a weight read from the module's attributes)."""
    found: dict[str, torch.nn.Module] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        m = gm.get_submodule(str(node.target))
        if not hasattr(m, "calculate_qparams") or not hasattr(m, "min_val") or node.args[0].op == "get_attr":
            continue
        if getattr(m, "qscheme", None) in (torch.per_channel_symmetric, torch.per_channel_affine):
            continue
        found[str(node.target)] = m
    return found


def _tensor_values(onnx_path: str | Path, tensors: Iterable[str], feed: Mapping[str, np.ndarray]
                   ) -> dict[str, np.ndarray]:
    """The values of ``tensors`` of the ONNX model on ``feed``. The last answer is kept: each trial of a torch
    search calibrates again on the same model and sample (a pruned session of EfficientNet-Lite0 took seconds)."""
    import hashlib

    import onnx

    from .transforms import _session

    path = Path(onnx_path)
    digest = hashlib.sha1()
    for k in sorted(feed):
        digest.update(k.encode())
        digest.update(np.ascontiguousarray(feed[k]).tobytes())
    key = (str(path.resolve()), path.stat().st_mtime_ns, tuple(sorted(tensors)), digest.hexdigest())
    if _LAST_VALUES and _LAST_VALUES[0] == key:
        return dict(_LAST_VALUES[1])
    proto = onnx.load(str(path))
    have = {o for n in proto.graph.node for o in n.output} | {i.name for i in proto.graph.input}
    names = [t for t in tensors if t in have]
    values: dict[str, np.ndarray] = {}
    if names:
        sess = _session(proto, names)
        wanted = {i.name for i in sess.get_inputs()}
        values = dict(zip(names, sess.run(names, {k: v for k, v in feed.items() if k in wanted})))
    _LAST_VALUES[:] = [key, values]
    return dict(values)


_LAST_VALUES: list[Any] = []
"""(key, values) of :func:`_tensor_values`' last call."""


def forget() -> None:
    """Drop the reference values :func:`_tensor_values` keeps (a deploy calls it when its work folder is gone)."""
    _LAST_VALUES.clear()


def _match(seen: Mapping[str, np.ndarray], values: Mapping[str, np.ndarray]) -> dict[str, tuple[str, bool]]:
    """Observer -> (the ONNX tensor whose values are nearest its input, relative L2 within
    :data:`MATCH_TOLERANCE`; whether the observer's input is that tensor zero-padded). Same shape first; else, for
    an observer that watches a padding's output (a same-padding convolution's input, where the ONNX exporter put
    the padding into the Conv), a tensor with the observer's channels whose values are the observer's interior
    at some offset, with zeros around."""
    by_shape: dict[tuple[int, ...], list[tuple[str, np.ndarray, float]]] = {}
    for t, v in values.items():
        by_shape.setdefault(tuple(v.shape), []).append((t, v, float(np.linalg.norm(v))))
    out: dict[str, tuple[str, bool]] = {}
    for obs, x in seen.items():
        best, err = None, MATCH_TOLERANCE
        for t, v, norm in by_shape.get(tuple(x.shape), []):
            e = _rel(x, v, norm)
            if e <= err:
                best, err = (t, False), e
        if best is None and x.ndim >= 3:
            for shape, candidates in by_shape.items():
                if len(shape) != x.ndim or shape[:2] != x.shape[:2] or \
                        not all(0 <= a - b <= 8 for a, b in zip(x.shape[2:], shape[2:])) or shape == x.shape:
                    continue
                for offsets in np.ndindex(*(a - b + 1 for a, b in zip(x.shape[2:], shape[2:]))):
                    window = (slice(None), slice(None)) + tuple(slice(o, o + n) for o, n in zip(offsets, shape[2:]))
                    inner = x[window]
                    rest = float(np.abs(x).sum() - np.abs(inner).sum())
                    for t, v, norm in candidates:
                        e = _rel(inner, v, norm)
                        if e <= err and rest <= MATCH_TOLERANCE * max(norm, 1e-12):
                            best, err = (t, True), e
        if best is not None:
            out[obs] = best
    return out


def _rel(x: np.ndarray, v: np.ndarray, norm: float) -> float:
    return float(np.linalg.norm(x - v) / norm) if norm > 0 else (0.0 if not x.any() else 1.0)


def _fixed(observer: torch.nn.Module, lo: float, hi: float) -> torch.nn.Module:
    """A min/max observer of ``observer``'s family and quantized range holding ``(lo, hi)``: its qparams are
    computed from that range exactly as for any min/max observer (a histogram observer's search is not rerun)."""
    if any(c.__module__.startswith("torchao") for c in type(observer).__mro__):  # PT2E's observers, not torch.ao's
        from torchao.quantization.pt2e.observer import MinMaxObserver
    else:
        from torch.ao.quantization.observer import MinMaxObserver
    fixed = MinMaxObserver(dtype=observer.dtype, qscheme=observer.qscheme, quant_min=observer.quant_min,
                           quant_max=observer.quant_max, eps=float(getattr(observer, "eps", torch.tensor(2 ** -12))))
    fixed.min_val = torch.tensor(float(lo))
    fixed.max_val = torch.tensor(float(hi))
    return fixed


def calibrate(prepared: torch.fx.GraphModule, batches: Iterable[tuple[torch.Tensor, ...]], input_names: list[str],
              onnx_path: str | Path | None, ranges: Mapping[str, tuple[float, float]] | None
              ) -> tuple[int, dict[str, Any]]:
    """Calibrate the activation observers of a prepared PT2E/FX graph: with the core's ``ranges`` (tensor of the
    ONNX model at ``onnx_path`` -> ``(lo, hi)``), each observer matched to its tensor on the first sample takes
    that range, and the calibration data is run through the graph only when some observer has no twin (it then
    observes by itself). Without ``ranges``, every batch is observed. Returns the samples run and a report for
    the artifact's meta."""
    observers = _observer_nodes(prepared) if ranges else {}
    seen: dict[str, np.ndarray] = {}
    hooks = []
    for name, obs in observers.items():
        def hook(_m: Any, args: tuple, name: str = name, obs: Any = obs) -> None:
            if name not in seen and args and isinstance(args[0], torch.Tensor):
                x = args[0].detach().float()[:1]
                clamp = getattr(obs, "qdeploy_clamp", None)  # an FX observer that sees its clamp's output
                seen[name] = (x.clamp(*clamp) if clamp else x).numpy().copy()
        hooks.append(obs.register_forward_pre_hook(hook))
    n, matched, first = 0, {}, None
    try:
        with torch.no_grad():
            for xs in batches:
                prepared(*xs)
                n += len(xs[0])
                if hooks:
                    for h in hooks:
                        h.remove()
                    hooks = []
                    first = {k: x[:1].numpy() for k, x in zip(input_names, xs)}
                    values = _tensor_values(onnx_path, ranges, first) if onnx_path and ranges else {}
                    matched = _match(seen, values)
                    if len(matched) == len(observers):
                        break  # every observer takes the core's range: no need to observe the rest
    finally:
        for h in hooks:
            h.remove()
    for obs_name, (tensor, padded) in matched.items():
        lo, hi = ranges[tensor]  # type: ignore[index]
        if padded:  # the padding's zeros are in the observed tensor too
            lo, hi = min(lo, 0.0), max(hi, 0.0)
        setattr(prepared, obs_name, _fixed(observers[obs_name], lo, hi))
    if not ranges:
        return n, {"activation_ranges": "observed by the backend"}
    own = sorted(set(observers) - set(matched))
    return n, {"activation_ranges": f"the core's: {len(matched)} of {len(observers)} activation observers"
                                    + (f"; {len(own)} observed here ({', '.join(own[:5])})" if own else ""),
               "activation_ranges_from_core": len(matched), "activation_observers": len(observers)}
