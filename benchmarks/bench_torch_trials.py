"""What one torch fallback trial costs before it is verified, with and without reusing the run's export and
calibration: EfficientNet-Lite0 (pretrained) on its 300 real photo crops, PT2E static INT8 (x86 engine), the
trial sequence a search makes (plain INT8, then the 1, 3 and 6 layers ranked most sensitive kept in FP32).

"fresh" exports, prepares and calibrates every trial (what the backend did before); "reused" is the backend's
path now: export and calibrate once with every layer observed, then give each trial the calibrated observers of
the edges it watches. Both produce the converted graph; the benchmark checks the two give the same outputs.
Verification (torch.compile + the validation run, about 25 s a trial here) is the same in both and not timed.
Same process, alternating, this machine's CPU. Prints a table and writes build/bench/torch_trials.json.

    .venv/bin/python benchmarks/bench_torch_trials.py
"""
from __future__ import annotations

import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
SPEC = {"precision": "int8", "weights": {"granularity": "per_channel"},
        "activations": {"mode": "static", "method": "minmax"}}


def main() -> None:
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    import efficientnet
    from qdeploy.calibration import open_data
    from qdeploy.model import load_model
    from qdeploy.plugins import get_registry
    from qdeploy.spec import QuantSpec
    from qdeploy_torch import build as b
    from qdeploy_torch import quantize as q

    torch.set_num_threads(2)
    data_dir = ROOT / "build" / "effnet"
    if not (data_dir / "calib.npz").is_file():
        efficientnet.prepare(data_dir)
    work = Path(tempfile.mkdtemp(prefix="bench-torch-trials-"))
    handle = load_model("examples/efficientnet.py:build_model", work / "m.onnx", "1x3x224x224")
    data = open_data(data_dir / "calib.npz", handle, "calibration")
    target = next(t for t in get_registry().profile("x86-avx512-vnni").backends if t.label == "torch:x86")
    plan = SimpleNamespace(spec=QuantSpec.from_dict(SPEC), target=target, state={"data": data}, model=handle)
    module = handle.torch_module.eval()
    example = b.example_inputs(plan, 32)
    x = torch.from_numpy(next(data.batches(16))[0][handle.inputs[0].name])
    convs = [n for n, m in module.named_modules() if isinstance(m, torch.nn.Conv2d)]
    ranked = [convs[0], convs[-1], convs[1], convs[2], convs[len(convs) // 2], convs[-2]]  # a plausible ranking
    trials = [{}] + [{n: "fp32" for n in ranked[:k]} for k in (1, 3, 6)]

    def fresh(keep):
        gm = q.export_for_quantization(copy.deepcopy(module), example, "m")
        prepared = prepare_pt2e(gm, b._quantizer(plan, keep))
        b._calibrate(plan, prepared, example)
        return prepared

    rows = []
    b.release()
    with b.quiet(), torch.no_grad():
        for keep in trials:
            t = time.perf_counter()
            a = fresh(keep)
            t_fresh = time.perf_counter() - t
            t = time.perf_counter()
            r, _, reused = b._prepared_from_cache(plan, module, example, keep)
            t_reused = time.perf_counter() - t
            same = bool(torch.equal(convert_pt2e(a)(x), convert_pt2e(r)(x)))
            rows.append({"float_layers": len(keep), "fresh_s": round(t_fresh, 2), "reused_s": round(t_reused, 2),
                         "observers_reused": reused, "same_outputs": same})
    b.release()
    total_fresh = sum(r["fresh_s"] for r in rows)
    total_reused = sum(r["reused_s"] for r in rows)
    print(f"EfficientNet-Lite0, torch PT2E x86, {data.count} calibration samples, {platform.processor() or 'cpu'}")
    print(f"{'float layers':>12} {'fresh s':>8} {'reused s':>9} {'reused':>7} {'same outputs':>13}")
    for r in rows:
        print(f"{r['float_layers']:>12} {r['fresh_s']:>8.2f} {r['reused_s']:>9.2f} {str(r['observers_reused']):>7} "
              f"{str(r['same_outputs']):>13}")
    print(f"{'total':>12} {total_fresh:>8.2f} {total_reused:>9.2f}   ({total_fresh / total_reused:.1f}x less)")
    out = ROOT / "build" / "bench" / "torch_trials.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": "efficientnet-lite0", "samples": data.count, "rows": rows,
                               "total_fresh_s": total_fresh, "total_reused_s": total_reused,
                               "measured_on": f"{platform.node()} CPU, 2 threads, same process"}, indent=2))


if __name__ == "__main__":
    main()
