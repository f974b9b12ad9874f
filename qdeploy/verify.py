"""Verification: compare an artifact's outputs with the FP32 reference, per output, and check the budget.

Backends run models; this module compares (Polygraphy's split). Metrics per output: ``max_abs``,
``mean_abs``, ``cosine`` (mean per-sample cosine similarity), ``sqnr_db``, and for classifier outputs
(``[N, C]`` with C > 1, not an L2-normalised embedding: see :func:`is_classifier`) ``top1_agreement``, plus
``top1_accuracy`` when labels are given, plus any metric a plugin registered.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .backend import Runner
from .errors import DataError
from .spec import HIGHER_IS_BETTER, Budget

SQNR_CAP_DB = 300.0
"""SQNR of identical outputs is infinite; it is reported as this cap so manifests stay valid JSON."""


def is_classifier(arr: np.ndarray) -> bool:
    """A batch of class scores: 2-D with more than one column, and not an embedding -- rows of unit L2 norm
    with signed values (a sentence encoder's L2-normalised output has no "top-1 class")."""
    if arr.ndim != 2 or arr.shape[1] <= 1:
        return False
    if arr.size and arr.min() < 0:
        norms = np.linalg.norm(arr.astype(np.float64), axis=1)
        if np.allclose(norms, 1.0, atol=1e-3):
            return False
    return True


def recorded_gap(got: np.ndarray, want: np.ndarray, rtol: float = 0.05) -> tuple[float, float]:
    """``(max abs difference, tolerance)`` of outputs against the outputs recorded when the artifact was
    verified: the tolerance is ``rtol`` of the recorded outputs' largest magnitude (plus 1e-6)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = float(np.max(np.abs(got - want))) if want.size else 0.0
    return err, 1e-6 + rtol * (float(np.max(np.abs(want))) if want.size else 0.0)


def output_metrics(ref: np.ndarray, out: np.ndarray, labels: np.ndarray | None = None,
                   extra: Mapping[str, Callable[..., float]] | None = None) -> dict[str, float]:
    """All metrics for one output: the reference and the candidate arrays of the same samples."""
    ref = np.asarray(ref, dtype=np.float64)
    out = np.asarray(out, dtype=np.float64)
    if ref.shape != out.shape:
        raise DataError(f"output shape {out.shape} differs from the reference's {ref.shape}")
    diff = np.abs(ref - out)
    r2 = ref.reshape(len(ref), -1) if ref.ndim else ref.reshape(1, -1)
    o2 = out.reshape(len(out), -1) if out.ndim else out.reshape(1, -1)
    denom = np.linalg.norm(r2, axis=1) * np.linalg.norm(o2, axis=1)
    nr, no = np.linalg.norm(r2, axis=1), np.linalg.norm(o2, axis=1)
    # two all-zero samples agree perfectly; one zero and one non-zero sample share no direction at all
    cos = np.where(denom > 0, np.sum(r2 * o2, axis=1) / np.maximum(denom, 1e-300), np.where((nr == 0) & (no == 0), 1.0, 0.0))
    noise = float(np.sum((ref - out) ** 2))
    sqnr = SQNR_CAP_DB if noise == 0 else min(SQNR_CAP_DB, 10 * math.log10(max(float(np.sum(ref ** 2)), 1e-300) / noise))
    m = {"max_abs": float(diff.max()) if diff.size else 0.0, "mean_abs": float(diff.mean()) if diff.size else 0.0,
         "cosine": float(np.mean(cos)), "sqnr_db": float(sqnr)}
    if is_classifier(ref):
        m["top1_agreement"] = float(np.mean(ref.argmax(1) == out.argmax(1)))
        if labels is not None:
            m["top1_accuracy"] = float(np.mean(out.argmax(1) == labels))
    for name, fn in (extra or {}).items():
        m[name] = float(fn(ref, out, labels))
    return m


def reference_metrics(ref: np.ndarray, labels: np.ndarray | None,
                      extra: Mapping[str, Callable[..., float]] | None = None) -> dict[str, float]:
    """The reference's own values of each metric (its accuracy, and the identity value of comparisons)."""
    return output_metrics(ref, ref, labels, extra)


@dataclass(frozen=True)
class BudgetResult:
    passed: bool
    metric: str
    value: float
    budget: float  # the effective bound the value was compared with
    mode: str
    threshold: float
    output: str

    def describe(self) -> str:
        op = ">=" if HIGHER_IS_BETTER.get(self.metric, True) else "<="
        rel = f" (reference - {self.threshold:g})" if self.mode == "relative" else ""
        return f"{self.metric} on {self.output!r} = {self.value:.4f}, budget {op} {self.budget:.4f}{rel}"

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "metric": self.metric, "value": self.value, "budget": self.budget,
                "mode": self.mode, "threshold": self.threshold, "output": self.output}


