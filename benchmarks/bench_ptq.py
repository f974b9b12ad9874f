"""The PTQ toolkit on EfficientNet-Lite0 (ReLU6, depthwise convs), real photo crops, onnxruntime QDQ INT8.

For each reference variant -- ``original`` (BatchNorm folded, nothing else), ``cle`` (cross-layer equalization,
ReLU6 kept, FP32 function unchanged on the calibration data), ``cle+bc`` (CLE then sequential empirical bias
correction for the weight granularity at hand, 8-bit activations simulated), ``cle+bcw`` (the same, weights
only), ``bc``/``bcw`` (bias correction alone) and any of them with ``ada`` (AdaRound, before bias correction,
``--ada-iterations`` per layer) -- and each weight granularity
(per-channel, per-tensor) and calibration method (the core's streaming observers: minmax, entropy,
percentile), the activation ranges are calibrated on the variant itself and handed to
``onnxruntime.quantization.quantize_static`` as its calibration cache (QDQ, u8 asymmetric activations, s8
symmetric weights, every supported op quantized, no layer left in float); the artifact runs on the held-out crops
and is compared with the ORIGINAL FP32 model: top-1 agreement and mean cosine of the logits, run on this CPU's
integer kernels (onnxruntime's default) and as float Q/DQ arithmetic (BASIC optimizations: what a runtime without
u8 x s8 saturation computes; on AVX2 without VNNI onnxruntime's fused kernels saturate in int16).

    python benchmarks/bench_ptq.py [--calib 300] [--val 200] [--bc-samples 64] [--methods minmax,entropy]
                                   [--variants original,cle,cle+bc] [--granularity per_channel,per_tensor]

Prints a table and writes build/bench_ptq.json. Crops and the exported reference are cached in build/bench_ptq/.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))


def _session(path: Path, basic: bool = False) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if basic:  # Q/DQ run as the float arithmetic ONNX defines (no fused integer kernels)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run(path: Path, x: np.ndarray, batch: int = 25, basic: bool = False) -> np.ndarray:
    sess = _session(path, basic)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def metrics(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    cos = (ref * out).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1))
    return {"top1_agreement": float((ref.argmax(1) == out.argmax(1)).mean()), "cosine": float(cos.mean()),
            "cosine_min": float(cos.min())}


def quantize(src: Path, dst: Path, ranges: Any, per_channel: bool, work: Path) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from qdeploy.backend import quiet
    from qdeploy_onnxruntime import ort_calibration_cache

    proto = onnx.load(str(src))
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    inits = {t.name for t in proto.graph.initializer}
    unranged = [n.name for n in proto.graph.node
                if any(t and t not in inits and types.get(t) == onnx.TensorProto.FLOAT and t not in ranges.ranges
                       for t in list(n.input) + list(n.output))]
    cache = ort_calibration_cache(ranges.ranges, work / "calibration.json")
    with quiet(""):
        quantize_static(str(src), str(dst), calibration_data_reader=None, calibration_cache_path=cache,
                        quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        per_channel=per_channel, nodes_to_exclude=unranged, calibrate_method=CalibrationMethod.MinMax)


def accumulation() -> Any:
    """How this CPU's INT8 kernels accumulate (qdeploy's own model of it): without an 8-bit dot product (VNNI)
    onnxruntime's u8 x s8 kernels sum pairs of products in saturating int16, and INT8 speed and accuracy here say
    little of a VNNI target's."""
    from qdeploy.profile_numerics import accumulation_of
    from qdeploy.profiles import cpu_flags

    return accumulation_of("cpu", platform.machine(), cpu_flags())


def timed(ref_path: Path, rows: list[dict[str, Any]], data: dict[str, np.ndarray], work: Path) -> dict[str, Any]:
    """Every artifact of ``rows``, the FP32 reference and onnxruntime ``quantize_static`` with its defaults (QDQ,
    s8 activations, per-tensor weights, MinMax on the same calibration crops), timed side by side in this process
    on this CPU's kernels (qdeploy's interleaved timer, one thread each, batch 8): median ms and the ratio to FP32."""
    from bench_onnxruntime import direct_quantize_static

    from qdeploy.backend import OrtRunner
    from qdeploy.verify import side_by_side

    name = _session(ref_path).get_inputs()[0].name
    t = time.time()
    direct = direct_quantize_static(ref_path, work / "quantize_static_defaults.onnx", {name: data["calib"]})
    print(f"quantize_static defaults: {time.time() - t:.0f}s", flush=True)
    fp32 = run(ref_path, data["val"])
    paths = {"fp32": ref_path, "quantize_static defaults": direct}
    paths.update({f"{r['variant']} {r['granularity']} {r['method']}": r["artifact"] for r in rows})
    runners = {k: OrtRunner(p, threads=1) for k, p in paths.items()}
    feed = {name: data["val"][:8]}
    times = side_by_side(runners, feed, batch=8, rounds=20, budget_s=240, warmup=1, reference="fp32")
    out: dict[str, Any] = {}
    for k, p in paths.items():  # the ratio: the median over rounds of FP32's time / this one's in the same round
        out[k] = {"median_ms": times[k].median_ms, "speedup_vs_fp32": times[k].vs_reference}
        if k != "fp32":
            out[k].update(metrics(fp32, run(p, data["val"])))
    import onnxruntime

    return {"where": f"onnxruntime {onnxruntime.__version__} CPU kernels, 1 thread, batch 8, interleaved rounds; "
                     f"{accumulation().why}",
            "artifacts": out}


