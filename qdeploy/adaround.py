"""AdaRound on the ONNX reference: learned weight rounding (Nagel et al. 2020, "Up or Down? Adaptive Rounding for
Post-Training Quantization").

Rounding every weight to the nearest grid point is not what keeps a layer's output closest to FP32's: for each
weighted layer (Conv, Gemm, MatMul with a constant weight), in graph order, AdaRound learns per weight whether to
round down or up, minimising ``||W x - W_q x||^2`` on the layer's own inputs from the calibration data, with a
regulariser that drives every soft rounding variable to 0 or 1 (its exponent annealed from 20 to 2).

The grid itself is searched first: rounding to nearest, each layer's scale (per tensor, or per output channel)
is the fraction of the max-abs range that gives the smallest output error on the sampled inputs (the weights past
it clamp to the grid's ends); AIMET and BRECQ search their weight grids too, on the weights' own error. Per tensor
it matters most: after CLE a depthwise layer's channels still span orders of magnitude, and the narrow ones, whose
inputs CLE made large, get a handful of levels from the widest one's max. Measured on EfficientNet-Lite0, per
tensor, CLE + AdaRound + bias correction as float Q/DQ: top-1 agreement 0.890 -> 0.905 and 1 - cosine 0.0065 ->
0.0050 (percentile calibration; README).

The learned weights are written back *dequantized* (``s * q``, exactly on the grid of the chosen scales) and the
element that sets each scale keeps its nearest rounding (the grid's end), so the scale a backend derives from the
new weights is the one AdaRound used: every backend that quantizes weights symmetrically from their max-abs
(onnxruntime, torch, LiteRT, TensorRT) picks the same integers. Asymmetric and per-group weights are left alone (said in the event).

The inputs are sampled, not kept whole: a Conv's receptive-field patches at random output positions of the first
calibration samples, a Gemm/MatMul's rows; the optimisation runs in torch (imported here only).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

from .errors import QDeployError
from .spec import PerChannel, PerGroup, WeightSpec

log = logging.getLogger("qdeploy.adaround")
ZETA, GAMMA = 1.1, -0.1
"""The rectified sigmoid's stretch: h(V) = clip(sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1)."""
REG_WEIGHT = 0.01
"""The rounding regulariser's weight (the paper's lambda) against the mean squared output error."""
LR = 1e-3
"""Adam's learning rate on the rounding variables. Measured on the small reference CNN (tests/test_transforms.py),
held-out output error of weights alone vs rounding to nearest, 1000 iterations: 0.28x (INT8 per tensor) and 0.62x
(INT4 per channel) on the max-abs grid with this rate and the error through second moments (0.75x and 0.63x with
512-row batches; earlier 0.61x and 0.83x with 1e-2 and the error summed per row); on the searched grid (below)
0.24x and 0.35x of nearest rounding on the max-abs grid."""
WARMUP = 0.2
"""The fraction of the iterations spent on the reconstruction alone before the regulariser starts."""
POSITIONS = 4096
"""Input rows (a Conv's patches at random output positions) sampled per layer."""
BATCH = 512
"""Rows per optimisation step (layers with more than GRAM_MAX_K inputs per output)."""
GRAM_MAX_K = 256
"""Up to this many inputs per output (a depthwise Conv's 9 or 25, a 1x1 Conv's channels), each step measures the
error on every sampled row at once through the rows' K x K second moments (cost out x K^2, not rows x out x K):
exact where a 512-row batch is an estimate, and several times faster on depthwise layers."""


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise QDeployError("transforms.adaround needs PyTorch (install the torch plugin: pip install ./plugins/torch, "
                           "or set adaround = false)") from None
    return torch


def _grid(w: np.ndarray, ws: WeightSpec, axis: int) -> tuple[np.ndarray, int, int]:
    """``(scale broadcastable to w, qmin, qmax)`` of symmetric weights, as :func:`qdeploy.simulate.qparams`."""
    from .simulate import qparams

    if isinstance(ws.granularity, PerChannel) and w.ndim > 1:
        red = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
        s, _, qmin, qmax = qparams(w.min(red, keepdims=True), w.max(red, keepdims=True), ws.bits, True)
    else:
        s, _, qmin, qmax = qparams(w.min(), w.max(), ws.bits, True)
    return np.broadcast_to(s, w.shape).astype(np.float64), qmin, qmax


RANGE_STEPS = np.round(np.arange(1.0, 0.295, -0.02), 2)
"""The fractions of the max-abs range the weight grid search tries (1.0 first: min-max wins ties)."""


