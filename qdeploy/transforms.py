"""Accuracy transforms on the FP32 reference ONNX, applied once before any backend sees the model.

* :func:`fold_batchnorm` -- Conv followed by BatchNormalization becomes one Conv (exact).
* :func:`cross_layer_equalization` -- DFQ (Nagel et al. 2019): for Conv/Gemm -> [Relu|LeakyRelu|PRelu|Clip] ->
  Conv/Gemm/MatMul chains, output channel ``i`` of the first layer is divided by ``s_i = sqrt(r1_i / r2_i)`` and
  input channel ``i`` of the second multiplied by it, so both per-channel weight ranges become
  ``sqrt(r1_i * r2_i)``; grouped/depthwise convs are handled with the group read from the weight shape (an
  absent ``group`` attribute is no reason to skip). A Clip (ReLU6) is kept: its channels' scales are bounded
  with calibrated per-channel ranges so that no channel reaches the clip bound it did not reach before.
* :func:`bias_correction` -- ``b += E[y_fp32 - y_q]`` per output channel, measured on calibration data with the
  weights fake-quantized as the spec says, layer by layer on the partly corrected model (``sequential``; with
  activation ranges the activation quantization is simulated too), all at once, or ``analytic``:
  ``b += (W - W_q) E[x]`` from the per-input-channel means of the FP32 inputs.
* :func:`smoothquant` -- SmoothQuant (Xiao et al. 2022): per input channel ``s_j = max|X_j|^a / max|W_j|^(1-a)``
  folded into the producer of ``X`` (LayerNormalization, a Mul+Add affine, Gemm, MatMul+Add): no Mul is added.
* :func:`transform_model` / :func:`apply_transforms` -- the one entry point, driven by ``spec.transforms``.

Every transform returns the model and a list of change records (dicts with ``transform``, ``nodes`` and a
human-readable ``detail``). The FP32 function is unchanged by BN folding, CLE (on the data its clip bounds were
calibrated on) and SmoothQuant; bias correction changes it on purpose. Activation ranges of the transformed model
differ from the original's: calibrate again after transforming.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np

from .backend import ORT_SIMULATION_DISABLED_OPTIMIZERS
from .errors import QDeployError
from .spec import AdaRoundSpec, PerChannel, PerGroup, PerTensor, QuantSpec, WeightSpec

Feed = Mapping[str, np.ndarray]
Feeds = Union[Sequence[Feed], Callable[[], Iterable[Feed]]]
"""Calibration inputs: a sequence of named-input batches, or a callable returning a fresh iterable of them."""
Change = dict[str, Any]
Range = tuple[Union[float, np.ndarray], Union[float, np.ndarray]]
"""``(lo, hi)`` of an activation tensor: floats (per tensor) or arrays of one value per channel."""

LINEAR_OPS = ("Conv", "Gemm", "MatMul")
HOMOGENEOUS_ACTS = ("Relu", "LeakyRelu", "PRelu")
"""Activations with f(x / s) = f(x) / s for every s > 0, per channel: a CLE scale passes through them."""


# --- graph helpers ------------------------------------------------------------------------------------------
def _name(node: Any) -> str:
    return node.name or node.output[0]


def _same(a: Any, b: Any) -> bool:
    return a is not None and b is not None and a.output[0] == b.output[0]


def _attr(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


class _Graph:
    """Index of a ModelProto's graph: initializers as arrays, producers, consumers; edits keep it current."""

    def __init__(self, model: Any) -> None:
        self.model, self.graph = model, model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self.inputs = {i.name for i in self.graph.input}
        self.outputs = {o.name for o in self.graph.output}
        self.producer = {o: n for n in self.graph.node for o in n.output if o}
        self.consumers: dict[str, list[Any]] = defaultdict(list)
        for n in self.graph.node:
            for x in n.input:
                if x:
                    self.consumers[x].append(n)

    def const(self, name: str) -> np.ndarray | None:
        from onnx import numpy_helper

        t = self.inits.get(name) if name else None
        return None if t is None else numpy_helper.to_array(t)

    def fconst(self, node: Any, idx: int) -> np.ndarray | None:
        """Input ``idx`` of ``node`` as a float32 constant, or None."""
        a = self.const(node.input[idx]) if len(node.input) > idx else None
        return a if a is not None and a.dtype == np.float32 else None

    def single_consumer(self, tensor: str) -> Any | None:
        users = self.consumers.get(tensor, [])
        if tensor in self.outputs or len(users) != 1 or list(users[0].input).count(tensor) != 1:
            return None
        return users[0]

    def unique(self, base: str) -> str:
        taken = set(self.inits) | set(self.producer) | self.inputs
        name, k = base, 1
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        return name

    def set(self, node: Any, idx: int, value: np.ndarray) -> None:
        """Give input ``idx`` of ``node`` the constant ``value``: in place when only this node reads it, else as a
        new initializer (a shared weight stays as the other readers expect it); appended when missing."""
        from onnx import numpy_helper

        value = np.ascontiguousarray(value, dtype=np.float32)
        name = node.input[idx] if len(node.input) > idx else ""
        shared = (name in self.inputs or len(self.consumers.get(name, [])) != 1
                  or list(node.input).count(name) != 1)
        if name and name in self.inits and not shared:
            self.inits[name].CopyFrom(numpy_helper.from_array(value, name))
            return
        new = self.unique(f"{name or _name(node) + '_bias'}_qd")
        t = numpy_helper.from_array(value, new)
        self.graph.initializer.append(t)
        self.inits[new] = self.graph.initializer[-1]
        if name:
            self.consumers[name].remove(node)
        while len(node.input) <= idx:
            node.input.append("")
        node.input[idx] = new
        self.consumers[new].append(node)

    def remove_node(self, node: Any) -> None:
        for x in node.input:
            if x and node in self.consumers.get(x, []):
                self.consumers[x].remove(node)
        for o in node.output:
            self.producer.pop(o, None)
        self.graph.node.remove(node)


def _copy(model: Any) -> Any:
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


# --- linear layers: where their output and input channels are -------------------------------------------------
def _weight(g: _Graph, node: Any) -> np.ndarray | None:
    """The constant float weight of a Conv / Gemm (transA=0) / MatMul (2-D weight), or None."""
    if node.op_type == "Conv":
        w = g.fconst(node, 1)
        return w if w is not None and w.ndim >= 3 else None
    if node.op_type == "Gemm" and not _attr(node, "transA", 0) or node.op_type == "MatMul":
        w = g.fconst(node, 1)
        return w if w is not None and w.ndim == 2 else None
    return None


def _out_axis(node: Any) -> int:
    return 1 if node.op_type == "MatMul" or node.op_type == "Gemm" and not _attr(node, "transB", 0) else 0


