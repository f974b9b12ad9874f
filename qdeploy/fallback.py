"""Fallback, the core loop over the neutral spec: resolve what each backend can do on the device, then climb
the precision ladder layer by layer until the accuracy budget holds. Every step is an event with a reason
code; ``strict`` refuses instead of falling back.
"""
from __future__ import annotations

import dataclasses
import time
import traceback
import warnings
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .backend import Artifact, Backend, Capabilities
from .errors import BackendError
from .profiles import BackendTarget
from .spec import PRECISIONS, QUANTIZED, PerChannel, PerTensor, QuantSpec

REASON_CODES = ("BACKEND_UNAVAILABLE", "MODEL_FORMAT_UNSUPPORTED", "OP_UNSUPPORTED", "PRECISION_UNSUPPORTED",
                "GRANULARITY_UNSUPPORTED", "ACCURACY_BELOW_BUDGET", "BUILD_FAILED", "LOAD_FAILED", "RUNTIME_ERROR",
                "DRIFT_DETECTED")


class FallbackWarning(UserWarning):
    """Issued for every fallback event under the ``warn`` policy (Python API users see them without a console)."""


class Events:
    """The run's event log: each event is stored, echoed to the console and passed to ``qdeploy_on_event``;
    under the ``warn`` policy each is also issued as a :class:`FallbackWarning`."""

    def __init__(self, echo: Callable[[str], None] | None = None, observe: Callable[[dict], None] | None = None,
                 warn: bool = False):
        self.items: list[dict[str, Any]] = []
        self.echo, self.observe, self.warn = echo, observe, warn

    def emit(self, code: str, target: str, message: str, **details: Any) -> dict[str, Any]:
        if code not in REASON_CODES:  # a plugin's unknown code must not take the run down
            message, code = f"{message} (reported as {code!r}, not a qdeploy reason code)", "BUILD_FAILED"
        event = {"code": code, "target": target, "message": message, **details}
        self.items.append(event)
        if self.echo:
            self.echo(f"[{code}] {target}: {message}")
        if self.observe:
            self.observe(event)
        if self.warn:
            warnings.warn(f"[{code}] {target}: {message}", FallbackWarning, stacklevel=3)
        return event


@dataclass
class Resolution:
    """What one profile entry will do with the spec: the resolved spec and ladder, or why it cannot run."""

    target: BackendTarget
    backend: Backend | None = None
    caps: Capabilities | None = None
    spec: QuantSpec | None = None
    ladder: tuple[str, ...] = ()
    events: list[tuple[str, str, dict]] = field(default_factory=list)  # (code, message, details), not yet emitted
    warnings: list[str] = field(default_factory=list)
    info: list[str] = field(default_factory=list)  # choices made while resolving ("auto" settings), not problems

    @property
    def runnable(self) -> bool:
        return self.spec is not None

    def note(self, code: str, message: str, **details: Any) -> None:
        self.events.append((code, message, details))

    def emit_all(self, events: Events) -> None:
        for code, message, details in self.events:
            events.emit(code, self.target.label, message, **details)


def _refuse_if_strict(res: Resolution, spec: QuantSpec) -> bool:
    if spec.fallback.policy == "strict":
        code, message, details = res.events[-1]
        res.events[-1] = (code, message + " (refused: policy is strict)", details)
        res.spec = None
        return True
    return False


