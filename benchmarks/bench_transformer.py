"""Transformer INT8 on CPU: qdeploy's recipes against onnxruntime's own quantizers on the same data.

The zoo's BERT sentence encoder (examples/zoo.py: 2 layers, trained here on CPython's docs, sdpa attention with
the -inf / float-min mask fill), both ONNX exports (dynamo=False and dynamo=True). Each recipe is scored by mean
cosine of the embeddings to FP32 on held-out text, and timed interleaved with the FP32 model in this process:
batch 8, one intra-op thread, round-robin rounds, median.

    python benchmarks/bench_transformer.py [--calib 300] [--val 200] [--rounds 30]

Prints a table and writes build/bench/transformer.json. Measured with onnxruntime on this host's CPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import zoo  # noqa: E402
from bench_onnxruntime import calibration_reader, direct_quantize_static, median_latency  # noqa: E402

from qdeploy.backend import OrtRunner  # noqa: E402
from qdeploy.verify import run_all  # noqa: E402


def session(path: Path) -> OrtRunner:
    return OrtRunner(path, threads=1)


def run(runner: OrtRunner, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return run_all(runner, feeds, batch=8)[runner.output_names[0]]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(np.where(den > 0, (a * b).sum(1) / np.maximum(den, 1e-30), 1.0)))


def recipes(src: Path, calib_npz: Path, val_npz: Path, work: Path, calib: dict[str, np.ndarray]) -> dict[str, Path]:
    import qdeploy
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    out: dict[str, Path] = {}
    for label, spec in (("qdeploy default (auto -> dynamic)", None),
                        ("qdeploy static recipe", {"activations": {"mode": "static"}})):
        full = {"budget": {"metric": "cosine", "threshold": 0.5}, "fallback": {"max_trials": 0}, **(spec or {})}
        b = qdeploy.deploy(str(src), target="x86-avx512-vnni", spec=full, calib=calib_npz, val=val_npz,
                           output=work / label.split()[1], backends=["onnxruntime"])
        out[label] = b.path / b.artifacts[0]["path"]
    out["ort quantize_static, defaults"] = work / "ort_static_default.onnx"
    direct_quantize_static(src, out["ort quantize_static, defaults"], calib)
    out["ort quantize_static, MatMul, per-channel"] = work / "ort_static_matmul.onnx"
    quantize_static(str(src), str(out["ort quantize_static, MatMul, per-channel"]), calibration_reader(calib),
                    quant_format=QuantFormat.QDQ, per_channel=True, op_types_to_quantize=["MatMul"])
    out["ort quantize_dynamic, per-channel"] = work / "ort_dynamic.onnx"
    quantize_dynamic(str(src), str(out["ort quantize_dynamic, per-channel"]), per_channel=True,
                     weight_type=QuantType.QInt8)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", type=int, default=300)
    ap.add_argument("--val", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-transformer-") as tmp:
        for name in ("bert-encoder", "bert-encoder-dynamo"):
            model = zoo.get(name)
            data = model.prepare(Path(tmp) / name / "data", args.calib, args.val)
            calib, val = dict(np.load(data / "calib.npz")), dict(np.load(data / "val.npz"))
            src = Path(model.model_path())
            work = Path(tmp) / name
            arts = recipes(src, data / "calib.npz", data / "val.npz", work, calib)
            ref = session(src)
            ref_out = run(ref, val)
            sessions = {"fp32": ref, **{k: session(p) for k, p in arts.items()}}
            feed = {k: v[:8] for k, v in val.items()}
            lat = median_latency(sessions, feed, args.rounds, budget_s=600.0)
            for label, path in arts.items():
                rows.append({"model": name, "recipe": label, "cosine": cosine(ref_out, run(sessions[label], val)),
                             "speed_vs_fp32": lat["fp32"] / lat[label], "latency_ms": lat[label],
                             "fp32_latency_ms": lat["fp32"], "size_vs_fp32": path.stat().st_size / src.stat().st_size})
    print(f"{'model':20s} {'recipe':42s} {'cosine':>8s} {'speed':>7s} {'size':>6s}")
    for r in rows:
        print(f"{r['model']:20s} {r['recipe']:42s} {r['cosine']:8.4f} {r['speed_vs_fp32']:6.2f}x "
              f"{r['size_vs_fp32']:5.2f}x")
    out = ROOT / "build" / "bench" / "transformer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"measured_on": "onnxruntime, this host's CPU, 1 intra-op thread, batch 8, "
                               "interleaved rounds (median)", "calib": args.calib, "val": args.val, "rows": rows},
                              indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