def _in_axis(node: Any) -> int:
    return 1 - _out_axis(node) if node.op_type != "Conv" else 1


def _rows(w: np.ndarray, axis: int) -> np.ndarray:
    """``w`` as [channels along ``axis``, everything else]."""
    return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)


def _out_absmax(w: np.ndarray, node: Any) -> np.ndarray:
    return np.abs(_rows(w, _out_axis(node))).max(1)


def _scale_out(w: np.ndarray, node: Any, factor: np.ndarray) -> np.ndarray:
    """``w`` with output channel ``i`` multiplied by ``factor[i]``."""
    shape = [1] * w.ndim
    shape[_out_axis(node)] = -1
    return w * factor.reshape(shape)


def _conv_groups(w: np.ndarray, node: Any, channels: int) -> int | None:
    """The group count of a Conv reading ``channels`` input channels, from its weight shape (the ``group``
    attribute, when present, must agree); None when the shapes do not fit."""
    cpg = w.shape[1]
    if cpg == 0 or channels % cpg or w.shape[0] % (channels // cpg):
        return None
    groups = channels // cpg
    return groups if _attr(node, "group", groups) == groups else None


def _in_view(w: np.ndarray, node: Any, channels: int) -> tuple[np.ndarray, tuple[int, ...]] | None:
    """``w`` viewed so that input channel ``c`` is index ``c`` of axis 0 after a transpose: returns the view
    [channels, rest] (a copy) and what is needed to put it back; None when it does not fit ``channels``."""
    if node.op_type == "Conv":
        groups = _conv_groups(w, node, channels)
        if groups is None:
            return None
        cpg, opg = w.shape[1], w.shape[0] // groups
        v = w.reshape(groups, opg, cpg, -1).transpose(0, 2, 1, 3)  # [g, cpg, opg, k]
        return v.reshape(channels, -1), (groups, cpg, opg)
    if w.shape[_in_axis(node)] != channels:
        return None
    return _rows(w, _in_axis(node)), ()


def _from_in_view(v: np.ndarray, w: np.ndarray, node: Any, meta: tuple[int, ...]) -> np.ndarray:
    if node.op_type == "Conv":
        groups, cpg, opg = meta
        return v.reshape(groups, cpg, opg, -1).transpose(0, 2, 1, 3).reshape(w.shape)
    axis = _in_axis(node)
    moved = np.moveaxis(w, axis, 0).shape
    return np.moveaxis(v.reshape(moved), 0, axis)


def _bias_of(g: _Graph, node: Any) -> tuple[Any, int, np.ndarray] | None:
    """(node holding the bias, its input index, bias value) of a linear layer; None when it has none. The
    bias of a MatMul is a constant operand of the Add that alone reads its output."""
    if node.op_type in ("Conv", "Gemm"):
        b = g.fconst(node, 2)
        return (node, 2, b) if b is not None else None
    add = g.single_consumer(node.output[0])
    if add is None or add.op_type != "Add":
        return None
    idx = 1 if add.input[0] == node.output[0] else 0
    b = g.fconst(add, idx)
    return (add, idx, b) if b is not None and (b.ndim <= 1 or b.ndim == 2 and b.shape[0] == 1) else None


def _channels_of(node: Any, w: np.ndarray) -> int:
    return int(w.shape[_out_axis(node)])


def _bias_times(b: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """A bias broadcast along its last axis to the channels of ``factor``, times ``factor``."""
    shape = b.shape[:-1] + (factor.size,) if b.ndim else (factor.size,)
    return np.broadcast_to(b, shape) * factor


def _set_out_scale(g: _Graph, node: Any, factor: np.ndarray) -> None:
    """Multiply output channel ``i`` of a linear layer (weight and bias) by ``factor[i]``."""
    w = _weight(g, node)
    assert w is not None
    g.set(node, 1, _scale_out(w, node, factor))
    bias = _bias_of(g, node)
    if bias is not None:
        holder, idx, b = bias
        g.set(holder, idx, _bias_times(b, factor))


def _ratio(r: np.ndarray) -> float:
    nz = r[r > 0]
    return float(nz.max() / nz.min()) if nz.size else 1.0


# --- running the graph on calibration data -------------------------------------------------------------------
def _feeds(calib: Feeds) -> Iterable[Feed]:
    return calib() if callable(calib) else calib


def _chunks(calib: Feeds, chunk: int) -> Iterator[dict[str, np.ndarray]]:
    for feed in _feeds(calib):
        n = len(next(iter(feed.values())))
        for i in range(0, n, chunk):
            yield {k: np.asarray(v[i:i + chunk]) for k, v in feed.items()}


def _session(model: Any, outputs: Collection[str], given: Mapping[str, np.ndarray] | None = None) -> Any:
    """An onnxruntime session of ``model`` with ``outputs`` as its only outputs, the graph pruned to what they
    need; with ``given`` (tensor -> an array of its values), those tensors become the graph's inputs and
    nothing above them is kept."""
    import onnx
    import onnxruntime as ort

    m = _copy(model)
    g = m.graph
    producer = {o: n for n in g.node for o in n.output if o}
    need: set[str] = set()
    keep: set[str] = set()
    stack = list(outputs)
    while stack:
        t = stack.pop()
        if t in need:
            continue
        need.add(t)
        n = None if given is not None and t in given else producer.get(t)
        if n is not None and n.output[0] not in keep:
            keep.add(n.output[0])
            stack.extend(x for x in n.input if x)
    nodes = [n for n in g.node if n.output[0] in keep]
    del g.node[:]
    g.node.extend(nodes)
    used = {x for n in nodes for x in n.input}
    kept = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)
    del g.output[:]
    g.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in outputs)
    if given is not None:
        del g.input[:]
        g.input.extend(onnx.helper.make_tensor_value_info(t, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), None)
                       for t, v in given.items() if t in need)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(ORT_SIMULATION_DISABLED_OPTIMIZERS))