def resolve(target: BackendTarget, backends: dict[str, Backend], model_formats: tuple[str, ...],
            spec: QuantSpec, family: str = "cnn") -> Resolution:
    """Spec x profile entry x backend capabilities -> a resolved spec, or the reason it cannot run."""
    res = Resolution(target)
    backend = backends.get(target.backend)
    if backend is None:
        res.note("BACKEND_UNAVAILABLE", f"no plugin registered for backend {target.backend!r}; install "
                 f"qdeploy-{target.backend} (plugins/{target.backend})")
        return res
    res.backend = backend
    try:
        caps = backend.capabilities(target)
    except Exception as exc:  # a plugin's probe must never take the whole run down
        res.note("BACKEND_UNAVAILABLE", f"capability probe failed: {type(exc).__name__}: {exc}")
        return res
    res.caps = caps
    if not caps.available:
        res.note("BACKEND_UNAVAILABLE", caps.reason or "runtime not available on this host")
        return res
    if not set(model_formats) & set(caps.model_formats):
        res.note("MODEL_FORMAT_UNSUPPORTED", f"takes {'/'.join(caps.model_formats)} models; this model is "
                 f"{'/'.join(model_formats)} only")
        return res
    fast = [p for p in PRECISIONS if p in target.fast and p in caps.precisions]
    allowed = [p for p in PRECISIONS if p in target.supported and p in caps.precisions]
    prec = spec.precision
    if prec not in allowed:
        up = [p for p in spec.fallback.ladder if p in fast and PRECISIONS.index(p) > PRECISIONS.index(prec)]
        if not up:
            res.note("PRECISION_UNSUPPORTED", f"{prec} is not supported here (runs: {', '.join(allowed) or 'none'}) "
                     f"and the ladder {list(spec.fallback.ladder)} has no higher precision this device runs fast",
                     requested=prec)
            return res
        res.note("PRECISION_UNSUPPORTED", f"{prec} is not supported here; using {up[0]}", requested=prec,
                 resolved=up[0])
        if _refuse_if_strict(res, spec):
            return res
        prec = up[0]
    elif prec in target.slow:
        res.warnings.append(f"{prec} is forced by the spec but runs slower than fp32 on this device with "
                            f"{target.backend}")
    spec = spec.replace(precision=prec)
    if spec.uses_quantized:
        act, w = spec.activations, spec.weights
        if act.mode == "auto":
            mode = "dynamic" if family == "transformer" and "dynamic" in caps.activation_modes else "static"
            res.info.append(f"activations.mode auto -> {mode}: " + (
                "a transformer-like graph (MatMul/Gemm layers, Softmax, no convolution): per-channel weights with "
                "per-batch activation ranges keep attention's outliers" if mode == "dynamic" else
                f"calibrated ranges for a {family} graph" if family != "transformer" else
                f"{target.backend} has no dynamic INT8"))
            act = dataclasses.replace(act, mode=mode)
        if act.mode not in caps.activation_modes:
            res.note("PRECISION_UNSUPPORTED", f"{act.mode} activation quantization is not supported by "
                     f"{target.backend}; it supports {', '.join(caps.activation_modes)}", requested=act.mode)
            return res
        if w.bits not in caps.weight_bits:
            res.note("PRECISION_UNSUPPORTED", f"{w.bits}-bit weights are not supported by {target.backend} "
                     f"(supports {caps.weight_bits})", requested=f"int{w.bits} weights")
            return res
        grans = [g for g in ("per_group", "per_channel", "per_tensor")
                 if g in target.granularities and g in caps.granularities]
        if w.granularity.type not in grans:
            new = PerChannel() if "per_channel" in grans else PerTensor()
            res.note("GRANULARITY_UNSUPPORTED", f"{w.granularity.type} weights are not supported here; using "
                     f"{new.type}", requested=w.granularity.type, resolved=new.type)
            if _refuse_if_strict(res, spec):
                return res
            w = dataclasses.replace(w, granularity=new)
        if (target.weight_symmetric_only or caps.weight_symmetric_only) and not w.symmetric:
            res.note("GRANULARITY_UNSUPPORTED", "asymmetric weights are not supported here (symmetric INT8 "
                     "only); using symmetric weights", requested="asymmetric", resolved="symmetric")
            if _refuse_if_strict(res, spec):
                return res
            w = dataclasses.replace(w, symmetric=True)
        if target.activation_symmetric_only and not act.symmetric and act.mode != "none":
            res.note("GRANULARITY_UNSUPPORTED", "asymmetric activations are not supported here (zero point must "
                     "be 0); using symmetric activations", requested="asymmetric", resolved="symmetric")
            if _refuse_if_strict(res, spec):
                return res
            act = dataclasses.replace(act, symmetric=True)
        spec = spec.replace(weights=w, activations=act)
    res.spec = spec
    res.ladder = tuple([prec] + [p for p in spec.fallback.ladder
                                 if p in fast and PRECISIONS.index(p) > PRECISIONS.index(prec)])
    return res


def entry_layers(res: Resolution, model: Any) -> dict[str, Any]:
    """The layers one entry plans: every weighted and activation x activation layer, and the tensor layers
    (Add, Concat, ...) its backend quantizes and can keep float one by one."""
    tensors: Collection[str] = ()
    if res.backend is not None and res.spec is not None:
        tensors = set(res.backend.quantized_tensors(model, res.spec, res.target))
    return {n: l for n, l in model.layers.items() if l.kind != "tensor" or n in tensors}


