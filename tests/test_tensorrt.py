"""The TensorRT backend: the Q/DQ graph against TensorRT's rules (by inspecting the ONNX), capabilities per
compute capability, the bundle it writes without TensorRT, and engine builds (skipped where TensorRT is not)."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qdeploy.calibration import collect_ranges, open_data
from qdeploy.errors import BackendError
from qdeploy.fallback import resolve
from qdeploy.model import load_model
from qdeploy.plugins import get_registry
from qdeploy.spec import ActivationSpec, QuantSpec, load_spec

pytest.importorskip("onnxruntime")
qdeploy_tensorrt = pytest.importorskip("qdeploy_tensorrt")
from qdeploy_tensorrt import TensorRTBackend  # noqa: E402
from qdeploy_tensorrt.engine import fast_precisions, tensorrt_status, trtexec_command  # noqa: E402
from qdeploy_tensorrt.qdq import add_residual_qdq, check_rules, output_channel_axis  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TRT_OK, TRT_REASON, _, _ = tensorrt_status()
needs_trt = pytest.mark.skipif(not TRT_OK, reason=f"engine build needs TensorRT and a GPU: {TRT_REASON}")


# --- a small graph with every placement case: Conv, residual Add, MatMul with [K, N] weights, Gemm(transB=0) --
def _residual_model(path: Path) -> Path:
    rng = np.random.default_rng(0)
    init = lambda name, *shape: numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)  # noqa
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["s"], name="residual_add"),
        helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
        helper.make_node("Flatten", ["r2"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "w3"], ["m"], name="matmul"),
        helper.make_node("Relu", ["m"], ["r3"], name="relu3"),
        helper.make_node("Gemm", ["r3", "w4", "b4"], ["y"], name="gemm", transB=0),
    ]
    graph = helper.make_graph(
        nodes, "residual", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        [init("w1", 4, 2, 3, 3), init("b1", 4), init("w2", 4, 4, 3, 3), init("b2", 4), init("w3", 64, 8),
         init("w4", 8, 5), init("b4", 5)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def residual(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trt-residual")
    handle = load_model(str(_residual_model(tmp / "m.onnx")), tmp / "reference.onnx")
    x = np.random.default_rng(1).normal(size=(64, 2, 4, 4)).astype(np.float32)
    spec = QuantSpec(activations=ActivationSpec(symmetric=True))
    ranges = collect_ranges(handle, open_data(x, handle, "calibration", spec.calibration), spec.activations)
    return handle, spec, ranges, x


def _target(name: str = "nvidia-t4"):
    return next(t for t in get_registry().profile(name).backends if t.backend == "tensorrt")


def _build(handle, spec, ranges, lp, workdir):
    backend = TensorRTBackend()
    plan = backend.translate(handle, spec, _target(), lp)
    plan = backend.calibrate(plan, ranges, None)
    return backend, backend.build(plan, workdir)


def _inits(proto):
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def test_qdq_graph_follows_tensorrt_rules(residual, tmp_path):
    handle, spec, ranges, _ = residual
    lp = {n: "int8" for n in handle.layers}
    _, art = _build(handle, spec, ranges, lp, tmp_path)
    proto = onnx.load(str(art.path / "model_qdq.onnx"))
    inits = _inits(proto)
    producer = {o: n for n in proto.graph.node for o in n.output}
    consumers = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    qdq = [n for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for n in qdq:  # symmetric INT8: every zero point an all-zero int8; positive scales
        zp, scale = inits[n.input[2]], inits[n.input[1]]
        assert zp.dtype == np.int8 and not zp.any(), n.name
        assert (scale > 0).all()
    nodes = {n.name: n for n in proto.graph.node}
    for name in ("conv1", "conv2", "matmul", "gemm"):  # R4: activation and weight inputs from a DQ
        node = nodes[name]
        act_dq, w_dq = producer[node.input[0]], producer[node.input[1]]
        assert act_dq.op_type == "DequantizeLinear" and w_dq.op_type == "DequantizeLinear"
        assert inits[act_dq.input[1]].ndim == 0, "activations are per-tensor"
        w = inits[producer[w_dq.input[0]].input[0]]  # float weight -> Q -> DQ
        axis = next(a.i for a in w_dq.attribute if a.name == "axis") % w.ndim
        assert axis == output_channel_axis(node, w.ndim)
        assert inits[w_dq.input[1]].shape == (w.shape[axis],), "per-channel on the output-channel axis"
        assert not [c for o in node.output for c in consumers.get(o, []) if c.op_type == "QuantizeLinear"], \
            "R5: no Q/DQ on a weighted op's output"
        if len(node.input) > 2:
            assert node.input[2] in inits, "bias stays a float initializer"
    assert output_channel_axis(nodes["conv1"], 4) == 0
    assert output_channel_axis(nodes["matmul"], 2) == 1 and output_channel_axis(nodes["gemm"], 2) == 1
    add = nodes["residual_add"]  # R6: the residual input is quantized, the conv output is not
    assert producer[add.input[0]].name == "conv2"
    assert producer[add.input[1]].op_type == "DequantizeLinear"
    # ORT already gave r1 a Q/DQ (it feeds conv2); on a graph where it has none, add_residual_qdq inserts it
    ref = onnx.load(str(handle.onnx_path))
    assert add_residual_qdq(ref, ranges.ranges, {"conv2"}) == ["r1"]
    dq = {o: n for n in ref.graph.node for o in n.output}[next(n for n in ref.graph.node
                                                               if n.name == "residual_add").input[1]]
    assert dq.op_type == "DequantizeLinear" and not _inits(ref)[dq.input[2]].any()
    assert _inits(ref)[dq.input[1]] == pytest.approx(max(map(abs, ranges.get("r1"))) / 127)
    assert check_rules(proto, [handle.layers[n].node for n in lp]) == []


def test_promoted_layers_have_no_qdq_and_carry_precision_constraints(residual, tmp_path):
    handle, spec, ranges, x = residual
    lp = {n: "int8" for n in handle.layers}
    lp["conv2"], lp["gemm"] = "fp16", "fp32"
    backend, art = _build(handle, spec, ranges, lp, tmp_path)
    proto = onnx.load(str(art.path / "model_qdq.onnx"))
    producer = {o: n for n in proto.graph.node for o in n.output}
    nodes = {n.name: n for n in proto.graph.node}
    for name in ("conv2", "gemm"):
        assert all(producer.get(i) is None or producer[i].op_type != "DequantizeLinear" for i in nodes[name].input)
    assert producer[nodes["residual_add"].input[1]].op_type != "DequantizeLinear"  # conv2 is float: no R6 pair
    config = json.loads((art.path / "build_config.json").read_text())
    assert {(c["node"], c["precision"]) for c in config["precision_constraints"]} == {("conv2", "fp16"),
                                                                                      ("gemm", "fp32")}
    assert config["builder_flags"] == ["INT8", "FP16"]
    line = (art.path / "trtexec.txt").read_text()
    assert "--precisionConstraints=obey" in line and "--layerPrecisions=conv2:fp16,gemm:fp32" in line
    assert "--minShapes=x:1x2x4x4" in line and "--int8" in line and "--fp16" in line
    runner = backend.runner(art.path, art.meta)  # simulated, FP16 layer rounded through Cast
    assert runner.simulated
    out = runner.infer({"x": x[:4]})["y"]
    assert out.shape == (4, 5) and np.isfinite(out).all()


def test_a_residual_add_is_a_layer_tensorrt_can_keep_float(residual, tmp_path):
    """The residual Add is a tensor layer TensorRT quantizes (R6) and can promote alone: kept float, its residual
    input gets no Q/DQ pair while every weighted layer stays INT8, and the graph still follows the rules."""
    handle, spec, ranges, _ = residual
    assert handle.layers["residual_add"].kind == "tensor"
    assert TensorRTBackend().quantized_tensors(handle, spec, _target()) == ["residual_add"]
    lp = {n: "int8" for n in handle.layers}
    lp["residual_add"] = "fp32"
    _, art = _build(handle, spec, ranges, lp, tmp_path)
    proto = onnx.load(str(art.path / "model_qdq.onnx"))
    producer = {o: n for n in proto.graph.node for o in n.output}
    add = next(n for n in proto.graph.node if n.name == "residual_add")
    assert [producer[i].op_type for i in add.input] == ["Conv", "Relu"], "both inputs float"
    assert art.meta["qdq"]["residual_qdq"] == [] and art.meta["qdq"]["int8_layers"] == 4
    weighted = [handle.layers[n].node for n in lp if handle.layers[n].kind != "tensor"]
    assert check_rules(proto, weighted, float_adds=["residual_add"]) == []
    assert check_rules(proto, weighted) != [], "without the plan's float Add, R6 is broken"


def test_rule_checker_reports_violations(residual, tmp_path):
    handle, spec, ranges, _ = residual
    lp = {n: "int8" for n in handle.layers}
    _, art = _build(handle, spec, ranges, lp, tmp_path)
    proto = onnx.load(str(art.path / "model_qdq.onnx"))
    int8 = [handle.layers[n].node for n in lp]
    bad = onnx.ModelProto()
    bad.CopyFrom(proto)
    zp = next(t for t in bad.graph.initializer if t.name == "x_zero_point")
    zp.CopyFrom(numpy_helper.from_array(np.array(3, np.int8), zp.name))
    assert any(p.startswith("R1") for p in check_rules(bad, int8))
    bad.CopyFrom(proto)
    dq = next(n for n in bad.graph.node if n.op_type == "DequantizeLinear" and n.input[1] == "w1_scale")
    for a in dq.attribute:
        if a.name == "axis":
            a.i = 1
    assert any(p.startswith("R3") for p in check_rules(bad, int8))
    bad.CopyFrom(proto)
    add = next(n for n in bad.graph.node if n.name == "residual_add")
    add.input[1] = "r1"
    assert any(p.startswith("R6") for p in check_rules(bad, int8))
    bad.CopyFrom(proto)  # R5: a Q/DQ between a conv and its ReLU breaks the fusion
    from qdeploy.simulate import insert_qdq
    insert_qdq(bad, next(n for n in bad.graph.node if n.name == "relu1"), 0, np.array(0.1, np.float32),
               np.array(0, np.int8), "c1_before_relu")
    assert any(p.startswith("R5 conv1") and "Relu" in p for p in check_rules(bad, int8))


def test_conv_feeding_conv_directly_is_quantized_as_the_next_layers_input(tmp_path):
    """A linear bottleneck (MobileNet/EfficientNet: a projection conv straight into the next block's conv):
    the Q/DQ on the first conv's output is the second conv's input pair (R4), which TensorRT fuses into the
    first conv's epilogue -- not an R5 violation."""
    from qdeploy_tensorrt.qdq import write_qdq_model

    rng = np.random.default_rng(0)
    init = lambda name, *shape: numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)  # noqa
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], name="project"),
             helper.make_node("Conv", ["a", "wb"], ["b"], name="expand"),
             helper.make_node("Relu", ["b"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "bottleneck", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 4, 4])],
                              [init("wa", 4, 4, 1, 1), init("wb", 8, 4, 1, 1)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    ranges = {"x": (-2.0, 2.0), "a": (-3.0, 3.0), "b": (-4.0, 4.0)}
    write_qdq_model(tmp_path / "m.onnx", tmp_path / "q.onnx", ranges, ["project", "expand"], True, tmp_path)
    proto = onnx.load(str(tmp_path / "q.onnx"))
    producer = {o: n for n in proto.graph.node for o in n.output}
    expand = next(n for n in proto.graph.node if n.name == "expand")
    assert producer[expand.input[0]].op_type == "DequantizeLinear"
    assert check_rules(proto, ["project", "expand"]) == []


def test_capabilities_follow_compute_capability():
    backend = TensorRTBackend()
    assert fast_precisions("7.5") == ("int8", "fp16", "fp32")
    assert fast_precisions("8.7") == ("int8", "fp16", "bf16", "fp32")
    assert fast_precisions("9.0") == ("int8", "fp16", "bf16", "fp8", "fp32")
    assert fast_precisions("7.0") == ("fp16", "fp32")
    caps = {n: backend.capabilities(_target(n)) for n in ("nvidia-t4", "nvidia-jetson-orin", "nvidia-h100")}
    assert caps["nvidia-t4"].precisions == ("int8", "fp16", "fp32")
    assert "bf16" in caps["nvidia-jetson-orin"].precisions and "bf16" in caps["nvidia-h100"].precisions
    assert "fp8" in caps["nvidia-h100"].precisions and "fp8" not in caps["nvidia-jetson-orin"].precisions
    for c in caps.values():
        assert c.available and c.verified_on == ("gpu" if TRT_OK else "simulated")


# --- FP8 (E4M3) on sm_89+: the same placement, FP8 pairs with scale amax / 448 ----------------------------------
def _build_on(handle, spec, ranges, lp, workdir, profile):
    backend = TensorRTBackend()
    plan = backend.translate(handle, spec, _target(profile), lp)
    return backend, backend.build(backend.calibrate(plan, ranges, None), workdir)


def test_fp8_qdq_graph_has_fp8_pairs_with_amax_over_448(residual, tmp_path):
    import ml_dtypes

    handle, spec, ranges, x = residual
    lp = {n: "fp8" for n in handle.layers}
    backend, art = _build_on(handle, spec, ranges, lp, tmp_path, "nvidia-h100")
    proto = onnx.load(str(art.path / "model_qdq.onnx"))
    assert next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 19
    inits = _inits(proto)
    producer = {o: n for n in proto.graph.node for o in n.output}
    qdq = [n for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and all(inits[n.input[2]].dtype == ml_dtypes.float8_e4m3fn for n in qdq)
    assert all(not inits[n.input[2]].astype(np.float32).any() for n in qdq)
    nodes = {n.name: n for n in proto.graph.node}
    act_dq = producer[nodes["conv2"].input[0]]  # activation r1: per-tensor, amax / 448
    assert float(inits[act_dq.input[1]]) == pytest.approx(max(map(abs, ranges.get("r1"))) / 448, rel=1e-6)
    w_dq = producer[nodes["conv1"].input[1]]  # weights: per output channel, each channel's amax / 448
    w = inits[producer[w_dq.input[0]].input[0]]
    assert inits[w_dq.input[1]] == pytest.approx(np.abs(w).max(axis=(1, 2, 3)) / 448, rel=1e-6)
    add = nodes["residual_add"]  # R6 with an FP8 pair
    assert inits[producer[add.input[1]].input[2]].dtype == ml_dtypes.float8_e4m3fn
    assert check_rules(proto, [], fp8_nodes=[handle.layers[n].node for n in lp]) == []
    assert art.meta["builder_flags"][:2] == ["FP8", "FP16"] and art.meta["qdq"]["fp8_layers"] == 4
    assert "--fp8" in (art.path / "trtexec.txt").read_text()
    # the simulation runs the graph as written: the same outputs as onnxruntime with every rewrite off
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = ort.InferenceSession(str(art.path / "model_qdq.onnx"), opts).run(None, {"x": x})[0]
    runner = backend.runner(art.path, art.meta)
    np.testing.assert_allclose(runner.infer({"x": x})["y"], plain, rtol=1e-5, atol=1e-5)


def test_fp8_graph_with_relu6_runs_as_written(tmp_path):
    """Clip (ReLU6, as in MobileNet/EfficientNet) in front of an FP8 QuantizeLinear: onnxruntime's own rewrite
    refuses the session; the simulated runner turns it off and runs the graph as written."""
    from qdeploy_tensorrt import SimulatedRunner
    from qdeploy_tensorrt.qdq import write_qdq_model

    rng = np.random.default_rng(0)
    init = lambda name, *shape: numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)  # noqa
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], name="c1"),
             helper.make_node("Clip", ["a", "lo", "hi"], ["c"], name="relu6"),
             helper.make_node("Conv", ["c", "wb"], ["y"], name="c2")]
    graph = helper.make_graph(nodes, "relu6", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [init("wa", 4, 4, 1, 1), init("wb", 8, 4, 1, 1),
                               numpy_helper.from_array(np.array(0, np.float32), "lo"),
                               numpy_helper.from_array(np.array(6, np.float32), "hi")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    write_qdq_model(tmp_path / "m.onnx", tmp_path / "q.onnx", {"x": (-2, 2), "a": (-3, 3), "c": (0, 6)}, [], True,
                    tmp_path, ["c1", "c2"])
    import onnxruntime as ort
    x = rng.normal(size=(3, 4, 4, 4)).astype(np.float32)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = ort.InferenceSession(str(tmp_path / "q.onnx"), opts).run(None, {"x": x})[0]
    np.testing.assert_allclose(SimulatedRunner(tmp_path / "q.onnx", []).infer({"x": x})["y"], plain, rtol=1e-5,
                               atol=1e-6)


def test_mixed_int8_and_fp8_layers_keep_their_own_pair_types(residual, tmp_path):
    handle, spec, ranges, _ = residual
    lp = {n: "int8" for n in handle.layers}
    fp8 = sorted(lp)[:2]
    lp.update({n: "fp8" for n in fp8})
    _, art = _build_on(handle, spec, ranges, lp, tmp_path, "nvidia-h100")
    proto = onnx.load(str(art.path / "model_qdq.onnx"))
    int8_nodes = [handle.layers[n].node for n, p in lp.items() if p == "int8"]
    fp8_nodes = [handle.layers[n].node for n, p in lp.items() if p == "fp8"]
    assert check_rules(proto, int8_nodes, fp8_nodes=fp8_nodes) == []
    # the checker catches a layer whose pairs have the other type (R8)
    assert any(p.startswith("R8") for p in check_rules(proto, fp8_nodes, fp8_nodes=int8_nodes))
    assert art.meta["builder_flags"][:3] == ["INT8", "FP8", "FP16"]


@pytest.mark.parametrize("int8,fp8", [([], ["g1", "g2"]), (["g1"], ["g2"]), (["g2"], ["g1"])])
def test_a_weight_shared_by_two_layers_gets_a_pair_of_each_layers_type(tmp_path, int8, fp8):
    """ORT gives a weight read by two layers one Q/DQ pair; an FP8 layer gets its own clone of it, so an INT8
    and an FP8 reader each see their type, and nothing is left unused."""
    from qdeploy_tensorrt.qdq import write_qdq_model

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], name="g1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w"], ["y"], name="g2", transB=1)]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
                              [numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "m.onnx"))
    ranges = {"x": (-3.0, 3.0), "r": (0.0, 5.0)}
    write_qdq_model(tmp_path / "m.onnx", tmp_path / "q.onnx", ranges, int8, True, tmp_path, fp8)
    proto = onnx.load(str(tmp_path / "q.onnx"))
    onnx.checker.check_model(proto)
    assert check_rules(proto, int8, fp8_nodes=fp8) == []
    used = {i for n in proto.graph.node for i in n.input}
    assert {t.name for t in proto.graph.initializer} <= used
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ort.InferenceSession(str(tmp_path / "q.onnx"), opts).run(None, {"x": np.ones((2, 8), np.float32)})


