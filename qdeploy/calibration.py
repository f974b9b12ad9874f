"""Calibration and validation data, and the observers that turn data into activation ranges.

Data comes from a folder of ``.npy``/``.npz`` files, one ``.npz``, arrays, or any Python iterable; it is
checked against the model's inputs (shape, dtype, NaN/Inf) and served in batches. An ``.npz`` holds one array
per model input keyed by input name (a single-input model takes any one array) and labels under ``y``.

Observers (min-max, moving average, percentile, entropy/KL, MSE) are updated batch by batch, so memory stays
bounded by one batch of activations plus a fixed-size histogram per tensor.
"""
from __future__ import annotations

import math
import re
import tempfile
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError
from .model import ModelHandle
from .spec import ActivationSpec, CalibrationSpec

LABEL_KEY = "y"
Batch = tuple[dict[str, np.ndarray], "np.ndarray | None"]
Chunk = tuple[dict[str, np.ndarray], "np.ndarray | None", str]  # a Batch and where it came from (a file)


# --- data ---------------------------------------------------------------------------------------------------
class Dataset:
    """Validated, re-iterable batches of named model inputs with optional labels.

    ``chunks`` yields ``(inputs, labels)`` or ``(inputs, labels, where)``, ``where`` naming the chunk's source
    (a file of a folder) so that errors point into it. Every sample given is checked once, on creation (shape,
    dtype, NaN/Inf, streamed chunk by chunk), even the ones past ``limit`` that will not be used."""

    def __init__(self, chunks: Callable[[], Iterator[Any]], model: ModelHandle, name: str,
                 batch_size: int = 32, limit: int | None = None, checked: bool = False,
                 hint: str = "Fix the data layout (e.g. NCHW vs NHWC) or --input-shape") -> None:
        self._chunks, self.model, self.name = chunks, model, name
        self.batch_size, self.limit = batch_size, limit
        self.has_labels = False
        total = 0
        for item in chunks():  # one full pass over everything given: shapes, dtypes, finiteness, size
            x, y, where = item if len(item) == 3 else (*item, None)
            if not checked:
                x = check_inputs(model, x, where or name, hint=hint)
            n = len(next(iter(x.values())))
            if y is not None:
                _labels(np.asarray(y).reshape(-1), n, name)
            total += n
        self.count = total if limit is None else min(total, limit)
        if self.count == 0:
            raise DataError(f"{name}: no samples (the data is empty)")

    def batches(self, batch_size: int | None = None) -> Iterator[Batch]:
        """Yield ``(inputs, labels)`` batches of at most ``batch_size`` samples."""
        size = batch_size or self.batch_size
        seen = 0
        buf_x: list[dict[str, np.ndarray]] = []
        buf_y: list[np.ndarray | None] = []
        for item in self._chunks():
            x, y = item[0], item[1]
            x = _as_model_inputs(self.model, x)
            n = len(next(iter(x.values())))
            if y is not None:
                y = _labels(np.asarray(y).reshape(-1), n, self.name)
            if self.limit is not None:
                n = min(n, self.limit - seen)
                x = {k: v[:n] for k, v in x.items()}
                y = None if y is None else y[:n]
            start = 0
            while start < n:  # fill the buffer up to exactly `size` samples, then yield it
                have = sum(len(next(iter(b.values()))) for b in buf_x)
                take = min(size - have, n - start)
                buf_x.append({k: v[start:start + take] for k, v in x.items()})
                buf_y.append(None if y is None else y[start:start + take])
                start += take
                if have + take == size:
                    yield _merge(buf_x, buf_y)
                    buf_x, buf_y = [], []
            seen += n
            if self.limit is not None and seen >= self.limit:
                break
        if buf_x:
            yield _merge(buf_x, buf_y)

    def digest(self) -> str:
        """sha256 of the samples used (inputs and labels, in order): what a cache of results computed from this
        data is keyed by."""
        import hashlib

        h = hashlib.sha256(str(self.limit).encode())
        for x, y in self.batches():
            for k in sorted(x):
                h.update(k.encode() + str((x[k].dtype, x[k].shape[1:])).encode())
                h.update(np.ascontiguousarray(x[k]).tobytes())
            if y is not None:
                h.update(np.ascontiguousarray(y).tobytes())
        return h.hexdigest()

    def arrays(self) -> Batch:
        """All samples at once (for validation sets, which are small)."""
        parts = list(self.batches(max(self.count, 1)))  # one part: in-memory data comes back uncopied
        return _merge([p[0] for p in parts], [p[1] for p in parts])


