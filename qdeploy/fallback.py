"""Fallback, the core loop over the neutral spec: resolve what each backend can do on the device, then climb
the precision ladder layer by layer until the accuracy budget holds. Every step is an event with a reason
code; ``strict`` refuses instead of falling back.
"""
from __future__ import annotations

import dataclasses
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .backend import Artifact, Backend, Capabilities
from .errors import BackendError
from .profiles import BackendTarget
from .spec import PRECISIONS, QUANTIZED, PerChannel, PerTensor, QuantSpec, summarize_precision

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


def initial_layer_precisions(res: Resolution, layers: dict[str, Any]) -> tuple[dict[str, str], set[str]]:
    """Each layer's starting precision (spec default and overrides, moved onto what this entry runs) and the
    set of layers pinned by an override (the fallback loop leaves those alone)."""
    spec = res.spec
    assert spec is not None
    runnable = [p for p in PRECISIONS if p in res.target.supported and p in res.caps.precisions]
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
    metrics: dict[str, dict[str, float]]
    budget: Any  # verify.BudgetResult
    outputs: dict[str, np.ndarray]


def climb(layer_precisions: dict[str, str], ladder: tuple[str, ...], ranking: list[str],
          pinned: set[str]) -> tuple[str, str, str] | None:
    """Raise the most sensitive layer that can still climb by one rung: ``(layer, from, to)`` or None.

    Layers at the lowest rung go first, most sensitive first; then the next rung, and so on."""
    order = sorted((ladder.index(layer_precisions[n]) if layer_precisions[n] in ladder else len(ladder), i, n)
                   for i, n in enumerate(ranking) if n not in pinned)
    for rung, _, name in order:
        if rung < len(ladder) - 1:
            return name, ladder[rung], ladder[rung + 1]
    return None


def accuracy_loop(res: Resolution, build_and_verify: Callable[[dict[str, str], int], Trial],
                  layer_precisions: dict[str, str], pinned: set[str], rank: Callable[[list[str]], list[str]],
                  events: Events, helps: Callable[[str, str, str], tuple[bool, str]] | None = None,
                  ) -> tuple[Trial, list[Trial]]:
    """Build, verify, and while the budget fails promote the worst layer one rung; bounded by the spec's
    ``max_trials`` and ``time_budget_s``. Returns the best trial (the passing one, else the closest) and all.

    ``helps(layer, from, to)`` judges a step between two quantized types (INT8 -> FP8 is not always a step up:
    E4M3 has 3 mantissa bits); a rung it rejects is skipped for that layer, and the event says why."""
    spec = res.spec
    assert spec is not None
    label = res.target.label
    start = time.monotonic()
    trials: list[Trial] = []
    ranking: list[str] | None = None
    current = dict(layer_precisions)
    step: tuple[str, str, str] | None = None
    attempts = 0  # builds tried, skipped rungs included: they count against the trial and time budgets
    while True:
        attempts += 1
        try:
            trial = build_and_verify(current, attempts - 1)
        except BackendError as exc:
            if not trials:
                raise
            layer, _, new = step if step else (None, None, None)
            higher = res.ladder[res.ladder.index(new) + 1:] if new in res.ladder else ()
            within = attempts <= spec.fallback.max_trials and time.monotonic() - start <= spec.fallback.time_budget_s
            if exc.code == "PRECISION_UNSUPPORTED" and layer and higher and within and \
                    spec.fallback.policy != "strict":
                # this backend cannot build that rung here: the layer skips it and climbs on
                events.emit(exc.code, label, f"{exc} (layer {layer} in {new}); skipping {new} for it: "
                            f"{new} -> {higher[0]}", layer=layer, requested=new, resolved=higher[0])
                step = (layer, new, higher[0])
                current[layer] = higher[0]
                continue
            # a promotion the backend cannot build: keep what was already built and verified
            events.emit(exc.code, label, f"{exc} (while building trial {len(trials)}); keeping the best artifact "
                        f"built so far")
            break
        trials.append(trial)
        # a backend may build a layer higher than asked (an event says so): climb on from what it built
        current.update({n: p for n, p in trial.artifact.layer_precisions.items() if n in current})
        b = trial.budget
        if b.passed:
            return trial, trials
        elapsed = time.monotonic() - start
        details = {"metric": b.metric, "value": b.value, "budget": b.budget, "output": b.output,
                   "trial": len(trials) - 1, "precision": trial.artifact.precision}
        if spec.fallback.policy == "strict":
            events.emit("ACCURACY_BELOW_BUDGET", label, f"{b.describe()}; policy is strict: no fallback",
                        action="fail", **details)
            break
        if attempts > spec.fallback.max_trials or elapsed > spec.fallback.time_budget_s:
            events.emit("ACCURACY_BELOW_BUDGET", label, f"{b.describe()}; trial/time budget spent "
                        f"({len(trials) - 1} promotions, {elapsed:.0f} s): keeping the best artifact found",
                        action="stop", **details)
            break
        if ranking is None:
            ranking = rank([n for n, p in current.items() if p == res.ladder[0] and n not in pinned])
            ranking += [n for n in current if n not in ranking]
        step = climb(current, res.ladder, ranking, pinned)
        if step is None:
            events.emit("ACCURACY_BELOW_BUDGET", label, f"{b.describe()}; every layer is already at the top of "
                        f"the ladder {list(res.ladder)}", action="stop", **details)
            break
        layer, old, new = step
        skipped: list[str] = []
        while helps is not None and old in QUANTIZED and new in QUANTIZED:
            ok, why = helps(layer, old, new)
            higher = res.ladder[res.ladder.index(new) + 1:]
            if ok or not higher:
                break
            skipped.append(f"{new} ({why})")
            new = higher[0]
        note = f" (skipped {'; '.join(skipped)})" if skipped else ""
        events.emit("ACCURACY_BELOW_BUDGET", label, f"{b.describe()}; promoting layer {layer} {old} -> {new}{note}",
                    action="promote", layer=layer, **{"from": old, "to": new}, **details,
                    **({"skipped": skipped} if skipped else {}))
        step = (layer, old, new)
        current[layer] = new
    best = max(trials, key=lambda t: (t.budget.value if _higher(t.budget.metric) else -t.budget.value))
    if not best.budget.passed and spec.fallback.policy != "strict":
        b = best.budget
        events.emit("ACCURACY_BELOW_BUDGET", label, f"{b.describe()}: the best of {len(trials)} trial(s) still "
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