def test_fp8_needs_sm89_and_climbs_on_older_gpus(residual):
    handle = residual[0]
    spec = QuantSpec(precision="fp8", activations=ActivationSpec(symmetric=True))
    backends = get_registry().backends
    h100 = resolve(_target("nvidia-h100"), backends, handle.formats, spec)
    assert h100.ladder[0] == "fp8" and not h100.events
    orin = resolve(_target("nvidia-jetson-orin"), backends, handle.formats, spec)  # sm_87: no FP8 tensor cores
    assert orin.ladder[0] == "fp16"
    assert [(c, d.get("requested"), d.get("resolved")) for c, _, d in orin.events] == \
        [("PRECISION_UNSUPPORTED", "fp8", "fp16")]
    t4 = resolve(_target("nvidia-t4"), backends, handle.formats, spec)  # sm_75: INT8/FP16, no FP8
    assert t4.ladder[0] == "fp16" and t4.events[0][0] == "PRECISION_UNSUPPORTED"
    with pytest.raises(BackendError, match="no fast kernels"):
        TensorRTBackend().translate(handle, spec, _target("nvidia-t4"), {n: "fp8" for n in handle.layers})


def test_asymmetric_spec_is_made_symmetric_or_refused(residual):
    handle = residual[0]
    backends = get_registry().backends
    asym = QuantSpec(activations=ActivationSpec(symmetric=False))
    res = resolve(_target(), backends, handle.formats, asym)
    assert res.spec.activations.symmetric
    assert [c for c, _, _ in res.events] == ["GRANULARITY_UNSUPPORTED"]
    strict = asym.replace(fallback=asym.fallback.__class__(policy="strict"))
    assert not resolve(_target(), backends, handle.formats, strict).runnable
    # a profile entry without the symmetric-only flags: the backend itself translates (or refuses under strict)
    loose = _target().__class__("tensorrt", ("int8", "fp32"), compute_capability="7.5")
    plan = TensorRTBackend().translate(handle, asym, loose, {n: "int8" for n in handle.layers})
    assert plan.state["events"][0][0] == "GRANULARITY_UNSUPPORTED"
    with pytest.raises(BackendError) as err:
        TensorRTBackend().translate(handle, strict, loose, {n: "int8" for n in handle.layers})
    assert err.value.code == "GRANULARITY_UNSUPPORTED"