SCAN_SAMPLES = 256
"""Samples checked for NaN/Inf at a time: the check's memory stays one chunk, whatever the file's size."""

SHAPE_HINT = "Fix the data layout (e.g. NCHW vs NHWC) or --input-shape"


def _as_model_inputs(model: ModelHandle, x: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The model's inputs from ``x``: a single sample gains its batch axis; dtypes become the model's."""
    out = {}
    for info in model.inputs:
        arr = np.asarray(x[info.name])
        if arr.ndim == len(info.shape) - 1:
            arr = arr[None]
        out[info.name] = arr.astype(info.dtype, copy=False)
    return out


def check_inputs(model: ModelHandle, x: Mapping[str, Any], where: str,
                 hint: str = SHAPE_HINT) -> dict[str, np.ndarray]:
    """Check every sample of ``x`` against the model's inputs: names, dtypes, shapes and NaN/Inf (streamed in
    :data:`SCAN_SAMPLES`-sample chunks). Errors name ``where`` (the file) and the sample's index in it."""
    for info in model.inputs:
        if info.name not in x:
            raise DataError(f"{where}: no array for model input {info.name!r}; found {sorted(x)}. Key each array "
                            f"by its input name")
        arr = np.asarray(x[info.name])
        if arr.dtype.kind not in "fiub":
            raise DataError(f"{where}: input {info.name!r} has dtype {arr.dtype}; expected numbers ({info.dtype})")
        if arr.ndim == len(info.shape) - 1:
            arr = arr[None]
        want = info.shape[1:]
        if arr.ndim != len(info.shape) or any(w is not None and w != g for w, g in zip(want, arr.shape[1:])):
            shown = "x".join("N" if d is None else str(d) for d in info.shape)
            raise DataError(f"{where}: input {info.name!r} has samples of shape "
                            f"{'x'.join(map(str, arr.shape[1:]))} (array {arr.shape}); the model takes "
                            f"{shown}. {hint}")
        if arr.dtype.kind == "f":
            first, count = -1, 0
            for start in range(0, len(arr), SCAN_SAMPLES):
                part = arr[start:start + SCAN_SAMPLES].astype(info.dtype, copy=False)
                bad_rows = ~np.isfinite(part).reshape(len(part), -1).all(axis=1)
                if bad_rows.any():
                    first = first if first >= 0 else start + int(np.argmax(bad_rows))
                    count += int(bad_rows.sum())
            if count:
                raise DataError(f"{where}: input {info.name!r} holds NaN or Inf in {count} of its {len(arr)} "
                                f"samples (the first is sample {first}, counting from 0 in that file); remove or "
                                f"clean those samples")
    return {info.name: (np.asarray(x[info.name])[None] if np.ndim(x[info.name]) == len(info.shape) - 1
                        else np.asarray(x[info.name])) for info in model.inputs}  # dtypes converted per batch


def _merge(xs: list[dict[str, np.ndarray]], ys: list) -> Batch:
    if len(xs) == 1:  # one part: no copy (a slice of the caller's arrays)
        return xs[0], ys[0]
    x = {k: np.concatenate([b[k] for b in xs]) for k in xs[0]}
    y = None if any(v is None for v in ys) else np.concatenate(ys)
    return x, y


