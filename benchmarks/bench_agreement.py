"""Do the backends of one bundle compute the same INT8 model? Every artifact and the FP32 reference run on the same
validation data; the table gives, for every pair, the mean per-sample cosine of their outputs and their top-1
agreement (classifier outputs). Each artifact is judged the way the deploy judged it (``Bundle.judge_runner``): its
own runtime here, or the target's exact INT8 accumulation, emulated, where this host's kernels differ.

Two INT8 artifacts closer to each other than to FP32 share their numerics (the same ranges, the same places of
Q/DQ); far apart, a backend quantizes differently -- what "one spec, one numerics everywhere" has to close.

    python benchmarks/bench_agreement.py BUNDLE --val VAL.npz [--threads 2]

Prints the table and writes build/bench/agreement.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    den = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return float(np.mean((a * b).sum(1) / den))


def main() -> int:
    from qdeploy.bundle import Bundle
    from qdeploy.verify import run_all

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--val", required=True, help="validation .npz with the model's input names")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    bundle = Bundle.load(args.bundle)
    x, _, _ = bundle.verification_data(args.val)
    output = bundle.budget_output
    outs, where = {}, {}
    runner = bundle.reference_runner(args.threads)
    try:
        outs["fp32"] = run_all(runner, x)[output]
    finally:
        runner.close()
    where["fp32"] = "onnxruntime (reference)"
    for art in bundle.artifacts:
        runner, numerics = bundle.judge_runner(art["id"], args.threads)
        try:
            outs[art["id"]] = run_all(runner, x)[output]
        finally:
            runner.close()
        where[art["id"]] = numerics or "its runtime here"
    names = list(outs)
    classes = outs["fp32"].ndim == 2 and outs["fp32"].shape[1] > 1
    pairs = {a: {b: {"cosine": cosine(outs[a], outs[b]),
                     **({"top1_agreement": float(np.mean(outs[a].argmax(1) == outs[b].argmax(1)))} if classes else {})}
                 for b in names} for a in names}
    width = max(len(n) for n in names)
    print(f"cosine{' / top-1 agreement' if classes else ''} of every pair, {len(outs['fp32'])} samples, output "
          f"{output!r}")
    print(" " * width + "  " + "  ".join(n.rjust(14)[:14] for n in names))
    for a in names:
        cells = [f"{pairs[a][b]['cosine']:.4f}" + (f"/{pairs[a][b]['top1_agreement']:.3f}" if classes else "")
                 for b in names]
        print(a.ljust(width) + "  " + "  ".join(c.rjust(14) for c in cells))
    for n in names:
        print(f"  {n}: {where[n]}")
    out = ROOT / "build" / "bench" / "agreement.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"bundle": str(args.bundle), "samples": len(outs["fp32"]), "output": output,
                               "where": where, "pairs": pairs}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
