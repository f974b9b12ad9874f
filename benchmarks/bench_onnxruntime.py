"""FP32 vs qdeploy INT8 vs onnxruntime.quantization.quantize_static (its defaults), same model, same data.

Runs on the onnxruntime CPU runtime of this machine, one thread per session, and prints a table and writes
build/bench/onnxruntime.json. Models: the digits CNN (batch 32) and EfficientNet-Lite0 (batch 8) on crops of
real photos. Latencies are medians over interleaved rounds (the machine is shared: compare ratios).

    python benchmarks/bench_onnxruntime.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))


def median_latency(runners: dict, feed: dict, rounds: int, budget_s: float) -> dict[str, float]:
    """Interleaved timing (qdeploy's own side-by-side timer): each round runs every runner once on ``feed``."""
    from qdeploy.verify import side_by_side

    n = len(next(iter(feed.values())))
    return {k: t.median_ms for k, t in side_by_side(runners, feed, batch=n, rounds=rounds, budget_s=budget_s,
                                                      warmup=1).items()}


def calibration_reader(calib: dict[str, np.ndarray]):
    """onnxruntime's CalibrationDataReader over named arrays, one sample per read."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            n = len(next(iter(calib.values())))
            self.it = iter([{k: v[i:i + 1] for k, v in calib.items()} for i in range(n)])

        def get_next(self):
            return next(self.it, None)
    return Reader()


def direct_quantize_static(fp32: Path, out: Path, calib: dict[str, np.ndarray]) -> Path:
    """onnxruntime's own static quantization with its defaults, fed the same calibration samples."""
    from onnxruntime.quantization import quantize_static

    quantize_static(str(fp32), str(out), calibration_reader(calib))
    return out


def bench_model(name: str, factory: str, shape: str, spec: dict, calib: Path, val: Path, batch: int,
                rounds: int, work: Path) -> dict:
    import qdeploy
    from qdeploy.backend import OrtRunner
    from qdeploy.calibration import open_data
    from qdeploy.spec import load_spec
    from qdeploy.verify import output_metrics, run_all

    t0 = time.perf_counter()
    bundle = qdeploy.deploy(factory, target="x86-avx512-vnni", spec=spec, calib=calib, val=val,
                            output=work / f"{name}-bundle", input_shape=shape, backends=["onnxruntime"])
    deploy_s = time.perf_counter() - t0
    art = bundle.artifacts[0]
    ref_path = bundle.reference_path
    cal_spec = load_spec(spec).calibration
    handle_inputs = bundle.manifest["model"]["inputs"]
    from qdeploy.model import ModelHandle, TensorInfo
    handle = ModelHandle(ref_path, [TensorInfo(i["name"], tuple(i["shape"]), i["dtype"]) for i in handle_inputs],
                         [], {}, "", "onnx", "")
    cx, _ = open_data(calib, handle, "calibration", cal_spec).arrays()  # the same samples qdeploy used
    t0 = time.perf_counter()
    direct = direct_quantize_static(ref_path, work / f"{name}-direct.onnx", cx)
    direct_s = time.perf_counter() - t0
    vx, vy = open_data(val, handle, "validation").arrays()

    runners = {"fp32": OrtRunner(ref_path, threads=1), "qdeploy": OrtRunner(bundle.path / art["path"], threads=1),
               "direct": OrtRunner(direct, threads=1)}
    outs = {k: run_all(r, vx)[bundle.manifest["budget_output"]] for k, r in runners.items()}
    feed = {k: v[:batch] for k, v in vx.items()}
    lat = median_latency(runners, feed, rounds, budget_s=60)
    size = {"fp32": ref_path.stat().st_size, "qdeploy": (bundle.path / art["path"]).stat().st_size,
            "direct": direct.stat().st_size}
    rows = {}
    for k in runners:
        m = output_metrics(outs["fp32"], outs[k], vy)
        rows[k] = {"latency_ms": lat[k], "speedup_vs_fp32": lat["fp32"] / lat[k], "size_bytes": size[k],
                   "size_vs_fp32": size[k] / size["fp32"], "top1_agreement": m.get("top1_agreement"),
                   "top1_accuracy": m.get("top1_accuracy"), "sqnr_db": m["sqnr_db"]}
    return {"model": name, "batch": batch, "val_samples": len(outs["fp32"]), "deploy_s": deploy_s,
            "direct_quantize_s": direct_s, "qdeploy_precision": art["precision"], "qdeploy_trials": art["trials"],
            "qdeploy_vs_direct_speed": lat["direct"] / lat["qdeploy"], "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="digits only")
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args()
    import digits

    out_dir = ROOT / "build" / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="qdeploy-bench-") as tmp:
        work = Path(tmp)
        d = digits.prepare(work / "digits")
        results.append(bench_model("digits-cnn", f"{ROOT / 'examples' / 'digits.py'}:build_model", "1x1x8x8",
                                   str(ROOT / "examples" / "digits_spec.toml"), d / "calib.npz", d / "val.npz", 32,
                                   args.rounds, work))
        if not args.quick:
            import efficientnet

            e = efficientnet.prepare(work / "effnet")
            spec = {"activations": {"method": "percentile", "percentile": 99.99},
                    "budget": {"metric": "top1_agreement", "threshold": 0.9}}
            results.append(bench_model("efficientnet-lite0", f"{ROOT / 'examples' / 'efficientnet.py'}:build_model",
                                       "1x3x224x224", spec, e / "calib.npz", e / "val.npz", 8, args.rounds, work))
    import onnxruntime

    report = {"where": f"onnxruntime {onnxruntime.__version__} CPU runtime, 1 thread, {platform.processor() or platform.machine()}",
              "results": results}
    (out_dir / "onnxruntime.json").write_text(json.dumps(report, indent=2))
    print(f"measured on: {report['where']}")
    hdr = f"{'model':<20} {'artifact':<9} {'latency ms':>10} {'vs fp32':>8} {'size':>6} {'top1 agr':>9} {'top1 acc':>9}"
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        for k, row in r["rows"].items():
            acc = f"{row['top1_accuracy']:.4f}" if row["top1_accuracy"] is not None else "-"
            print(f"{r['model']:<20} {k:<9} {row['latency_ms']:>10.2f} {row['speedup_vs_fp32']:>7.2f}x "
                  f"{row['size_vs_fp32']:>5.2f}x {row['top1_agreement']:>9.4f} {acc:>9}")
        print(f"{'':<20} qdeploy vs quantize_static defaults: {r['qdeploy_vs_direct_speed']:.2f}x speed "
              f"(qdeploy {r['qdeploy_precision']}, {r['qdeploy_trials']} trial(s), batch {r['batch']})")
    print(f"wrote {out_dir / 'onnxruntime.json'}")


if __name__ == "__main__":
    main()
