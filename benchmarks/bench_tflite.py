"""TFLite backend benchmark on a larger CNN, all on the LiteRT CPU runtime (XNNPACK) of this machine.

    .venv/bin/python benchmarks/bench_tflite.py [--threads 1] [--runs 200]

The model: a residual CNN (conv-BN-ReLU stem, three stages of two residual blocks at 32/64/128 channels,
global average pool, linear; 0.6M parameters, about 110M multiply-adds) on scikit-learn's digits upsampled to
32x32, trained here in about a minute and cached under build/cache. Compared, each on one LiteRT
interpreter:

* LiteRT FP32: ``litert_torch.convert`` of the model;
* qdeploy INT8: ``qdeploy.deploy`` to x86-avx512-vnni's tflite entry with the digits spec (per-channel
  symmetric weights, MSE-calibrated activations, top-1 budget), a full-integer .tflite;
* litert-torch INT8: litert-torch used directly with its documented default recipe
  (``PT2EQuantizer`` + ``get_symmetric_quantization_config(is_per_channel=True)``, its histogram observers),
  calibrated on the same samples.

Prints a table and writes build/bench/tflite.json. Latency is the median of ``--runs`` single-sample
invocations after a warm-up; accuracy is top-1 on the held-out digits split.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
CACHE = ROOT / "build" / "cache" / "bench_tflite_resnet.pt"
SIZE = 32


def make_net():
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU()
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = self.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return self.relu(y + (x if self.down is None else self.down(x)))

    class ResNetDigits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
            self.layer1 = nn.Sequential(Block(32, 32, 1), Block(32, 32, 1))
            self.layer2 = nn.Sequential(Block(32, 64, 2), Block(64, 64, 1))
            self.layer3 = nn.Sequential(Block(64, 128, 2), Block(128, 128, 1))
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(128, 10)

        def forward(self, x):
            x = self.layer3(self.layer2(self.layer1(self.stem(x))))
            return self.fc(self.pool(x).flatten(1))

    return ResNetDigits()


def data():
    import torch
    import torch.nn.functional as F

    from digits import load_digits_split

    x, y, xv, yv = load_digits_split()
    up = lambda a: F.interpolate(torch.from_numpy(a), size=(SIZE, SIZE), mode="bilinear",  # noqa: E731
                                 align_corners=False).numpy()
    return up(x), y, up(xv), yv


def trained_model(x: np.ndarray, y: np.ndarray):
    import torch

    torch.manual_seed(0)
    model = make_net()
    if CACHE.is_file():
        model.load_state_dict(torch.load(CACHE, weights_only=True))
        return model.eval()
    from digits import fit

    fit(model, x, y, epochs=4, lr=2e-3, seed=0)
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), CACHE)
    return model


def litert_default_int8(model, calib: np.ndarray, path: Path) -> None:
    """litert-torch's own documented PT2E recipe, nothing from qdeploy."""
    import litert_torch
    import torch
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    sample = (torch.from_numpy(calib[:1]),)
    prepared = prepare_pt2e(torch.export.export(model, sample).module(), quantizer)
    with torch.no_grad():
        for i in range(len(calib)):
            prepared(torch.from_numpy(calib[i:i + 1]))
    converted = convert_pt2e(prepared, fold_quantize=False)
    litert_torch.convert(converted, sample, quant_config=QuantConfig(pt2e_quantizer=quantizer)).export(str(path))


