"""One spec, one numerics: the same INT8 spec deployed through onnxruntime, torch (x86, PT2E + Inductor) and
LiteRT (XNNPACK) to ``x86-avx512-vnni``, with the accuracy transforms on or off, and how closely the three
artifacts agree with FP32 and with each other.

The torch and LiteRT builds take the core's calibrated activation ranges (matched to their observers) and, with
the transforms on, the transformed weights written into the PyTorch module. onnxruntime's artifact runs as float
Q/DQ (exact int32 accumulation: what the target computes; this host's AVX2 kernels saturate), torch's and
LiteRT's on their own runtimes here.

    python benchmarks/bench_cross_backend.py [--model efficientnet|digits] [--transforms on,off,ada] [--val 200]

``on``: CLE + bias correction; ``ada``: CLE + AdaRound (on its searched grid) + bias correction: the learned
integers must reach all three backends (each derives its weight scales from the written weights' max-abs).

Models: EfficientNet-Lite0 on real photo crops (``examples/efficientnet.py``, per-tensor weights, CLE + bias
correction), or the trained digits CNN with a 256x outlier channel (``examples/digits.py``). Prints a table and
writes build/bench_cross_backend.json.
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

MODELS = {"efficientnet": ("examples/efficientnet.py:build_model", "1x3x224x224"),
          "digits": ("examples/digits.py:build_sensitive_model", "1x1x8x8")}
PAIRS = (("onnxruntime", "torch"), ("onnxruntime", "tflite"), ("torch", "tflite"))


def _data(model: str) -> Path:
    out = ROOT / "build" / f"bench_cross_backend-{model}"
    if not (out / "val.npz").is_file():
        if model == "efficientnet":
            import efficientnet

            efficientnet.prepare(out)
        else:
            import digits

            digits.prepare(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="efficientnet")
    ap.add_argument("--transforms", default="on,off")
    ap.add_argument("--val", type=int, default=200)
    args = ap.parse_args()

    import qdeploy
    from qdeploy.backend import OrtRunner
    from qdeploy.profile_numerics import ExactInt32Runner
    from qdeploy.verify import output_metrics
    from qdeploy_tflite import LiteRTRunner
    from qdeploy_torch.runner import TorchRunner

    factory, shape = MODELS[args.model]
    data = _data(args.model)
    x = dict(np.load(data / "val.npz"))["input"][:args.val]
    rows = []
    for setting in args.transforms.split(","):
        on = setting in ("on", "ada")
        spec = {"precision": "int8", "weights": {"bits": 8, "symmetric": True, "granularity": "per_tensor"},
                "activations": {"mode": "static", "method": "minmax"},
                "transforms": {"cross_layer_equalization": on, "bias_correction": "empirical" if on else False,
                               "adaround": {"iterations": 1000} if setting == "ada" else False},
                "budget": {"metric": "cosine", "mode": "absolute", "threshold": 0.1}, "fallback": {"max_trials": 1}}
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            b = qdeploy.deploy(str(ROOT / factory), target="x86-avx512-vnni", spec=spec, calib=data / "calib.npz",
                               val=data / "val.npz", input_shape=shape, backends=["onnxruntime", "torch", "tflite"],
                               output=Path(tmp) / "bundle")
            seconds = time.perf_counter() - start
            arts = {a["backend"]: a for a in b.manifest["artifacts"]}
            fp32 = OrtRunner(b.path / "reference.onnx").infer({"input": x})["output"]
            outs = {"onnxruntime": ExactInt32Runner(b.path / arts["onnxruntime"]["path"], 2).infer({"input": x}),
                    "torch": TorchRunner(b.path / arts["torch"]["path"], arts["torch"]["meta"]).infer({"input": x}),
                    "tflite": LiteRTRunner(b.path / arts["tflite"]["path"], arts["tflite"]["meta"]).infer(
                        {"input": x})}
            outs = {k: v["output"] for k, v in outs.items()}
            row = {"transforms": setting, "deploy_s": round(seconds, 1),
                   "applied": {k: bool(a["transforms"].get("applied")) for k, a in arts.items()},
                   "ranges": {"torch": arts["torch"]["meta"].get("activation_ranges"),
                              "tflite": arts["tflite"]["meta"].get("calibration", {}).get("activation_ranges")}}
            for k, v in outs.items():
                m = output_metrics(fp32, v)
                row[f"{k}_vs_fp32"] = {"cosine": m["cosine"], "top1_agreement": m["top1_agreement"]}
            for a, c in PAIRS:
                m = output_metrics(outs[a], outs[c])
                row[f"{a}_vs_{c}"] = {"cosine": m["cosine"], "top1_agreement": m["top1_agreement"]}
            rows.append(row)
    print(f"{args.model}, per-tensor INT8 to x86-avx512-vnni, {len(x)} validation samples "
          f"(cosine / top-1 agreement)")
    cols = ["onnxruntime_vs_fp32", "torch_vs_fp32", "tflite_vs_fp32"] + [f"{a}_vs_{c}" for a, c in PAIRS]
    print("| transforms | " + " | ".join(c.replace("_vs_", " vs ") for c in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for r in rows:
        print(f"| {r['transforms']} | " + " | ".join(f"{r[c]['cosine']:.5f} / {r[c]['top1_agreement']:.3f}"
                                                     for c in cols) + " |")
    out = ROOT / "build" / "bench_cross_backend.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "host": platform.processor() or platform.machine(),
                               "where": "onnxruntime as float Q/DQ (exact int32), torch and LiteRT on their own "
                                        "runtimes on this host", "rows": rows}, indent=2, default=float))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