def test_bad_inputs_get_one_clear_error(residual):
    handle, spec, _, _ = residual
    backend = TensorRTBackend()
    with pytest.raises(BackendError, match="static activation scales"):
        backend.translate(handle, spec.replace(activations=ActivationSpec(mode="dynamic", symmetric=True)),
                          _target(), {n: "int8" for n in handle.layers})
    with pytest.raises(BackendError, match="no fast kernels"):
        backend.translate(handle, spec, _target("nvidia-t4"), {n: "bf16" for n in handle.layers})
    with pytest.raises(BackendError, match="not a TensorRT artifact"):
        backend.runner(Path("/nonexistent"), {"onnx": "model_qdq.onnx"})


def test_trtexec_line_for_static_shapes():
    line = trtexec_command({"onnx": "m.onnx", "workspace_mb": 512, "builder_flags": ["INT8"],
                            "precision_constraints": [], "shapes": {"x": {"min": [1, 3], "opt": [1, 3], "max": [1, 3]}}})
    assert line == ("trtexec --onnx=m.onnx --saveEngine=engine.plan --timingCacheFile=timing.cache "
                    "--memPoolSize=workspace:512 --int8")


# --- the acceptance run: digits -> nvidia-t4 ---------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_bundle(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    from qdeploy.pipeline import deploy

    data = tmp_path_factory.mktemp("digits-data")
    subprocess.run([sys.executable, str(ROOT / "examples" / "digits.py"), "prepare", str(data)], check=True,
                   capture_output=True)
    out = tmp_path_factory.mktemp("digits-t4") / "bundle"
    return deploy(f"{ROOT / 'examples' / 'digits.py'}:build_model", target="nvidia-t4",
                  spec=load_spec(ROOT / "examples" / "digits_spec.toml"), calib=data / "calib.npz",
                  val=data / "val.npz", output=out, input_shape="1x1x8x8",
                  backends=["tensorrt", "onnxruntime:cpu"])


