"""One backend entry's fallback run, and what the entries of a deploy share.

:class:`DeployContext` holds what every entry of one deploy shares: the model, the calibration data and the
ranges it gave (calibrated once per observer setting), the FP32 reference run, the console and the event log.
:class:`FallbackRun` owns build -> verify -> rank -> promote for one profile entry, with the fallback policy
decided here: a backend only builds what it is asked and reports what it actually built (its artifact's
``layer_precisions``, and ``plan.reasons`` for layers it moved); it never reads the policy.
"""
from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .backend import Backend, Capabilities, OrtRunner, Plan
from .bundle import path_sha256, path_size
from .calibration import ActivationRanges, Dataset, collect_ranges, unranged_layers
from .errors import BackendError, QDeployError, StrictPolicyError
from .fallback import (Events, Resolution, Trial, accuracy_loop, entry_layers, failure_event,
                       initial_layer_precisions)
from .model import ModelHandle
from .profiles import Profile
from .records import ArtifactRecord, LayerMove
from .sensitivity import compute as sensitivity_table
from .spec import HIGHER_IS_BETTER, QUANTIZED, QuantSpec, summarize_precision
from .verify import Reference, side_by_side, verify_artifact

Echo = Callable[[str], None]
TRANSFORM_SAMPLES = 32
"""Calibration samples the accuracy transforms (bias correction, SmoothQuant) are computed from."""
TECHNIQUE_ORDER = ("cross_layer_equalization", "bias_correction", "adaround")
"""The order "auto" tries the accuracy transforms in after a plain build misses: each on top of those kept so far
(the transforms themselves always run CLE, AdaRound, then bias correction). SmoothQuant has no "auto": set, it makes
the transforms explicit, applied before the first build."""
Progress = Callable[[str, int, int], None]


def needs_ranges(spec: QuantSpec, model: ModelHandle) -> bool:
    """Static INT8 of a model that is not already quantized needs calibrated activation ranges."""
    return spec.activations.mode == "static" and spec.uses_quantized and not model.prequantized


def transforms_mode(spec: QuantSpec, model: ModelHandle) -> str:
    """How a fallback run uses the accuracy transforms: ``off`` (nothing asked, or nothing to quantize), ``on``
    (a transform set explicitly: applied before the first build) or ``auto`` (tried when the plain build misses
    the budget, kept only if it helps)."""
    t = spec.transforms
    if not spec.uses_quantized or model.prequantized:
        return "off"
    explicit = [t.cross_layer_equalization, t.bias_correction, t.smoothquant, t.adaround]
    if any(v not in (False, "auto") for v in explicit):
        return "on"
    return "auto" if "auto" in explicit else "off"


def transforms_preview(spec: QuantSpec, model: ModelHandle, caps: Capabilities) -> dict[str, Any]:
    """What a deploy of ``model`` through a backend with ``caps`` would do with the accuracy transforms (for
    ``qdeploy check``): the mode, and per transform whether it would apply and why."""
    mode = transforms_mode(spec, model)
    if mode == "off":
        return {"mode": "off", "reason": "no transform asked, or nothing to quantize", "transforms": {}}
    if "onnx" not in caps.model_formats and model.torch_module is None:
        return {"mode": mode, "reason": "not applied: this backend builds from a PyTorch module; this model has none",
                "transforms": {}}
    import onnx

    from .transforms import decide

    chosen = decide(onnx.load(str(model.onnx_path), load_external_data=False), spec, after_miss=mode == "auto")
    when = ("applied to the reference before the first build" if mode == "on" else
            "tried on the reference one at a time (CLE, bias correction, AdaRound) after a plain build misses the "
            "budget, each kept only if it verifies better")
    if "onnx" not in caps.model_formats:
        when += "; the transformed weights are written into the PyTorch module this backend builds from"
    return {"mode": mode, "reason": when,
            "transforms": {k: {"apply": v if isinstance(v, (str, float)) else bool(v), "why": why}
                           for k, (v, why) in chosen.items()}}


