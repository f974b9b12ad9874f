"""What real exported graphs carry and toy models don't, each in a small hand-built ONNX graph: weights stored
as Constant nodes, zero-size Constants, opsets below 13, -inf in an attention mask, names that collide with
onnxruntime's counters, already-quantized graphs, and a transformer-like graph that `auto` deploys dynamically.
The zoo (tests/test_zoo.py) runs the same paths on the public models they come from."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qdeploy
from qdeploy.errors import QDeployError
from qdeploy.model import load_model

RNG = np.random.default_rng(0)
SPEC = {"budget": {"metric": "cosine", "threshold": 0.5}, "fallback": {"max_trials": 0}}


def _save(path, nodes, inputs, outputs, inits=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _const(name, arr):
    return helper.make_node("Constant", [], [name], name=f"const_{name}", value=numpy_helper.from_array(arr, name))


def _conv_net(path, opset=17, constant_weights=False):
    """Conv(3->8) - Relu - Resize(x1, with an empty roi Constant) - Conv(8->4) - GlobalAveragePool."""
    w1 = RNG.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3
    w2 = RNG.standard_normal((4, 8, 1, 1)).astype(np.float32) * 0.3
    nodes = [_const("roi", np.zeros((0,), np.float32)), _const("scales", np.ones(4, np.float32))]
    inits = []
    if constant_weights:
        nodes += [_const("w1", w1), _const("w2", w2)]
    else:
        inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")]
    nodes += [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
              helper.make_node("Resize", ["r1", "roi", "scales"], ["z1"], name="resize", mode="nearest"),
              helper.make_node("Conv", ["z1", "w2"], ["c2"], name="conv2"),
              helper.make_node("GlobalAveragePool", ["c2"], ["y"], name="gap")]
    return _save(path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 1, 1])], inits, opset)


@pytest.fixture
def image_data(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, x=RNG.standard_normal((48, 3, 16, 16)).astype(np.float32))
    return path


def _ort_artifact(bundle):
    art = next(a for a in bundle.artifacts if a["backend"] == "onnxruntime")
    return art, onnx.load(str(bundle.path / art["path"]))


def test_constant_weights_are_weights_and_old_opsets_are_upgraded(tmp_path, image_data):
    """Paddle2ONNX writes weights as Constant nodes at opset 11, with an empty Resize roi: the weights are
    quantized as int8 weights per channel (not as uint8 activations), and calibration skips the empty tensor."""
    src = _conv_net(tmp_path / "m.onnx", opset=11, constant_weights=True)
    lines = []
    b = qdeploy.deploy(src, target="x86-avx512-vnni", spec=SPEC, calib=image_data, val=image_data,
                       output=tmp_path / "b", backends=["onnxruntime"], echo=lines.append)
    assert any("Constant node(s) folded" in ln for ln in lines) and any("upgraded to 13" in ln for ln in lines)
    intake = b.manifest["model"]["intake"]
    assert b.manifest["model"]["opset"] == 13 and len(intake) == 2
    art, proto = _ort_artifact(b)
    assert art["precision"] == "int8" and art["metrics"]["cosine"] > 0.99
    int8 = {t.name: tuple(t.dims) for t in proto.graph.initializer if t.data_type == TensorProto.INT8}
    assert (8, 3, 3, 3) in int8.values() and (4, 8, 1, 1) in int8.values()  # weights stored as int8
    scales = [numpy_helper.to_array(t) for t in proto.graph.initializer if t.name.endswith("_scale")]
    assert any(s.shape == (8,) for s in scales)  # per-channel: the opset upgrade made axis legal


def _attention(path, dims=16):
    """A transformer-like block: x @ Wq, x @ Wk, scores = q k^T + mask, where mask = (1 - m) * -inf-ish (the
    sdpa export's arithmetic), softmax, @ v, @ Wo."""
    w = {n: numpy_helper.from_array(RNG.standard_normal((dims, dims)).astype(np.float32) * 0.3, n)
         for n in ("wq", "wk", "wv", "wo")}
    neg = numpy_helper.from_array(np.array(-np.inf, np.float32), "neg_inf")
    one = numpy_helper.from_array(np.array(1.0, np.float32), "one")
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"], name="q_proj"),
             helper.make_node("MatMul", ["x", "wk"], ["k"], name="k_proj"),
             helper.make_node("MatMul", ["x", "wv"], ["v"], name="v_proj"),
             helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["s"], name="scores"),
             helper.make_node("Cast", ["mask"], ["mf"], name="mask_cast", to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["mf", "axes"], ["mu"], name="mask_unsq"),
             helper.make_node("Equal", ["mu", "zero"], ["pad"], name="mask_eq"),
             helper.make_node("Where", ["pad", "neg_inf", "zero"], ["bias"], name="mask_where"),
             helper.make_node("Add", ["s", "bias"], ["sm"], name="mask_add"),
             helper.make_node("Softmax", ["sm"], ["p"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["a"], name="context"),
             helper.make_node("MatMul", ["a", "wo"], ["y"], name="o_proj")]
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    return _save(path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, dims]),
                               helper.make_tensor_value_info("mask", TensorProto.INT64, ["N", 8])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, dims])],
                 [*w.values(), neg, one, zero, axes])


@pytest.fixture
def attention_data(tmp_path):
    x = RNG.standard_normal((64, 8, 16)).astype(np.float32)
    mask = np.ones((64, 8), np.int64)
    mask[np.arange(64), RNG.integers(3, 8, 64)] = 0  # some padded positions: -inf in the mask bias
    path = tmp_path / "att.npz"
    np.savez(path, x=x, mask=mask)
    return path