def test_digits_to_t4_bundle(digits_bundle):
    m = digits_bundle.manifest
    trt = next(a for a in m["artifacts"] if a["backend"] == "tensorrt")
    folder = digits_bundle.path / trt["path"]
    for f in ("model_qdq.onnx", "build_config.json", "trtexec.txt", "build_engine.sh"):
        assert (folder / f).is_file(), f
    assert "trtexec --onnx=model_qdq.onnx" in (folder / "trtexec.txt").read_text()
    ref_acc = m["reference"]["metrics"]["top1_accuracy"]
    assert trt["precision"] == "int8"
    assert trt["metrics"]["top1_accuracy"] >= ref_acc - 0.01  # simulated INT8 within 1 point of FP32
    assert trt["verified_on"] == ("gpu" if TRT_OK else "simulated")
    if not TRT_OK:
        events = [e for e in m["events"] if e["target"] == "tensorrt" and e["code"] == "BACKEND_UNAVAILABLE"]
        assert events and "qdeploy build-engine" in events[0]["message"]
        assert "simulated" in events[0]["message"]
        assert digits_bundle.runner(trt["id"]).simulated  # never served; the chain goes on to onnxruntime
        host = next(a for a in m["artifacts"] if a["target"] == "onnxruntime:cpu")
        assert not digits_bundle.runner(host["id"]).simulated
    assert check_rules(onnx.load(str(folder / "model_qdq.onnx")),
                       [layer["node"] for layer in m["model"]["layers"].values()]) == []