def open_data(source: Any, model: ModelHandle, role: str, cal: CalibrationSpec | None = None,
              limit: int | None = None, hint: str = SHAPE_HINT) -> Dataset | None:
    """A :class:`Dataset` from a path (folder of .npy/.npz, one .npz or .npy), arrays, or an iterable.

    For calibration (``cal`` given) from arrays or one file, ``cal.samples`` samples are drawn with
    ``cal.seed``, the same number per class when labels exist and ``cal.balanced`` is set. Folders and iterables
    are streamed: their first ``cal.samples`` samples are used, files in natural order (``s2`` before ``s10``).
    """
    if source is None:
        return None
    name = f"{role} data {source}" if isinstance(source, (str, Path)) else f"{role} data"
    batch = cal.batch_size if cal else 32
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise DataError(f"{role} data {path} does not exist")
        if path.is_dir():
            files = sorted((p for p in path.iterdir() if p.suffix in (".npy", ".npz") and p.stem not in ("y", "labels")),
                           key=_natural_key)
            if not files:
                raise DataError(f"{role} folder {path} holds no .npy or .npz files")
            label_file = next((path / f for f in ("y.npy", "labels.npy") if (path / f).is_file()), None)
            chunks = _folder_chunks(files, model, label_file, name)
            return Dataset(chunks, model, name, batch, limit or (cal.samples if cal else None), hint=hint)
        if path.suffix not in (".npz", ".npy"):
            raise DataError(f"{role} data {path}: use a .npz file, a .npy file or a folder of them")
        try:
            loaded = np.load(path, allow_pickle=False)
            arrays = dict(loaded) if path.suffix == ".npz" else {"": loaded}
        except Exception as exc:
            raise DataError(f"{role} data {path} cannot be read: {exc}") from None
        x, y = _name_arrays(arrays, model, name)
    elif isinstance(source, np.ndarray) or isinstance(source, dict):
        x, y = _name_arrays(source if isinstance(source, dict) else {"": source}, model, name)
    elif isinstance(source, Iterable):
        return _iterable_dataset(source, model, name, batch, limit or (cal.samples if cal else None))
    else:
        raise DataError(f"{role} data: cannot read a {type(source).__name__}; pass a folder, .npz/.npy, arrays or "
                        f"an iterable")
    first = next(iter(x.values()))
    if first.ndim == 0:
        raise DataError(f"{name}: holds a single number, not samples; give an array of shape N x "
                        f"{'x'.join('?' if d is None else str(d) for d in model.inputs[0].shape[1:])}")
    x = check_inputs(model, x, name, hint=hint)  # every sample given, before any subset is drawn
    n = len(next(iter(x.values())))
    if n == 0:
        raise DataError(f"{name}: no samples (the arrays are empty)")
    if y is not None:
        y = _labels(y, n, name)
    if cal is not None:
        idx = select(n, cal, y)
        x = {k: v[idx] for k, v in x.items()}
        y = None if y is None else y[idx]
    return Dataset(lambda: iter([(x, y)]), model, name, batch, limit, checked=True)


def select(n: int, cal: CalibrationSpec, labels: np.ndarray | None) -> np.ndarray:
    """Indices of the calibration subset: ``cal.samples`` drawn with ``cal.seed``, balanced across classes."""
    rng = np.random.default_rng(cal.seed)
    k = min(n, cal.samples)
    if labels is None or not cal.balanced or k == n:
        return np.sort(rng.permutation(n)[:k])
    classes = np.unique(labels)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    picked: list[int] = []
    r = 0
    while len(picked) < k:  # round robin over classes: equal counts as long as each class has samples
        for idx in per_class:
            if r < len(idx) and len(picked) < k:
                picked.append(int(idx[r]))
        r += 1
    return np.sort(np.array(picked))