def moved_layers(res: Resolution, asked: dict[str, str], plan: Plan) -> list[tuple[str, str, str, str]]:
    """``(layer, asked, built, why)`` for each layer the backend's plan builds in another precision."""
    return [(name, want, got, plan.reasons.get(name) or f"{res.target.backend} cannot build it in {want} here")
            for name, want in asked.items() if (got := plan.layer_precisions.get(name, want)) != want]


def _ranges_file(model: ModelHandle, data: Dataset, spec: QuantSpec) -> Path:
    import hashlib
    import json

    from . import __version__
    from .sensitivity import cache_dir

    from . import calibration

    a = spec.activations
    code = hashlib.sha256(Path(calibration.__file__).read_bytes()).hexdigest()  # new observers: new ranges
    key = hashlib.sha256(json.dumps([__version__, code, model.sha256, data.digest(), a.method, a.momentum,
                                     a.percentile, a.symmetric]).encode()).hexdigest()[:32]
    return cache_dir() / "ranges" / f"{key}.json"


def load_cached_ranges(model: ModelHandle, data: Dataset, spec: QuantSpec) -> ActivationRanges | None:
    """Ranges computed before from this model, these samples and these observers (``QDEPLOY_CACHE``): many
    targets of one model share one calibration."""
    import json

    try:
        d = json.loads(_ranges_file(model, data, spec).read_text())
        return ActivationRanges(d["method"], {k: (float(v[0]), float(v[1])) for k, v in d["ranges"].items()},
                                int(d["samples"]), dict(d["nonfinite"]))
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def save_cached_ranges(model: ModelHandle, data: Dataset, spec: QuantSpec, ranges: ActivationRanges) -> None:
    import json
    import os

    file = _ranges_file(model, data, spec)
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"method": ranges.method, "ranges": ranges.ranges, "samples": ranges.samples,
                                   "nonfinite": ranges.nonfinite}))
        tmp.replace(file)
    except OSError:  # a read-only cache costs the reuse, never the deploy
        pass


@dataclass
class DeployContext:
    """What every entry of one deploy shares."""

    model: ModelHandle
    calib: Dataset | None
    reference: Reference
    out_name: str
    threads: int
    work: Path
    events: Events
    echo: Echo
    progress: Progress | None = None
    objective: str = "latency"
    profile: Profile | None = None
    """The deploy's hardware profile: whose INT8 numerics an artifact is verified with
    (:func:`qdeploy.profile_numerics.target_judge`)."""
    range_cache: dict[tuple, ActivationRanges] = field(default_factory=dict)
    ranges_cached: bool = False
    transform_cache: dict[tuple, tuple[Path | None, list[dict[str, Any]], float]] = field(default_factory=dict)
    """The transformed references of this deploy: the same transforms on the same layers (CLE, bias correction,
    AdaRound: seconds to minutes each) run once, however many entries ask for them."""
    _timer: OrtRunner | None = None

    @property
    def val_x(self) -> dict[str, np.ndarray]:
        return dict(self.reference.inputs)

    def ranges_for(self, spec: QuantSpec, model: ModelHandle | None = None) -> ActivationRanges | None:
        """The calibrated ranges a spec needs (None when it needs none) on ``model`` (default: the reference),
        computed once per model and observer setting."""
        model = model or self.model
        if not needs_ranges(spec, model):
            return None
        assert self.calib is not None  # the deploy refused static INT8 without calibration data
        a = spec.activations
        key = (model.sha256, a.method, a.momentum, a.percentile, a.symmetric)
        if key not in self.range_cache:
            found = load_cached_ranges(model, self.calib, spec)
            if found is not None:
                self.echo(f"calibration: {a.method} ranges of these {self.calib.count} samples from the cache")
                self.ranges_cached = True
            else:
                self.echo(f"calibrating: {self.calib.count} samples, {a.method} observers")
                progress = self.progress
                cb = (lambda d, n: progress("calibrate", d, n)) if progress else None
                found = collect_ranges(model, self.calib, a, cb)
                save_cached_ranges(model, self.calib, spec, found)
            self.range_cache[key] = found
            for tensor, why in found.nonfinite.items():
                self.echo(f"calibration: tensor {tensor} {why}: it stays float (no finite range)")
        return self.range_cache[key]

    def timer(self) -> OrtRunner:
        """The FP32 reference each trial is timed against (one session for the whole deploy)."""
        if self._timer is None:
            self._timer = OrtRunner(self.model.onnx_path, threads=self.threads)
        return self._timer

    def close(self) -> None:
        if self._timer is not None:
            self._timer.close()
            self._timer = None