LADDER_FP8 = {"ladder": ["int8", "fp8", "fp16", "fp32"]}


def test_fp8_on_the_ladder_is_taken_where_it_helps(digits_data, tmp_path):
    """The outlier channel of the sensitive model crushes per-tensor INT8; FP8's range holds it: those layers
    climb int8 -> fp8 (the simulated per-layer SQNR says fp8 is better) and the budget holds without FP16."""
    from qdeploy.pipeline import deploy

    spec = {"weights": {"granularity": "per_tensor"}, "activations": {"symmetric": True},
            "budget": {"metric": "top1_agreement", "threshold": 0.99}, "fallback": LADDER_FP8,
            "transforms": {"cross_layer_equalization": False, "bias_correction": False, "adaround": False}}  # precision alone here
    b = deploy(f"{ROOT / 'examples' / 'digits.py'}:build_sensitive_model", target="nvidia-h100", spec=spec,
               calib=digits_data / "calib.npz", val=digits_data / "val.npz", output=tmp_path / "b",
               input_shape="1x1x8x8", backends=["tensorrt"])
    art = b.artifacts[0]
    promoted = [e for e in b.manifest["events"] if e.get("action") == "promote"]
    moves = {n: e["to"][n] for e in promoted for n in e["layers"]}
    outlier = {n: t for n, t in moves.items() if n in ("conv1", "conv2")}  # the two most sensitive
    assert outlier and set(outlier.values()) == {"fp8"}
    assert not any(n in e.get("skipped", {}) for e in promoted for n in outlier)
    assert art["budget"]["passed"] and "fp8" in art["layer_precisions"].values()
    nodes = b.manifest["model"]["layers"]
    proto = onnx.load(str(b.path / art["path"] / "model_qdq.onnx"))
    assert check_rules(proto, [nodes[n]["node"] for n, p in art["layer_precisions"].items() if p == "int8"],
                       fp8_nodes=[nodes[n]["node"] for n, p in art["layer_precisions"].items() if p == "fp8"]) == []


def test_fp8_on_the_ladder_is_skipped_where_it_would_hurt(digits_data, tmp_path):
    """Well-behaved layers lose more in E4M3 than in per-channel INT8: a promotion skips the fp8 rung for them
    (to fp16), and the event gives both simulated SQNRs."""
    from qdeploy.pipeline import deploy

    spec = {"activations": {"symmetric": True}, "budget": {"metric": "cosine", "threshold": 0.99999},
            "fallback": {**LADDER_FP8, "max_trials": 1},
            "transforms": {"cross_layer_equalization": False, "bias_correction": False, "adaround": False}}
    b = deploy(f"{ROOT / 'examples' / 'digits.py'}:build_model", target="nvidia-h100", spec=spec,
               calib=digits_data / "calib.npz", val=digits_data / "val.npz", output=tmp_path / "b",
               input_shape="1x1x8x8", backends=["tensorrt"])
    [e] = [e for e in b.manifest["events"] if e.get("action") == "promote"]
    skipped = {n: sk for n, sk in e.get("skipped", {}).items()}
    assert skipped and all(e["to"][n] == "fp16" and sk[0].startswith("fp8 (simulated output SQNR")
                           for n, sk in skipped.items())
    assert e["from"] == "int8" and "fp8 (simulated output SQNR" in e["message"]