def crops_and_reference(calib: int, val: int) -> tuple[dict[str, np.ndarray], Path]:
    """The calibration and validation crops and the exported FP32 reference, cached in build/bench_ptq/."""
    import efficientnet

    from qdeploy.model import load_model

    cache = ROOT / "build" / "bench_ptq"
    cache.mkdir(parents=True, exist_ok=True)
    data = {}
    for name, n, seed in (("calib", calib, 1), ("val", val, 2)):
        f = cache / f"{name}_{n}.npy"
        if not f.exists():
            np.save(f, efficientnet.crops(n, seed))
        data[name] = np.load(f)
    ref_path = cache / "reference.onnx"
    if not ref_path.exists():
        load_model(f"{ROOT / 'examples' / 'efficientnet.py'}:build_model", ref_path, "1x3x224x224")
    return data, ref_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=300)
    ap.add_argument("--val", type=int, default=200)
    ap.add_argument("--bc-samples", type=int, default=128, help="calibration samples the transforms run on")
    ap.add_argument("--methods", default="minmax,percentile")
    ap.add_argument("--variants", default="original,bcw,cle+bcw")
    ap.add_argument("--granularity", default="per_channel,per_tensor")
    ap.add_argument("--headroom", type=float, default=2.0, help="CLE clip headroom (see cross_layer_equalization)")
    ap.add_argument("--ada-iterations", type=int, default=1000, help="AdaRound steps per layer (variants with ada)")
    ap.add_argument("--keep", help="a folder to keep each variant's transformed FP32 model in (for "
                                   "bench_error_budget.py --model)")
    ap.add_argument("--reuse-kept", action="store_true", help="load a variant's transformed model from --keep when "
                                                                  "it is there instead of transforming again")
    ap.add_argument("--latency", action="store_true",
                    help="also time every artifact against the FP32 reference side by side on this CPU's kernels "
                         "(1 thread, batch 8), with onnxruntime quantize_static's defaults on the same crops")
    args = ap.parse_args()
    import logging

    logging.basicConfig(format="%(message)s")
    logging.getLogger("qdeploy.adaround").setLevel(logging.DEBUG)  # one line per layer: AdaRound is the slow part

    import onnx

    from qdeploy import transforms as T
    from qdeploy.calibration import collect_ranges, open_data
    from qdeploy.model import load_model
    from qdeploy.spec import (ActivationSpec, AdaRoundSpec, CalibrationSpec, PerTensor, QuantSpec, TransformsSpec,
                              WeightSpec)

    t0 = time.time()
    data, ref_path = crops_and_reference(args.calib, args.val)
    print(f"data + reference: {time.time() - t0:.0f}s", flush=True)
    original = onnx.load(str(ref_path))
    in_name = original.graph.input[0].name
    fp32 = run(ref_path, data["val"])
    calib_feeds = [{in_name: data["calib"][i:i + 32]} for i in range(0, len(data["calib"]), 32)]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="qdeploy-bench-ptq-") as tmp:
        work = Path(tmp)
        grans = args.granularity.split(",")
        variants: dict[tuple[str, str], tuple[Path, list[dict[str, Any]], float]] = {}
        for variant in args.variants.split(","):
            for gran in grans:
                if not {"bc", "bcw", "ada"} & set(variant.split("+")) and gran != grans[0]:  # one model for both
                    variants[(variant, gran)] = variants[(variant, grans[0])]
                    continue
                t1 = time.time()
                ws = WeightSpec(granularity=PerTensor()) if gran == "per_tensor" else WeightSpec()
                parts = variant.split("+")
                tspec = TransformsSpec(cross_layer_equalization="cle" in parts,
                                       bias_correction="empirical" if {"bc", "bcw"} & set(parts) else False,
                                       adaround=AdaRoundSpec(args.ada_iterations) if "ada" in parts else False)
                spec = QuantSpec(weights=ws, activations=ActivationSpec(mode="static"), transforms=tspec)
                path = work / f"{variant}_{gran}.onnx"
                kept = Path(args.keep or ".") / path.name
                if args.reuse_kept and args.keep and kept.exists():
                    model, events = onnx.load(str(kept)), [{"transform": "kept", "applied": True, "count": None,
                                                            "skipped": 0, "reason": str(kept)}]
                else:
                    model, events = T.transform_model(original, spec, calib_feeds, max_samples=args.bc_samples,
                                                      clip_headroom=args.headroom, simulate_activations="bc" in parts)
                onnx.save(model, str(path))
                if args.keep:
                    Path(args.keep).mkdir(parents=True, exist_ok=True)
                    onnx.save(model, str(Path(args.keep) / path.name))
                out = run(path, data["val"])
                drift = float(np.abs(out - fp32).max() / np.abs(fp32).max())
                summary = [{k: e[k] for k in ("transform", "applied", "count", "skipped", "reason")} for e in events]
                for e in events:
                    if e["transform"] == "cross_layer_equalization" and e["changes"]:
                        done = [c for c in e["changes"] if "skipped" not in c]
                        summary.append({"cle_pairs": len(done), "depthwise_pairs": sum(c["groups"] > 1 for c in done),
                                        "clip_fixed_channels": sum(c["clip_fixed_channels"] for c in done)})
                variants[(variant, gran)] = (path, summary, drift)
                print(f"{variant:>8} {gran:<11} transforms {time.time() - t1:5.0f}s  FP32 drift vs original "
                      f"{drift:.2e}  {[(s.get('transform'), s.get('count')) for s in summary]}", flush=True)
        for method in args.methods.split(","):
            act = ActivationSpec(mode="static", method=method, percentile=99.999)
            ranged: dict[Path, Any] = {}
            for (variant, gran), (path, summary, drift) in variants.items():
                t1 = time.time()
                if path not in ranged:
                    handle = load_model(str(path), work / f"ref_{path.stem}.onnx")
                    ds = open_data({in_name: data["calib"]}, handle, "calibration",
                                   CalibrationSpec(samples=args.calib, batch_size=16))
                    ranged[path] = collect_ranges(handle, ds, act)
                q = work / f"q_{variant}_{gran}_{method}.onnx"
                quantize(path, q, ranged[path], gran == "per_channel", work)
                m = metrics(fp32, run(q, data["val"]))
                f = metrics(fp32, run(q, data["val"], basic=True))
                rows.append({"variant": variant, "granularity": gran, "method": method, **m,
                             "float_qdq": f, "fp32_drift": drift, "transforms": summary, "artifact": q})
                print(f"{variant:>8} {gran:<11} {method:<10} top1 {m['top1_agreement']:.3f}  cosine "
                      f"{m['cosine']:.4f}  | float Q/DQ top1 {f['top1_agreement']:.3f} cosine {f['cosine']:.4f}"
                      f"  ({time.time() - t1:.0f}s)", flush=True)
        latency = timed(ref_path, rows, data, work) if args.latency else None
        for r in rows:
            r["artifact"] = r["artifact"].name
    import onnxruntime

    report = {"where": f"onnxruntime {onnxruntime.__version__} CPU, {platform.processor() or platform.machine()}",
              "int8_accumulation": accumulation().kind, "calib": args.calib, "val": args.val,
              "bc_samples": args.bc_samples, "clip_headroom": args.headroom, "seconds": time.time() - t0, "rows": rows, "latency": latency}
    out = ROOT / "build" / "bench_ptq.json"
    out.write_text(json.dumps(report, indent=2, default=float))
    print(f"\n{'variant':<9} {'weights':<12} {'method':<11} {'top1 agr':>8} {'cosine':>7} | float Q/DQ "
          f"{'top1':>6} {'cosine':>7}")
    for r in rows:
        print(f"{r['variant']:<9} {r['granularity']:<12} {r['method']:<11} {r['top1_agreement']:>8.3f} "
              f"{r['cosine']:>7.4f} | {'':>10} {r['float_qdq']['top1_agreement']:>6.3f} "
              f"{r['float_qdq']['cosine']:>7.4f}")
    if latency:
        print(f"\nlatency, {latency['where']}")
        for name, v in latency["artifacts"].items():
            acc = (f"  top1 {v['top1_agreement']:.3f} cosine {v['cosine']:.4f}" if "cosine" in v else "")
            print(f"{name:<40} {v['median_ms']:8.2f} ms  {v['speedup_vs_fp32']:5.2f}x FP32{acc}")
    print(f"wrote {out} ({report['seconds']:.0f}s)")


if __name__ == "__main__":
    main()