def _labels(y: Any, n: int, name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or y.dtype.kind not in "iub":
        raise DataError(f"{name}: labels under {LABEL_KEY!r} must be integer class indices, one per sample (shape "
                        f"({n},)); got {y.dtype} of shape {y.shape}")
    if len(y) != n:
        raise DataError(f"{name}: {len(y)} labels for {n} samples; give one label per sample")
    if len(y) and y.min() < 0:
        raise DataError(f"{name}: label {int(y.min())} is negative; labels are class indices 0..C-1")
    return y


def check_label_range(y: np.ndarray | None, classes: int, name: str) -> None:
    """Labels must index the model's ``classes`` outputs: a label set for another model would score 0."""
    if y is None or not len(y):
        return
    top = int(y.max())
    if top >= classes:
        raise DataError(f"{name}: label {top} is out of range for a model with {classes} output classes "
                        f"(labels are 0..{classes - 1}); are these the labels of this model's data?")


def _natural_key(path: Path) -> list:
    """``s2`` before ``s10``: labels in ``y.npy`` follow the files in this order."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _name_arrays(arrays: dict[str, Any], model: ModelHandle, name: str) -> Batch:
    arrays = dict(arrays)
    y = arrays.pop(LABEL_KEY, None)
    names = [i.name for i in model.inputs]
    if len(names) == 1 and names[0] not in arrays:
        if len(arrays) != 1:
            raise DataError(f"{name}: holds arrays {sorted(arrays)}; for this single-input model give one array "
                            f"(or one keyed {names[0]!r}) plus optional labels under {LABEL_KEY!r}")
        arrays = {names[0]: next(iter(arrays.values()))}
    missing = [n for n in names if n not in arrays]
    if missing:
        raise DataError(f"{name}: no array for model input(s) {missing}; found {sorted(arrays)}")
    return {n: np.asarray(arrays[n]) for n in names}, (None if y is None else np.asarray(y))


def _iterable_dataset(source: Iterable, model: ModelHandle, name: str, batch: int, limit: int | None) -> Dataset:
    """Items are arrays, dicts of arrays, or ``(inputs, labels)`` pairs. A one-shot iterator (a generator) is
    kept in memory up to ``limit`` samples so it can be read more than once; a re-iterable is re-read."""

    def parse(item: Any) -> Batch:
        if isinstance(item, tuple) and len(item) == 2:
            x = item[0] if isinstance(item[0], dict) else {"": item[0]}
            return _name_arrays(x, model, name)[0], item[1]
        return _name_arrays(item if isinstance(item, dict) else {"": item}, model, name)

    if iter(source) is source:
        kept, seen = [], 0
        for item in source:
            x, y = parse(item)
            kept.append((x, y))
            seen += len(next(iter(x.values())))
            if limit is not None and seen >= limit:
                break
        return Dataset(lambda: iter(kept), model, name, batch, limit)
    return Dataset(lambda: (parse(item) for item in source), model, name, batch, limit)


def _folder_chunks(files: list[Path], model: ModelHandle, label_file: Path | None,
                   name: str) -> Callable[[], Iterator[Chunk]]:
    labels = None
    if label_file is not None:
        try:
            labels = np.load(label_file, allow_pickle=False).reshape(-1)
        except Exception as exc:
            raise DataError(f"{name}: labels file {label_file.name} cannot be read: {exc}") from None

    def chunks() -> Iterator[Chunk]:
        offset = 0
        for f in files:
            try:
                loaded = np.load(f, allow_pickle=False)
                arrays = dict(loaded) if f.suffix == ".npz" else {"": loaded}
            except Exception as exc:
                raise DataError(f"{name}: {f.name} cannot be read: {exc}") from None
            x, y = _name_arrays(arrays, model, f"{name}/{f.name}")
            n = len(next(iter(x.values())))
            first = model.inputs[0]
            if x[first.name].ndim == len(first.shape) - 1:
                n = 1
            if y is None and labels is not None:
                y = labels[offset:offset + n]
            offset += n
            yield x, y, f"{name}/{f.name}"
    return chunks


# --- observers ----------------------------------------------------------------------------------------------
class Observer:
    """Tracks one tensor's statistics over batches and proposes a quantization range ``(lo, hi)``."""

    def update(self, x: np.ndarray) -> None:
        raise NotImplementedError

    def range(self) -> tuple[float, float]:
        raise NotImplementedError


class MinMaxObserver(Observer):
    def __init__(self) -> None:
        self.lo, self.hi = math.inf, -math.inf

    def update(self, x: np.ndarray) -> None:
        self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))

    def range(self) -> tuple[float, float]:
        return self.lo, self.hi