def _search_grid(torch: Any, x: np.ndarray, wm: np.ndarray, sm: np.ndarray, qmin: int, qmax: int,
                 groups: int) -> tuple[np.ndarray, np.ndarray]:
    """The scales (``groups x out x K``, as ``sm``) whose grid, rounding to nearest, gives the layer's output on
    the rows ``x`` the smallest squared error: each scale of ``sm`` (max-abs / qmax) times the fraction of
    :data:`RANGE_STEPS` that does best -- one fraction per output channel where the scales are per channel, one
    for the tensor otherwise (the weights past the narrower range clamp to the grid's ends). The error is exact
    over every row through their K x K second moments. Returns the scales and the fractions chosen."""
    X = torch.from_numpy(x).reshape(len(x), groups, -1).double()
    G = torch.einsum("bgk,bgl->gkl", X, X)
    W = torch.from_numpy(wm.astype(np.float64))
    S = torch.from_numpy(np.ascontiguousarray(sm, np.float64))
    per_channel = bool(np.all(sm == sm[..., :1])) and not np.all(sm == sm.flat[0])
    errs = []
    for a in RANGE_STEPS:
        d = (W / (S * a)).round().clamp(qmin, qmax) * (S * a) - W
        e = (torch.einsum("gok,gkl->gol", d, G) * d).sum(-1)  # groups x out
        errs.append(e if per_channel else e.sum().expand_as(e))
    best = torch.stack(errs).argmin(0).numpy()  # groups x out: the first (widest) of equal errors
    frac = RANGE_STEPS[best]
    return sm * frac[..., None], frac


def _patches(xs: list[np.ndarray], node: Any, kernel: tuple[int, ...], rng: np.random.Generator,
             count: int) -> list[np.ndarray]:
    """``count`` receptive-field patches (rows of ``C_in * kh * kw``) of a 2-D Conv at random output positions,
    the same positions in each array of ``xs`` (the FP32 input, and the quantized model's)."""
    from .transforms import _attr

    n, c = xs[0].shape[:2]
    kh, kw = kernel
    sh, sw = _attr(node, "strides", [1, 1])
    dh, dw = _attr(node, "dilations", [1, 1])
    pads = _attr(node, "pads", [0, 0, 0, 0])
    if _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise ValueError("auto_pad")
    h, w = xs[0].shape[2] + pads[0] + pads[2], xs[0].shape[3] + pads[1] + pads[3]
    oh = (h - dh * (kh - 1) - 1) // sh + 1
    ow = (w - dw * (kw - 1) - 1) // sw + 1
    b = rng.integers(0, n, count)
    oy, ox = rng.integers(0, oh, count) * sh, rng.integers(0, ow, count) * sw
    iy = oy[:, None] + dh * np.arange(kh)[None, :]  # count x kh
    ix = ox[:, None] + dw * np.arange(kw)[None, :]  # count x kw
    out = []
    for x in xs:
        xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
        patch = xp[b[:, None, None, None], np.arange(c)[None, :, None, None], iy[:, None, :, None],
                   ix[:, None, None, :]]
        out.append(patch.reshape(count, c * kh * kw).astype(np.float32))
    return out


def _rows(xs: list[np.ndarray], rng: np.random.Generator, count: int) -> list[np.ndarray]:
    """``count`` random rows of a Gemm/MatMul input (every leading axis flattened), the same in each of ``xs``."""
    idx = rng.integers(0, int(np.prod(xs[0].shape[:-1])), count)
    return [x.reshape(-1, x.shape[-1])[idx].astype(np.float32) for x in xs]


