"""``deploy()`` and ``check()``: the data flow of DESIGN.md, from a model to a verified bundle."""
from __future__ import annotations

import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .backend import OrtRunner, Plan
from .bundle import SAMPLES, Bundle, commit, path_sha256, path_size, prepare_output
from .calibration import Dataset, collect_ranges, open_data
from .errors import BackendError, BudgetNotMet, DataError, NothingBuilt, StrictPolicyError
from .fallback import OBJECTIVES, Events, Resolution, entry_layers, initial_layer_precisions, resolve
from .model import ModelHandle, load_model, random_inputs
from .run import DeployContext, FallbackRun, moved_layers, needs_ranges, transforms_preview
from .plugins import Registry, get_registry
from .records import ArtifactRecord, Manifest
from .profiles import Profile, detect_profile_name, load_profile_file, resolve_threads
from .sensitivity import compute as sensitivity_table
from .spec import HIGHER_IS_BETTER, POLICIES, QUANTIZED, QuantSpec, load_spec
from .verify import Reference, batch_for, budget_output, check_budget, run_all, run_reference, side_by_side

Echo = Callable[[str], None]
Progress = Callable[[str, int, int], None]
log = logging.getLogger("qdeploy")


def _log_echo(line: str) -> None:
    """The Python API's default ``echo``: each console line of the CLI as a ``qdeploy`` log record (warnings at
    WARNING, the rest at INFO), so library callers configure it with :mod:`logging`."""
    log.log(logging.WARNING if line.startswith("warning") else logging.INFO, "%s", line)


WARMUP_SAMPLES = 8


def resolve_profile(target: str | Profile | None, registry: Registry) -> Profile:
    if isinstance(target, Profile):
        return target
    if target in (None, "", "detect", "host"):
        return registry.profile(detect_profile_name())
    if str(target).endswith(".toml"):
        return load_profile_file(target)
    return registry.profile(str(target))


def _with_policy(spec: QuantSpec, policy: str | None) -> QuantSpec:
    if policy is None:
        return spec
    if policy not in POLICIES:
        raise DataError(f"--policy {policy!r} is not one of {', '.join(POLICIES)}")
    import dataclasses
    return spec.replace(fallback=dataclasses.replace(spec.fallback, policy=policy))


def _resolutions(profile: Profile, registry: Registry, model: ModelHandle, spec: QuantSpec,
                 only: list[str] | None) -> list[Resolution]:
    entries = [t for t in profile.backends if not only or t.backend in only or t.label in only]
    if not entries:
        raise DataError(f"--backend {', '.join(only or [])} matches no entry of profile {profile.name}; it has "
                        f"{', '.join(t.label for t in profile.backends)}")
    out = []
    for t in entries:
        res = resolve(t, registry.backends, model.formats, spec, model.family)
        if res.backend is not None and res.spec is not None:
            res.warnings += res.backend.advise(model, res.spec, t)
        out.append(res)
    return out


def check(model: Any, target: str | Profile | None = None, spec: Any = None, input_shape: Any = None,
          backends: list[str] | None = None, policy: str | None = None) -> dict[str, Any]:
    """What would run where, what falls back and why, without building anything."""
    registry = get_registry()
    spec = _with_policy(load_spec(spec), policy)
    profile = resolve_profile(target, registry)
    with tempfile.TemporaryDirectory(prefix="qdeploy-check-") as tmp:
        handle = load_model(model, Path(tmp) / "reference.onnx", input_shape)
        entries = []
        for res in _resolutions(profile, registry, handle, spec, backends):
            layers: dict[str, str] = {}
            transforms: dict[str, Any] | None = None
            numerics = ""
            if res.runnable:
                layers, _ = initial_layer_precisions(res, entry_layers(res, handle))
                layers, plan = _check_translation(res, handle, layers)
                if res.caps and res.caps.verified_on == "simulated" and not res.caps.oracle:  # as deploy records it
                    res.note("BACKEND_UNAVAILABLE", f"the {res.target.backend} runtime is not available here"
                             f"{f' ({res.caps.reason})' if res.caps.reason else ''}: its artifact is built for the "
                             f"target and verified only by simulation")
                if res.spec is not None and res.caps is not None:
                    transforms = transforms_preview(res.spec, handle, res.caps)
                if "int8" in layers.values():
                    from .profile_numerics import emulated_numerics, exact_numerics

                    numerics = emulated_numerics(profile, res.target.backend)
                    if not numerics and plan is not None and res.backend is not None \
                            and res.backend.has_exact_form(plan) and (words := exact_numerics(profile)):
                        numerics = f"{words}; the artifact's quantize/dequantize program run as float arithmetic"
            entries.append({
                "target": res.target.label, "runnable": res.runnable,
                "precision": res.spec.precision if res.spec else None, "ladder": list(res.ladder),
                "verified_on": res.caps.verified_on if res.caps else None,
                "events": [{"code": c, "message": m, **d} for c, m, d in res.events],
                "warnings": res.warnings, "info": res.info, "layers": layers, "transforms": transforms,
                "int8_accuracy_numerics": numerics})
    return {"profile": profile.name, "notes": list(profile.notes), "model": handle.source, "intake": handle.notes,
            "layers": len(handle.layers), "entries": entries,
            "warnings": [f"spec {t}" for t in spec.unmatched_overrides({n: layer.op_type
                                                                       for n, layer in handle.layers.items()})]}


