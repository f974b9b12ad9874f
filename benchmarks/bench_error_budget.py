"""Where EfficientNet-Lite0's INT8 error comes from: each group of weights, and each group of activations, quantized
alone, on the real photo crops of ``bench_ptq.py`` (its cached crops and reference).

Weights: the BatchNorm-folded reference with one group's weights fake-quantized (symmetric INT8, per channel or per
tensor, rounding to nearest: what every backend does without AdaRound), everything else FP32 -- the stem conv,
the depthwise convs, the 1x1 convs, the classifier. Activations: the onnxruntime QDQ model of ``bench_ptq.py``
(``quantize_static`` with the core's ranges, every op quantized) with one group's activation quantize/dequantize
pairs replaced by a clip to the same range (onnxruntime folds ReLU6 into the pair: the clip keeps the function),
run as float Q/DQ arithmetic -- the Conv outputs through ReLU6 (pointwise, depthwise), the Conv outputs without
activation (projections), the residual Adds, the model input, the rest.

    python benchmarks/bench_error_budget.py [--granularity per_channel] [--method minmax] [--model PATH.onnx]

Prints 1 - cosine and top-1 agreement to the FP32 reference per row and writes build/bench_error_budget.json.
"""
from __future__ import annotations

import argparse
import collections
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_ptq as B  # noqa: E402  (the crops, the reference, quantize, run, metrics)


def _kind(node: Any, w: np.ndarray) -> str:
    if node.op_type != "Conv":
        return "classifier"
    groups = next((a.i for a in node.attribute if a.name == "group"), 1)
    if groups > 1:
        return "depthwise"
    return "stem" if w.shape[1] == 3 else "1x1" if w.shape[2] == 1 else "other conv"


def weight_rows(model: Any, per_channel: bool, evaluate: Any) -> list[dict[str, Any]]:
    import onnx
    from onnx import numpy_helper

    from qdeploy.simulate import fake_quant_weight
    from qdeploy.spec import PerTensor, WeightSpec

    ws = WeightSpec() if per_channel else WeightSpec(granularity=PerTensor())
    inits = {i.name: i for i in model.graph.initializer}
    layers = [(n, numpy_helper.to_array(inits[n.input[1]])) for n in model.graph.node
              if n.op_type in ("Conv", "Gemm") and len(n.input) > 1 and n.input[1] in inits]
    kinds = collections.Counter(_kind(n, w) for n, w in layers)
    rows = []
    for group in ["all weights", *sorted(kinds)]:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        mi = {i.name: i for i in m.graph.initializer}
        for node, w in layers:
            if group == "all weights" or _kind(node, w) == group:
                axis = 1 if node.op_type == "Gemm" and not any(a.name == "transB" and a.i for a in node.attribute) \
                    else 0
                mi[node.input[1]].CopyFrom(numpy_helper.from_array(
                    fake_quant_weight(w, ws, axis).astype(np.float32), node.input[1]))
        rows.append({"quantized": f"weights: {group}", "layers": sum(kinds.values()) if group == "all weights"
                     else kinds[group], **evaluate(m, group, basic=False)})
    return rows


def activation_kinds(m: Any) -> dict[str, str]:
    """Each activation QuantizeLinear's group, by what produces the tensor it quantizes."""
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    prod = {o: n for n in m.graph.node for o in n.output}
    kinds = {}
    for n in m.graph.node:
        if n.op_type != "QuantizeLinear" or n.input[0] in inits:
            continue
        p = prod.get(n.input[0])
        if p is None:
            kinds[n.name] = "model input"
        elif p.op_type == "Conv":
            zp = int(inits[n.input[2]])
            dw = next((a.i for a in p.attribute if a.name == "group"), 1) > 1
            kinds[n.name] = (("conv + ReLU6" if zp == 0 else "conv, no activation")
                             + (" (depthwise)" if dw else ""))
        elif p.op_type == "Add":
            kinds[n.name] = "residual add"
        else:
            kinds[n.name] = f"other ({p.op_type})"
    return kinds


