"""One model, many targets: ``qdeploy deploy MODEL --target a,b,c -o DIR``.

The model is exported once (to the FP32 reference ONNX every target starts from) and calibrated once per
observer setting the targets need; both are shared through the cache folder (``QDEPLOY_CACHE``), as the
sensitivity tables are. Then every target is deployed as a Ray task into ``DIR/<target>/`` (a local Ray started
with this machine's cores, or the cluster at ``ray_address``); without Ray installed the targets run one after
another, with a one-line notice. ``DIR/index.json`` lists every bundle with its verdict and events, or the error
of a target that failed.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BundleError, DataError, QDeployError

INDEX = "index.json"
Echo = Callable[[str], None]


def parse_targets(text: str | None, file: str | Path | None = None) -> list[str]:
    """Targets from ``a,b,c`` and/or a file (one per line, ``#`` comments; or a TOML/JSON list under
    ``targets``). Duplicates are an error: each target writes its own bundle."""
    names = [t.strip() for t in (text or "").split(",") if t.strip()]
    if file is not None:
        path = Path(file)
        try:
            raw = path.read_text()
        except OSError as exc:
            raise DataError(f"targets file {path}: {exc.strerror or exc}") from None
        if path.suffix in (".toml", ".json"):
            try:
                import tomllib

                data = json.loads(raw) if path.suffix == ".json" else tomllib.loads(raw)
            except ValueError as exc:
                raise DataError(f"targets file {path} cannot be parsed: {exc}") from None
            listed = data.get("targets") if isinstance(data, dict) else data
            if not isinstance(listed, list) or not all(isinstance(t, str) for t in listed):
                raise DataError(f"targets file {path}: give a list of profile names under 'targets'")
            names += listed
        else:
            names += [line.split("#", 1)[0].strip() for line in raw.splitlines() if line.split("#", 1)[0].strip()]
    dupes = sorted({t for t in names if names.count(t) > 1})
    if dupes:
        raise DataError(f"target(s) {', '.join(dupes)} given twice; each target writes one bundle")
    if not names:
        raise DataError("no target given: --target a,b,c or --targets-file FILE")
    return names


def folder_name(target: str) -> str:
    """The bundle folder of a target: its profile name (a profile file's stem)."""
    return Path(target).stem if target.endswith(".toml") else target


@dataclass
class FanoutResult:
    path: Path
    index: dict[str, Any]

    @property
    def exit_code(self) -> int:
        codes = [t["exit_code"] for t in self.index["targets"] if t["exit_code"]]
        return max(codes) if codes else 0


def _deploy_one(target: str, kwargs: dict[str, Any], cache: str | None) -> dict[str, Any]:
    """One target's deploy (in a Ray worker or in this process): a summary for the index, never a raise."""
    if cache:
        os.environ["QDEPLOY_CACHE"] = cache
    from .pipeline import deploy

    start = time.perf_counter()
    lines: list[str] = []
    try:
        bundle = deploy(target=target, echo=lines.append, **kwargs)
    except QDeployError as exc:
        return {"target": target, "exit_code": exc.exit_code, "error": str(exc), "log": lines,
                "seconds": time.perf_counter() - start}
    except Exception as exc:  # noqa: BLE001 - one target's bug must not lose the others' bundles
        return {"target": target, "exit_code": 3, "error": f"internal error: {type(exc).__name__}: {exc}",
                "log": lines, "seconds": time.perf_counter() - start}
    m = bundle.manifest
    return {"target": target, "exit_code": 0, "profile": m["profile"]["name"],
            "verdict": "pass" if any(a["budget"]["passed"] for a in m["artifacts"]) else "below budget",
            "artifacts": [{"id": a["id"], "passed": a["budget"]["passed"], "metric": a["budget"]["metric"],
                           "value": a["budget"]["value"], "verified_on": a["verified_on"],
                           "latency_vs_fp32": a.get("latency_vs_fp32")} for a in m["artifacts"]],
            "events": m["events"], "calibration_from_cache": m["calibration"].get("from_cache", False),
            "log": lines, "seconds": time.perf_counter() - start}


def _prepare(model: Any, targets: list[str], spec: Any, calib: Any, input_shape: Any, backends: list[str] | None,
             policy: str | None, work: Path, echo: Echo) -> None:
    """Export the model once and calibrate once per observer setting the targets need (into the cache)."""
    from .calibration import open_data
    from .model import load_model
    from .pipeline import _resolutions, _with_policy, resolve_profile
    from .plugins import get_registry
    from .run import load_cached_ranges, needs_ranges, save_cached_ranges
    from .spec import load_spec

    registry = get_registry()
    qspec = _with_policy(load_spec(spec), policy)
    start = time.perf_counter()
    handle = load_model(model, work / "reference.onnx", input_shape)
    echo(f"fan-out: model exported once ({time.perf_counter() - start:.1f} s), shared by {len(targets)} targets "
         f"through the cache")
    calib_ds = open_data(calib, handle, "calibration", qspec.calibration)
    if calib_ds is None:
        return
    done: set[tuple] = set()
    for target in targets:
        for res in _resolutions(resolve_profile(target, registry), registry, handle, qspec, backends):
            if res.spec is None or not needs_ranges(res.spec, handle):
                continue
            a = res.spec.activations
            key = (a.method, a.momentum, a.percentile, a.symmetric)
            if key in done:
                continue
            done.add(key)
            if load_cached_ranges(handle, calib_ds, res.spec) is None:
                from .calibration import collect_ranges

                start = time.perf_counter()
                save_cached_ranges(handle, calib_ds, res.spec, collect_ranges(handle, calib_ds, a))
                echo(f"fan-out: calibrated once for {a.method} observers ({'symmetric' if a.symmetric else 'asymmetric'}"
                     f", {time.perf_counter() - start:.1f} s), shared through the cache")


def deploy_many(model: Any, targets: list[str], output: str | Path, spec: Any = None, calib: Any = None,
                val: Any = None, input_shape: Any = None, backends: list[str] | None = None,
                policy: str | None = None, threads: int | None = None, objective: str = "latency",
                ray_address: str | None = None, use_ray: bool | None = None, echo: Echo | None = None) -> FanoutResult:
    """Deploy ``model`` to every target in ``targets`` (see the module's doc). ``use_ray``: None uses Ray when it
    is installed; False runs the targets one after another."""
    echo = echo or (lambda s: None)
    out = Path(output)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / INDEX).is_file())):
        raise BundleError(f"output {out} exists and is not an empty folder or an earlier fan-out (no {INDEX}); "
                          f"choose another -o folder")
    out.mkdir(parents=True, exist_ok=True)
    cache = os.environ.get("QDEPLOY_CACHE")
    if cache is None:
        from .sensitivity import cache_dir

        cache = str(cache_dir())
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="qdeploy-fanout-"))
    try:
        _prepare(model, targets, spec, calib, input_shape, backends, policy, work, echo)
        # every target loads the model itself (the torch and TFLite backends need the module), its ONNX export and
        # its calibration from the cache the driver just filled
        kwargs_of = {t: {"model": model, "spec": spec, "calib": calib, "val": val, "input_shape": input_shape,
                         "output": str(out / folder_name(t)), "backends": backends, "policy": policy,
                         "threads": threads, "objective": objective} for t in targets}
        ray: Any = None
        if use_ray is not False:
            try:
                import ray as ray_module

                ray = ray_module
            except ImportError:
                if use_ray:
                    raise QDeployError("--ray needs Ray: pip install 'qdeploy[ray]'") from None
                echo("fan-out: Ray is not installed (pip install 'qdeploy[ray]'): the targets run one after another")
        if ray is not None:
            if not ray.is_initialized():
                ray.init(address=ray_address, num_cpus=None if ray_address else os.cpu_count(),
                         include_dashboard=False, log_to_driver=False, configure_logging=False,
                         runtime_env={"env_vars": {"QDEPLOY_CACHE": cache}})
            where = f"Ray at {ray_address}" if ray_address else f"a local Ray ({os.cpu_count()} CPUs)"
            echo(f"fan-out: {len(targets)} targets as Ray tasks on {where}")
            task = ray.remote(num_cpus=1)(_deploy_one)
            results = ray.get([task.remote(t, kwargs_of[t], cache) for t in targets])
            mode = "ray"
        else:
            results = []
            for t in targets:
                echo(f"fan-out: deploying {t}")
                results.append(_deploy_one(t, kwargs_of[t], cache))
            mode = "sequential"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for r in results:
        r["bundle"] = f"{folder_name(r['target'])}/" if r["exit_code"] == 0 else None
        echo(f"  {r['target']:<22} " + (f"{r['verdict']}: " + ", ".join(
            f"{a['id']} {'pass' if a['passed'] else 'FAIL'} ({a['metric']} {a['value']:.4f})" for a in r["artifacts"])
            if r["exit_code"] == 0 else f"error (exit {r['exit_code']}): {r['error']}"))
    index = {"model": str(model) if isinstance(model, (str, Path)) else type(model).__name__, "mode": mode,
             "wall_s": time.perf_counter() - start, "shared": {"export": "once, by the driver",
                                                               "calibration": "once per observer setting, cache"},
             "targets": results}
    tmp = out / f".{INDEX}.tmp"
    tmp.write_text(json.dumps(index, indent=2, default=str) + "\n")
    tmp.replace(out / INDEX)
    return FanoutResult(out, index)