class MovingAverageObserver(Observer):
    """Exponential moving average of each batch's min and max: ``r = momentum*r + (1-momentum)*batch``."""

    def __init__(self, momentum: float) -> None:
        self.momentum = momentum
        self.lo: float | None = None
        self.hi: float | None = None

    def update(self, x: np.ndarray) -> None:
        lo, hi = float(x.min()), float(x.max())
        m = self.momentum
        self.lo = lo if self.lo is None else m * self.lo + (1 - m) * lo
        self.hi = hi if self.hi is None else m * self.hi + (1 - m) * hi

    def range(self) -> tuple[float, float]:
        assert self.lo is not None and self.hi is not None, "range() before any update()"
        return self.lo, self.hi


class HistogramObserver(Observer):
    """A streaming histogram over [-R, R] (``bins`` even). When data exceeds R, R doubles (as often as needed)
    and neighbouring bins merge exactly, so the histogram never needs a second pass over the data."""

    def __init__(self, bins: int = 2048) -> None:
        self.bins, self.radius = bins, 0.0
        self.hist = np.zeros(bins, dtype=np.float64)
        self.lo, self.hi = math.inf, -math.inf

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32).ravel()
        lo, hi = float(x.min()), float(x.max())
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        peak = max(abs(lo), abs(hi), 1e-12)
        if self.radius == 0.0:
            self.radius = 2.0 ** math.ceil(math.log2(peak))
        while peak > self.radius:
            self._double()
        self.hist += np.histogram(x, bins=self.bins, range=(-self.radius, self.radius))[0]

    def _double(self) -> None:
        merged = self.hist.reshape(-1, 2).sum(axis=1)  # bin pairs merge into the middle half of the new range
        q = self.bins // 4
        self.hist = np.zeros(self.bins)
        self.hist[q:q + len(merged)] = merged
        self.radius *= 2.0

    @property
    def centers(self) -> np.ndarray:
        w = 2 * self.radius / self.bins
        return -self.radius + w * (np.arange(self.bins) + 0.5)

    def range(self) -> tuple[float, float]:
        return self.lo, self.hi


class PercentileObserver(HistogramObserver):
    """Clips both tails at the ``percentile`` (e.g. 99.99 keeps all but the most extreme 0.01% per side)."""

    def __init__(self, percentile: float) -> None:
        super().__init__()
        self.p = percentile

    def range(self) -> tuple[float, float]:
        cdf = np.cumsum(self.hist) / self.hist.sum()
        edges = np.linspace(-self.radius, self.radius, self.bins + 1)
        tail = 1.0 - self.p / 100.0
        lo = edges[np.searchsorted(cdf, tail, side="left")]
        hi = edges[min(int(np.searchsorted(cdf, 1.0 - tail, side="left")) + 1, self.bins)]
        return max(self.lo, float(lo)), min(self.hi, float(hi))


class EntropyObserver(HistogramObserver):
    """KL-divergence threshold search on |x| (TensorRT's entropy calibration): the clipping threshold whose
    128-level quantized distribution loses the least information."""

    def __init__(self, levels: int = 128, stride: int = 4) -> None:
        super().__init__()
        self.levels, self.stride = levels, stride

    def range(self) -> tuple[float, float]:
        half = self.bins // 2
        absh = self.hist[half:] + self.hist[:half][::-1]
        # the zero bin holds every ReLU zero: left as is, that spike dominates the divergence and the search picks
        # a threshold far inside the data (EfficientNet-Lite0's ReLU6 outputs got (0, 1.84), top-1 agreement ~0).
        # As NVIDIA's pytorch-quantization does, it counts as much as its neighbour.
        absh[0] = absh[1]
        width = self.radius / half
        best_i, best_kl = half, math.inf
        for i in range(self.levels, half + 1, self.stride):
            p = absh[:i].copy()
            p[i - 1] += absh[i:].sum()  # outliers clip into the last bin
            if p.sum() == 0:
                continue
            chunks = np.array_split(np.arange(i), self.levels)
            q = np.zeros(i)
            for c in chunks:
                nz = absh[c] > 0
                if nz.any():
                    q[c[nz]] = absh[c].sum() / nz.sum()
            ps, qs = p / p.sum(), q / max(q.sum(), 1e-12)
            mask = ps > 0
            kl = float(np.sum(ps[mask] * np.log(ps[mask] / np.maximum(qs[mask], 1e-12))))
            if kl < best_kl:
                best_kl, best_i = kl, i
        t = best_i * width
        return max(self.lo, -t), min(self.hi, t)