def _reduce(calib: Feeds, model: Any, tensors: Mapping[str, int | None], chunk: int,
            want: tuple[str, ...] = ("sum", "min", "max")) -> dict[str, dict[str, Any]]:
    """Per-channel statistics of ``tensors`` (name -> channel axis, -1 for the last, None for the whole tensor)
    over the calibration data: ``sum`` (with ``count``), ``min``, ``max`` (arrays of one value per channel)."""
    names = list(tensors)
    sess = _session(model, names)
    inputs = {i.name for i in sess.get_inputs()}
    stats: dict[str, dict[str, Any]] = {}
    for feed in _chunks(calib, chunk):
        outs = sess.run(names, {k: v for k, v in feed.items() if k in inputs})
        for t, y in zip(names, outs):
            y = np.asarray(y, np.float64)
            if tensors[t] is None:  # the whole tensor: one value (never the batch axis: chunks differ in size)
                y = y.reshape(1, -1)
            axis = tensors[t] % y.ndim if y.ndim and tensors[t] is not None else 0
            red = tuple(i for i in range(y.ndim) if i != axis)
            s = stats.setdefault(t, {"count": 0})
            s["count"] += y.size // max(y.shape[axis], 1) if y.ndim else 1
            for key, fn, comb in (("sum", np.sum, np.add), ("min", np.min, np.minimum), ("max", np.max, np.maximum)):
                if key in want:
                    v = fn(y, axis=red)
                    s[key] = v if key not in s else comb(s[key], v)
    return stats


