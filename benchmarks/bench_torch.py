"""Benchmark of the torch backend on this CPU: a larger CNN and an MLP, batch 32, one thread, same run.

For each model: FP32 eager, FP32 compiled (Inductor), qdeploy's torch INT8 artifact (x86 engine) (``qdeploy.deploy`` with
``--backend torch``, run through its own runner), and torchao PT2E used directly with its defaults
(``X86InductorQuantizer`` default config, ``prepare_pt2e``/``convert_pt2e``, ``torch.compile`` with freezing)
on the same model and calibration data; then the FX engines as their profiles pick them (fbgemm for
x86-avx2, qnnpack for arm64-neon: on x86 the latter shows what ``check`` warns about). Both models are trained here on scikit-learn's digits (the CNN on the
images upsampled to 3x32x32), so accuracy is real top-1 on the held-out split. Prints a table and writes
build/bench/torch.json.

    .venv/bin/python benchmarks/bench_torch.py [--threads 1] [--repeats 30]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
CACHE = ROOT / "build" / "cache"
BATCH = 32
SPEC = {"precision": "int8", "weights": {"bits": 8, "symmetric": True, "granularity": "per_channel"},
        "activations": {"mode": "static", "method": "mse"},
        "budget": {"metric": "top1_accuracy", "mode": "relative", "threshold": 0.01},
        "fallback": {"max_trials": 0}, "calibration": {"samples": 300}}


def cnn():
    import torch.nn as nn

    def block(i, o):
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

    class CNN(nn.Module):
        """VGG-style, 3x32x32 in: 6 conv+BN+ReLU layers (64-128-256 channels), 3 pools, 2 linear layers."""

        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(*block(3, 64), *block(64, 64), nn.MaxPool2d(2), *block(64, 128),
                                          *block(128, 128), nn.MaxPool2d(2), *block(128, 256), *block(256, 256),
                                          nn.MaxPool2d(2))
            self.fc1 = nn.Linear(256 * 4 * 4, 512)
            self.fc2 = nn.Linear(512, 10)
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.fc2(self.relu(self.fc1(self.features(x).flatten(1))))

    return CNN()


def mlp():
    import torch.nn as nn

    return nn.Sequential(nn.Flatten(), nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 2048), nn.ReLU(),
                         nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))


def data(kind: str):
    import torch
    import torch.nn.functional as F
    from digits import load_digits_split

    x, y, xv, yv = load_digits_split()
    if kind == "cnn":
        up = lambda a: F.interpolate(torch.from_numpy(a), size=32, mode="bilinear").repeat(1, 3, 1, 1).numpy()
        x, xv = up(x), up(xv)
    return x.astype(np.float32), y, xv.astype(np.float32), yv


def trained(kind: str):
    import torch

    torch.manual_seed(0)  # the initial weights too: the same model on every run
    model = cnn() if kind == "cnn" else mlp()
    path = CACHE / f"bench_{kind}.pt"
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    from digits import fit

    x, y, _, _ = data(kind)
    fit(model, x, y, epochs=3 if kind == "cnn" else 8, lr=1e-3, seed=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


def timed(fn, x, repeats: int) -> float:
    fn(x)
    fn(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000)


def top1(fn, xv, yv) -> float:
    preds = [np.asarray(fn(xv[i:i + BATCH])).argmax(1) for i in range(0, len(xv) - BATCH + 1, BATCH)]
    n = len(preds) * BATCH
    return float((np.concatenate(preds) == yv[:n]).mean())


def bench(kind: str, repeats: int, work: Path) -> dict:
    import torch
    import torch._inductor.config as inductor_config

    import qdeploy
    from qdeploy_torch.runner import TorchRunner

    model = trained(kind)
    x, y, xv, yv = data(kind)
    shape = "x".join(map(str, (1,) + x.shape[1:]))
    np.savez(work / f"{kind}_calib.npz", input=x, y=y)
    np.savez(work / f"{kind}_val.npz", input=xv, y=yv)
    xb = xv[:BATCH]

    def eager(a):
        with torch.no_grad():
            return model(torch.from_numpy(a)).numpy()

    row = {"model": kind, "params": sum(p.numel() for p in model.parameters())}
    row["fp32_eager_ms"] = timed(eager, xb, repeats)
    row["fp32_top1"] = top1(eager, xv, yv)

    compiled = torch.compile(model, dynamic=False)

    def fp32c(a):
        with torch.no_grad(), inductor_config.patch(freezing=True):
            return compiled(torch.from_numpy(a)).numpy()

    t = time.perf_counter()
    fp32c(xb)
    row["fp32_compile_s"] = time.perf_counter() - t
    row["fp32_compiled_ms"] = timed(fp32c, xb, repeats)

    # qdeploy: the whole pipeline, then the artifact through its own runner
    t = time.perf_counter()
    bundle = qdeploy.deploy(model, target="x86-avx512-vnni", spec=SPEC, calib=work / f"{kind}_calib.npz",
                            val=work / f"{kind}_val.npz", input_shape=shape, backends=["torch"],
                            output=work / f"{kind}_bundle")
    row["qdeploy_deploy_s"] = time.perf_counter() - t
    art = bundle.manifest["artifacts"][0]
    runner = TorchRunner(bundle.path / art["path"], art["meta"])
    run = lambda a: runner.infer({"input": a})["output"]
    row["qdeploy_int8_ms"] = timed(run, xb, repeats)
    row["qdeploy_int8_top1"] = top1(run, xv, yv)
    row["qdeploy_size_vs_fp32"] = art["size_vs_fp32"]

    # torchao PT2E directly, its defaults, the same calibration samples qdeploy drew
    from qdeploy.calibration import select
    from qdeploy.spec import CalibrationSpec
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    idx = select(len(x), CalibrationSpec(samples=300), y)
    cal = torch.from_numpy(x[idx])
    t = time.perf_counter()
    gm = torch.export.export(model, (cal[:BATCH],), dynamic_shapes=({0: torch.export.Dim.AUTO},)).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    try:
        prepared = prepare_pt2e(gm, quantizer)
    except ValueError as exc:  # the shared-module case qdeploy handles (see quantize.tag_module_calls)
        row["torchao_error"] = str(exc)
        prepared = None
    if prepared is not None:
        for i in range(0, len(cal), BATCH):
            prepared(cal[i:i + BATCH])
        converted = convert_pt2e(prepared)
        inductor_config.freezing = True  # as torchao's PT2E x86 tutorial sets it
        direct = torch.compile(converted, dynamic=False)

        def ao(a):
            n = len(a)
            if n < BATCH:
                a = np.concatenate([a, np.zeros((BATCH - n,) + a.shape[1:], a.dtype)])
            with torch.no_grad():
                return direct(torch.from_numpy(a))[:n].numpy()

        ao(xb)
        row["torchao_build_s"] = time.perf_counter() - t
        row["torchao_int8_ms"] = timed(ao, xb, repeats)
        row["torchao_int8_top1"] = top1(ao, xv, yv)
        row["qdeploy_vs_torchao_speed"] = row["torchao_int8_ms"] / row["qdeploy_int8_ms"]
    # the FX engines (TorchScript artifacts): fbgemm as the x86-avx2 profile picks it, qnnpack as arm64-neon does
    for profile, label, engine in (("x86-avx2", "torch:fbgemm", "fbgemm"), ("arm64-neon", "torch:qnnpack", "qnnpack")):
        b = qdeploy.deploy(model, target=profile, spec=SPEC, calib=work / f"{kind}_calib.npz",
                           val=work / f"{kind}_val.npz", input_shape=shape, backends=[label],
                           output=work / f"{kind}_{engine}")
        a = b.manifest["artifacts"][0]
        eng = TorchRunner(b.path / a["path"], a["meta"])
        run_e = lambda v, eng=eng: eng.infer({"input": v})["output"]
        row[f"{engine}_int8_ms"] = timed(run_e, xb, max(5, repeats // 5))
        row[f"{engine}_int8_top1"] = top1(run_e, xv, yv)
    torch.backends.quantized.engine = "x86"
    row["int8_vs_fp32_eager"] = row["fp32_eager_ms"] / row["qdeploy_int8_ms"]
    row["int8_vs_fp32_compiled"] = row["fp32_compiled_ms"] / row["qdeploy_int8_ms"]
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--models", default="cnn,mlp")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="qdeploy-bench-") as tmp:
        for kind in args.models.split(","):
            print(f"benchmarking {kind} ...", file=sys.stderr, flush=True)
            rows.append(bench(kind, args.repeats, Path(tmp)))
    cols = [("model", "{}"), ("fp32_top1", "{:.4f}"), ("qdeploy_int8_top1", "{:.4f}"), ("torchao_int8_top1", "{:.4f}"),
            ("fp32_eager_ms", "{:.2f}"), ("fp32_compiled_ms", "{:.2f}"), ("qdeploy_int8_ms", "{:.2f}"),
            ("torchao_int8_ms", "{:.2f}"), ("fbgemm_int8_ms", "{:.2f}"), ("qnnpack_int8_ms", "{:.2f}"),
            ("int8_vs_fp32_eager", "{:.2f}x"),
            ("qdeploy_vs_torchao_speed", "{:.3f}"), ("qdeploy_size_vs_fp32", "{:.3f}")]
    print(" | ".join(c for c, _ in cols))
    for r in rows:
        print(" | ".join(f.format(r[c]) if c in r else "-" for c, f in cols))
    result = {"host": platform.processor() or platform.machine(), "torch": torch.__version__, "threads": args.threads,
              "batch": BATCH, "cpu_count": os.cpu_count(), "rows": rows}
    out = ROOT / "build" / "bench" / "torch.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
