"""TensorRT INT8 vs FP8 (E4M3) Q/DQ recipes on an sm_90 profile, accuracy only, SIMULATED.

No TensorRT runs here (it cannot be installed on these machines): each recipe's explicitly quantized ONNX is
run in onnxruntime on the CPU, as `qdeploy deploy --target nvidia-h100` verifies it, and compared with the
FP32 reference. TensorRT's fused kernels can differ from this simulation, and latency is not measured (it
would be the CPU's, not the GPU's). Prints a table and writes build/bench/tensorrt_sim.json.

    python benchmarks/bench_tensorrt_sim.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

RECIPES = {
    # every layer in one type, no fallback: the raw accuracy of each format
    "int8": {"precision": "int8", "fallback": {"max_trials": 0}},
    "fp8": {"precision": "fp8", "fallback": {"max_trials": 0}},
    # INT8 first; the layers the budget needs climb to FP8 before FP16
    "int8->fp8 ladder": {"precision": "int8", "fallback": {"ladder": ["int8", "fp8", "fp16", "fp32"],
                                                          "max_trials": 6}},
}


def run(name: str, factory: str, shape: str, calib: Path, val: Path, act: dict, threshold: float,
        work: Path) -> list[dict]:
    import qdeploy

    rows = []
    for recipe, spec in RECIPES.items():
        spec = {**spec, "activations": {**act, "symmetric": True},
                "budget": {"metric": "top1_agreement", "threshold": threshold}}
        t0 = time.perf_counter()
        b = qdeploy.deploy(factory, target="nvidia-h100", spec=spec, calib=calib, val=val, input_shape=shape,
                           output=work / f"{name}-{recipe.replace('>', '').replace(' ', '-')}",
                           backends=["tensorrt"])
        art = b.artifacts[0]
        counts: dict[str, int] = {}
        for p in art["layer_precisions"].values():
            counts[p] = counts.get(p, 0) + 1
        m = art["metrics"]
        rows.append({"model": name, "recipe": recipe, "precision": art["precision"], "layers": counts,
                     "trials": art["trials"], "top1_agreement": m.get("top1_agreement"),
                     "top1_accuracy": m.get("top1_accuracy"), "cosine": m["cosine"], "sqnr_db": m["sqnr_db"],
                     "budget": f">= {threshold}", "passed": art["budget"]["passed"], "verified_on": art["verified_on"],
                     "deploy_s": round(time.perf_counter() - t0, 1)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="digits only")
    args = ap.parse_args()
    import digits

    out_dir = ROOT / "build" / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="qdeploy-bench-trt-") as tmp:
        work = Path(tmp)
        d = digits.prepare(work / "digits")
        rows += run("digits-cnn", f"{ROOT / 'examples' / 'digits.py'}:build_model", "1x1x8x8", d / "calib.npz",
                    d / "val.npz", {"method": "minmax"}, 0.99, work)
        if not args.quick:
            import efficientnet

            e = efficientnet.prepare(work / "effnet")
            rows += run("efficientnet-lite0", f"{ROOT / 'examples' / 'efficientnet.py'}:build_model",
                        "1x3x224x224", e / "calib.npz", e / "val.npz",
                        {"method": "percentile", "percentile": 99.99}, 0.95, work)
    report = {"where": "SIMULATED: the TensorRT Q/DQ ONNX run in onnxruntime on this CPU (no TensorRT here); "
                       "accuracy against the FP32 reference only, no latency", "results": rows}
    (out_dir / "tensorrt_sim.json").write_text(json.dumps(report, indent=2))
    print(f"measured: {report['where']}")
    hdr = (f"{'model':<19} {'recipe':<17} {'layers':<24} {'trials':>6} {'top1 agr':>9} {'cosine':>7} "
           f"{'sqnr dB':>8}  budget")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        layers = ", ".join(f"{n} {p}" for p, n in r["layers"].items())
        print(f"{r['model']:<19} {r['recipe']:<17} {layers:<24} {r['trials']:>6} {r['top1_agreement']:>9.4f} "
              f"{r['cosine']:>7.4f} {r['sqnr_db']:>8.2f}  {'pass' if r['passed'] else 'FAIL'} ({r['budget']})")
    print(f"wrote {out_dir / 'tensorrt_sim.json'}")


if __name__ == "__main__":
    main()