def initial_layer_precisions(res: Resolution, layers: dict[str, Any]) -> tuple[dict[str, str], set[str]]:
    """Each layer's starting precision (spec default and overrides, moved onto what this entry runs) and the
    set of layers pinned by an override (the fallback loop leaves those alone)."""
    spec, caps = res.spec, res.caps
    assert spec is not None and caps is not None, "only a runnable resolution has layer precisions"
    runnable = [p for p in PRECISIONS if p in res.target.supported and p in caps.precisions]
    out, pinned = {}, set()
    for name, layer in layers.items():
        p = spec.precision_for(name, layer.op_type)
        if p != spec.precision:
            pinned.add(name)
        if p not in runnable:
            higher = [q for q in runnable if PRECISIONS.index(q) > PRECISIONS.index(p)]
            new = higher[0] if higher else runnable[-1]
            res.note("PRECISION_UNSUPPORTED", f"layer {name}: {p} does not run on this device; kept in {new}",
                     layer=name, requested=p, resolved=new)
            if _refuse_if_strict(res, spec):
                return {}, set()
            p = new
        out[name] = p
    return out, pinned


@dataclass
class Trial:
    artifact: Artifact
    metrics: Mapping[str, Mapping[str, float]]  # per output, as verification measured them
    budget: Any  # verify.BudgetResult
    outputs: dict[str, np.ndarray]
    latency_vs_fp32: float | None = None  # a short side-by-side timing against the reference (None: simulated)
    size_bytes: int = 0
    verification: Any = None  # verify.Verification: metrics, budget and where it ran, as the manifest records it

    def point(self, index: int, ladder0: str) -> dict[str, Any]:
        """This trial as a point of the accuracy-latency-size front."""
        return {"trial": index, "metric": self.budget.metric, "value": self.budget.value,
                "passed": self.budget.passed, "latency_vs_fp32": self.latency_vs_fp32, "size_bytes": self.size_bytes,
                "precision": self.artifact.precision,
                "promoted": sorted(n for n, p in self.artifact.layer_precisions.items() if p != ladder0)}


OBJECTIVES = ("latency", "size", "accuracy")


def choose(trials: list[Trial], objective: str = "latency") -> Trial:
    """The point of the front to keep: among trials that met the budget, the fastest (``latency``; the fewest
    promotions where no latency was measured), the smallest (``size``) or the most accurate (``accuracy``);
    when none met it, the most accurate."""
    passing = [t for t in trials if t.budget.passed]

    def accuracy(t: Trial) -> float:
        return t.budget.value if _higher(t.budget.metric) else -t.budget.value

    def promoted(t: Trial) -> int:
        return sum(1 for p in t.artifact.layer_precisions.values() if p not in QUANTIZED)

    if not passing:
        return max(trials, key=accuracy)
    if objective == "size":
        return min(passing, key=lambda t: (t.size_bytes, -accuracy(t)))
    if objective == "accuracy":
        return max(passing, key=accuracy)
    return max(passing, key=lambda t: (t.latency_vs_fp32 or 0.0, -promoted(t), accuracy(t)))


Score = tuple[float, float]
"""A layer's ``(noise, cost)``: the output noise it contributes when quantized (a fraction of the output's power,
from its simulated SQNR alone) and the cost of promoting it (the float weight bytes it adds back; for a layer
without a weight, the activation bytes it reads: see :mod:`qdeploy.sensitivity`)."""


def promotion_order(scores: dict[str, Score]) -> list[str]:
    """Layers by predicted gain per cost, best first (noise removed per byte added back; ties: more noise)."""
    return sorted(scores, key=lambda n: (-scores[n][0] / max(scores[n][1], 1024.0), -scores[n][0], n))


def prefix_for(order: list[str], scores: dict[str, Score], fraction: float) -> int:
    """The shortest prefix of ``order`` whose layers carry ``fraction`` of the predicted noise (at least one)."""
    total = sum(scores[n][0] for n in order) or 1.0
    acc = 0.0
    for k, name in enumerate(order, 1):
        acc += scores[name][0]
        if acc >= fraction * total - 1e-15:
            return k
    return len(order)


FIRST_FRACTION = 0.75
GROWTH = 4
"""The growing sets: the shortest prefix carrying FIRST_FRACTION of the predicted noise, then each failure
divides the noise left by GROWTH (3/4, 15/16, 63/64, ...). Measured on EfficientNet-Lite0 (onnxruntime, x86-avx2):
halving (1/2, 3/4, 7/8, 15/16) grew 2, 3, 8, 20 layers, the middle two barely moving cosine (the ranking is a
prediction), and with two bisections spent 8 verifications; quartering reaches the passing set two verifications
sooner and leaves the bisection to undo what was not needed."""

STALL_VERIFICATIONS = 3
"""Growing promotion sets that did not move the metric, in a row, before the search gives up on a rung."""