class FallbackRun:
    """build -> verify -> rank -> promote for one runnable profile entry (see the module's doc)."""

    def __init__(self, ctx: DeployContext, res: Resolution) -> None:
        assert res.backend is not None and res.caps is not None and res.spec is not None, "a runnable entry"
        self.ctx, self.res = ctx, res
        self.backend: Backend = res.backend
        self.caps: Capabilities = res.caps
        self.spec: QuantSpec = res.spec
        self.label = res.target.label
        self.strict = self.spec.fallback.policy == "strict"
        # each layer's starting precision: an override the device cannot run is a resolution event (refused, and
        # the entry not runnable, under strict)
        self.layer_prec, self.pinned = initial_layer_precisions(res, entry_layers(res, ctx.model))
        self.ranges: ActivationRanges | None = None
        self.model = ctx.model  # what the backend builds from: the reference, or the reference transformed
        self.transforms: dict[str, Any] = {}  # what the accuracy transforms did, for the manifest
        self.not_carried = ""  # why the transforms could not be carried into the PyTorch module
        self.sensitivity: dict[str, float] = {}
        self.costs: dict[str, float] = {}
        self.worst: list[int] = []  # the samples the ranking measured on
        self.changed: set[tuple[str, str, str]] = set()
        self.moves: dict[str, LayerMove] = {}  # the latest move of each layer, for the kept artifact's record
        self.trials: list[Trial] = []

    # ------------------------------------------------------------------ the steps the search drives
    def build_and_verify(self, layer_precisions: dict[str, str], i: int) -> Trial:
        """Translate, calibrate, build and verify one configuration (trial ``i``)."""
        ctx, backend = self.ctx, self.backend
        stage = "build"
        try:
            plan = backend.translate(self.model, self.spec, self.res.target, layer_precisions)
            plan = backend.calibrate(plan, self.ranges, ctx.calib)
            self._keep_unranged_float(plan)
            self._record_translation(layer_precisions, plan)
            art = backend.build(plan, ctx.work / f"{self.label.replace(':', '-')}-{i}")
            stage = "load"
            runner = backend.runner(art.path, {**art.meta, "threads": ctx.threads})
            judge, numerics = runner, ""
            stage = "run"
            try:
                if ctx.profile is not None:  # the target's exact INT8 accumulation, not this host's saturating kernels
                    from .profile_numerics import exact_numerics, target_judge

                    emulated, numerics = target_judge(ctx.profile, backend.name, art.path, ctx.threads)
                    if emulated is None and (words := exact_numerics(ctx.profile)):
                        # the backend's own exact form of the artifact (its Q/DQ program as float arithmetic)
                        emulated = backend.exact_runner(art.path, {**art.meta, "threads": ctx.threads})
                        numerics = f"{words}; the artifact's quantize/dequantize program run as float arithmetic" \
                            if emulated is not None else ""
                    judge = emulated or runner
                shown = ctx.progress
                cb = (lambda d, n: shown(f"verify {self.label} trial {i}", d, n)) if shown else None
                where = {"kind": self.caps.verified_on, **(art.meta.get("verified_on") or {}),
                         **({"numerics": numerics} if numerics else {})}
                v = verify_artifact(judge, ctx.reference, self.spec.budget, ctx.out_name, where=where, progress=cb)
                speed = None if runner.simulated else side_by_side(
                    {"ref": ctx.timer(), "art": runner}, ctx.reference.inputs, rounds=10, budget_s=1.0,
                    reference="ref", warmup=1)["art"].vs_reference
            finally:
                runner.close()
                if judge is not runner:
                    judge.close()
        except QDeployError:
            raise
        except Exception as exc:
            code, msg = failure_event(exc, stage)
            raise BackendError(msg, code) from exc
        ctx.echo(f"{self.label}: trial {i}: {summarize_precision(art.layer_precisions)}: {v.budget.describe()} -> "
                 f"{'pass' if v.budget.passed else 'below budget'}"
                 + (f" (exact int32 accumulation of {ctx.profile.name}, emulated)" if numerics and ctx.profile else ""))
        return Trial(art, v.metrics, v.budget, dict(v.outputs), speed, path_size(art.path), v)

    def score(self, names: list[str]) -> dict[str, tuple[float, float]]:
        """Each layer's predicted output noise when quantized (from its simulated SQNR alone) and the cost of
        promoting it (its float weight bytes), for the search."""
        ctx, base = self.ctx, self.res.ladder[0]
        if base not in QUANTIZED:
            return {n: (1.0, 1.0) for n in names}
        if not self.sensitivity:
            progress = ctx.progress
            cb = (lambda d, n: progress(f"sensitivity {self.label}", d, n)) if progress else None
            table = sensitivity_table(self.model, self.spec, self.ranges, names, ctx.reference.inputs,
                                      ctx.reference.outputs[ctx.out_name], ctx.out_name, base, progress=cb,
                                      threads=ctx.threads)
            ctx.echo(f"{self.label}: ranked {len(names)} layers by sensitivity on the {table.samples} samples "
                     f"quantization hurts most ({'from the cache' if table.cached else f'{table.seconds:.0f} s'})")
            self.sensitivity.update({r.layer: r.sqnr_only_quantized for r in table.rows.values()})
            self.costs.update({r.layer: float(r.cost_bytes) for r in table.rows.values()})
            self.worst[:] = table.worst
        return {n: (10 ** (-self.sensitivity[n] / 10) if n in self.sensitivity else 0.0, self.costs.get(n, 0.0))
                for n in names}

    def helps(self, layer: str, old: str, new: str) -> tuple[bool, str]:
        """Between two quantized types: does ``new`` damage the output less than ``old`` when only this layer is
        quantized (the ranking's simulation, on the ranking's samples)? For promoted layers only."""
        if old != self.res.ladder[0] or layer not in self.sensitivity or not self.worst:
            return True, ""
        ctx = self.ctx
        there = sensitivity_table(self.model, self.spec, self.ranges, [layer], ctx.reference.inputs,
                                  ctx.reference.outputs[ctx.out_name], ctx.out_name, new, threads=ctx.threads,
                                  worst=self.worst).rows[layer].sqnr_only_quantized
        here = self.sensitivity[layer]
        return there > here, (f"simulated output SQNR {there:.1f} dB with only this layer in {new}, "
                              f"{here:.1f} dB in {old}")

    # ------------------------------------------------------------------ the run
    def run(self, per_layer: bool = False) -> Trial | None:
        """The search for this entry; the trial to keep, or None when the entry failed (an event says why; the
        chain moves on). Raises :class:`StrictPolicyError` when it failed under ``strict``; a kept trial that
        misses the budget under ``strict`` is the caller's to refuse (the budget is a deploy-wide verdict)."""
        self.ranges = self.ctx.ranges_for(self.spec)
        try:
            prior = self._techniques_first()
            best, self.trials = accuracy_loop(self.res, self.build_and_verify, self.layer_prec, self.pinned, self.score,
                                              self.ctx.events, self.helps, self.ctx.objective, prior)
        except BackendError as exc:
            self.ctx.events.emit(exc.code, self.label, str(exc))
            if self.strict:
                raise StrictPolicyError(f"{self.label}: [{exc.code}] {exc}; policy is strict: no fallback to the "
                                        f"next backend") from None
            return None
        finally:
            self.backend.release()
        for code, message in best.artifact.events:
            self.ctx.events.emit(code, self.label, message)
        if per_layer and not self.sensitivity and self.res.ladder[0] in QUANTIZED:
            self.score([n for n, p in best.artifact.layer_precisions.items() if p == self.res.ladder[0]])
        return best

    # ------------------------------------------------------------------ techniques before precision
    def _techniques_first(self) -> list[Trial] | None:
        """Accuracy transforms before any precision is spent. With a transform set explicitly, the first build is
        of the transformed reference. With ``auto``, a plain build that misses the budget is followed by one build
        per technique, in :data:`TECHNIQUE_ORDER`, each on top of those kept so far and kept only if it verifies
        better (an event each, with the metric before and after), until one meets the budget. Returns the
        verifications made here (None: the search makes the first)."""
        mode = transforms_mode(self.spec, self.ctx.model)
        if mode == "off":
            return None
        if "onnx" not in self.caps.model_formats and self.ctx.model.torch_module is None:
            self.transforms = {"applied": False, "reason": "the backend builds from a PyTorch module; this model has "
                                                           "none"}
            return None
        if mode == "on":
            handle, events = self._transformed(self.spec)
            if handle is None:
                self.transforms = {"applied": False, "events": events,
                                   "reason": self.not_carried or "no transform changed the model"}
                return None
            self.model, self.ranges = handle, self.ctx.ranges_for(self.spec, handle)
            trial = self.build_and_verify(dict(self.layer_prec), 0)
            done = [e["transform"] for e in events if e.get("applied")]
            self.transforms = {"applied": True, "mode": mode, "events": events, "trial": 0}
            self.ctx.echo(f"{self.label}: accuracy transforms ({', '.join(done)}) applied to the reference before "
                          f"building: {trial.budget.describe()}")
            return [trial]
        if self.strict or self.spec.fallback.max_trials < 1:  # a fallback step: not under strict or 0 trials
            return None
        plain = self.build_and_verify(dict(self.layer_prec), 0)
        trials = [plain]
        if plain.budget.passed:
            self.transforms = {"applied": False, "reason": "auto: the plain build met the budget"}
            return trials
        import onnx

        from .transforms import decide

        chosen = decide(onnx.load(str(self.ctx.model.onnx_path), load_external_data=False), self.spec,
                        after_miss=True)
        steps = [t for t in TECHNIQUE_ORDER if chosen[t][0]]
        kept: list[str] = []
        best, tried, kept_events = plain, [], []
        for technique in steps:
            if len(trials) > self.spec.fallback.max_trials:
                break
            spec = self._only(kept + [technique])
            handle, events = self._transformed(spec)
            if handle is None:
                continue
            before_model, before_ranges = self.model, self.ranges
            self.model, self.ranges = handle, self.ctx.ranges_for(spec, handle)
            trial = self.build_and_verify(dict(self.layer_prec), len(trials))
            trials.append(trial)
            before, after = best.budget, trial.budget
            better = after.value > before.value if _higher_is_better(after.metric) else after.value < before.value
            base = list(kept)
            tried.append({"technique": technique, "on_top_of": base, "trial": len(trials) - 1,
                          "before": before.value, "value": after.value, "kept": better})
            if better:
                kept.append(technique)
                best, kept_events = trial, events
            else:
                self.model, self.ranges = before_model, before_ranges
            on_top = f" on top of {', '.join(base)}" if base else ""
            verdict = "kept" if better else "undone: it did not help"
            self.ctx.events.emit("ACCURACY_BELOW_BUDGET", self.label,
                                 f"{before.describe()}; technique before precision: {technique}{on_top} -> "
                                 f"{after.metric} {after.value:.4f} ({verdict})",
                                 action="transform", transforms=base + [technique], technique=technique,
                                 metric=after.metric, before=before.value, value=after.value, budget=after.budget,
                                 kept=better, trial=len(trials) - 1)
            if best.budget.passed:
                break
        self.transforms = {"applied": bool(kept), "mode": mode, "kept": bool(kept), "techniques": kept,
                           "steps": tried, "events": kept_events,
                           "reason": "auto: " + (f"kept {', '.join(kept)}" if kept else
                                                 "no technique verified better" if tried else
                                                 self.not_carried or "no technique changed the model")}
        return trials

    def _only(self, techniques: list[str]) -> QuantSpec:
        """The spec with only ``techniques`` of the transforms on (as "auto" resolved them), the rest off. An
        "auto" AdaRound becomes explicit: after a missed budget it runs on per-channel weights too, which the
        transforms' own "auto" (applied before any build) leaves off."""
        import dataclasses

        from .spec import AdaRoundSpec

        t = self.spec.transforms

        def value(name: str) -> Any:
            v = getattr(t, name) if name in techniques else False
            return AdaRoundSpec() if name == "adaround" and v == "auto" else v
        return self.spec.replace(transforms=dataclasses.replace(t, **{name: value(name) for name in TECHNIQUE_ORDER}))

    def _transformed(self, spec: QuantSpec) -> tuple[ModelHandle | None, list[dict[str, Any]]]:
        """The reference with ``spec``'s transforms applied, as a handle with the same layer map (None when no
        transform changed anything), and the transforms' events."""
        import dataclasses

        import onnx

        from .model import sha256_file
        from .transforms import _Graph, _layers, _name, transform_model

        ctx = self.ctx
        calib = ctx.calib
        feeds = (lambda: (x for x, _ in calib.batches(16))) if calib is not None else None
        layers = [ctx.model.layers[n].node for n, p in self.layer_prec.items() if p in QUANTIZED]
        reference = onnx.load(str(ctx.model.onnx_path))
        # what the transformed reference depends on: the transforms, the weights they round to, the activations
        # bias correction and AdaRound simulate, the weighted layers that will be quantized (the transforms touch
        # no other: an entry that also quantizes its Adds or pools gets the same reference)
        weighted = tuple(sorted(_name(n) for n in _layers(_Graph(reference), layers)))
        key = (repr(spec.transforms), repr(spec.weights), repr(spec.activations), weighted)
        if key in ctx.transform_cache:
            path, summary, took = ctx.transform_cache[key]
            if path is None:
                return None, summary
            ctx.echo(f"{self.label}: accuracy transforms on the reference: the same as an earlier entry's "
                     f"({took:.0f} s then), reused")
        else:
            start = time.perf_counter()
            # 32 samples: bias correction estimates a mean per output channel over every spatial position of each
            # sample (plenty), and its cached intermediates scale with the samples (128 took 4.6 GB on EfficientNet)
            proto, events = transform_model(reference, spec, feeds, layers=layers, max_samples=TRANSFORM_SAMPLES)
            took = time.perf_counter() - start
            applied = [e for e in events
                       if e.get("applied") and e.get("count") and e["transform"] != "fold_batchnorm"]
            summary = [{k: v for k, v in e.items() if k != "changes"} for e in events]
            if not applied:
                ctx.transform_cache[key] = (None, summary, took)
                return None, summary
            tag = "-".join(e["transform"] for e in applied)
            path = ctx.work / f"transformed-{len(ctx.transform_cache)}-{tag}.onnx"
            onnx.save(proto, str(path))
            ctx.transform_cache[key] = (path, summary, took)
            ctx.echo(f"{self.label}: accuracy transforms on the reference: "
                     + ", ".join(f"{e['transform']} ({e['count']} layers)" for e in applied) + f" ({took:.0f} s)")
        handle = dataclasses.replace(ctx.model, onnx_path=path, sha256=sha256_file(path))
        if "onnx" not in self.caps.model_formats:  # the backend builds from the PyTorch module: carry them there
            from .torch_bridge import CarryError, carry_weights

            feed = {k: v[:4] for k, v in ctx.reference.inputs.items()}
            try:
                module, carried = carry_weights(ctx.model.torch_module, reference, onnx.load(str(path)),
                                                ctx.model.layers, feed, path)
            except CarryError as exc:
                self.not_carried = f"the transformed weights do not fit the PyTorch module: {exc}"
                ctx.echo(f"{self.label}: accuracy transforms not applied: {self.not_carried}")
                return None, summary
            ctx.echo(f"{self.label}: transformed weights of {len(carried)} layers written into the PyTorch module "
                     f"(it computes what the transformed reference computes)")
            handle.torch_module = module
        return handle, summary

    def record(self, trial: Trial, staging: Path) -> tuple[ArtifactRecord, dict[str, np.ndarray]]:
        """Move the kept artifact into the bundle; its manifest record, and its outputs on the validation data."""
        art = trial.artifact
        precision = summarize_precision(art.layer_precisions) if art.layer_precisions else art.precision
        ident = f"{self.label.replace(':', '-')}-{precision.replace('mixed ', 'mixed-').replace('/', '-')}"
        dest = staging / "artifacts" / (ident + (art.path.suffix if art.path.is_file() else ""))
        dest.parent.mkdir(exist_ok=True)
        shutil.move(str(art.path), dest)
        trials = self.trials or [trial]
        moved = [m for m in self.moves.values() if art.layer_precisions.get(m.layer) == m.built]
        verified = trial.verification.as_record()
        record = ArtifactRecord(
            id=ident, backend=self.res.target.backend, target=self.label, precision=precision,
            path=dest.relative_to(staging).as_posix(), sha256=path_sha256(dest), size_bytes=path_size(dest),
            verified_on=verified["verified_on"], verification=verified["verification"], metrics=verified["metrics"],
            metrics_per_output=verified["metrics_per_output"], budget=verified["budget"],
            layer_precisions=art.layer_precisions, spec=self.spec.to_dict(), meta=art.meta, moved_layers=moved,
            trials=len(trials), sensitivity=self.sensitivity, transforms=self.transforms,
            front={"objective": self.ctx.objective, "chosen": trials.index(trial),
                   "points": [t.point(i, self.res.ladder[0]) for i, t in enumerate(trials)],
                   "note": "every verified configuration of this entry; latency_vs_fp32 from a short side-by-side "
                           "timing per trial (the artifact's own figure comes from the final one)"})
        return record, trial.outputs

    # ------------------------------------------------------------------ what the backend built
    def _keep_unranged_float(self, plan: Plan) -> None:
        """Layers whose activations have no finite range stay float, whatever the backend (an event each)."""
        for name, why in unranged_layers(plan.model.layers, plan.layer_precisions, self.ranges, QUANTIZED).items():
            plan.layer_precisions[name] = "fp32"
            plan.reasons[name] = why

    def _record_translation(self, asked: dict[str, str], plan: Plan) -> None:
        """A backend may build a layer in another precision than asked (a format limit): never silently. Each
        change is a ``PRECISION_UNSUPPORTED`` event (once per layer and change); ``strict`` refuses it."""
        for name, want, got, why in moved_layers(self.res, asked, plan):
            self.moves[name] = LayerMove(name, want, got, why)
            if (name, want, got) in self.changed:
                continue
            self.changed.add((name, want, got))
            if self.strict:
                raise BackendError(f"layer {name}: {why}; it would be built in {got} (refused: policy is strict)",
                                   "PRECISION_UNSUPPORTED")
            self.ctx.events.emit("PRECISION_UNSUPPORTED", self.label, f"layer {name}: {why}; built in {got}",
                                 layer=name, requested=want, resolved=got)


def _higher_is_better(metric: str) -> bool:
    return HIGHER_IS_BETTER.get(metric, True)