def budget_output(budget: Budget, output_names: list[str]) -> str:
    if budget.output and budget.output not in output_names:
        raise DataError(f"budget.output {budget.output!r} is not a model output; outputs: {output_names}")
    return budget.output or output_names[0]


def check_budget(budget: Budget, metrics: Mapping[str, float], ref_metrics: Mapping[str, float],
                 output: str) -> BudgetResult:
    if budget.metric not in metrics:
        hint = " (top1_accuracy needs labels: add 'y' to the validation data)" if budget.metric == "top1_accuracy" \
            else ""
        raise DataError(f"budget metric {budget.metric!r} cannot be computed for output {output!r}{hint}; "
                        f"available: {', '.join(sorted(metrics))}")
    value = metrics[budget.metric]
    higher = HIGHER_IS_BETTER.get(budget.metric, True)
    if budget.mode == "absolute":
        bound = budget.threshold
    else:
        ref = ref_metrics[budget.metric]
        bound = ref - budget.threshold if higher else ref + budget.threshold
    passed = value >= bound - 1e-12 if higher else value <= bound + 1e-12
    return BudgetResult(passed, budget.metric, float(value), float(bound), budget.mode, budget.threshold, output)


BATCH_INPUT_BYTES = 4 << 20
"""Verification and latency batches hold at most this many input bytes (at least one sample): a runtime's
activations scale with the batch (a 224x224 CNN at batch 64 held over 1 GB in onnxruntime's arena)."""