MAX_BISECT = 2
"""Verifications spent bisecting a passing promotion set back down: each halves the gap to the largest failing
set; two take most of what can be given back, the rest costs more verifications than it saves precision."""


def accuracy_loop(res: Resolution, build_and_verify: Callable[[dict[str, str], int], Trial],
                  layer_precisions: dict[str, str], pinned: set[str],
                  score: Callable[[list[str]], dict[str, Score]], events: Events,
                  helps: Callable[[str, str, str], tuple[bool, str]] | None = None,
                  objective: str = "latency", prior: list[Trial] | None = None) -> tuple[Trial, list[Trial]]:
    """Build and verify; while the budget fails, search the set of layers to promote (a search, not a walk).

    Layers are ordered by predicted gain per cost (:func:`promotion_order`, from the simulated sensitivity).
    Each rung of the ladder in turn: promote the shortest prefix carrying three quarters of the predicted noise,
    then 15/16, 63/64, ... (:data:`FIRST_FRACTION`, :data:`GROWTH`) until a build passes; then bisect the prefix back down between the largest
    failing and the smallest passing set (at most :data:`MAX_BISECT` verifications), so promotions that were not
    needed are undone. Every verification
    counts against ``max_trials`` (full verifications, not loop iterations) and ``time_budget_s``; a rung stops
    after :data:`STALL_VERIFICATIONS` growing sets in a row that did not move the metric. Returns the trial
    :func:`choose` picks for ``objective`` among those that passed (else the closest), and all trials: the
    verified points of the accuracy-latency-size front. ``prior``: trials the caller verified already; the
    search starts from the best of them.

    ``helps(layer, from, to)`` judges a step between two quantized types (INT8 -> FP8 is not always a step up:
    E4M3 has 3 mantissa bits); a layer it rejects skips that rung, and the event says why."""
    spec = res.spec
    assert spec is not None
    label = res.target.label
    start = time.monotonic()
    trials: list[Trial] = []
    def better(t: Trial) -> float:
        return t.budget.value if _higher(t.budget.metric) else -t.budget.value

    def within() -> bool:
        return len(trials) <= spec.fallback.max_trials and time.monotonic() - start <= spec.fallback.time_budget_s

    if prior:  # verifications the caller made already (the plain build, a transformed one): the search goes on
        trials.extend(prior)  # from the best of them, and they count against max_trials
        first = max(prior, key=better)
    else:
        first = build_and_verify(dict(layer_precisions), 0)
        trials.append(first)
    if first.budget.passed:
        return first, trials
    b = first.budget
    details = {"metric": b.metric, "value": b.value, "budget": b.budget, "output": b.output}
    if spec.fallback.policy == "strict":
        events.emit("ACCURACY_BELOW_BUDGET", label, f"{b.describe()}; policy is strict: no fallback",
                    action="fail", trial=0, precision=first.artifact.precision, **details)
        return first, trials
    base = {n: p for n, p in first.artifact.layer_precisions.items() if n in layer_precisions} or dict(layer_precisions)
    candidates = [n for n, p in base.items() if p == res.ladder[0] and n not in pinned]
    stop_reason = ""
    passing: tuple[int, Trial] | None = None
    if len(res.ladder) < 2 or not candidates:
        stop_reason = f"every layer is already at the top of the ladder {list(res.ladder)}"
    elif not within():
        stop_reason = f"trial/time budget spent ({len(trials)} verification(s), {time.monotonic() - start:.0f} s)"
    scores = score(candidates) if not stop_reason else {}
    order = promotion_order({n: scores.get(n, (0.0, 0.0)) for n in candidates}) if not stop_reason else []
    searched_from = len(trials)  # the first promotion starts from ``first`` (the best so far), not the last tried
    for rung in res.ladder[1:] if not stop_reason else ():
        targets: dict[str, tuple[str, list[str]]] = {}  # layer -> (the rung it gets, rungs it skipped and why)

        def target_of(name: str) -> tuple[str, list[str]]:
            if name not in targets:
                new, skipped = rung, []
                while helps is not None and res.ladder[0] in QUANTIZED and new in QUANTIZED:
                    ok, why = helps(name, res.ladder[0], new)
                    up = res.ladder[res.ladder.index(new) + 1:]
                    if ok or not up:
                        break
                    skipped.append(f"{new} ({why})")
                    new = up[0]
                targets[name] = (new, skipped)
            return targets[name]

        fail_k, pass_k, fraction, stalled, bisected = 0, None, FIRST_FRACTION, 0, 0
        best_value = better(first)
        while True:
            if pass_k is None:
                k = max(prefix_for(order, {n: scores.get(n, (0.0, 0.0)) for n in order}, fraction), fail_k + 1)
                k = min(k, len(order))
            elif pass_k - fail_k <= 1 or bisected >= MAX_BISECT:
                break  # bisection done (or spent): pass_k is the smallest passing prefix found
            else:
                k = (fail_k + pass_k) // 2
            if not within():
                stop_reason = (f"trial/time budget spent ({len(trials)} verification(s), "
                               f"{time.monotonic() - start:.0f} s)")
                break
            config = dict(base)
            for name in order[:k]:
                config[name] = target_of(name)[0]
            phase = "grow" if pass_k is None else "bisect"
            moves = [(name, *target_of(name)) for name in order[:k]]
            shown = ", ".join(f"{n} -> {t}" + (f" (skipped {'; '.join(sk)})" if sk else "") for n, t, sk in moves[:6])
            more = f" and {len(moves) - 6} more" if len(moves) > 6 else ""
            last = (trials[-1] if len(trials) > searched_from else first).budget
            events.emit("ACCURACY_BELOW_BUDGET", label,
                        f"{last.describe()}; trial {len(trials)} promotes {k} of {len(order)} layers from "
                        f"{res.ladder[0]} ({phase}, by predicted gain per cost): {shown}{more}",
                        action="promote", layers=[n for n, _, _ in moves], to={n: t for n, t, _ in moves},
                        **{"from": res.ladder[0]}, trial=len(trials), phase=phase, metric=last.metric,
                        value=last.value, budget=last.budget, output=last.output,
                        **({"skipped": {n: sk for n, _, sk in moves if sk}} if any(sk for _, _, sk in moves) else {}))
            if phase == "bisect":
                bisected += 1
            try:
                trial = build_and_verify(config, len(trials))
            except BackendError as exc:
                if exc.code == "PRECISION_UNSUPPORTED" and rung != res.ladder[-1]:
                    events.emit(exc.code, label, f"{exc} (trial {len(trials)}, layers promoted to {rung}); this "
                                f"rung cannot be built here: trying the next one")
                    break  # the next rung of the ladder
                events.emit(exc.code, label, f"{exc} (while building trial {len(trials)}); keeping the best artifact "
                            f"built so far")
                stop_reason = "a promotion could not be built"
                break
            trials.append(trial)
            if trial.budget.passed:
                pass_k, passing = k, (k, trial)
                continue
            fail_k = k
            if pass_k is None:
                if k >= len(order):
                    break  # every candidate on this rung and still below budget: the next rung, if any
                if better(trial) <= best_value + 1e-9:
                    stalled += 1
                    if stalled >= STALL_VERIFICATIONS:
                        stop_reason = (f"{stalled} larger promotion sets in a row did not move "
                                       f"{trial.budget.metric}")
                        break
                else:
                    stalled = 0
                best_value = max(best_value, better(trial))
                fraction = 1 - (1 - fraction) / GROWTH
        if passing is not None or stop_reason:
            break
    if passing is not None:
        return choose(trials, objective), trials
    best = max(trials, key=better)
    b = best.budget
    last = trials[-1].budget
    events.emit("ACCURACY_BELOW_BUDGET", label, f"{last.describe()}; {stop_reason or 'every promotion on the ladder '}"
                f"{'' if stop_reason else str(list(res.ladder)) + ' tried'}", action="stop", metric=last.metric,
                value=last.value, budget=last.budget, output=last.output, trial=len(trials) - 1,
                precision=trials[-1].artifact.precision)
    events.emit("ACCURACY_BELOW_BUDGET", label, f"{b.describe()}: the best of {len(trials)} verification(s) still "
                f"misses the budget; kept, marked as failing (servers and `verify` see budget.passed false)",
                action="keep", metric=b.metric, value=b.value, budget=b.budget, output=b.output,
                trial=trials.index(best), precision=best.artifact.precision)
    return best, trials


def _higher(metric: str) -> bool:
    from .spec import HIGHER_IS_BETTER
    return HIGHER_IS_BETTER.get(metric, True)


def failure_event(exc: BaseException, stage: str) -> tuple[str, str]:
    """(reason code, one-line message) for an exception raised while building, loading or running."""
    if isinstance(exc, BackendError):
        return exc.code, str(exc)
    code = {"build": "BUILD_FAILED", "load": "LOAD_FAILED", "run": "RUNTIME_ERROR"}[stage]
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    loc = f" at {Path(where.filename).name}:{where.lineno}" if where else ""
    return code, f"{type(exc).__name__}: {msg}{loc}"