class MSEObserver(HistogramObserver):
    """The clipping range (a shrink factor of [min, max]) that minimises the expected squared quantization
    error of the observed distribution, for 8-bit affine quantization."""

    def __init__(self, symmetric: bool, qlevels: int = 255, candidates: int = 64) -> None:
        super().__init__()
        self.symmetric, self.qlevels, self.candidates = symmetric, qlevels, candidates

    def range(self) -> tuple[float, float]:
        c, n = self.centers, self.hist
        keep = n > 0
        c, n = c[keep], n[keep]
        lo0, hi0 = min(self.lo, 0.0), max(self.hi, 0.0)
        if self.symmetric:
            m = max(-lo0, hi0)
            lo0, hi0 = -m, m
        best, best_err = (lo0, hi0), math.inf
        for k in np.linspace(0.2, 1.0, self.candidates):
            lo, hi = lo0 * k, hi0 * k
            scale = max(hi - lo, 1e-12) / self.qlevels
            zp = np.round(-lo / scale)
            deq = (np.clip(np.round(c / scale) + zp, 0, self.qlevels) - zp) * scale
            err = float(np.sum(n * (c - deq) ** 2))
            if err < best_err:
                best_err, best = err, (lo, hi)
        return max(self.lo, best[0]), min(self.hi, best[1])


def make_observer(act: ActivationSpec) -> Observer:
    return {"minmax": MinMaxObserver, "moving_average": lambda: MovingAverageObserver(act.momentum),
            "percentile": lambda: PercentileObserver(act.percentile), "entropy": EntropyObserver,
            "mse": lambda: MSEObserver(act.symmetric)}[act.method]()


# --- range collection on the FP32 reference ------------------------------------------------------------------
MASK_MAGNITUDE = 1e30
"""Values this large are fill values (``finfo.min`` in attention masks), not data: a range over them would
give a scale that zeroes everything else, so their tensor stays float, like one holding inf or NaN."""
QDQ_OPS = frozenset({
    "Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Sub", "Concat", "Relu", "Clip", "LeakyRelu",
    "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "MaxPool", "AveragePool", "GlobalAveragePool", "Resize",
    "Softmax", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Split", "Slice", "Pad", "Gather",
    "Where", "LayerNormalization", "InstanceNormalization", "BatchNormalization", "ReduceMean", "Div", "Erf",
    "Gelu", "Pow", "Sqrt", "LSTM", "GRU", "Expand", "Tile", "ArgMax", "DepthToSpace", "SpaceToDepth"})
"""Op types whose float inputs and outputs the observers calibrate: the union of what any backend may put
Q/DQ pairs around. Shape arithmetic (Shape, Cast, Range, ConstantOfShape, comparisons) is never observed."""
CALIBRATION_BUDGET_BYTES = 256 << 20
"""The most bytes of exposed activations one calibration run may hold at once (sets the batch size)."""


@dataclass
class ActivationRanges:
    """Calibrated ``(lo, hi)`` per activation tensor of the reference ONNX (by tensor name).

    ``nonfinite`` names tensors that held inf, NaN or mask fill values on the calibration data, with what was
    seen: they have no range and stay float in every backend (a range is finite, or there is none)."""

    method: str
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    samples: int = 0
    nonfinite: dict[str, str] = field(default_factory=dict)

    def get(self, tensor: str) -> tuple[float, float]:
        if tensor not in self.ranges:
            raise KeyError(f"no calibrated range for tensor {tensor!r}")
        return self.ranges[tensor]


