"""GPU check of the torch backend (at most ~5 minutes; never max-autotune): FP16 and BF16 on CUDA against FP32.

Deploys the digits model and the benchmark CNN (benchmarks/bench_torch.py, trained on digits upsampled to
3x32x32) with ``qdeploy.deploy(..., backends=["torch:cuda"])`` at fp16 and at bf16, then prints per model and
precision: top-1 accuracy (FP32 vs the artifact), top-1 agreement with FP32, and latency of the artifact's
runner against FP32 eager on the same GPU, same batch, numpy in and out for both. Writes
build/bench/gpu_torch.json.

    python benchmarks/gpu_check_torch.py                 # on a machine with an NVIDIA GPU
    python benchmarks/gpu_check_torch.py --cpu-dry-run   # exercise the same code on CPU (no GPU numbers)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))
DEADLINE_S = 280.0


def profile(device: str, batch: int):
    """nvidia-h100's torch entry (device cuda), with the benchmark batch; on --cpu-dry-run a CPU stand-in."""
    from qdeploy.plugins import get_registry

    prof = get_registry().profile("nvidia-h100")
    entry = next(t for t in prof.backends if t.backend == "torch")
    opts = dict(entry.options)
    opts.update(device=device, batch=batch)
    entry = dataclasses.replace(entry, options=tuple(sorted(opts.items())), slow=("fp16",) if device == "cpu" else ())
    return dataclasses.replace(prof, backends=(entry,))


def timed(fn, x, repeats: int, sync) -> float:
    for _ in range(3):
        fn(x)
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        sync()
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-dry-run", action="store_true", help="run the same steps on CPU (no GPU numbers)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    start = time.monotonic()
    import torch

    import qdeploy
    from qdeploy_torch.runner import TorchRunner

    device = "cpu" if args.cpu_dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU visible to torch: nothing to check (use --cpu-dry-run to exercise the script)")
        return 2
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name(0) if device == 'cuda' else 'cpu'}, "
          f"batch {args.batch}", flush=True)

    import bench_torch
    import digits

    x, y, xv, yv = digits.load_digits_split()
    models = {"digits": (digits.build_model(), x, y, xv, yv), "cnn": (bench_torch.trained("cnn"),
                                                                      *bench_torch.data("cnn"))}
    prof = profile(device, args.batch)
    rows = []
    with tempfile.TemporaryDirectory(prefix="qdeploy-gpu-") as tmp:
        work = Path(tmp)
        for name, (model, xc, yc, xval, yval) in models.items():
            reps = max(1, -(-args.batch // len(xval)))  # tile the validation set up to one full batch
            xb = np.concatenate([xval] * reps)[:args.batch]
            np.savez(work / f"{name}_val.npz", input=xval, y=yval)
            shape = "x".join(map(str, (1,) + xval.shape[1:]))
            fp32 = model.to(device).eval()

            def eager(a, fp32=fp32):
                with torch.no_grad():
                    return fp32(torch.from_numpy(a).to(device)).float().cpu().numpy()

            ref_ms = timed(eager, xb, args.repeats, sync)
            ref_pred = np.concatenate([eager(xval[i:i + 256]) for i in range(0, len(xval), 256)]).argmax(1)
            for prec in ("fp16", "bf16"):
                if time.monotonic() - start > DEADLINE_S:
                    print(f"stopping early: {DEADLINE_S:.0f} s spent", flush=True)
                    break
                t = time.perf_counter()
                spec = {"precision": prec, "budget": {"metric": "top1_accuracy", "mode": "relative",
                                                      "threshold": 0.01}}
                bundle = qdeploy.deploy(model.cpu(), target=prof, spec=spec, val=work / f"{name}_val.npz",
                                        input_shape=shape, backends=["torch"], output=work / f"{name}_{prec}")
                build_s = time.perf_counter() - t
                art = bundle.manifest["artifacts"][0]
                runner = TorchRunner(bundle.path / art["path"], art["meta"])
                run = lambda a, r=runner: r.infer({"input": a})["output"]
                ms = timed(run, xb, args.repeats, sync)
                pred = run(xval).argmax(1)
                rows.append({"model": name, "precision": prec, "artifact_precision": art["precision"],
                             "fp32_top1": float((ref_pred == yval).mean()), "top1": float((pred == yval).mean()),
                             "agreement": float((pred == ref_pred).mean()), "fp32_ms": ref_ms, "ms": ms,
                             "speedup": ref_ms / ms, "deploy_s": build_s, "budget_passed": art["budget"]["passed"]})
                r = rows[-1]
                print(f"{name:7s} {prec}: top-1 {r['top1']:.4f} (fp32 {r['fp32_top1']:.4f}), agreement "
                      f"{r['agreement']:.4f}, {ms:.2f} ms vs fp32 {ref_ms:.2f} ms = {r['speedup']:.2f}x "
                      f"(deploy {build_s:.0f} s)", flush=True)
                fp32 = fp32.to(device)
    out = ROOT / "build" / "bench" / ("gpu_torch.json" if device == "cuda" else "gpu_torch_dryrun.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device, "torch": torch.__version__, "batch": args.batch, "rows": rows},
                              indent=2))
    print(f"wrote {out} in {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