def test_auto_mode_deploys_a_transformer_dynamically(tmp_path, attention_data):
    """`auto` picks dynamic INT8 for a transformer-like graph on onnxruntime; the activation x activation
    MatMuls it cannot quantize dynamically are PRECISION_UNSUPPORTED events, never silent."""
    src = _attention(tmp_path / "att.onnx")
    lines = []
    b = qdeploy.deploy(src, target="x86-avx512-vnni", spec=SPEC, calib=attention_data, val=attention_data,
                       output=tmp_path / "b", backends=["onnxruntime"], echo=lines.append)
    assert any("activations.mode auto -> dynamic" in ln for ln in lines)
    art, _ = _ort_artifact(b)
    assert art["meta"]["format"] == "dynamic" and art["spec"]["activations"]["mode"] == "dynamic"
    assert art["layer_precisions"]["scores"] == art["layer_precisions"]["context"] == "fp32"
    assert art["layer_precisions"]["q_proj"] == "int8"
    moved = {e["layer"] for e in b.manifest["events"] if e["code"] == "PRECISION_UNSUPPORTED"}
    assert {"scores", "context"} <= moved
    assert art["metrics"]["cosine"] > 0.97  # random weights; the zoo's trained encoder is held to 0.99


def test_static_int8_keeps_the_minus_inf_mask_float(tmp_path, attention_data):
    """Static INT8 on a graph with -inf in the mask path: no scale of inf, no NaN, the tensor stays float and
    the console and manifest say why."""
    src = _attention(tmp_path / "att.onnx")
    lines = []
    spec = {**SPEC, "activations": {"mode": "static"}}
    b = qdeploy.deploy(src, target="x86-avx512-vnni", spec=spec, calib=attention_data, val=attention_data,
                       output=tmp_path / "b", backends=["onnxruntime"], echo=lines.append)
    assert any("holds -inf" in ln and "stays float" in ln for ln in lines)
    assert set(b.manifest["calibration"]["nonfinite"]) >= {"bias", "sm"}
    art, proto = _ort_artifact(b)
    for t in proto.graph.initializer:
        if t.name.endswith("_scale"):
            assert np.isfinite(numpy_helper.to_array(t)).all(), t.name
    assert art["metrics"]["cosine"] > 0.95 and art["layer_precisions"]["q_proj"] == "int8"


def test_tensor_names_that_collide_with_ort_counters_are_renamed(tmp_path, image_data):
    """tf2onnx names tensors `conv1d_25` and `conv1d_252`; onnxruntime's quantizer appends counters to names and
    wired the wrong tensor into a Transpose (the artifact failed to load). Intake renames the clashing ones."""
    src = _conv_net(tmp_path / "m.onnx")
    proto = onnx.load(str(src))
    for node in proto.graph.node:  # c1 -> "w1" + "2": a name that is another tensor's name plus a digit
        node.output[:] = ["w12" if o == "c1" else o for o in node.output]
        node.input[:] = ["w12" if i == "c1" else i for i in node.input]
    onnx.save(proto, str(src))
    handle = load_model(src, tmp_path / "ref.onnx")
    assert any("renamed" in n for n in handle.notes)
    names = {o for n in onnx.load(str(tmp_path / "ref.onnx")).graph.node for o in n.output}
    assert "w12_t" in names and "w12" not in names


def _conv_integer(path):
    """A dynamically quantized conv (DynamicQuantizeLinear + ConvInteger), as an already-INT8 export holds."""
    w = numpy_helper.from_array(RNG.integers(-100, 100, (4, 3, 3, 3)).astype(np.int8), "wq")
    wz = numpy_helper.from_array(np.array(0, np.int8), "wz")
    ws = numpy_helper.from_array(np.array(0.01, np.float32), "ws")
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"], name="dq"),
             helper.make_node("ConvInteger", ["xq", "wq", "xz", "wz"], ["ci"], name="convint"),
             helper.make_node("Cast", ["ci"], ["cf"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Mul", ["xs", "ws"], ["s"], name="scale"),
             helper.make_node("Mul", ["cf", "s"], ["y"], name="rescale")]
    return _save(path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])], [w, wz, ws], opset=13)


def test_an_already_quantized_model_is_deployed_as_is_or_refused_in_one_line(tmp_path):
    src = _conv_integer(tmp_path / "q.onnx")
    data = tmp_path / "x.npz"
    np.savez(data, x=RNG.standard_normal((16, 3, 8, 8)).astype(np.float32))
    lines = []
    b = qdeploy.deploy(src, target="x86-avx512-vnni", spec=SPEC, val=data, output=tmp_path / "b",
                       backends=["onnxruntime"], echo=lines.append)
    assert any("already quantized (ConvInteger, DynamicQuantizeLinear nodes)" in ln for ln in lines)
    art, _ = _ort_artifact(b)
    assert art["precision"] == "int8" and art["meta"]["format"] == "qdq-prequantized"
    assert art["metrics"]["cosine"] == pytest.approx(1.0)
    with pytest.raises(QDeployError, match="TensorRT does not run ConvInteger, DynamicQuantizeLinear"):
        qdeploy.deploy(src, target="nvidia-t4", spec=SPEC, val=data, output=tmp_path / "t", backends=["tensorrt"])