def sensitivity(model: Any, target: str | Profile | None = None, spec: Any = None, calib: Any = None,
                val: Any = None, input_shape: Any = None, backends: list[str] | None = None,
                threads: int | None = None, echo: Echo | None = None, progress: Progress | None = None) -> Any:
    """The layer-wise sensitivity table alone (no artifact built): for the first entry of the target's profile
    that can run the model, every quantized layer's simulated damage to the budget output with only it
    quantized and with all but it quantized, on the samples quantization hurts most. Cached like a deploy's."""
    registry = get_registry()
    spec = load_spec(spec)
    profile = resolve_profile(target, registry)
    echo = echo or _log_echo
    n_threads = resolve_threads(threads, profile)
    with tempfile.TemporaryDirectory(prefix="qdeploy-sens-") as tmp:
        handle = load_model(model, Path(tmp) / "reference.onnx", input_shape)
        res = next((r for r in _resolutions(profile, registry, handle, spec, backends) if r.runnable), None)
        if res is None:
            raise NothingBuilt(f"no backend of profile {profile.name} can run this model here: nothing to measure "
                               f"(see `qdeploy check`)")
        rspec = res.spec
        assert rspec is not None  # runnable
        layer_prec, _ = initial_layer_precisions(res, entry_layers(res, handle))
        layers = [n for n, p in layer_prec.items() if p in QUANTIZED]
        if not layers:
            raise DataError(f"{res.target.label}: no layer is quantized under this spec: nothing to measure")
        calib_ds = open_data(calib, handle, "calibration", rspec.calibration)
        if calib_ds is None and needs_ranges(rspec, handle):
            raise DataError("static INT8 needs calibration data: pass --calib (a folder of .npy files or an .npz)")
        val_ds = open_data(val, handle, "validation")
        val_x = val_ds.arrays()[0] if val_ds else calib_ds.arrays()[0] if calib_ds else random_inputs(handle, 32)
        ranges = None
        if calib_ds is not None and needs_ranges(rspec, handle):
            echo(f"calibrating: {calib_ds.count} samples, {rspec.activations.method} observers")
            ranges = collect_ranges(handle, calib_ds, rspec.activations)
        out_name = budget_output(rspec.budget, [o.name for o in handle.outputs])
        runner = OrtRunner(handle.onnx_path, threads=n_threads)
        try:
            ref = run_all(runner, val_x)[out_name]
        finally:
            runner.close()
        echo(f"{res.target.label}: {len(layers)} layers in {layer_prec[layers[0]]}, measured on {out_name!r}")
        cb = (lambda d, n: progress("sensitivity", d, n)) if progress else None
        table = sensitivity_table(handle, rspec, ranges, layers, val_x, ref, out_name, layer_prec[layers[0]],
                                  both=True, progress=cb, threads=n_threads)
    table.target = res.target.label
    return table


