"""The zoo of real public models (examples/zoo.py) through every backend that takes each, as a user runs it.

For each model: the host's own x86 profile (detected) and, for ONNX models, `nvidia-t4` (TensorRT, simulated).
For each model and target: `qdeploy deploy` from the command line under `/usr/bin/time -v` (wall time, peak
RSS), then, in this process, every artifact timed interleaved with the FP32 reference (round-robin rounds,
median, one thread: QDEPLOY_TFLITE_THREADS=1, torch.set_num_threads(1), onnxruntime intra_op 1) on a batch of
the validation data. The metric is the model's own (cosine for maps/sequences/embeddings, top-1 agreement for
classifiers) against FP32 on the held-out real data, from the manifest.

    python benchmarks/bench_zoo.py [--models a,b] [--calib 64] [--val 32] [--trials 0] [--rounds 10]

Prints README's zoo table and writes build/bench/zoo.json. "verified on" says where: `runtime` is the real
runtime on this CPU, `simulated` the TensorRT Q/DQ graph run in onnxruntime (no TensorRT here).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
os.environ.setdefault("QDEPLOY_TFLITE_THREADS", "1")

import zoo  # noqa: E402
from bench_onnxruntime import median_latency  # noqa: E402

QDEPLOY = str(Path(sys.executable).parent / "qdeploy")


def host_profile() -> str:
    """This host's x86 profile: its int8 kernels are what runs here (an artifact for a VNNI profile verified
    on an AVX2 host saturates in onnxruntime's u8 x s8 kernels, which the AVX2 profile avoids with 7-bit
    weights)."""
    from qdeploy.profiles import detect_profile_name

    name = detect_profile_name()
    return name if name.startswith("x86") else "x86-avx512-vnni"


HOST = host_profile()


def deploy(model: zoo.ZooModel, data: Path, out: Path, target: str, trials: int, backend: str | None) -> dict:
    spec = out.parent / f"{out.name}.spec.json"
    spec.write_text(json.dumps({"budget": {"metric": model.metric, "threshold": 0.99 if model.metric == "cosine"
                                           else 0.95}, "fallback": {"max_trials": trials}}))
    cmd = ["/usr/bin/time", "-v", QDEPLOY, "deploy", model.model_path(), "--target", target, "--calib",
           str(data / "calib.npz"), "--val", str(data / "val.npz"), "--spec", str(spec), "-o", str(out)]
    if model.input_shape:
        cmd += ["--input-shape", model.input_shape]
    if backend:
        cmd += ["--backend", backend]
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr)
    text = res.stdout + res.stderr
    return {"rc": res.returncode, "wall_s": wall, "peak_rss_mb": int(rss.group(1)) / 1024 if rss else None,
            "last_line": next((ln for ln in reversed(res.stdout.strip().splitlines()) if ln.strip()), "")
            if res.returncode == 0 else next((ln for ln in text.splitlines() if ln.startswith("qdeploy:")), text[-300:])}


def interleaved(bundle_dir: Path, feed: dict[str, np.ndarray], rounds: int) -> dict[str, float]:
    """Median ms per artifact id (and 'fp32'), timed round-robin in this process on one thread."""
    import torch

    from qdeploy.backend import OrtRunner
    from qdeploy.bundle import Bundle

    torch.set_num_threads(1)
    b = Bundle.load(bundle_dir)
    runners = {"fp32": OrtRunner(b.reference_path, threads=1)}
    for a in b.artifacts:
        if a["verified_on"] == "simulated":
            continue
        runners[a["id"]] = (OrtRunner(b.path / a["path"], threads=1) if a["backend"] == "onnxruntime"
                            else b.runner(a["id"]))
    lat = median_latency(runners, feed, rounds, budget_s=600.0)
    for r in runners.values():
        r.close()
    return lat


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(zoo.ZOO))
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--val", type=int, default=32)
    ap.add_argument("--trials", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-zoo-") as tmp:
        for name in args.models.split(","):
            model = zoo.get(name)
            data = model.prepare(Path(tmp) / name / "data", args.calib, args.val)
            val = dict(np.load(data / "val.npz"))
            feed = {k: v[:8] for k, v in val.items()}
            runs = [(HOST, None)] + ([("nvidia-t4", "tensorrt")] if model.fmt == "onnx" else [])
            for target, backend in runs:
                out = Path(tmp) / name / target
                run = deploy(model, data, out, target, args.trials, backend)
                print(f"{name} -> {target}: exit {run['rc']}, {run['wall_s']:.0f} s, peak RSS "
                      f"{run['peak_rss_mb']:.0f} MB", flush=True)
                if run["rc"] != 0:
                    rows.append({"model": name, "target": target, **run})
                    continue
                manifest = json.loads((out / "manifest.json").read_text())
                lat = interleaved(out, feed, args.rounds)
                for a in manifest["artifacts"]:
                    m = a["metrics"]
                    rows.append({"model": name, "target": target, "backend": a["backend"],
                                 "precision": a["precision"], "metric": model.metric,
                                 "value": m.get(model.metric), "budget_passed": a["budget"]["passed"],
                                 "speed_vs_fp32": lat["fp32"] / lat[a["id"]] if a["id"] in lat else None,
                                 "size_vs_fp32": a["size_vs_fp32"], "verified_on": a["verified_on"], **run})
    print(f"\n| model | backend | precision | metric vs FP32 | speed vs FP32 | size | verified on | deploy | peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "backend" not in r:
            print(f"| {r['model']} | ({r['target']}) | — | exit {r['rc']}: {r['last_line'][:80]} | | | | "
                  f"{r['wall_s']:.0f} s | {r['peak_rss_mb']:.0f} MB |")
            continue
        speed = f"{r['speed_vs_fp32']:.2f}×" if r["speed_vs_fp32"] else "—"
        print(f"| {r['model']} | {r['backend']} | {r['precision']} | {r['metric']} {r['value']:.4f} | {speed} | "
              f"{r['size_vs_fp32']:.2f}× | {r['verified_on']} | {r['wall_s']:.0f} s | {r['peak_rss_mb']:.0f} MB |")
    out = ROOT / "build" / "bench" / "zoo.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"profile": HOST, "measured_on": "this host's CPU; speed interleaved with the FP32 reference in one "
                               "process, one thread, batch 8, median of rounds; deploy wall time and peak RSS of the "
                               "whole CLI process (/usr/bin/time -v)", "args": vars(args), "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