def _layer_matrix(w: np.ndarray, node: Any, groups: int) -> np.ndarray:
    """The weight as ``groups x out_per_group x K``: what multiplies an input row of each group."""
    from .transforms import _attr

    if node.op_type == "Conv":
        return w.reshape(groups, w.shape[0] // groups, -1)
    if node.op_type == "Gemm" and _attr(node, "transB", 0):
        return w[None]  # N x K
    return w.T[None]  # MatMul / Gemm without transB: K x N


def _optimise(torch: Any, x: np.ndarray, xq: np.ndarray | None, wm: np.ndarray, sm: np.ndarray, qmin: int,
              qmax: int, groups: int, iterations: int, seed: int) -> np.ndarray:
    """The learned integer grid values (``groups x out x K``) of one layer: its FP32 output on the FP32 rows ``x``
    reconstructed from the rows ``xq`` the quantized model feeds it (``x`` itself when None)."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.from_numpy(x).reshape(len(x), groups, -1)  # rows x groups x K
    Xq = X if xq is None else torch.from_numpy(xq).reshape(len(xq), groups, -1)
    W = torch.from_numpy(wm.astype(np.float32))
    S = torch.from_numpy(sm.astype(np.float32))
    depthwise = W.shape[1] == 1 and groups > 1

    def apply(rows: Any, weights: Any) -> Any:  # rows x groups x out
        if depthwise:  # one output per group: an elementwise product, not thousands of one-column matmuls
            return (rows * weights[:, 0]).sum(-1, keepdim=True)
        return torch.einsum("bgk,gok->bgo", rows, weights)

    base = torch.floor(W / S)
    rest = (W / S - base).clamp(1e-4, 1 - 1e-4)
    V = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).requires_grad_(True)
    opt = torch.optim.Adam([V], lr=LR)
    warm = int(iterations * WARMUP)
    k = W.shape[2]
    if k <= GRAM_MAX_K:
        # the mean squared error over every row at once, through second moments: for each output o of group g,
        # sum_rows (wq.xq - w.x)^2 = wq Gqq wq' - 2 wq Gqx w' + w Gxx w'  (G: K x K per group, built once)
        Xd, Xqd = X.double(), Xq.double()
        Gqq = torch.einsum("bgk,bgl->gkl", Xqd, Xqd)
        Gqx = Gqq if xq is None else torch.einsum("bgk,bgl->gkl", Xqd, Xd)
        Gxx = Gqq if xq is None else torch.einsum("bgk,bgl->gkl", Xd, Xd)
        Wd = W.double()
        const = torch.einsum("gok,gkl,gol->", Wd, Gxx, Wd)
        cross = torch.einsum("gkl,gol->gok", Gqx, Wd).float()  # Gqx w', per output
        Gqq = Gqq.float()
        scale = 1.0 / (len(X) * W.shape[0] * W.shape[1])

        def error(wq: Any) -> Any:
            quad = (torch.einsum("gok,gkl->gol", wq, Gqq) * wq).sum()
            return (quad - 2 * (wq * cross).sum() + const.float()) * scale
    else:
        Y = apply(X, W)

        def error(wq: Any) -> Any:
            idx = torch.randint(0, len(X), (min(BATCH, len(X)),), generator=gen)
            return (apply(Xq[idx], wq) - Y[idx]).pow(2).mean()
    for it in range(iterations):
        h = (torch.sigmoid(V) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)
        wq = S * (base + h).clamp(qmin, qmax)
        loss = error(wq)
        if it >= warm:
            beta = 2 + (20 - 2) * (1 - (it - warm) / max(iterations - warm, 1))
            loss = loss + REG_WEIGHT * (1 - (2 * h - 1).abs().pow(beta)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        up = (torch.sigmoid(V) * (ZETA - GAMMA) + GAMMA).clamp(0, 1) >= 0.5
        return (base + up.to(base.dtype)).clamp(qmin, qmax).numpy().astype(np.float64)


def adaround(model: Any, calib: Sequence[Mapping[str, np.ndarray]], weights: WeightSpec, *, iterations: int = 1000,
             layers: Collection[str] | None = None, chunk: int = 16, seed: int = 0,
             act_ranges: Mapping[str, tuple[float, float]] | None = None,
             act_symmetric: bool = False, search_range: bool = True) -> tuple[Any, list[Any]]:
    """A copy of the FP32 ONNX ``model`` whose weighted layers (all, or the node names in ``layers``) hold
    AdaRound-rounded weights (dequantized onto the spec's symmetric grid), learned on ``calib`` (a list of feeds),
    and the changes (one per layer: its name and the fraction of weights rounded away from nearest).

    With ``act_ranges`` (each layer input's range), a layer's rounding reconstructs its FP32 output from the
    input the quantized model gives it -- the layers above with the roundings already learned, 8-bit activations
    on every layer input -- so it also absorbs the error of the activations and of the layers above (the paper's
    asymmetric reconstruction, layer by layer). ``search_range``: search each layer's grid first
    (:func:`_search_grid`); False keeps the max-abs grid (the baseline the ratios measured at :data:`LR` compare
    with)."""
    from .transforms import (Change, _attr, _chunks, _copy, _Graph, _layers, _name, _quant_axis, _session, _weight,
                             simulate_quantized)

    torch = _torch()
    if weights.bits > 8 or isinstance(weights.granularity, PerGroup) or not weights.symmetric:
        return _copy(model), []
    model = _copy(model)
    g = _Graph(model)
    targets, kernels = [], {}
    for node in _layers(g, layers):
        w = _weight(g, node)
        if w is None or (node.op_type == "Conv" and w.ndim != 4) or (node.op_type != "Conv" and w.ndim != 2) \
                or (node.op_type == "Gemm" and _attr(node, "transA", 0)):
            continue
        targets.append(node)
        kernels[node.output[0]] = tuple(w.shape[2:])
    if not targets:
        return model, []
    inputs = sorted({n.input[0] for n in targets})
    sess = _session(model, inputs)
    feed_names = {i.name for i in sess.get_inputs()}
    chunks = list(_chunks(calib, chunk))
    per_chunk = max(1, POSITIONS // max(len(chunks), 1))

    def sample(xs: list[np.ndarray], node: Any, k: int, c: int) -> list[np.ndarray]:
        rng = np.random.default_rng([seed, k, c])  # the same positions for the FP32 and the quantized input
        return (_patches(xs, node, kernels[node.output[0]], rng, per_chunk) if node.op_type == "Conv"
                else _rows(xs, rng, per_chunk))

    rows: dict[str, list[np.ndarray]] = {n.output[0]: [] for n in targets}
    for c, feed in enumerate(chunks):
        outs = dict(zip(inputs, sess.run(inputs, {k: v for k, v in feed.items() if k in feed_names})))
        for k, node in enumerate(targets):
            if node.output[0] not in rows:
                continue
            try:
                rows[node.output[0]].append(sample([outs[node.input[0]]], node, k, c)[0])
            except (ValueError, IndexError):  # auto_pad, a layout the sampling does not cover: left as it is
                del rows[node.output[0]]
        del outs
    names = [_name(n) for n in targets]
    changes: list[Change] = []
    for k, node in enumerate(targets):
        if not rows.get(node.output[0]):
            continue
        x = np.concatenate(rows.pop(node.output[0]))
        xq = None
        if act_ranges is not None:  # the input the quantized model feeds it, the layers above already rounded
            qmodel = simulate_quantized(model, weights, act_ranges, act_symmetric, names)
            reads = next(n.input[0] for n in qmodel.graph.node if n.output[0] == node.output[0])
            qsess = _session(qmodel, [reads])
            qnames = {i.name for i in qsess.get_inputs()}
            xq = np.concatenate([sample([qsess.run([reads], {n: v for n, v in feed.items() if n in qnames})[0]],
                                        node, k, c)[0] for c, feed in enumerate(chunks)])
            del qsess, qmodel
        w0 = _weight(g, node)
        assert w0 is not None  # a target has a constant weight
        w = w0.astype(np.float64)
        axis = _quant_axis(node, weights)
        s, qmin, qmax = _grid(w, weights, axis)
        # a Conv's groups from its input channels (a depthwise Conv may lack the ``group`` attribute)
        groups = x.shape[1] // int(np.prod(w.shape[1:])) if node.op_type == "Conv" else 1
        if groups < 1 or (node.op_type == "Conv" and w.shape[0] % groups):
            continue
        wm, sm = _layer_matrix(w, node, groups), _layer_matrix(s, node, groups)
        if wm.shape[2] * groups != x.shape[1]:
            continue  # a layout this sampling does not cover
        start = time.perf_counter()
        frac = np.ones(1)
        if search_range:
            sm, frac = _search_grid(torch, x, wm, sm, qmin, qmax, groups)
            s = _back(sm, w, node)
        with torch.enable_grad():
            q = _optimise(torch, x, xq, wm, sm, qmin, qmax, groups, iterations, seed + k)
        log.debug("adaround %s (%d/%d): %d x %d weights, %.1f s", _name(node), k + 1, len(targets),
                  wm.shape[0] * wm.shape[1], wm.shape[2], time.perf_counter() - start)
        q = _back(q, w, node)
        nearest = np.clip(np.round(w / s), qmin, qmax)
        keep = _scale_setters(w, axis, weights)  # these set the scale: their rounding stays nearest
        q[keep] = nearest[keep]
        g.set(node, 1, q * s)
        changes.append({"transform": "adaround", "nodes": [_name(node)],
                        "rounded_away_from_nearest": round(float(np.mean(q != nearest)), 4),
                        "range_fraction": round(float(frac.min()), 2)})
    return model, changes


def _back(q: np.ndarray, w: np.ndarray, node: Any) -> np.ndarray:
    """The inverse of :func:`_layer_matrix`: ``groups x out x K`` back to the weight's own layout."""
    from .transforms import _attr

    if node.op_type == "Conv":
        return q.reshape(w.shape)
    if node.op_type == "Gemm" and _attr(node, "transB", 0):
        return q[0]
    return q[0].T


def _scale_setters(w: np.ndarray, axis: int, ws: WeightSpec) -> np.ndarray:
    """A mask of the elements whose magnitude sets their scale (the max-abs per channel, or of the tensor)."""
    a = np.abs(w)
    if isinstance(ws.granularity, PerChannel) and w.ndim > 1:
        red = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
        return a == a.max(red, keepdims=True)
    return a == a.max()