@pytest.mark.skipif(TRT_OK, reason="TensorRT is installed here: its engine serves")
def test_a_simulated_tensorrt_artifact_never_serves(digits_bundle):
    """Served on a host without TensorRT, the bundle's TensorRT link is out of the chain with a reason and the
    onnxruntime artifact answers."""
    from qdeploy.serve import FallbackModel

    with FallbackModel(digits_bundle.path, drift_sample=0) as model:
        chain = {s.id: s for s in model.slots}
        trt = next(s for s in model.slots if s.backend == "tensorrt")
        assert trt.state == "failed" and trt.reason == "BACKEND_UNAVAILABLE" and "simulated" in trt.detail
        assert chain[model.active].backend == "onnxruntime" and not chain[model.active].is_reference
        x = digits_bundle.samples()["input:input"]
        assert model.infer({"input": x}).artifact == model.active


def test_digits_fp8_to_h100(digits_data, tmp_path):
    """precision = "fp8" on an sm_90 profile: an FP8 Q/DQ artifact, simulated top-1 within 1 point of FP32."""
    import ml_dtypes
    from qdeploy.pipeline import deploy

    data = digits_data
    b = deploy(f"{ROOT / 'examples' / 'digits.py'}:build_model", target="nvidia-h100",
               spec={"precision": "fp8", "activations": {"symmetric": True}}, calib=data / "calib.npz",
               val=data / "val.npz", output=tmp_path / "b", input_shape="1x1x8x8", backends=["tensorrt"])
    art = b.artifacts[0]
    assert art["precision"] == "fp8" and art["verified_on"] == ("gpu" if TRT_OK else "simulated")
    assert art["metrics"]["top1_accuracy"] >= b.manifest["reference"]["metrics"]["top1_accuracy"] - 0.01
    proto = onnx.load(str(b.path / art["path"] / "model_qdq.onnx"))
    assert {_inits(proto)[n.input[2]].dtype for n in proto.graph.node if n.op_type == "DequantizeLinear"} == \
        {np.dtype(ml_dtypes.float8_e4m3fn)}
    assert "FP8" in art["meta"]["builder_flags"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    """The qdeploy CLI in a subprocess with only this plugin and onnxruntime's loaded (other plugins in
    development must not decide this file's results)."""
    import os
    from importlib import metadata

    others = [ep.name for ep in metadata.entry_points(group="qdeploy") if ep.name not in ("tensorrt", "onnxruntime")]
    env = {**os.environ, "QDEPLOY_DISABLED_PLUGINS": ",".join(others)}
    return subprocess.run([sys.executable, "-m", "qdeploy.cli", *args], capture_output=True, text=True, env=env)


@pytest.mark.skipif(TRT_OK, reason="TensorRT is installed here: the refusal path does not apply")
def test_build_engine_without_tensorrt_exits_2_with_one_line(digits_bundle):
    proc = _cli("build-engine", str(digits_bundle.path))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs TensorRT" in lines[0]


def test_build_engine_bad_bundle_is_one_error(tmp_path):
    proc = _cli("build-engine", str(tmp_path))
    assert proc.returncode == 2 and "not a qdeploy bundle" in proc.stderr


def test_import_qdeploy_tensorrt_does_not_import_tensorrt():
    code = "import qdeploy_tensorrt, qdeploy.plugins as p, sys; p.get_registry(); print('tensorrt' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# TensorRT Python API members the engine module uses, as bound in NVIDIA/TensorRT python/src/infer/pyCore.cpp,
# pyGraph.cpp and python/src/parsers/pyOnnx.cpp (8.6 - 10.x) and the Python API reference.
TRT_API = {
    "Logger", "Logger.WARNING", "Builder", "NetworkDefinitionCreationFlag.EXPLICIT_BATCH", "OnnxParser",
    "MemoryPoolType.WORKSPACE", "BuilderFlag", "BuilderFlag.OBEY_PRECISION_CONSTRAINTS", "LayerType.CONSTANT",
    "LayerType.SHAPE", "Runtime", "TensorIOMode.INPUT", "nptype", "__version__",
    "create_network", "parse_from_file", "num_errors", "get_error", "create_builder_config",
    "set_memory_pool_limit", "set_flag", "num_inputs", "get_input", "num_layers", "get_layer", "precision",
    "set_output_type", "num_outputs", "type", "name", "create_optimization_profile", "set_shape",
    "add_optimization_profile", "create_timing_cache", "set_timing_cache", "build_serialized_network",
    "get_timing_cache", "serialize", "deserialize_cuda_engine", "create_execution_context", "num_io_tensors",
    "get_tensor_name", "get_tensor_mode", "get_tensor_profile_shape", "get_tensor_dtype", "set_input_shape",
    "set_tensor_address", "get_tensor_shape", "execute_async_v3",
}


def test_engine_module_uses_only_documented_tensorrt_api():
    """Every ``trt.X`` and every method called on a TensorRT object in engine.py is a documented member."""
    src = (Path(qdeploy_tensorrt.__file__).parent / "engine.py").read_text()
    tree = ast.parse(src)
    trt_objs = {"builder", "network", "parser", "bconf", "profile", "layer", "runtime", "engine", "context",
                "cache", "serialized"}
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain, cur = [node.attr], node.value
            while isinstance(cur, ast.Attribute):
                chain.insert(0, cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name) and cur.id == "trt":
                used.add(".".join(chain))
            elif isinstance(cur, ast.Name) and cur.id in trt_objs:
                used.add(chain[0])
            elif isinstance(cur, ast.Name) and cur.id == "self" and chain[0] in ("engine", "context", "runtime"):
                used.update(chain[1:2])
            elif isinstance(cur, ast.Call) and isinstance(cur.func, ast.Attribute) and \
                    cur.func.attr in ("get_timing_cache", "get_input", "get_error"):
                used.add(chain[0])
    used -= {"trt", "stream", "cuda", "logger"}
    used = {u for u in used if not any(v.startswith(u + ".") for v in used)}  # keep whole chains only
    assert used and used <= TRT_API | {"float32", "float16", "bfloat16"}, sorted(used - TRT_API)


@needs_trt
def test_build_engine_on_gpu_updates_manifest(digits_bundle):
    from qdeploy.bundle import Bundle
    from qdeploy.cli import main

    assert main(["build-engine", str(digits_bundle.path)]) == 0
    bundle = Bundle.load(digits_bundle.path)  # integrity map re-computed
    art = next(a for a in bundle.artifacts if a["backend"] == "tensorrt")
    assert (bundle.path / art["path"] / "engine.plan").is_file()
    assert art["engine"]["tensorrt_version"] and art["engine"]["gpu"] and art["verified_on"] == "gpu"
    assert not bundle.runner(art["id"]).simulated


@needs_trt
def test_engine_build_with_precision_constraints(residual, tmp_path):
    handle, spec, ranges, x = residual
    lp = {n: "int8" for n in handle.layers}
    lp["gemm"] = "fp32"
    backend, art = _build(handle, spec, ranges, lp, tmp_path)
    assert (art.path / "engine.plan").is_file() and art.meta["constrained_layers"]["gemm"]
    runner = backend.runner(art.path, art.meta)
    assert not runner.simulated
    assert runner.infer({"x": x[:8]})["y"].shape == (8, 5)


# --- build-engine's control flow, TensorRT and the GPU stubbed (only inside these tests) ------------------------
STUB_GPU = "Stub GPU (sm_75)"


def _stub_engine_runner(plan: Path, change):
    """Stands in for a TensorRT engine on the GPU: the artifact's own Q/DQ graph (its simulation), outputs passed
    through ``change`` -- what a GPU whose kernels differ from the simulation would give. Not ``simulated``."""
    from qdeploy.backend import Runner

    config = json.loads((Path(plan).parent / "build_config.json").read_text())
    sim = TensorRTBackend().runner(Path(plan).parent, {"onnx": config["onnx"],
                                                       "precision_constraints": config["precision_constraints"]})

    class StubEngine(Runner):
        input_names, output_names, max_batch = sim.input_names, sim.output_names, sim.max_batch

        def infer_impl(self, feed):
            return {k: change(v) for k, v in sim.infer_impl(feed).items()}

        def close(self):
            sim.close()

    return StubEngine()


@pytest.fixture
def stub_gpu(monkeypatch):
    """``tensorrt_status`` says TensorRT and a GPU are here, ``build_engine`` writes a placeholder engine.plan,
    ``TrtRunner`` is :func:`_stub_engine_runner` with ``stub["change"]`` (identity unless a test sets it)."""
    from qdeploy_tensorrt import engine

    stub = {"change": lambda y: y, "built": []}

    def build(folder, config):
        if stub.get("fail"):
            (folder / engine.ENGINE).write_bytes(b"half-written")
            raise BackendError("stub builder failed", "BUILD_FAILED")
        (folder / engine.ENGINE).write_bytes(b"stub engine of " + config["onnx"].encode())
        stub["built"].append(folder)
        return {"engine": engine.ENGINE, "tensorrt_version": "10.0-stub", "gpu": STUB_GPU,
                "timing_cache": engine.TIMING_CACHE, "constrained_layers": {}}

    monkeypatch.setattr(engine, "tensorrt_status", lambda: (True, "", "10.0-stub", STUB_GPU))
    monkeypatch.setattr(engine, "build_engine", build)
    monkeypatch.setattr(engine, "TrtRunner", lambda plan: _stub_engine_runner(plan, lambda y: stub["change"](y)))
    return stub


@pytest.fixture
def t4_copy(digits_bundle, tmp_path):
    import shutil

    from qdeploy.bundle import Bundle

    shutil.copytree(digits_bundle.path, tmp_path / "bundle")
    return Bundle.load(tmp_path / "bundle")


def _engine_outputs(bundle, art, x, change):
    sim = TensorRTBackend().runner(bundle.path / art["path"], art["meta"])
    try:
        return {k: change(v) for k, v in sim.infer(x).items()}
    finally:
        sim.close()


def test_build_engine_records_what_the_gpu_verified(stub_gpu, t4_copy, capsys):
    """The engine is re-verified on the GPU runtime: metrics, budget, where and the warm-up outputs in
    samples.npz are the GPU's, not the simulation's."""
    from qdeploy.backend import OrtRunner
    from qdeploy.bundle import Bundle
    from qdeploy.cli import main
    from qdeploy.verify import check_budget, output_metrics

    before = t4_copy.manifest
    old = next(a for a in before["artifacts"] if a["backend"] == "tensorrt")
    val = before["validation"]["source"]
    stub_gpu["change"] = lambda y: y + np.float32(0.01)  # a GPU whose numbers differ a little from the simulation
    assert main(["build-engine", str(t4_copy.path), "--val", val]) == 0
    b = Bundle.load(t4_copy.path)  # integrity map rewritten, engine.plan included
    art = b.artifact(old["id"])
    assert (b.path / art["path"] / "engine.plan").is_file() and stub_gpu["built"]
    assert art["verified_on"] == "gpu"
    assert art["verification"] | {"samples": 0} == {"kind": "gpu", "runtime": "tensorrt 10.0-stub", "device": STUB_GPU,
                                                    "samples": 0, "source": f"validation data {val}",
                                                    "basis": "measured"}

    data = np.load(val)
    x, y = {"input": data["input"]}, data["y"]
    out = b.budget_output
    ref = OrtRunner(b.reference_path).infer(x)[out]
    got = _engine_outputs(b, art, x, stub_gpu["change"])[out]
    want = output_metrics(ref, got, y)
    assert art["verification"]["samples"] == len(y)
    assert art["metrics"] == pytest.approx(want) and art["metrics_per_output"][out] == pytest.approx(want)
    assert art["metrics"]["max_abs"] != pytest.approx(old["metrics"]["max_abs"])  # not the simulation's
    assert art["budget"] == pytest.approx(check_budget(b.budget, want, output_metrics(ref, ref, y), out).as_dict())
    assert art["budget"]["passed"]
    stored = b.stored_inputs()
    np.testing.assert_allclose(b.samples()[f"{art['id']}:{out}"],
                               _engine_outputs(b, art, stored, stub_gpu["change"])[out], rtol=1e-6, atol=1e-6)
    assert art["engine"]["tensorrt_version"] == "10.0-stub" and art["meta"]["engine"] == "engine.plan"
    row = next(line for line in (b.path / "report.md").read_text().splitlines() if line.startswith(f"| {art['id']}"))
    assert "| gpu |" in row


def test_build_engine_records_an_engine_that_misses_the_budget(stub_gpu, t4_copy):
    """A failing engine is not passed off: budget.passed false, an ACCURACY_BELOW_BUDGET event with the metric,
    its warm-up outputs the failing ones, and the serving chain puts it after the artifact that met its budget."""
    from qdeploy.bundle import Bundle
    from qdeploy.cli import main

    val = t4_copy.manifest["validation"]["source"]
    old = next(a for a in t4_copy.artifacts if a["backend"] == "tensorrt")
    assert old["budget"]["passed"] and t4_copy.artifacts[0]["id"] == old["id"]
    stub_gpu["change"] = lambda y: np.roll(y, 1, axis=-1)  # every class score one class off
    assert main(["build-engine", str(t4_copy.path), "--val", val]) == 1
    b = Bundle.load(t4_copy.path)
    art = b.artifact(old["id"])
    assert art["verified_on"] == "gpu" and not art["budget"]["passed"]
    assert art["budget"]["value"] == art["metrics"]["top1_accuracy"] < old["budget"]["value"] - 0.5
    [ev] = [e for e in b.manifest["events"] if e["code"] == "ACCURACY_BELOW_BUDGET"]
    assert ev["metric"] == "top1_accuracy" and ev["artifact"] == art["id"] and ev["value"] == art["budget"]["value"]
    assert [a["backend"] for a in b.artifacts] == ["onnxruntime", "tensorrt"]
    assert "missed its accuracy budget on the GPU" in art["chain_reason"]
    out = b.budget_output
    np.testing.assert_allclose(b.samples()[f"{art['id']}:{out}"],
                               _engine_outputs(b, art, b.stored_inputs(), stub_gpu["change"])[out], rtol=1e-6,
                               atol=1e-6)


def test_build_engine_without_labels_compares_with_the_recorded_outputs(stub_gpu, t4_copy, capsys):
    """On the stored samples (no labels) a top1_accuracy budget cannot be measured: the one rule of
    verify_artifact holds the engine to the outputs recorded when it was verified, and says so."""
    from qdeploy.bundle import Bundle
    from qdeploy.cli import main

    old = next(a for a in t4_copy.artifacts if a["backend"] == "tensorrt")
    assert main(["build-engine", str(t4_copy.path)]) == 0  # the engine gives what the simulation gave
    art = Bundle.load(t4_copy.path).artifact(old["id"])
    assert art["verification"]["basis"] == "recorded" and "needs labels" in art["verification"]["detail"]
    assert art["budget"]["passed"] and art["budget"]["value"] == old["budget"]["value"]
    assert "top1_accuracy" not in art["metrics"] and art["metrics"]["top1_agreement"] == 1.0
    assert art["verification"]["samples"] == len(next(iter(t4_copy.stored_inputs().values())))

    rng = np.random.default_rng(0)
    stub_gpu["change"] = lambda y: y + rng.normal(0, 5, y.shape).astype(y.dtype)
    assert main(["build-engine", str(t4_copy.path)]) == 1
    art = Bundle.load(t4_copy.path).artifact(old["id"])
    assert not art["budget"]["passed"] and "differ from the verified ones" in art["verification"]["detail"]
    assert "FAIL" in capsys.readouterr().out


def test_a_failed_engine_build_leaves_the_bundle_as_it_was(stub_gpu, t4_copy):
    from qdeploy.bundle import Bundle
    from qdeploy.cli import main

    before = (t4_copy.path / "manifest.json").read_text()
    stub_gpu["fail"] = True
    assert main(["build-engine", str(t4_copy.path)]) == 2
    Bundle.load(t4_copy.path)  # every sha256 still holds: the half-written engine is gone
    assert (t4_copy.path / "manifest.json").read_text() == before
    assert not list(t4_copy.path.rglob("engine.plan"))


def test_a_simulated_runner_is_verified_simulated_whatever_it_is_called(t4_copy):
    from qdeploy.verify import verify_artifact

    art = next(a for a in t4_copy.artifacts if a["backend"] == "tensorrt")
    runner = t4_copy.runner(art["id"])
    assert runner.simulated
    x, y, source = t4_copy.verification_data(t4_copy.manifest["validation"]["source"])
    found = verify_artifact(runner, t4_copy.reference_run(x, y, source=source), t4_copy.budget,
                            where={"kind": "gpu", "device": "none"})
    assert found.verified_on == {"kind": "simulated", "device": "none"}
    assert found.as_record()["metrics"] == pytest.approx(art["metrics"])  # the deploy's numbers, one path