def without(m: Any, names: set[str]) -> Any:
    """``m`` with the activation Q/DQ pairs of the QuantizeLinear ``names`` replaced by a Clip to their range."""
    import onnx
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(m)
    g = out.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    consumers = collections.defaultdict(list)
    for n in g.node:
        for i in n.input:
            consumers[i].append(n)
    outputs = {o.name for o in g.output}
    drop, add = [], []
    for q in [n for n in g.node if n.name in names]:
        scale, zp = float(inits[q.input[1]]), int(inits[q.input[2]])
        lo, hi = f"{q.name}/lo", f"{q.name}/hi"
        g.initializer.extend([numpy_helper.from_array(np.array(scale * (0 - zp), np.float32), lo),
                              numpy_helper.from_array(np.array(scale * (255 - zp), np.float32), hi)])
        dqs = consumers[q.output[0]]
        target = next((dq.output[0] for dq in dqs if dq.output[0] in outputs), f"{q.name}/clipped")
        add.append(helper.make_node("Clip", [q.input[0], lo, hi], [target], name=f"{q.name}/clip"))
        for dq in dqs:
            for c in consumers[dq.output[0]]:
                for i, t in enumerate(c.input):
                    if t == dq.output[0]:
                        c.input[i] = target
            drop.append(dq)
        drop.append(q)
    keep = [n for n in g.node if not any(n is d for d in drop)] + add
    ready = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    ordered: list[Any] = []
    while keep:  # topological order for the added clips
        rest = []
        for n in keep:
            if all(i in ready for i in n.input):
                ordered.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(keep):
            raise RuntimeError("cycle")
        keep = rest
    del g.node[:]
    g.node.extend(ordered)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--granularity", default="per_channel", choices=["per_channel", "per_tensor"])
    ap.add_argument("--method", default="minmax")
    ap.add_argument("--model", help="an ONNX model to quantize instead of the reference (a transformed one)")
    ap.add_argument("--calib", type=int, default=300)
    ap.add_argument("--val", type=int, default=200)
    args = ap.parse_args()
    import onnx

    from qdeploy.calibration import collect_ranges, open_data
    from qdeploy.model import load_model
    from qdeploy.spec import ActivationSpec, CalibrationSpec
    from qdeploy.transforms import fold_batchnorm

    t0 = time.time()
    data, ref_path = B.crops_and_reference(args.calib, args.val)
    fp32 = B.run(ref_path, data["val"])
    src = Path(args.model) if args.model else ref_path
    model = fold_batchnorm(onnx.load(str(src)))[0]
    in_name = model.graph.input[0].name
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="qdeploy-bench-budget-") as tmp:
        work = Path(tmp)

        def evaluate(m: Any, tag: str, basic: bool) -> dict[str, float]:
            path = work / f"{abs(hash(tag))}.onnx"
            onnx.save(m, str(path))
            r = B.metrics(fp32, B.run(path, data["val"], basic=basic))
            print(f"{tag:<32} 1 - cosine {1 - r['cosine']:.5f}  top-1 agreement {r['top1_agreement']:.3f}",
                  flush=True)
            return {"one_minus_cosine": 1 - r["cosine"], "top1_agreement": r["top1_agreement"]}

        rows += weight_rows(model, args.granularity == "per_channel", evaluate)
        folded = work / "folded.onnx"
        onnx.save(model, str(folded))
        handle = load_model(str(folded), work / "ref.onnx")
        ds = open_data({in_name: data["calib"]}, handle, "calibration",
                       CalibrationSpec(samples=args.calib, batch_size=16))
        ranges = collect_ranges(handle, ds, ActivationSpec(mode="static", method=args.method, percentile=99.999))
        q = work / "q.onnx"
        B.quantize(folded, q, ranges, args.granularity == "per_channel", work)
        qm = onnx.load(str(q))
        for i, n in enumerate(qm.graph.node):  # node names are not unique in every exported graph
            n.name = f"{n.name}#{i}"
        kinds = activation_kinds(qm)
        rows.append({"quantized": "weights and activations", **evaluate(qm, "weights and activations", True)})
        rows.append({"quantized": "weights (activations' pairs clipped)",
                     **evaluate(without(qm, set(kinds)), "weights, no activation", True)})
        for kind, count in sorted(collections.Counter(kinds.values()).items()):
            r = evaluate(without(qm, {k for k, v in kinds.items() if v == kind}), f"all but {kind}", True)
            rows.append({"quantized": f"everything but activations: {kind}", "tensors": count, **r})
    import onnxruntime

    report = {"where": f"onnxruntime {onnxruntime.__version__} CPU ({platform.machine()}); weights rows on the FP32 "
                       f"kernels, the others as float Q/DQ arithmetic (exact int32 accumulation)",
              "granularity": args.granularity, "method": args.method, "model": str(src), "val": args.val,
              "seconds": time.time() - t0, "rows": rows}
    out = ROOT / "build" / "bench_error_budget.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"\n{'quantized':<58} {'1 - cosine':>10} {'top-1 agr':>9}")
    for r in rows:
        print(f"{r['quantized']:<58} {r['one_minus_cosine']:>10.5f} {r['top1_agreement']:>9.3f}")
    print(f"wrote {out} ({report['seconds']:.0f}s)")


if __name__ == "__main__":
    main()