def activation_tensors(proto: Any) -> list[str]:
    """Names of the float activation tensors that a backend may quantize: the inputs and outputs of the
    graph's :data:`QDQ_OPS` nodes that are not initializers."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    inits = {t.name for t in proto.graph.initializer}
    names = [t for n in proto.graph.node if n.op_type in QDQ_OPS for t in list(n.input) + list(n.output)]
    return [n for n in dict.fromkeys(names) if n and n not in inits and types.get(n) == onnx.TensorProto.FLOAT]


def _describe_nonfinite(x: np.ndarray) -> str:
    kinds = [k for k, m in (("-inf", np.isneginf(x)), ("+inf", np.isposinf(x)), ("NaN", np.isnan(x)),
                            (f"|x| >= {MASK_MAGNITUDE:g}", np.isfinite(x) & (np.abs(x) >= MASK_MAGNITUDE)))
             if m.any()]
    return f"holds {', '.join(kinds)} on calibration data (an attention-mask fill, typically)"


def collect_ranges(model: ModelHandle, data: Dataset, act: ActivationSpec,
                   progress: Callable[[int, int], None] | None = None) -> ActivationRanges:
    """Run the FP32 reference over ``data`` with the quantizable activations exposed and feed the observers.

    Memory stays bounded: the batch is sized so the exposed activations of one run fit
    :data:`CALIBRATION_BUDGET_BYTES`; empty tensors are skipped; a tensor that holds inf, NaN or a mask fill
    value is dropped from observation at once and reported in ``nonfinite``."""
    import onnx

    from .backend import OrtRunner

    proto = onnx.load(str(model.onnx_path))
    tensors = activation_tensors(proto)
    existing = {o.name for o in proto.graph.output}
    for t in tensors:
        if t not in existing:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    observers: dict[str, Observer] = {}
    nonfinite: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="qdeploy-calib-") as tmp:
        path = Path(tmp) / "augmented.onnx"
        onnx.save(proto, str(path))
        del proto
        runner = OrtRunner(path)
        first, _ = next(data.batches(1))
        out = runner.infer(first)  # one sample sizes the batch: its exposed activations x batch fit the budget
        per_sample = sum(out[t].nbytes for t in tensors) or 1
        batch = max(1, min(data.batch_size, CALIBRATION_BUDGET_BYTES // per_sample))
        _observe(out, tensors, observers, nonfinite, act)
        del out
        done = 1
        for x, _ in _skip_first(data.batches(batch), 1):
            _observe(runner.infer(x), tensors, observers, nonfinite, act)
            done += len(next(iter(x.values())))
            if progress:
                progress(done, data.count)
        runner.close()
    found = {t: o.range() for t, o in observers.items() if t not in nonfinite}
    return ActivationRanges(act.method, {t: (float(lo), float(hi)) for t, (lo, hi) in found.items()}, done,
                            nonfinite)


def _skip_first(batches: Iterator[Batch], n: int) -> Iterator[Batch]:
    """The batches after the first ``n`` samples (the one that sized the batch)."""
    for x, y in batches:
        k = len(next(iter(x.values())))
        if n >= k:
            n -= k
            continue
        if n:
            x, y = {a: v[n:] for a, v in x.items()}, None if y is None else y[n:]
            n = 0
        yield x, y


def _observe(out: dict[str, np.ndarray], tensors: list[str], observers: dict[str, Observer],
             nonfinite: dict[str, str], act: ActivationSpec) -> None:
    """Feed one run's outputs to the observers (empty tensors are skipped: there is nothing to range)."""
    for t in tensors:
        if t in nonfinite:
            continue
        v = out[t]
        if v.size == 0:
            continue
        if not np.isfinite(v).all() or np.abs(v).max() >= MASK_MAGNITUDE:
            nonfinite[t] = _describe_nonfinite(v)
            observers.pop(t, None)
            continue
        if t not in observers:
            observers[t] = make_observer(act)
        observers[t].update(v)


def unranged_layers(layers: Mapping[str, Any], precisions: Mapping[str, str], ranges: ActivationRanges | None,
                    quantized: Collection[str]) -> dict[str, str]:
    """Layers set to a ``quantized`` precision one of whose activations (inputs or output) has no finite
    range, with why: they must stay float in every backend (a scale computed from inf is inf)."""
    if ranges is None:
        return {}
    out = {}
    for name, layer in layers.items():
        if precisions.get(name) not in quantized:
            continue
        missing = [t for t in (*(layer.activations or (layer.input,)), layer.output) if t not in ranges.ranges]
        if missing:
            why = ranges.nonfinite.get(missing[0], "was empty or never observed on the calibration data")
            out[name] = f"its activation {missing[0]} {why}: no finite range, so it stays float"
    return out