def channel_ranges(model: Any, calib: Feeds, tensors: Mapping[str, int | None], chunk: int = 16
                   ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel ``(min, max)`` of ``tensors`` (name -> channel axis) of the FP32 ``model`` on ``calib``."""
    st = _reduce(calib, model, tensors, chunk, ("min", "max"))
    return {t: (s["min"], s["max"]) for t, s in st.items()}


def tensor_ranges(model: Any, calib: Feeds, tensors: Iterable[str], chunk: int = 16) -> dict[str, tuple[float, float]]:
    """Per-tensor min-max ``(lo, hi)`` of ``tensors`` of the FP32 ``model`` on ``calib``."""
    return {t: (float(lo.min()), float(hi.max()))
            for t, (lo, hi) in channel_ranges(model, calib, dict.fromkeys(tensors), chunk).items()}


# --- batch-norm folding --------------------------------------------------------------------------------------
def fold_batchnorm(model: Any) -> tuple[Any, list[Change]]:
    """Fold every inference-mode BatchNormalization that alone reads a Conv's output into that Conv:
    ``W' = W * gamma / sqrt(var + eps)``, ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``. Exact."""
    model = _copy(model)
    g = _Graph(model)
    changes: list[Change] = []
    for bn in [n for n in model.graph.node if n.op_type == "BatchNormalization"]:
        conv = g.producer.get(bn.input[0])
        if (conv is None or conv.op_type != "Conv" or _attr(bn, "training_mode", 0) or not _attr(bn, "spatial", 1)
                or any(o for o in bn.output[1:]) or not _same(g.single_consumer(conv.output[0]), bn)):
            continue
        w = _weight(g, conv)
        params = [g.fconst(bn, i) for i in range(1, 5)]
        if w is None or any(p is None for p in params):
            continue
        gamma, beta, mean, var = (np.asarray(p, np.float64) for p in params)
        k = gamma / np.sqrt(var + float(_attr(bn, "epsilon", 1e-5)))
        b = g.fconst(conv, 2)
        b64 = np.zeros(w.shape[0]) if b is None else b.astype(np.float64)
        g.set(conv, 1, _scale_out(w.astype(np.float64), conv, k))
        g.set(conv, 2, (b64 - mean) * k + beta)
        out = bn.output[0]
        g.remove_node(bn)
        g.producer.pop(conv.output[0], None)
        conv.output[0] = out
        g.producer[out] = conv
        changes.append({"transform": "fold_batchnorm", "nodes": [_name(conv), _name(bn)],
                        "detail": f"BatchNormalization {_name(bn)} folded into Conv {_name(conv)}"})
    if changes:
        _drop_unused(model)
    return model, changes


def _drop_unused(model: Any) -> None:
    """Remove the initializers no node reads any more (the folded BatchNorm's parameters)."""
    used = {x for n in model.graph.node for x in n.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    if len(keep) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)


# --- cross-layer equalization ------------------------------------------------------------------------------
def _clip_bounds(g: _Graph, node: Any) -> tuple[float, float] | None:
    """(lo, hi) of a Clip; None when a bound is not a constant."""
    if len(node.input) > 1 or not any(a.name in ("min", "max") for a in node.attribute):
        vals = []
        for i, default in ((1, -math.inf), (2, math.inf)):
            if len(node.input) > i and node.input[i]:
                a = g.const(node.input[i])
                if a is None or a.size != 1:
                    return None
                vals.append(float(a.reshape(())))
            else:
                vals.append(default)
        return vals[0], vals[1]
    return float(_attr(node, "min", -3.4e38)), float(_attr(node, "max", 3.4e38))


def cle_pairs(model: Any) -> list[tuple[Any, Any | None, Any]]:
    """The (first layer, activation or None, second layer) chains CLE can equalize: a Conv/Gemm whose output
    only the activation reads (Relu, LeakyRelu, PRelu, Clip, or none), whose output only a Conv/Gemm/MatMul reads
    as its data input, both with constant weights and matching channel counts."""
    g = _Graph(model)
    pairs = []
    for n1 in model.graph.node:
        w1 = _weight(g, n1) if n1.op_type in ("Conv", "Gemm") else None
        if w1 is None:
            continue
        t = n1.output[0]
        nxt, act = g.single_consumer(t), None
        if nxt is not None and (nxt.op_type in HOMOGENEOUS_ACTS or nxt.op_type == "Clip") and nxt.input[0] == t:
            act, t = nxt, nxt.output[0]
            nxt = g.single_consumer(t)
        if nxt is None or nxt.op_type not in LINEAR_OPS or nxt.input[0] != t:
            continue
        w2 = _weight(g, nxt)
        if w2 is not None and _in_view(w2, nxt, _channels_of(n1, w1)) is not None:
            pairs.append((n1, act, nxt))
    return pairs


def cross_layer_equalization(model: Any, ranges: Mapping[str, Range] | None = None, *, passes: int = 20,
                             tol: float = 1e-4, clip_headroom: float = 2.0) -> tuple[Any, list[Change]]:
    """Equalize the per-channel weight ranges of every chain :func:`cle_pairs` finds, iterating ``passes``
    times over them (or until no scale moves by more than ``tol``, relative).

    Through a Clip (ReLU6) the clip is kept; ``ranges`` must then hold the calibrated range of the clip's input
    (the first layer's output), per channel (arrays) or per tensor (floats, conservative). A channel whose
    calibrated range reaches past ``bound / clip_headroom`` keeps scale 1; the others get a scale no smaller
    than ``max * clip_headroom / bound``, so no channel's calibrated max passes the clip bound (with
    ``clip_headroom`` > 1, agreement holds on data up to that many times the calibrated range). Without a range
    a clipped pair is skipped: the function is never changed. Measured on EfficientNet-Lite0 (300 calibration
    crops, 200 other crops): headroom 1 is exact on the calibration data (6e-7) but moves the held-out logits by
    3.1% of their max (FP32 top-1 agreement 0.985); headroom 2 moves them by 0.4% (agreement 1.0) and keeps
    14165 of 17920 clipped channels at scale 1 (6055 with headroom 1)."""
    model = _copy(model)
    g = _Graph(model)
    pairs = cle_pairs(model)
    state: list[dict[str, Any]] = []
    changes: list[Change] = []
    for n1, act, n2 in pairs:
        w1 = _weight(g, n1)
        assert w1 is not None
        c = _channels_of(n1, w1)
        st: dict[str, Any] = {"n1": n1, "act": act, "n2": n2, "total": np.ones(c), "frozen": 0,
                              "before": _ratio(_out_absmax(w1, n1)), "lo": None, "hi": None}
        if act is not None and act.op_type == "Clip":
            bounds = _clip_bounds(g, act)
            r = (ranges or {}).get(n1.output[0])
            reason = ("the clip bounds are not constants" if bounds is None else
                      "a clip with a lower bound above 0" if bounds[0] > 0 else
                      f"no calibrated range for {n1.output[0]!r}" if r is None else "")
            if reason:
                changes.append({"transform": "cross_layer_equalization", "nodes": [_name(n1), _name(n2)],
                                "skipped": reason, "detail": f"{_name(n1)} -> Clip -> {_name(n2)} skipped: {reason}"})
                continue
            assert bounds is not None and r is not None
            st["bounds"] = bounds
            st["lo"] = np.broadcast_to(np.asarray(r[0], np.float64), (c,)).copy()
            st["hi"] = np.broadcast_to(np.asarray(r[1], np.float64), (c,)).copy()
        state.append(st)
    for _ in range(passes):
        moved = 0.0
        for st in state:
            n1, n2 = st["n1"], st["n2"]
            w1, w2 = _weight(g, n1), _weight(g, n2)
            assert w1 is not None and w2 is not None
            r1 = _out_absmax(w1, n1).astype(np.float64)
            view = _in_view(w2, n2, r1.size)
            assert view is not None
            v, meta = view
            r2 = np.abs(v).max(1).astype(np.float64)
            ok = (r1 > 0) & (r2 > 0)
            s = np.ones_like(r1)
            s[ok] = np.sqrt(r1[ok] / r2[ok])
            if st["hi"] is not None:
                s = _bound_clip_scales(s, st["lo"], st["hi"], st["bounds"], clip_headroom, st)
            if np.allclose(s, 1.0):
                continue
            moved = max(moved, float(np.abs(np.log(s)).max()))
            _set_out_scale(g, n1, 1.0 / s)
            g.set(n2, 1, _from_in_view(v * s[:, None], w2, n2, meta))
            st["total"] *= s
            if st["hi"] is not None:
                st["lo"], st["hi"] = st["lo"] / s, st["hi"] / s
        if moved < tol:
            break
    for st in state:
        n1, n2, act = st["n1"], st["n2"], st["act"]
        w1 = _weight(g, n1)
        assert w1 is not None
        w2 = _weight(g, n2)
        assert w2 is not None
        groups = _conv_groups(w2, n2, w1.shape[_out_axis(n1)]) if n2.op_type == "Conv" else 1
        after = _ratio(_out_absmax(w1, n1))
        via = act.op_type if act is not None else "direct"
        ch: Change = {"transform": "cross_layer_equalization", "nodes": [_name(n1), _name(n2)], "activation": via,
                      "groups": groups, "group_inferred": n2.op_type == "Conv" and _attr(n2, "group") is None,
                      "range_ratio_before": st["before"], "range_ratio_after": after,
                      "scale_min": float(st["total"].min()), "scale_max": float(st["total"].max()),
                      "clip_fixed_channels": st["frozen"]}
        extra = f", {st['frozen']} clip-bound channel(s) kept at scale 1" if st["frozen"] else ""
        ch["detail"] = (f"{_name(n1)} -> {via} -> {_name(n2)}{' (depthwise)' if groups and groups > 1 else ''}: "
                        f"range ratio {st['before']:.1f}x -> {after:.1f}x, scales {ch['scale_min']:.3g}.."
                        f"{ch['scale_max']:.3g}{extra}")
        changes.append(ch)
    return model, changes


def _bound_clip_scales(s: np.ndarray, lo: np.ndarray, hi: np.ndarray, bounds: tuple[float, float],
                       headroom: float, st: dict[str, Any]) -> np.ndarray:
    """Scales that keep Clip(x / s) == Clip(x) / s on the calibrated channel ranges [lo, hi]."""
    blo, bhi = bounds
    free = np.ones(s.shape, bool)
    floor = np.zeros_like(s)
    if math.isfinite(bhi):
        free &= hi * headroom <= bhi
        floor = np.maximum(floor, hi * headroom / bhi)
    if blo < 0 and math.isfinite(blo):
        free &= lo * headroom >= blo
        floor = np.maximum(floor, lo * headroom / blo)
    st["frozen"] = int((~free).sum())
    return np.where(free, np.maximum(s, floor), 1.0)


# --- quantization simulation ----------------------------------------------------------------------------------
def _layers(g: _Graph, names: Collection[str] | None) -> list[Any]:
    return [n for n in g.graph.node if n.op_type in LINEAR_OPS and _weight(g, n) is not None
            and (names is None or _name(n) in names or n.name in names)]


def _quant_axis(node: Any, ws: WeightSpec) -> int:
    if node.op_type == "Conv" and isinstance(ws.granularity, PerChannel):
        return ws.granularity.axis
    return _out_axis(node)


def _quantize_layer(g: _Graph, node: Any, ws: WeightSpec, act_ranges: Mapping[str, tuple[float, float]] | None,
                    act_symmetric: bool) -> None:
    from .simulate import fake_quant_weight, insert_qdq, qparams

    w = _weight(g, node)
    assert w is not None
    g.set(node, 1, fake_quant_weight(w, ws, _quant_axis(node, ws)))
    x = node.input[0]
    if act_ranges is not None and x in act_ranges:
        lo, hi = act_ranges[x]
        s, z, _, _ = qparams(lo, hi, 8, act_symmetric, signed=act_symmetric)
        insert_qdq(g.model, node, 0, np.array(s, np.float32), np.array(z, np.int8 if act_symmetric else np.uint8),
                   g.unique(f"{x}__fq_{_name(node)}"))


def simulate_quantized(model: Any, weights: WeightSpec, act_ranges: Mapping[str, tuple[float, float]] | None = None,
                       act_symmetric: bool = False, layers: Collection[str] | None = None) -> Any:
    """A copy of ``model`` whose Conv/Gemm/MatMul layers (all, or those named) have fake-quantized weights and,
    where ``act_ranges`` has their input, a QuantizeLinear/DequantizeLinear pair (8 bit) in front."""
    model = _copy(model)
    g = _Graph(model)
    for node in _layers(g, layers):
        _quantize_layer(g, node, weights, act_ranges, act_symmetric)
    return model


# --- bias correction ---------------------------------------------------------------------------------------------
def _out_channel_axis(node: Any) -> int:
    """The channel axis of a linear layer's output activation."""
    return 1 if node.op_type == "Conv" else -1


def _analytic_delta(dw: np.ndarray, node: Any, mean_x: np.ndarray) -> np.ndarray | None:
    """``(W - W_q) E[x]`` per output channel, from the per-input-channel means ``mean_x``."""
    view = _in_view(dw, node, mean_x.size)
    if view is None:
        return None
    v, meta = view
    if node.op_type == "Conv":  # v: [C, opg * k]; sum the kernel, then each output channel over its group
        groups, cpg, opg = meta
        per = v.reshape(groups, cpg, opg, -1).sum(3) * mean_x.reshape(groups, cpg, 1)
        return per.sum(1).reshape(-1)
    return (v * mean_x[:, None]).sum(0)


def bias_correction(model: Any, calib: Feeds, weights: WeightSpec | None = None, *, mode: str = "empirical",
                    sequential: bool = True, act_ranges: Mapping[str, tuple[float, float]] | None = None,
                    act_symmetric: bool = False, layers: Collection[str] | None = None,
                    chunk: int = 16) -> tuple[Any, list[Change]]:
    """Correct the biases of the Conv/Gemm/MatMul(+Add) layers (all, or those named in ``layers``) for the
    quantization of their weights as ``weights`` says (default: INT8 symmetric per channel).

    ``mode="empirical"``: ``b += E[y_fp32] - E[y_q]`` per output channel on ``calib``, where ``y_q`` is the layer's
    output in a copy of the model with quantized weights. ``sequential=True`` quantizes and corrects one layer at
    a time in graph order, each measured on the model already corrected above it (the activations the rest of the
    graph still needs are kept between layers, so this costs about one forward pass); with ``act_ranges`` (tensor -> (lo, hi) of *this* model) the layers' inputs are also
    fake-quantized (8 bit), so the correction absorbs the mean error of activation quantization too.
    ``sequential=False`` measures every layer's own error at once, on the FP32 inputs (two runs): exact
    ``E[(W - W_q) x]``, blind to the errors of the layers above.
    ``mode="analytic"``: ``b += (W - W_q) E[x]`` with ``E[x]`` the per-input-channel mean of the FP32 input
    (exact for Gemm/MatMul; for Conv, zero padding at the borders is ignored). A Conv or Gemm without a bias
    gets one; a MatMul without an Add is left alone."""
    from .simulate import fake_quant_weight

    if mode not in ("empirical", "analytic"):
        raise ValueError(f"bias correction mode {mode!r}: use 'empirical' or 'analytic'")
    ws = weights or WeightSpec()
    model = _copy(model)
    g = _Graph(model)
    targets: list[Any] = []
    changes: list[Change] = []
    for node in _layers(g, layers):
        if node.op_type == "MatMul" and _bias_of(g, node) is None:
            changes.append({"transform": "bias_correction", "nodes": [_name(node)], "skipped": "no bias Add",
                            "detail": f"{_name(node)}: a MatMul without a constant bias Add is not corrected"})
            continue
        if _bias_of(g, node) is None:  # Conv / Gemm without bias: a zero bias to correct
            w = _weight(g, node)
            assert w is not None
            g.set(node, 2, np.zeros(_channels_of(node, w), np.float32))
        targets.append(node)
    if not targets:
        return model, changes

    def delta_from(means_fp: dict[str, dict[str, Any]], means_q: dict[str, dict[str, Any]], t: str) -> np.ndarray:
        return means_fp[t]["sum"] / means_fp[t]["count"] - means_q[t]["sum"] / means_q[t]["count"]

    deltas: dict[str, np.ndarray] = {}
    if mode == "analytic":
        st = _reduce(calib, model, {n.input[0]: _out_channel_axis(n) for n in targets}, chunk, ("sum",))
        for n in targets:
            w = _weight(g, n)
            assert w is not None
            mean_x = st[n.input[0]]["sum"] / st[n.input[0]]["count"]
            d = _analytic_delta(w.astype(np.float64) - fake_quant_weight(w, ws, _quant_axis(n, ws)), n, mean_x)
            if d is not None:
                deltas[_name(n)] = d * float(_attr(n, "alpha", 1.0)) if n.op_type == "Gemm" else d
    else:
        outs = {n.output[0]: _out_channel_axis(n) for n in targets}
        fp = _reduce(calib, model, outs, chunk, ("sum",))
        if not sequential:  # every layer's own error on the FP32 inputs: a weight-quantized twin of each layer
            q = _reduce(calib, _twins(model, targets, ws), {f"{t}__bcq": a for t, a in outs.items()}, chunk, ("sum",))
            deltas = {_name(n): delta_from(fp, {n.output[0]: q[f"{n.output[0]}__bcq"]}, n.output[0]) for n in targets}
        else:
            deltas = _sequential_deltas(model, targets, calib, fp, ws, act_ranges, act_symmetric, chunk)
    for n in targets:
        d = deltas.get(_name(n))
        if d is None:
            continue
        holder, _, b = _add_bias(g, n, d)
        changes.append({"transform": "bias_correction", "nodes": [_name(n)], "mode": mode,
                        "sequential": sequential and mode == "empirical",
                        "mean_abs_shift": float(np.abs(d).mean()),
                        "relative_shift": float(np.abs(d).mean() / max(float(np.abs(b).mean()), 1e-12)),
                        "detail": f"{_name(n)}: bias shifted by {float(np.abs(d).mean()):.3g} on average "
                                  f"({mode}{', sequential' if sequential and mode == 'empirical' else ''})"})
    return model, changes


CHUNK_INPUT_BYTES = 2 << 20
"""The most input bytes the transforms run through the model at once. Their statistics runs ask onnxruntime for
every layer's output, all alive together: EfficientNet-Lite0 (0.6 MB a 224x224 sample) peaked at 2.05 GB RSS with
16-sample chunks and 1.44 GB with 4, in the same time (measured here)."""

CACHE_BYTES = 1 << 30
"""The most bytes of intermediate activations sequential bias correction keeps between layers."""


def _sequential_deltas(model: Any, targets: list[Any], calib: Feeds, fp: dict[str, dict[str, Any]], ws: WeightSpec,
                       act_ranges: Mapping[str, tuple[float, float]] | None, act_symmetric: bool, chunk: int,
                       cache_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Quantize and correct the targets one at a time in graph order. The values of the tensors that the rest of
    the graph still needs (the frontier: the current layer's output, a residual branch) are kept for every
    calibration sample, so each step runs only the nodes between the frontier and the next layer: about one
    forward pass in all. When the frontier outgrows ``cache_bytes``, it restarts from the graph inputs."""
    budget = CACHE_BYTES if cache_bytes is None else cache_bytes
    work = _copy(model)
    inputs = {i.name for i in work.graph.input} - {t.name for t in work.graph.initializer}
    feeds = list(_feeds(calib))
    samples = {k: np.concatenate([np.asarray(f[k]) for f in feeds]) for k in inputs if k in feeds[0]}
    count = len(next(iter(samples.values())))
    cache: dict[str, np.ndarray] = dict(samples)
    computed: set[str] = set()
    deltas: dict[str, np.ndarray] = {}
    for n in targets:
        y, axis = n.output[0], _out_channel_axis(n)
        wg = _Graph(work)
        wn = wg.producer[y]
        _quantize_layer(wg, wn, ws, act_ranges, act_symmetric)
        g = _Graph(work)
        nodes, stack, seen = [], [y], set()
        while stack:  # the nodes between the frontier and y
            t = stack.pop()
            if t in seen or t in cache or t not in g.producer:
                continue
            seen.add(t)
            p = g.producer[t]
            nodes.append(p)
            stack.extend(x for x in p.input if x)
        done = computed | {p.output[0] for p in nodes}
        pending = {x for p in work.graph.node if p.output[0] not in done for x in p.input if x}
        keep = [o for p in nodes for o in p.output if o and o in pending and o != y]
        sess = _session(work, [y] + keep, cache)
        names = [i.name for i in sess.get_inputs()]
        total: np.ndarray | None = None
        parts: dict[str, list[np.ndarray]] = {t: [] for t in [y] + keep}
        for i in range(0, count, chunk):
            outs = sess.run([y] + keep, {t: cache[t][i:i + chunk] for t in names})
            yv = np.asarray(outs[0], np.float64)
            a = axis % yv.ndim
            s = yv.sum(axis=tuple(k for k in range(yv.ndim) if k != a))
            total = s if total is None else total + s
            for t, v in zip([y] + keep, outs):
                if t != y or y in pending:
                    parts[t].append(v)
        assert total is not None
        d = (fp[y]["sum"] - total) / fp[y]["count"]
        deltas[_name(n)] = d
        _add_bias(_Graph(work), _Graph(work).producer[y], d)
        new = {t: v for t, v in cache.items() if t in pending}
        for t in keep:
            new[t] = np.concatenate(parts[t])
        if y in pending:
            v = np.concatenate(parts[y])
            if n.op_type != "MatMul":  # the bias is inside the layer: its output moves by d (a MatMul's is in the Add)
                shape = [1] * v.ndim
                shape[axis % v.ndim] = -1
                v = (v + d.reshape(shape)).astype(v.dtype)
            new[y] = v
        computed = done
        if sum(v.nbytes for v in new.values()) > budget:
            cache, computed = dict(samples), set()
        else:
            cache = new
    return deltas


def _twins(model: Any, targets: list[Any], ws: WeightSpec) -> Any:
    """``model`` plus, for each target layer, a copy reading the same FP32 input with fake-quantized weights and
    writing ``<output>__bcq``."""
    import onnx
    from onnx import numpy_helper

    from .simulate import fake_quant_weight

    out = _copy(model)
    g = _Graph(out)
    for n in targets:
        w = _weight(g, n)
        assert w is not None
        twin = onnx.NodeProto()
        twin.CopyFrom(n)
        twin.name = f"{_name(n)}__bcq"
        twin.output[0] = f"{n.output[0]}__bcq"
        twin.input[1] = g.unique(f"{n.input[1]}__bcq")
        out.graph.initializer.append(numpy_helper.from_array(fake_quant_weight(w, ws, _quant_axis(n, ws)),
                                                             twin.input[1]))
        g.inits[twin.input[1]] = out.graph.initializer[-1]
        out.graph.node.append(twin)
    return out


def _add_bias(g: _Graph, node: Any, delta: np.ndarray) -> tuple[Any, int, np.ndarray]:
    """Move a layer's output by ``delta`` per channel through its bias (a Gemm's C is scaled by ``beta``)."""
    bias = _bias_of(g, node)
    assert bias is not None
    holder, idx, b = bias
    if holder.op_type == "Gemm":
        delta = delta / float(_attr(holder, "beta", 1.0))
    g.set(holder, idx, np.broadcast_to(b, b.shape[:-1] + (delta.size,) if b.ndim else (delta.size,)) + delta)
    return holder, idx, b


# --- SmoothQuant ---------------------------------------------------------------------------------------------
def _smooth_source(g: _Graph, t: str) -> tuple[str, Callable[[np.ndarray], None]] | None:
    """How to divide channel ``j`` (last axis) of tensor ``t`` by ``s_j`` inside its producer, without a new
    node: (description, apply function); None when the producer cannot absorb it."""
    p = g.producer.get(t)
    if p is None:
        return None
    if p.op_type == "LayerNormalization":
        has_beta = len(p.input) > 2 and bool(p.input[2])
        gamma, beta = g.fconst(p, 1), g.fconst(p, 2) if has_beta else None
        if gamma is None or gamma.ndim != 1 or _attr(p, "axis", -1) != -1 or has_beta and beta is None:
            return None

        def ln(s: np.ndarray) -> None:
            g.set(p, 1, gamma / s)
            if beta is not None:
                g.set(p, 2, np.broadcast_to(beta, s.shape) / s)
        return "LayerNormalization", ln
    if p.op_type == "Add":  # y = x * gamma + beta (a LayerNorm written out), or MatMul + bias
        for i in (0, 1):
            beta, other = g.fconst(p, 1 - i), g.producer.get(p.input[i])
            if beta is None or beta.ndim > 1 or other is None or not _same(g.single_consumer(other.output[0]), p):
                continue
            if other.op_type == "MatMul" and _weight(g, other) is not None and other.output[0] == p.input[i]:
                def mm(s: np.ndarray, other: Any = other) -> None:
                    _set_out_scale(g, other, 1.0 / s)
                return "MatMul+Add", mm
            if other.op_type == "Mul":
                j = next((k for k in (0, 1) if g.fconst(other, k) is not None), None)
                gamma = g.fconst(other, j) if j is not None else None
                if j is None or gamma is None or gamma.ndim > 1:
                    continue

                def affine(s: np.ndarray, other: Any = other, j: int = j, gamma: np.ndarray = gamma,
                           beta: np.ndarray = beta, i: int = i) -> None:
                    g.set(other, j, np.broadcast_to(gamma, s.shape) / s)
                    g.set(p, 1 - i, np.broadcast_to(beta, s.shape) / s)
                return "Mul+Add", affine
        return None
    if p.op_type == "Gemm" and _weight(g, p) is not None:
        return "Gemm", lambda s: _set_out_scale(g, p, 1.0 / s)
    return None


def _smooth_consumers(g: _Graph, t: str) -> list[Any] | None:
    users = g.consumers.get(t, [])
    if t in g.outputs or not users:
        return None
    for u in users:
        if u.op_type not in ("MatMul", "Gemm") or u.input[0] != t or list(u.input).count(t) != 1 \
                or _weight(g, u) is None:
            return None
    return users


def smoothquant(model: Any, calib: Feeds, alpha: float = 0.5, *, chunk: int = 16) -> tuple[Any, list[Change]]:
    """Migrate activation outliers into the weights for every tensor read only by MatMul/Gemm layers with
    constant weights (Q/K/V sharing one LayerNorm output share one scale, from the max over their weights) and
    produced by a LayerNormalization, a Mul+Add affine, a Gemm or a MatMul+Add: per channel ``j`` of the last
    axis, ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``; the producer's output channel is divided by ``s_j``
    and the consumers' weight rows multiplied by it. The FP32 function is unchanged."""
    model = _copy(model)
    g = _Graph(model)
    found = []
    for t in list(g.producer):
        users = _smooth_consumers(g, t)
        source = _smooth_source(g, t) if users else None
        if users and source:
            found.append((t, users, source))
    if not found:
        return model, []
    st = _reduce(calib, model, {t: -1 for t, _, _ in found}, chunk, ("min", "max"))
    changes: list[Change] = []
    for t, users, (kind, apply) in found:
        xmax = np.maximum(np.abs(st[t]["min"]), np.abs(st[t]["max"]))
        views = []
        for u in users:
            w = _weight(g, u)
            assert w is not None
            view = _in_view(w, u, xmax.size)
            if view is None:
                break
            views.append((u, w, view))
        if len(views) != len(users):
            continue
        wmax = np.max([np.abs(v).max(1) for _, _, (v, _) in views], axis=0)
        ok = (xmax > 0) & (wmax > 0)
        s = np.ones_like(xmax)
        s[ok] = np.clip(xmax[ok] ** alpha / wmax[ok] ** (1 - alpha), 1e-5, 1e5)
        apply(s)
        for u, w, (v, meta) in views:
            g.set(u, 1, _from_in_view(v * s[:, None], w, u, meta))
        med_before, med_after = float(np.median(xmax)), float(np.median(xmax / s))
        before = float(xmax.max() / med_before) if med_before > 0 else math.inf
        after = float((xmax / s).max() / med_after) if med_after > 0 else math.inf
        changes.append({"transform": "smoothquant", "nodes": [_name(u) for u in users], "tensor": t,
                        "producer": kind, "alpha": alpha, "outlier_ratio_before": before,
                        "outlier_ratio_after": after,
                        "detail": f"{t} ({kind} -> {', '.join(_name(u) for u in users)}): activation max/median "
                                  f"{before:.1f}x -> {after:.1f}x"})
    return model, changes


# --- the entry point -------------------------------------------------------------------------------------------
def has_depthwise(model: Any) -> bool:
    """True when some Conv has one input channel per group and more than one group."""
    g = _Graph(model)
    for n in model.graph.node:
        w = _weight(g, n) if n.op_type == "Conv" else None
        if w is not None and w.shape[1] == 1 and _attr(n, "group", 1) > 1:
            return True
    return False


def _take(calib: Feeds, max_samples: int) -> list[dict[str, np.ndarray]]:
    out, n = [], 0
    for feed in _feeds(calib):
        k = len(next(iter(feed.values())))
        take = min(k, max_samples - n)
        out.append({name: np.asarray(v[:take]) for name, v in feed.items()})
        n += take
        if n >= max_samples:
            break
    return out


def _event(transform: str, changes: list[Change], applied: bool, reason: str) -> dict[str, Any]:
    done = [c for c in changes if "skipped" not in c]
    return {"transform": transform, "applied": applied and bool(done), "count": len(done),
            "skipped": len(changes) - len(done), "reason": reason, "changes": changes}


def decide(model: Any, spec: QuantSpec, after_miss: bool = False) -> dict[str, tuple[Any, str]]:
    """What :func:`transform_model` does to ``model`` (an ONNX ModelProto, BatchNorm folded or not) under
    ``spec``, with why: ``cross_layer_equalization`` (bool), ``smoothquant`` (alpha or False), ``adaround``
    (iterations or False) and ``bias_correction`` ("empirical" / "analytic" / False). ``"auto"`` resolves here: CLE when weights are per
    tensor or the model has depthwise convs, bias correction (empirical, sequential) on models with a Conv, AdaRound
    on per-tensor weights of models with a Conv when PyTorch is installed -- and, with ``after_miss`` (the
    techniques a fallback run tries one at a time after a plain build missed its budget, before it spends
    precision), on per-channel weights too: minutes of CPU on a large model, so only when it is that or a layer
    above INT8 (on EfficientNet-Lite0 per channel it took cosine 0.9933 to 0.9985, README)."""
    t = spec.transforms
    quantized = spec.uses_quantized
    nothing = "" if quantized else ", nothing quantized"
    cle: Any = t.cross_layer_equalization
    if cle == "auto":
        per_tensor = isinstance(spec.weights.granularity, PerTensor)
        dw = has_depthwise(model)
        cle, cle_why = (quantized and (per_tensor or dw),
                        "auto: " + ("per-tensor weights" if per_tensor else "depthwise convs" if dw else
                                    "per-channel weights, no depthwise conv") + nothing)
    else:
        cle_why = f"cross_layer_equalization = {str(cle).lower()}"
    sq = t.smoothquant
    sq_choice: Any = sq.alpha if sq is not False else False  # type: ignore[union-attr]
    sq_why = f"smoothquant alpha = {sq.alpha}" if sq is not False else "smoothquant = false"  # type: ignore[union-attr]
    bc: Any = t.bias_correction
    if bc == "auto":
        convs = any(n.op_type == "Conv" for n in model.graph.node)
        bc, bc_why = ("empirical" if quantized and convs else False,
                      "auto: " + ("convolutional model" if convs else "no Conv layer") + nothing)
    else:
        bc_why = f"bias_correction = {bc if bc else 'false'}"
    ada: Any = False
    if t.adaround is False:
        ada_why = "adaround = false"
    elif not quantized:
        ada_why = "nothing is quantized"
    elif spec.weights.bits > 8 or not spec.weights.symmetric or isinstance(spec.weights.granularity, PerGroup):
        ada_why = "adaround: symmetric per-tensor or per-channel weights of 8 bits or fewer only"
    elif t.adaround == "auto":
        import importlib.util

        per_tensor = isinstance(spec.weights.granularity, PerTensor)
        convs = any(n.op_type == "Conv" for n in model.graph.node)
        torch = importlib.util.find_spec("torch") is not None
        if (per_tensor or after_miss) and convs and torch:
            ada, ada_why = AdaRoundSpec().iterations, ("auto: per-tensor weights of a convolutional model"
                                                       if per_tensor else "auto: a convolutional model, tried last "
                                                       "after a missed budget, before any layer is promoted")
        else:
            ada_why = "auto: " + ("per-channel weights (tried only after a missed budget)" if not per_tensor else
                                  "no Conv layer" if not convs else "PyTorch is not installed (it runs AdaRound)")
    else:
        ada = t.adaround.iterations  # type: ignore[union-attr]
        ada_why = f"adaround iterations = {ada}"
    return {"cross_layer_equalization": (cle, cle_why), "smoothquant": (sq_choice, sq_why), "adaround": (ada, ada_why),
            "bias_correction": (bc, bc_why)}


def transform_model(model: Any, spec: QuantSpec, calib: Feeds | None = None,
                    ranges: Mapping[str, Range] | None = None, *, layers: Collection[str] | None = None,
                    max_samples: int = 128, chunk: int = 16, clip_headroom: float = 2.0,
                    simulate_activations: bool | None = None) -> tuple[Any, list[dict[str, Any]]]:
    """Apply ``spec.transforms`` to an FP32 ONNX ModelProto: BatchNorm folding (always), cross-layer
    equalization, SmoothQuant, AdaRound (:mod:`qdeploy.adaround`), then bias correction (last: it corrects for the
    quantization of the final weights). Returns the transformed model and one event per transform: ``transform``, ``applied``,
    ``count`` (layers or pairs changed), ``skipped``, ``reason`` (why it ran or not) and the ``changes``.

    ``calib``: calibration batches, run ``chunk`` samples at a time; CLE through a Clip takes its channel ranges
    from all of them, bias correction and SmoothQuant use the first ``max_samples``. ``ranges`` (tensor -> (lo, hi) of the original
    FP32 model) bound CLE's scales through a Clip when no ``calib`` is given. ``layers``: the node names that will
    be quantized (default all). "auto": CLE runs when weights are per-tensor or the model has depthwise convs;
    AdaRound when weights are per-tensor on a model with a Conv layer and PyTorch is installed; bias correction
    (empirical, sequential) runs on models with a Conv layer. Nothing runs but BN folding when
    the spec quantizes nothing. ``simulate_activations``: sequential bias correction also simulates 8-bit
    activations on the layer inputs (min-max ranges of the model being corrected); default: when the spec's
    activations are static or auto. ``clip_headroom``: see :func:`cross_layer_equalization`."""
    t = spec.transforms
    events: list[dict[str, Any]] = []
    model, ch = fold_batchnorm(model)
    events.append(_event("fold_batchnorm", ch, True, "always (exact)"))
    data = _take(calib, max_samples) if calib is not None else None
    if data:  # every intermediate of a chunk is alive at once in the statistics runs: bound the chunk by its input
        per_sample = sum(v[:1].nbytes for v in data[0].values()) or 1
        chunk = max(1, min(chunk, CHUNK_INPUT_BYTES // per_sample))
    chosen = decide(model, spec)
    cle, why = chosen["cross_layer_equalization"]
    if cle:
        pairs = cle_pairs(model)
        clip_in = {n1.output[0]: (1 if n1.op_type == "Conv" else -1) for n1, act, _ in pairs
                   if act is not None and act.op_type == "Clip"}
        cle_ranges: Mapping[str, Range] | None = ranges
        if clip_in and calib is not None:  # all the calibration data: a clip bound is only as safe as its max
            cle_ranges = dict(channel_ranges(model, calib, clip_in, chunk))
        model, ch = cross_layer_equalization(model, cle_ranges, clip_headroom=clip_headroom)
        events.append(_event("cross_layer_equalization", ch, True, why))
    else:
        events.append(_event("cross_layer_equalization", [], False, why))

    alpha, why = chosen["smoothquant"]
    if alpha is not False and data:
        model, ch = smoothquant(model, data, alpha, chunk=chunk)
        events.append(_event("smoothquant", ch, True, why))
    elif alpha is not False:
        events.append(_event("smoothquant", [], False, "no calibration data"))

    if simulate_activations is None:
        simulate_activations = spec.activations.mode in ("static", "auto")
    iterations, why = chosen["adaround"]
    if iterations and data:
        from .adaround import adaround

        ada_ranges = None
        if simulate_activations:
            ada_ranges = tensor_ranges(model, data, {n.input[0] for n in _layers(_Graph(model), layers)}, chunk)
        model, ch = adaround(model, data, spec.weights, iterations=int(iterations), layers=layers, chunk=chunk,
                             act_ranges=ada_ranges, act_symmetric=spec.activations.symmetric)
        events.append(_event("adaround", ch, True, why + (", activations simulated" if ada_ranges else "")))
    else:
        events.append(_event("adaround", [], False, why + ("" if data or not iterations else ", no calibration data")))

    bc, why = chosen["bias_correction"]
    if bc and data:
        act_ranges = None
        if bc == "empirical" and simulate_activations:
            g = _Graph(model)
            act_ranges = tensor_ranges(model, data, {n.input[0] for n in _layers(g, layers)}, chunk)
        model, ch = bias_correction(model, data, spec.weights, mode=str(bc), act_ranges=act_ranges,
                                    act_symmetric=spec.activations.symmetric, layers=layers, chunk=chunk)
        events.append(_event("bias_correction", ch, True, why + (", activations simulated" if act_ranges else "")))
    else:
        events.append(_event("bias_correction", [], False, why + ("" if data or not bc else ", no calibration data")))
    return model, events


def apply_transforms(model_in: str | Path | Any, model_out: str | Path, spec: QuantSpec, calib: Feeds | None = None,
                     ranges: Mapping[str, Range] | None = None, **kw: Any) -> list[dict[str, Any]]:
    """Load ``model_in`` (a path or ModelProto), :func:`transform_model` it, save to ``model_out``; the events."""
    import onnx

    model = onnx.load(str(model_in)) if isinstance(model_in, (str, Path)) else model_in
    model, events = transform_model(model, spec, calib, ranges, **kw)
    onnx.save(model, str(model_out))
    return events
