"""``qdeploy build-engine BUNDLE``: build a bundle's TensorRT engine(s) on this GPU, verify them with TensorRT
against the FP32 reference, and rewrite the manifest (integrity map included)."""
from __future__ import annotations

import argparse
import json
import time
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
    from qdeploy.bundle import Bundle, path_sha256, path_size, write_manifest
    from qdeploy.spec import QuantSpec
    from qdeploy.verify import check_budget, output_metrics, run_all

    from .engine import BUILD_CONFIG, ENGINE, TrtRunner, build_engine, tensorrt_status

    bundle = Bundle.load(args.bundle)
    m = bundle.manifest
    arts = [a for a in m["artifacts"] if a["backend"] == "tensorrt" and args.artifact in (None, a["id"])]
    if not arts:
        have = ", ".join(a["id"] for a in m["artifacts"] if a["backend"] == "tensorrt") or "none"
        raise BundleError(f"bundle {args.bundle} has no TensorRT artifact {args.artifact or ''}".rstrip() +
                          f" (TensorRT artifacts: {have}); deploy to an nvidia-* target first")
    if args.workspace_mb is not None and args.workspace_mb <= 0:
        raise QDeployError(f"--workspace-mb {args.workspace_mb} must be a positive number of MiB")
    usable, reason, version, gpu = tensorrt_status()
    if not usable:
        raise QDeployError(f"build-engine needs TensorRT and an NVIDIA GPU: {reason}; run it on the target GPU "
                           f"with TensorRT installed")
    x, y = _verification_data(bundle, args.val)
    out_name = m["budget_output"]
    ref = run_all(bundle.reference_runner(), x)
    ref_metrics = output_metrics(ref[out_name], ref[out_name], y)
    budget = QuantSpec.from_dict(m["spec"]).budget
    status = 0
    for art in arts:
        folder = bundle.path / art["path"]
        config = json.loads((folder / BUILD_CONFIG).read_text())
        if args.workspace_mb:
            config["workspace_mb"] = args.workspace_mb
        print(f"{art['id']}: building {ENGINE} with TensorRT {version} on {gpu} ...", flush=True)
        start = time.monotonic()
        info = build_engine(folder, config)
        runner = TrtRunner(folder / ENGINE)
        out = run_all(runner, x)
        runner.close()
        metrics = output_metrics(ref[out_name], out[out_name], y)
        try:
            result = check_budget(budget, metrics, ref_metrics, out_name)
            passed, detail = result.passed, result.describe()
        except QDeployError:  # a label metric without labels: judge on agreement with the FP32 reference
            passed = metrics["top1_agreement"] >= art["metrics"].get("top1_agreement", 1.0) - 0.01 \
                if "top1_agreement" in metrics else metrics["cosine"] >= 0.99
            detail = f"top1_agreement {metrics.get('top1_agreement', float('nan')):.4f}, cosine {metrics['cosine']:.4f}" \
                     f" (no labels for {budget.metric})"
        art["meta"].update(info)
        art["engine"] = {**info, "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                         "build_s": round(time.monotonic() - start, 1),
                         "verification": {"samples": len(next(iter(x.values()))), "source": args.val or "stored samples",
                                          "metrics": metrics, "passed": passed, "detail": detail}}
        art["verified_on"] = "gpu" if passed else art["verified_on"]
        art["sha256"], art["size_bytes"] = path_sha256(folder), path_size(folder)
        if not passed:
            status = 1
        print(f"{art['id']}: {'pass' if passed else 'FAIL'}: {detail} (TensorRT {version}, {gpu})")
    write_manifest(bundle.path, m)
    print(f"manifest updated: {Path(args.bundle) / 'manifest.json'}")
    return status


def _verification_data(bundle: Any, val: str | None) -> tuple[dict, Any]:
    if val:
        from qdeploy.calibration import open_data
        from qdeploy.model import ModelHandle, TensorInfo

        inputs = [TensorInfo(i["name"], tuple(i["shape"]), i["dtype"]) for i in bundle.manifest["model"]["inputs"]]
        handle = ModelHandle(bundle.reference_path, inputs, [], {}, "", "onnx", "")
        return open_data(val, handle, "validation").arrays()
    s = bundle.samples()
    return {k.split(":", 1)[1]: v for k, v in s.items() if k.startswith("input:")}, None