def evaluate(path: Path, x: np.ndarray, y: np.ndarray, threads: int, runs: int) -> dict:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), num_threads=threads)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]

    def feed(sample: np.ndarray) -> np.ndarray:
        if inp["dtype"] == np.float32:
            return sample
        s, z = inp["quantization"]
        return np.clip(np.round(sample / s) + z, -128, 127).astype(inp["dtype"])

    preds = []
    for i in range(len(x)):
        it.set_tensor(inp["index"], feed(x[i:i + 1]))
        it.invoke()
        preds.append(int(it.get_tensor(out["index"]).argmax()))
    one = feed(x[:1])
    for _ in range(20):
        it.set_tensor(inp["index"], one)
        it.invoke()
    times = []
    for _ in range(runs):
        it.set_tensor(inp["index"], one)
        t = time.perf_counter()
        it.invoke()
        times.append(time.perf_counter() - t)
    ops = sorted({o["op_name"] for o in it._get_ops_details()})
    return {"latency_ms": statistics.median(times) * 1e3, "top1": float(np.mean(np.array(preds) == y)),
            "size_bytes": path.stat().st_size, "input_dtype": np.dtype(inp["dtype"]).name, "ops": ops}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "build" / "bench" / "tflite.json"))
    args = ap.parse_args()

    import litert_torch
    import torch

    import qdeploy

    x, y, xv, yv = data()
    model = trained_model(x, y)
    with torch.no_grad():
        torch_top1 = float((model(torch.from_numpy(xv)).argmax(1).numpy() == yv).mean())
    work = Path(tempfile.mkdtemp(prefix="bench-tflite-"))
    results: dict[str, dict] = {}
    t0 = time.perf_counter()
    litert_torch.convert(model, (torch.from_numpy(x[:1]),)).export(str(work / "fp32.tflite"))
    results["LiteRT FP32"] = {"build_s": time.perf_counter() - t0}

    t0 = time.perf_counter()
    bundle = qdeploy.deploy(model, target="x86-avx512-vnni", spec=ROOT / "examples" / "digits_spec.toml",
                            calib={"input": x, "y": y}, val={"input": xv, "y": yv}, output=work / "bundle",
                            input_shape=f"1x1x{SIZE}x{SIZE}", backends=["tflite"])
    art = bundle.artifacts[0]
    results["qdeploy INT8"] = {"build_s": time.perf_counter() - t0, "precision": art["precision"],
                               "float_ops": art["meta"]["float_ops"],
                               "events": [f"[{e['code']}] {e['message']}" for e in bundle.manifest["events"]]}
    qd_path = bundle.path / art["path"]

    t0 = time.perf_counter()
    from qdeploy.calibration import select
    from qdeploy.spec import load_spec

    cal = load_spec(ROOT / "examples" / "digits_spec.toml").calibration
    litert_default_int8(model, x[select(len(x), cal, y)], work / "litert_int8.tflite")  # the same 300 samples
    results["litert-torch INT8 (default recipe)"] = {"build_s": time.perf_counter() - t0}

    paths = {"LiteRT FP32": work / "fp32.tflite", "qdeploy INT8": qd_path,
             "litert-torch INT8 (default recipe)": work / "litert_int8.tflite"}
    for name, path in paths.items():
        results[name].update(evaluate(path, xv, yv, args.threads, args.runs))
    fp32 = results["LiteRT FP32"]
    for r in results.values():
        r["speedup_vs_fp32"] = fp32["latency_ms"] / r["latency_ms"]
        r["size_vs_fp32"] = r["size_bytes"] / fp32["size_bytes"]
    qd, lt = results["qdeploy INT8"], results["litert-torch INT8 (default recipe)"]
    summary = {"int8_vs_fp32_speed": qd["speedup_vs_fp32"], "qdeploy_vs_litert_default_speed":
               lt["latency_ms"] / qd["latency_ms"], "torch_fp32_top1": torch_top1}

    print(f"\nLiteRT CPU runtime (ai-edge-litert, XNNPACK), {args.threads} thread(s), batch 1, median of {args.runs}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible")
    print(f"model: residual CNN, 1x1x{SIZE}x{SIZE} input; top-1 on {len(yv)} held-out digits "
          f"(PyTorch FP32 {torch_top1:.4f})\n")
    head = f"{'artifact':<36} {'latency ms':>10} {'vs FP32':>8} {'top-1':>7} {'size KiB':>9} {'vs FP32':>8}"
    print(head + "\n" + "-" * len(head))
    for name, r in results.items():
        print(f"{name:<36} {r['latency_ms']:>10.3f} {r['speedup_vs_fp32']:>7.2f}x {r['top1']:>7.4f} "
              f"{r['size_bytes'] / 1024:>9.1f} {r['size_vs_fp32']:>7.2f}x")
    print(f"\nqdeploy INT8 vs LiteRT FP32: {summary['int8_vs_fp32_speed']:.2f}x faster; qdeploy INT8 speed / "
          f"litert-torch default INT8 speed: {summary['qdeploy_vs_litert_default_speed']:.2f}")
    if qd["float_ops"]:
        print(f"note: float ops left in the qdeploy artifact: {qd['float_ops']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "runs": args.runs, "runtime": "ai-edge-litert (XNNPACK)",
                               "results": results, "summary": summary}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