def deploy(model: Any, target: str | Profile | None = None, spec: Any = None, calib: Any = None, val: Any = None,
           output: str | Path = "bundle", input_shape: Any = None, backends: list[str] | None = None,
           policy: str | None = None, per_layer: bool = False, echo: Echo | None = None,
           progress: Progress | None = None, threads: int | None = None, objective: str = "latency") -> Bundle:
    """Deploy ``model`` to ``target``: build, verify and fall back per the spec; write the bundle to ``output``.

    ``objective`` (latency | size | accuracy) picks, among the verified configurations that met the budget, the
    one each entry keeps. ``threads``: intra-op threads of every runner (verification and the side-by-side latency); default the
    profile's ``threads``, else 1. Raises :class:`~qdeploy.errors.BudgetNotMet` under the ``strict`` policy when
    the budget is not met, and another :class:`~qdeploy.errors.QDeployError` for bad input; nothing is left at
    ``output`` then.
    """
    registry = get_registry()
    spec = _with_policy(load_spec(spec), policy)
    profile = resolve_profile(target, registry)
    n_threads = resolve_threads(threads, profile)
    if objective not in OBJECTIVES:
        raise DataError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
    output = Path(output)
    staging = prepare_output(output)
    work = Path(tempfile.mkdtemp(prefix="qdeploy-work-"))
    try:
        manifest = _deploy(registry, model, profile, spec, calib, val, staging, work, input_shape, backends,
                           per_layer, echo or _log_echo, progress, n_threads, objective)
        commit(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
        bridge = sys.modules.get("qdeploy.torch_bridge")  # its reference values are of files in ``work``: gone
        if bridge is not None:
            bridge.forget()
    bundle = Bundle(output, manifest)
    registry.pm.hook.qdeploy_on_report(manifest=bundle.manifest, bundle_dir=output)
    return bundle


def _check_translation(res: Resolution, handle: Any, layers: dict[str, str]) -> tuple[dict[str, str], Plan | None]:
    """What the backend would really build (its translation, nothing built): layers it moves are events. Returns
    the layers' precisions and the plan (None when nothing was translated)."""
    if not layers or res.spec is None or res.backend is None:
        return layers, None
    try:
        plan = res.backend.translate(handle, res.spec, res.target, dict(layers))
    except BackendError as exc:
        res.note(exc.code, str(exc))
        res.spec = None  # not runnable: the deploy would record the same event and move on
        return {}, None
    except Exception as exc:  # a plugin's translation must not take `check` down
        res.note("BUILD_FAILED", f"translation failed: {type(exc).__name__}: {exc}")
        res.spec = None
        return {}, None
    strict = res.spec.fallback.policy == "strict"
    for name, want, got, why in moved_layers(res, layers, plan):
        res.note("PRECISION_UNSUPPORTED", f"layer {name}: {why}; "
                 + (f"it would be built in {got} (refused: policy is strict)" if strict else f"built in {got}"),
                 layer=name, requested=want, resolved=got)
        if strict:  # as the deploy would: refused, this entry does not run
            res.spec = None
            return {}, None
    return dict(plan.layer_precisions), plan


def _deploy(registry: Registry, model_src: Any, profile: Profile, spec: QuantSpec, calib: Any, val: Any,
            staging: Path, work: Path, input_shape: Any, only: list[str] | None, per_layer: bool, echo: Echo,
            progress: Progress | None, threads: int, objective: str = "latency") -> Manifest:
    model = _intake(model_src, staging, input_shape, spec, echo)
    resolutions = _resolutions(profile, registry, model, spec, only)
    need_ranges = any(r.spec is not None and needs_ranges(r.spec, model) for r in resolutions)
    calib_ds, val_x, val_y, val_source = _open_data(model, calib, val, echo, spec, need_ranges)
    reference, out_name = _reference(registry, model, spec, val_x, val_y, val_source, threads)
    events = Events(echo, registry.emit, warn=spec.fallback.policy == "warn")
    ctx = DeployContext(model, calib_ds, reference, out_name, threads, work, events, echo, progress, objective,
                        profile)
    try:
        built, outputs = _run_entries(ctx, resolutions, staging, per_layer)
    finally:
        ctx.close()
    _refuse_empty(built, spec, profile, events)
    ref_lat, timing = _time_and_order(registry, staging, built, val_x, threads, echo)
    samples = _samples(built, outputs, val_x, reference.outputs, out_name)
    manifest = _manifest(model, spec, profile, calib, calib_ds, ctx, val_x, val_source, staging, ref_lat, timing,
                         out_name, built, events)
    return Bundle.write(staging, manifest, samples)


def _intake(model_src: Any, staging: Path, input_shape: Any, spec: QuantSpec, echo: Echo) -> ModelHandle:
    """Load the model into the bundle's FP32 reference and say what the intake changed."""
    model = load_model(model_src, staging / "reference.onnx", input_shape)
    for text in model.notes:
        echo(f"model: {text}")
    if model.prequantized:
        echo(f"model: already quantized ({', '.join(model.prequantized)} nodes): deployed as it is where a backend "
             f"runs it, refused with the reason where not; no calibration")
    for text in spec.unmatched_overrides({n: layer.op_type for n, layer in model.layers.items()}):
        echo(f"warning: spec {text}")
    return model


def _open_data(model: ModelHandle, calib: Any, val: Any, echo: Echo, spec: QuantSpec, need_ranges: bool
               ) -> tuple[Dataset | None, dict[str, np.ndarray], np.ndarray | None, str]:
    """Calibration data, and the validation inputs and labels (the calibration data or random inputs when no
    validation data is given, with a warning), every sample checked."""
    calib_ds = open_data(calib, model, "calibration", spec.calibration)
    val_ds = open_data(val, model, "validation")
    if calib_ds is None and need_ranges:
        raise DataError("static INT8 needs calibration data: pass --calib (a folder of .npy files or an .npz)")
    val_source = str(val) if val_ds else "calibration data" if calib_ds else "random inputs"
    if val_ds is None:
        echo("warning: no --val data; verifying on the calibration data" if calib_ds else
             "warning: no --val or --calib data; verifying on random inputs")
    if val_ds is not None:
        val_x, val_y = val_ds.arrays()
    elif calib_ds is not None:
        val_x, val_y = calib_ds.arrays()
    else:
        val_x, val_y = random_inputs(model, 32), None
    return calib_ds, val_x, val_y, val_source


def _reference(registry: Registry, model: ModelHandle, spec: QuantSpec, val_x: dict[str, np.ndarray],
               val_y: np.ndarray | None, val_source: str, threads: int) -> tuple[Reference, str]:
    """The FP32 reference run every artifact is verified against; the budget must be computable and met by it."""
    out_name = budget_output(spec.budget, [o.name for o in model.outputs])
    extra = registry.metrics
    if spec.budget.metric not in HIGHER_IS_BETTER and spec.budget.metric not in extra:
        raise DataError(f"budget.metric {spec.budget.metric!r} is neither built in nor registered by a plugin; "
                        f"registered: {', '.join(sorted(extra)) or 'none'}")
    reference = run_reference(model.onnx_path, val_x, val_y, threads=threads, extra=extra, label_output=out_name,
                              source=f"validation data {val_source}")
    own = reference.metrics[out_name]
    ref_budget = check_budget(spec.budget, own, own, out_name)  # computable?
    if not ref_budget.passed:
        raise DataError(f"the FP32 reference itself misses the budget ({ref_budget.describe()}): no artifact can "
                        f"be verified against it; loosen budget.threshold or use a relative budget")
    return reference, out_name


def _run_entries(ctx: DeployContext, resolutions: list[Resolution], staging: Path,
                 per_layer: bool) -> tuple[list[ArtifactRecord], dict[str, dict[str, np.ndarray]]]:
    """Each profile entry in order: its resolution's events, then its fallback run; the artifacts kept, and
    their outputs on the validation data (by artifact id)."""
    built: list[ArtifactRecord] = []
    outputs: dict[str, dict[str, np.ndarray]] = {}
    for res in resolutions:
        run = FallbackRun(ctx, res) if res.runnable else None  # may add resolution events (layer overrides)
        res.emit_all(ctx.events)
        for w in res.warnings:
            ctx.echo(f"warning: {res.target.label}: {w}")
        for line in res.info:
            ctx.echo(f"{res.target.label}: {line}")
        if run is None or not res.runnable:
            continue
        best = run.run(per_layer)
        if best is None:
            continue
        if not best.budget.passed and run.strict:
            raise BudgetNotMet(f"accuracy budget not met and policy is strict: {run.label}: "
                               f"{best.budget.describe()}")
        record, outputs[record.id] = run.record(best, staging)
        built.append(record)
    return built, outputs


def _refuse_empty(built: list[ArtifactRecord], spec: QuantSpec, profile: Profile, events: Events) -> None:
    if built:
        return
    if spec.fallback.policy == "strict":  # every entry refused or failed, and strict moves on to nothing
        raise StrictPolicyError(f"policy is strict and no backend of profile {profile.name} can build this "
                                f"model as specified here (the events above say why)")
    why = "; ".join(f"{e['target']}: [{e['code']}] {e['message']}" for e in events.items)
    raise NothingBuilt(f"no backend of profile {profile.name} could build this model here ({why})")


def _time_and_order(registry: Registry, staging: Path, built: list[ArtifactRecord], val_x: dict[str, np.ndarray],
                    threads: int, echo: Echo) -> tuple[float, dict[str, Any]]:
    """Time every artifact against the reference side by side, then order the serving chain: artifacts that met
    the budget first -- among them, those with no latency here (simulated: their runtime is not on this host, and
    they serve only where it is) keep the profile's preference, then the measured ones, fastest first (profile
    order breaks ties) -- and last the ones that missed it."""
    echo(f"timing: the FP32 reference and {len(built)} artifact(s) side by side, {threads} thread(s) each")
    ref_lat, timing = _time_side_by_side(registry, staging / "reference.onnx", staging, built, val_x, threads)
    order = {id(a): i for i, a in enumerate(built)}
    built.sort(key=lambda a: (not a.passed, 0.0 if not a.passed or a.latency_ms is None else a.latency_ms,
                              order[id(a)]))
    ref_size = path_size(staging / "reference.onnx")
    for i, a in enumerate(built):
        a.chain_reason = _chain_reason(a, i, built)
        a.size_vs_fp32 = a.size_bytes / ref_size
    return ref_lat, timing


def _samples(built: list[ArtifactRecord], outputs: dict[str, dict[str, np.ndarray]], val_x: dict[str, np.ndarray],
             ref_out: Any, out_name: str) -> dict[str, Any]:
    """Warm-up samples: the first inputs, the reference's and each artifact's outputs on them; and each
    artifact's per-sample error distribution (the full outputs are dropped here)."""
    samples: dict[str, Any] = {f"input:{k}": v[:WARMUP_SAMPLES] for k, v in val_x.items()}
    samples.update({f"reference:{k}": v[:WARMUP_SAMPLES] for k, v in ref_out.items()})
    for a in built:
        outs = outputs.pop(a.id)
        a.error_per_sample = _error_histogram(ref_out[out_name], outs[out_name])
        samples.update({f"{a.id}:{k}": v[:WARMUP_SAMPLES] for k, v in outs.items()})
    return samples


def _manifest(model: ModelHandle, spec: QuantSpec, profile: Profile, calib: Any, calib_ds: Dataset | None,
              ctx: DeployContext, val_x: dict[str, np.ndarray], val_source: str, staging: Path, ref_lat: float,
              timing: dict[str, Any], out_name: str, built: list[ArtifactRecord], events: Events) -> Manifest:
    ref_path = staging / "reference.onnx"
    return Manifest(
        qdeploy_version=__version__, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        model=model.describe(), spec=spec.to_dict(),
        profile={"name": profile.name, "sha256": profile.sha256, "data": profile.to_dict()},
        calibration={"samples": calib_ds.count if calib_ds else 0, "method": spec.activations.method,
                     "from_cache": ctx.ranges_cached,
                     "nonfinite": {t: why for r in ctx.range_cache.values() for t, why in r.nonfinite.items()},
                     "source": str(calib) if isinstance(calib, (str, Path)) else "python"},
        validation={"samples": len(next(iter(val_x.values()))), "source": val_source},
        reference={"path": "reference.onnx", "sha256": path_sha256(ref_path), "size_bytes": path_size(ref_path),
                   "latency_ms": ref_lat, "metrics": dict(ctx.reference.metrics[out_name])},
        latency_measured_on={**_latency_host(val_x), **timing},
        budget_output=out_name, artifacts=built, events=events.items, samples=SAMPLES)


def _latency_host(val_x: dict[str, np.ndarray]) -> dict[str, Any]:
    """Where the manifest's latencies come from: this host, one batch, each artifact's own runtime."""
    import os
    import platform

    from .profiles import cpu_flags, gpu_compute_capability

    model_name = ""
    try:
        model_name = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
    except OSError:
        pass
    gpu = gpu_compute_capability()
    return {"host": platform.node(), "machine": platform.machine(), "cpu": model_name, "cpus": os.cpu_count(),
            "avx512_vnni": "avx512_vnni" in cpu_flags(), "gpu": gpu[0] if gpu else None,
            "batch": batch_for(val_x, 32),
            "note": "the FP32 reference (onnxruntime, this host's CPU) and every artifact (its own runtime; GPU "
                    "runtimes on the GPU) timed side by side in one process, round-robin, on the same batch with "
                    "the same intra-op threads; vs-FP32 ratios are the median of per-round ratios"}


def _time_side_by_side(registry: Registry, ref_path: Path, staging: Path, built: list[ArtifactRecord],
                       val_x: dict[str, np.ndarray], threads: int) -> tuple[float, dict[str, Any]]:
    """Time the reference and every artifact that runs on its real runtime here, interleaved; fill each
    artifact's ``latency_ms``/``latency_vs_fp32``/``latency`` and return the reference's median and the
    measurement's description. Simulated artifacts get no latency: their speed says nothing of the target."""
    runners: dict[str, Any] = {"reference": OrtRunner(ref_path, threads=threads)}
    try:
        for a in built:
            a.latency_ms = a.latency_vs_fp32 = None
            backend = registry.backends[a.backend]  # it built this artifact in this process
            runner = backend.runner(staging / a.path, {**a.meta, "threads": threads})
            if runner.simulated:
                runner.close()
                continue
            runners[a.id] = runner
        timing = side_by_side(runners, val_x, reference="reference")
    finally:
        for r in runners.values():
            r.close()
    for a in built:
        if a.id in timing:
            t = timing[a.id]
            a.latency_ms, a.latency_vs_fp32, a.latency = t.median_ms, t.vs_reference, t.as_dict()
    ref = timing["reference"]
    return ref.median_ms, {"threads": threads, "rounds": ref.rounds, "method": "side-by-side",
                           "reference": ref.as_dict()}


def _error_histogram(ref: np.ndarray, out: np.ndarray, bins: int = 30) -> dict[str, Any]:
    """The distribution of the per-sample relative error ``||out - ref|| / ||ref||`` (for report.html)."""
    n = len(ref)
    r = ref.reshape(n, -1).astype(np.float64)
    err = np.linalg.norm(out.reshape(n, -1).astype(np.float64) - r, axis=1) / np.maximum(np.linalg.norm(r, axis=1),
                                                                                         1e-30)
    hi = float(err.max()) if n else 0.0
    counts, edges = np.histogram(err, bins=bins, range=(0.0, hi if hi > 0 else 1.0))
    return {"counts": counts.tolist(), "edges": edges.tolist(),
            "quantiles": {q: float(np.quantile(err, int(q[1:]) / 100)) for q in ("p50", "p90", "p99", "p100")}}


def _chain_reason(art: ArtifactRecord, i: int, chain: list[ArtifactRecord]) -> str:
    """Why this artifact sits at position ``i`` of the serving chain, in words for metadata and the report."""
    if not art.passed:
        return "missed its accuracy budget: served only after every artifact that met it"
    if art.latency_ms is None:
        return ("met its budget; not timed here (its runtime is not on this host, so it serves only where it is): "
                "kept in the profile's order, before the artifacts measured here")
    faster = [a.id for a in chain[:i] if a.passed and a.latency_ms is not None]
    return (f"met its budget; {art.latency_ms:.3g} ms per batch measured side by side: "
            + ("the fastest" if not faster else f"after {', '.join(faster)} (faster)"))