def batch_for(inputs: Mapping[str, np.ndarray], most: int) -> int:
    """The batch size for ``inputs``: at most ``most`` samples and :data:`BATCH_INPUT_BYTES` of input."""
    n = len(next(iter(inputs.values())))
    per_sample = sum(v[:1].nbytes for v in inputs.values()) or 1
    return max(1, min(most, n, BATCH_INPUT_BYTES // per_sample))


def run_all(runner: Runner, inputs: Mapping[str, np.ndarray], batch: int | None = None,
            progress: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
    """Run every sample of ``inputs`` in batches (:func:`batch_for` of 64 unless given) and concatenate;
    ``progress(done, total)`` after each batch (a slow runtime can take minutes over a validation set)."""
    batch = batch or batch_for(inputs, 64)
    n = len(next(iter(inputs.values())))
    parts = []
    for i in range(0, n, batch):
        parts.append(runner.infer({k: v[i:i + batch] for k, v in inputs.items()}))
        if progress is not None:
            progress(min(i + batch, n), n)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def latency_ms(runner: Runner, inputs: Mapping[str, np.ndarray], batch: int | None = None, repeats: int = 15,
               budget_s: float = 3.0) -> float:
    """Median wall time of one batch of ``batch`` samples (:func:`batch_for` of 32 unless given), in
    milliseconds (bounded by ``budget_s``). One runner alone: to compare runners use :func:`side_by_side`."""
    return side_by_side({"x": runner}, inputs, batch, rounds=repeats, budget_s=budget_s)["x"].median_ms


@dataclass(frozen=True)
class Timing:
    """One runner's share of a side-by-side timing: median and quartiles of its per-round times (ms), and
    the median over rounds of ``reference time / this time`` measured in the same round."""

    median_ms: float
    p25_ms: float
    p75_ms: float
    rounds: int
    vs_reference: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"median_ms": self.median_ms, "p25_ms": self.p25_ms, "p75_ms": self.p75_ms, "rounds": self.rounds,
                "vs_fp32": self.vs_reference}


def side_by_side(runners: Mapping[str, Runner], inputs: Mapping[str, np.ndarray], batch: int | None = None,
                 rounds: int = 30, budget_s: float = 6.0, reference: str | None = None,
                 warmup: int = 2) -> dict[str, Timing]:
    """Time every runner on the same batch, interleaved round-robin in this process: each round runs each
    runner once, so load that comes and goes on a shared machine hits all of them alike. ``reference`` names
    the runner the ``vs_reference`` ratios divide (per round, then the median). At least 5 rounds; more until
    ``rounds`` or ``budget_s`` seconds."""
    batch = batch or batch_for(inputs, 32)
    feed = {k: v[:batch] for k, v in inputs.items()}
    for r in runners.values():
        for _ in range(warmup):  # first calls compile, allocate arenas, fill caches
            r.infer(feed)
    times: dict[str, list[float]] = {k: [] for k in runners}
    start = time.perf_counter()
    for i in range(rounds):
        for k, r in runners.items():
            t = time.perf_counter()
            r.infer(feed)
            times[k].append(time.perf_counter() - t)
        if i >= 4 and time.perf_counter() - start > budget_s:
            break
    ref = np.array(times[reference]) if reference else None
    out = {}
    for k, v in times.items():
        arr = np.array(v) * 1000
        ratio = float(np.median(ref / np.array(v))) if ref is not None else None
        out[k] = Timing(float(np.median(arr)), float(np.percentile(arr, 25)), float(np.percentile(arr, 75)),
                        len(v), ratio)
    return out


# --- the one verification path: the FP32 reference run, then each artifact judged against it -------------------
@dataclass(frozen=True)
class Reference:
    """The FP32 reference run on the verification data: what every artifact is compared with.

    ``outputs`` and ``metrics`` are per model output (``metrics``: the reference's own value of each metric, its
    accuracy and the identity value of each comparison, what a relative budget subtracts from); ``extra`` are the
    plugin metrics computed for the reference and every artifact alike; ``source`` says where the data came from."""

    inputs: Mapping[str, np.ndarray] = field(repr=False)
    labels: np.ndarray | None = field(repr=False)
    outputs: Mapping[str, np.ndarray] = field(repr=False)
    metrics: Mapping[str, Mapping[str, float]]
    extra: Mapping[str, Callable[..., float]] = field(default_factory=dict, repr=False)
    source: str = ""

    @property
    def samples(self) -> int:
        return len(next(iter(self.inputs.values())))


def run_reference(reference_path: str | Path, inputs: Mapping[str, np.ndarray], labels: np.ndarray | None = None,
                  *, threads: int = 0, extra: Mapping[str, Callable[..., float]] | None = None,
                  label_output: str | None = None, source: str = "validation data") -> Reference:
    """Run the FP32 reference ONNX on ``inputs`` (onnxruntime, ``threads`` intra-op threads) and compute its own
    metrics per output. ``labels`` must index the classes of ``label_output`` (default: the first output) when
    that output is a classifier: a DataError names the data otherwise."""
    from .backend import OrtRunner

    runner = OrtRunner(reference_path, threads=threads)
    try:
        outputs = run_all(runner, inputs)
    finally:
        runner.close()
    label_output = label_output or next(iter(outputs))
    if labels is not None and is_classifier(outputs[label_output]):  # labels index its classes
        from .calibration import check_label_range

        check_label_range(labels, int(outputs[label_output].shape[-1]), source)
    extra = dict(extra or {})
    metrics = {o: output_metrics(v, v, labels, extra) for o, v in outputs.items()}
    return Reference(dict(inputs), labels, outputs, metrics, extra, source)


@dataclass(frozen=True)
class Recorded:
    """What an artifact was verified with, kept beside it (a bundle's warm-up samples): the first samples'
    ``inputs``, the artifact's ``outputs`` on them and the ``budget`` verdict of that verification. It decides a
    budget on a label metric when the data at hand has no labels (see :func:`verify_artifact`)."""

    inputs: Mapping[str, np.ndarray] = field(repr=False)
    outputs: Mapping[str, np.ndarray] = field(repr=False)
    budget: BudgetResult


@dataclass(frozen=True)
class Verification:
    """What :func:`verify_artifact` found for one artifact.

    ``metrics`` per output; ``budget`` the verdict on the budget output; ``verified_on`` where it ran:
    ``{"kind": "runtime" | "gpu" | "simulated", "runtime": ..., "device": ..., ...}``; ``outputs`` the artifact's
    outputs on every sample (a bundle keeps the first as warm-up samples). ``basis`` is ``"measured"`` (the budget
    metric measured here) or ``"recorded"`` (a label metric without labels: the outputs matched the recorded ones
    within the warm-up tolerance, and the budget verdict is the recorded one; ``detail`` says so)."""

    metrics: Mapping[str, Mapping[str, float]]
    budget: BudgetResult
    verified_on: Mapping[str, Any]
    outputs: Mapping[str, np.ndarray] = field(repr=False)
    samples: int
    source: str = ""
    basis: str = "measured"
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.budget.passed

    def describe(self) -> str:
        return self.detail or self.budget.describe()

    def as_record(self) -> dict[str, Any]:
        """The fields of a manifest's artifact record that this verification owns: ``verified_on`` (the kind),
        ``verification`` (where it ran, on how many samples of what, on which basis), ``metrics`` (of the
        budget output), ``metrics_per_output`` and ``budget``."""
        where = {**self.verified_on, "samples": self.samples, "source": self.source, "basis": self.basis}
        if self.detail:
            where["detail"] = self.detail
        return {"verified_on": self.verified_on["kind"], "verification": where,
                "metrics": dict(self.metrics[self.budget.output]),
                "metrics_per_output": {o: dict(m) for o, m in self.metrics.items()}, "budget": self.budget.as_dict()}


def verify_artifact(runner: Runner, reference: Reference, budget: Budget, output: str | None = None,
                    where: Mapping[str, Any] | None = None, recorded: Recorded | None = None,
                    progress: Callable[[int, int], None] | None = None) -> Verification:
    """Run ``runner`` on the reference's inputs, compute every metric of every output against the reference's
    outputs and check ``budget`` on ``output`` (default: ``budget.output``, else the first output).
    ``progress(done, total)``: samples run so far.

    ``where`` describes where the runner runs (``kind``, ``runtime``, ``device``, ...); ``kind`` defaults to
    ``runtime``, and a runner that says it is ``simulated`` is verified ``simulated``, whatever ``where`` claims.

    One rule for unlabelled data: when the budget metric cannot be computed here (a label metric, no labels) and
    ``recorded`` holds outputs of the same inputs, the artifact passes when its outputs match the recorded ones
    within the warm-up tolerance of ``qdeploy serve`` (:func:`recorded_gap`) and its recorded verdict passed;
    the budget keeps the recorded value, and ``basis`` says ``recorded``. Otherwise a DataError names what is
    missing."""
    names = list(reference.outputs)
    output = output or budget_output(budget, names)
    outputs = run_all(runner, reference.inputs, progress=progress)
    missing = [o for o in names if o not in outputs]
    if missing:
        raise DataError(f"the artifact gives no output {missing}; the reference gives {names}")
    metrics = {o: output_metrics(reference.outputs[o], outputs[o], reference.labels, reference.extra) for o in names}
    place = {"kind": "runtime", **(where or {})}
    if getattr(runner, "simulated", False):
        place["kind"] = "simulated"
    gap = None
    if budget.metric not in metrics[output] and reference.labels is None and recorded is not None:
        gap = _recorded_gap(reference, outputs[output], recorded, output)
    if gap is None or recorded is None:  # measured here (check_budget names what is missing when it cannot be)
        result = check_budget(budget, metrics[output], reference.metrics[output], output)
        return Verification(metrics, result, place, outputs, reference.samples, reference.source)
    err, tol = gap
    was = recorded.budget
    matches = err <= tol
    detail = (f"outputs {'match' if matches else 'differ from'} the verified ones {'within' if matches else 'by'} "
              f"{err:.3g} (tolerance {tol:.3g}); {budget.metric} needs labels to be re-measured: as verified, "
              f"{was.describe()}")
    if matches and not was.passed:
        detail += "; it missed its budget then: kept as the best found"
    result = BudgetResult(matches and was.passed, was.metric, was.value, was.budget, was.mode, was.threshold, output)
    return Verification(metrics, result, place, outputs, reference.samples, reference.source, "recorded", detail)


def _recorded_gap(reference: Reference, got: np.ndarray, recorded: Recorded, output: str) -> tuple[float, float] | None:
    """``(max abs difference, tolerance)`` of ``got`` against the recorded outputs, when they were recorded on
    the first samples of these very inputs; None when they were not (nothing to compare)."""
    want = recorded.outputs.get(output)
    if want is None or not len(want) or len(want) > len(got):
        return None
    k = len(want)
    for name, x in reference.inputs.items():
        rec = recorded.inputs.get(name)
        if rec is None or np.shape(rec) != np.shape(x[:k]) or not np.array_equal(rec, x[:k]):
            return None
    if np.shape(want) != np.shape(got[:k]):
        return None
    return recorded_gap(got[:k], want)
