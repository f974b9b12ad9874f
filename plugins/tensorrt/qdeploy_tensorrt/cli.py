"""``qdeploy build-engine BUNDLE``: build a bundle's TensorRT engine(s) on this GPU, re-verify each engine with
TensorRT against the FP32 reference through the core's one verification path, and replace what the bundle
records of the artifact (metrics, budget verdict, where it was verified, its warm-up outputs) with what the GPU
gave. An engine that misses the budget is recorded as missing it (an ``ACCURACY_BELOW_BUDGET`` event, and the
serving chain puts it after every artifact that met its budget); the command then exits 1."""
from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qdeploy.errors import BundleError, QDeployError


def add_build_engine(subparsers: Any) -> None:
    p = subparsers.add_parser("build-engine", help="build a bundle's TensorRT engine on this GPU (TensorRT installed), "
                              "verify it and update the manifest")
    p.add_argument("bundle", help="a bundle folder written by `qdeploy deploy` for an NVIDIA target")
    p.add_argument("--artifact", help="the TensorRT artifact id (default: every TensorRT artifact of the bundle)")
    p.add_argument("--val", help="validation data to verify on (default: the bundle's stored samples)")
    p.add_argument("--workspace-mb", type=int, help="TensorRT builder workspace in MiB (default: the build config's)")
    p.set_defaults(func=cmd_build_engine)


def cmd_build_engine(args: argparse.Namespace) -> int:
    import json

    from qdeploy.backend import load_bundle, verify_artifact

    from . import engine

    bundle = load_bundle(args.bundle)
    m = bundle.manifest
    ids = [a["id"] for a in m["artifacts"] if a["backend"] == "tensorrt" and args.artifact in (None, a["id"])]
    if not ids:
        have = ", ".join(a["id"] for a in m["artifacts"] if a["backend"] == "tensorrt") or "none"
        raise BundleError(f"bundle {args.bundle} has no TensorRT artifact {args.artifact or ''}".rstrip() +
                          f" (TensorRT artifacts: {have}); deploy to an nvidia-* target first")
    if args.workspace_mb is not None and args.workspace_mb <= 0:
        raise QDeployError(f"--workspace-mb {args.workspace_mb} must be a positive number of MiB")
    usable, reason, version, gpu = engine.tensorrt_status()
    if not usable:
        raise QDeployError(f"build-engine needs TensorRT and an NVIDIA GPU: {reason}; run it on the target GPU "
                           f"with TensorRT installed")
    x, y, source = bundle.verification_data(args.val)
    reference = bundle.reference_run(x, y, source=source)
    stored = bundle.stored_inputs() if args.val else None  # the warm-up inputs, when not what was verified on
    where = {"kind": "gpu", "runtime": f"tensorrt {version}", "device": gpu}
    status = 0
    for art_id in ids:
        art = bundle.artifact(art_id)
        recorded = bundle.recorded(art_id)  # what it was verified with until now: the simulation, or an older engine
        folder = bundle.path / art["path"]
        config = json.loads((folder / engine.BUILD_CONFIG).read_text())
        if args.workspace_mb:
            config["workspace_mb"] = args.workspace_mb
        print(f"{art_id}: building {engine.ENGINE} with TensorRT {version} on {gpu} ...", flush=True)
        start = time.monotonic()
        with _restored_on_failure(folder, (engine.ENGINE, engine.TIMING_CACHE)):  # the bundle stays intact
            info = engine.build_engine(folder, config)
            build_s = round(time.monotonic() - start, 1)
            runner = engine.TrtRunner(folder / engine.ENGINE)
            try:
                found = verify_artifact(runner, reference, bundle.budget, bundle.budget_output, where=where,
                                        recorded=recorded)
                warm = runner.infer(stored) if stored is not None else found.outputs
            finally:
                runner.close()
        record = {**art, **found.as_record(), "meta": {**art.get("meta", {}), **info},
                  "engine": {**info, "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "build_s": build_s}}
        events = []
        if found.passed and not (art.get("budget") or {}).get("passed", True):
            record["chain_reason"] = ("met its budget on the GPU (qdeploy build-engine) after missing it when "
                                      "deployed: served after the artifacts that met it then")
        if not found.passed:
            status = 1
            record["chain_reason"] = ("missed its accuracy budget on the GPU (qdeploy build-engine): served only after "
                                      "every artifact that met it")
            b = found.budget
            events.append({"code": "ACCURACY_BELOW_BUDGET", "target": art["target"],
                           "message": f"{art_id}: the TensorRT engine ({version}, {gpu}) misses the budget: "
                                      f"{found.describe()}",
                           "artifact": art_id, "metric": b.metric, "value": b.value, "budget": b.budget,
                           "verified_on": dict(found.verified_on)})
        bundle.replace_artifact(record, dict(warm), events)
        print(f"{art_id}: {'pass' if found.passed else 'FAIL'}: {found.describe()} (TensorRT {version}, {gpu})")
    print(f"manifest updated: {Path(args.bundle) / 'manifest.json'}")
    return status


@contextlib.contextmanager
def _restored_on_failure(folder: Path, names: tuple[str, ...]) -> Iterator[None]:
    """Put ``names`` in ``folder`` back as they were if the block raises: a failed build or load leaves the
    artifact folder matching the manifest's sha256 (the bundle stays loadable)."""
    before = {n: (folder / n).read_bytes() if (folder / n).is_file() else None for n in names}
    try:
        yield
    except BaseException:
        for n, data in before.items():
            if data is None:
                (folder / n).unlink(missing_ok=True)
            else:
                (folder / n).write_bytes(data)
        raise
