"""Layer-wise sensitivity, computed once and cached: which layers hurt the budget output when quantized.

For every layer the table holds two simulated measurements (the core's fake quantization, the spec's exact
numerics, run in onnxruntime) on the budget output: the SQNR with **only that layer** quantized, and the SQNR
with **every quantized layer but that one** (what promoting it alone would give back). Both are measured on the
samples where quantization hurts most — the validation samples with the largest error when every layer is
quantized — not on the mean over all samples. Each row also carries a predicted cost of promoting the layer:
a weighted layer's float weight bytes (the size it adds back); a tensor layer's (an Add, a Concat, an activation x
activation MatMul) float activation bytes per sample (promoting one takes the integer kernel it ran in apart:
dequantize, the float op, quantize again for the next layer, a speed cost that grows with the tensors). Measured on
EfficientNet-Lite0 (onnxruntime, x86-avx2): with a tensor layer's cost taken as zero, the search promoted residual
Adds first and kept an artifact 1.19x FP32 (2 Adds and 6 layers float); priced by activation bytes, the same search
kept every Add INT8 and 7 layers float, 1.31x.

Results are cached as JSON under :func:`cache_dir` keyed by (model sha256, the spec's numerics, the ranges,
the samples, the precision): later deploys, ``qdeploy sensitivity`` and an interrupted deploy reuse them. The
file is rewritten after every layer, so a run killed halfway resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .calibration import ActivationRanges
from .model import ModelHandle
from .spec import QuantSpec

WORST_SAMPLES = 32
"""How many of the worst-hit validation samples the sensitivity is measured on."""

CACHE_FORMAT = 1


def cache_dir() -> Path:
    """``QDEPLOY_CACHE``, else ``$XDG_CACHE_HOME/qdeploy``, else ``~/.cache/qdeploy``."""
    if os.environ.get("QDEPLOY_CACHE"):
        return Path(os.environ["QDEPLOY_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qdeploy"


@dataclass(frozen=True)
class Row:
    layer: str
    op_type: str
    sqnr_only_quantized: float  # dB on the worst samples, only this layer quantized (lower: more sensitive)
    sqnr_all_but_this: float | None  # dB, every layer quantized but this one (higher: promoting it helps more)
    cost_bytes: int  # predicted cost of promoting it: float weight bytes, or activation bytes (tensor layers)


@dataclass
class SensitivityTable:
    key: str
    precision: str
    output: str
    samples: int
    sqnr_all_quantized: float
    rows: dict[str, Row]
    worst: tuple[int, ...] = ()  # indices of the samples measured on, in the inputs given
    seconds: float = 0.0
    cached: bool = False
    target: str = ""  # the profile entry whose resolved spec was simulated

    def ranked(self) -> list[Row]:
        """Most sensitive first: lowest SQNR with only it quantized."""
        return sorted(self.rows.values(), key=lambda r: r.sqnr_only_quantized)

    def as_dict(self) -> dict[str, Any]:
        return {"format": CACHE_FORMAT, "key": self.key, "precision": self.precision, "output": self.output,
                "samples": self.samples, "sqnr_all_quantized": self.sqnr_all_quantized, "seconds": self.seconds,
                "rows": [asdict(r) for r in self.ranked()]}

    def write(self, json_path: Path, csv_path: Path | None = None) -> None:
        json_path.write_text(json.dumps(self.as_dict(), indent=2) + "\n")
        if csv_path is not None:
            lines = ["layer,op_type,sqnr_only_quantized_db,sqnr_all_but_this_db,cost_bytes"]
            lines += [f"{r.layer},{r.op_type},{r.sqnr_only_quantized:.3f},"
                      f"{'' if r.sqnr_all_but_this is None else f'{r.sqnr_all_but_this:.3f}'},{r.cost_bytes}"
                      for r in self.ranked()]
            csv_path.write_text("\n".join(lines) + "\n")


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, np.ndarray):
            h.update(str((p.dtype, p.shape)).encode())
            h.update(np.ascontiguousarray(p).tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def table_key(model: ModelHandle, spec: QuantSpec, ranges: ActivationRanges | None, inputs: Mapping[str, np.ndarray],
              precision: str, both: bool) -> str:
    """What the table depends on: the model, the spec's numerics (weights, activations; not the budget or the
    fallback), the calibrated ranges, the samples, the precision and whether both columns are measured."""
    d = spec.to_dict()
    numerics = {k: d.get(k) for k in ("weights", "activations", "transforms")}
    rng = sorted((k, [float(v) for v in r]) for k, r in ranges.ranges.items()) if ranges else None
    from . import backend, simulate

    code = [hashlib.sha256(Path(m).read_bytes()).hexdigest() for m in (simulate.__file__, backend.__file__, __file__)]
    return _digest(CACHE_FORMAT, __version__, code, model.sha256, numerics, rng, precision, both,
                   *[inputs[k] for k in sorted(inputs)])[:32]


def _sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    from .verify import output_metrics

    return output_metrics(ref, out)["sqnr_db"]


def _promotion_costs(model: ModelHandle) -> dict[str, int]:
    """Each layer's promotion cost in bytes (see the module's doc): its weight's, or, for a layer without a weight,
    the float32 bytes of the activations it reads per sample (unknown dimensions count 1; a shape shape inference
    cannot tell costs as much as the largest weight)."""
    import onnx

    proto = onnx.load(str(model.onnx_path), load_external_data=False)
    sizes = {t.name: int(np.prod(t.dims)) * 4 for t in proto.graph.initializer}
    shapes: dict[str, int] = {}
    if any(not layer.weight for layer in model.layers.values()):
        try:
            g = onnx.shape_inference.infer_shapes(proto).graph
        except Exception:  # noqa: BLE001 - costs fall back to the conservative default
            g = proto.graph
        for vi in list(g.value_info) + list(g.input):
            dims = vi.type.tensor_type.shape.dim
            if vi.type.tensor_type.HasField("shape"):
                shapes[vi.name] = 4 * int(np.prod([d.dim_value if d.dim_value > 0 else 1 for d in dims]))
    largest = max(sizes.values(), default=0)
    out = {}
    for name, layer in model.layers.items():
        if layer.weight:
            out[name] = sizes.get(layer.weight, 0)
        else:
            acts = layer.activations or (layer.input,)
            out[name] = sum(shapes.get(t, largest) for t in acts)
    return out


def compute(model: ModelHandle, spec: QuantSpec, ranges: ActivationRanges | None, layers: Iterable[str],
            inputs: Mapping[str, np.ndarray], reference: np.ndarray, output: str, precision: str = "int8",
            both: bool = False, cache: bool = True, progress: Callable[[int, int], None] | None = None,
            threads: int = 1, worst: Iterable[int] | None = None) -> SensitivityTable:
    """The sensitivity table of ``layers`` (see the module's doc), from the cache when it holds it (and
    completed with the layers it lacks). ``reference`` is the FP32 output ``output`` on ``inputs``. ``worst``:
    measure on these sample indices (another table's ``worst``, to compare two precisions on the same
    samples) instead of finding the worst-hit ones."""
    import onnx

    from .backend import OrtRunner
    from .simulate import ORT_FP8_DISABLED_OPTIMIZERS, simulated_model
    from .verify import run_all

    layers = list(layers)
    start = time.perf_counter()
    disabled = ORT_FP8_DISABLED_OPTIMIZERS if precision == "fp8" else ()
    with tempfile.TemporaryDirectory(prefix="qdeploy-sens-") as tmp:
        path = Path(tmp) / "sim.onnx"

        def run(quantized: list[str], feed: Mapping[str, np.ndarray]) -> np.ndarray:
            onnx.save(simulated_model(model, spec, ranges, quantized, precision), str(path))
            runner = OrtRunner(path, threads=threads, disabled_optimizers=disabled, basic_only=True)
            try:
                return run_all(runner, feed)[output]
            finally:
                runner.close()

        if worst is None:  # the samples where quantizing every layer hurts most
            full = run(layers, inputs)
            n = len(reference)
            err = np.sum((full.reshape(n, -1).astype(np.float64) - reference.reshape(n, -1)) ** 2, axis=1)
            err /= np.maximum(np.sum(reference.reshape(n, -1).astype(np.float64) ** 2, axis=1), 1e-30)
            idx = np.sort(np.argsort(-err, kind="stable")[:WORST_SAMPLES])
            all_q = _sqnr(reference[idx], full[idx])
        else:
            idx, all_q = np.asarray(list(worst), dtype=np.int64), float("nan")
        feed = {k: v[idx] for k, v in inputs.items()}
        ref = reference[idx]
        key = table_key(model, spec, ranges, feed, precision, both)
        file = cache_dir() / "sensitivity" / f"{key}.json"
        done: dict[str, Row] = {}
        if cache and file.is_file():
            try:
                data = json.loads(file.read_text())
                done = {r["layer"]: Row(**r) for r in data.get("rows", []) if r["layer"] in model.layers}
            except (OSError, ValueError, TypeError, KeyError):
                done = {}
        cached = bool(done) and all(name in done for name in layers)
        table = SensitivityTable(key, precision, output, len(idx), all_q, done, tuple(int(i) for i in idx),
                                 cached=cached)
        todo = [name for name in layers if name not in done]
        costs = _promotion_costs(model) if todo else {}
        for i, name in enumerate(todo):
            only = _sqnr(ref, run([name], feed))
            but = _sqnr(ref, run([m for m in layers if m != name], feed)) if both else None
            table.rows[name] = Row(name, model.layers[name].op_type, only, but, costs.get(name, 0))
            if cache:  # after every layer: an interrupted run resumes from here
                _save(file, table)
            if progress:
                progress(i + 1, len(todo))
    table.seconds = time.perf_counter() - start
    return table


def _save(file: Path, table: SensitivityTable) -> None:
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(table.as_dict()))
        tmp.replace(file)
    except OSError:  # a read-only cache folder costs the reuse, never the deploy
        pass
