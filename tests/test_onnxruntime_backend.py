"""The onnxruntime backend on its own: what each build writes into the graph, per profile and spec."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import qdeploy
from qdeploy.profiles import profile_from_dict

from conftest import make_mlp_onnx


def _deploy(tmp_path, model, data, target, spec=None, name="b"):
    return qdeploy.deploy(model, target=target, spec=spec, calib=data, val=data, output=tmp_path / name,
                          backends=["onnxruntime"])


def _graph(bundle):
    art = bundle.artifacts[0]
    return art, onnx.load(str(bundle.path / art["path"]))


def _inits(proto):
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def _cpu_profile(fast):
    return profile_from_dict({"name": "cpu-test", "description": "test", "device": "cpu",
                              "backends": [{"backend": "onnxruntime", "fast": fast}]})


def test_reduce_range_on_avx2_keeps_weights_in_7_bits(tmp_path, mlp_onnx, mlp_data):
    """x86-avx2 has no VNNI: u8 x s8 pairs are summed into i16 and can saturate, so its profile asks for
    7-bit weights (reduce_range); the VNNI profile keeps the full 8 bits."""
    _, avx2 = _graph(_deploy(tmp_path, mlp_onnx, mlp_data, "x86-avx2", name="avx2"))
    _, vnni = _graph(_deploy(tmp_path, mlp_onnx, mlp_data, "x86-avx512-vnni", name="vnni"))

    def weight_codes(proto):
        return [v for k, v in _inits(proto).items() if v.dtype == np.int8 and v.ndim == 2]

    assert weight_codes(avx2) and max(np.abs(w).max() for w in weight_codes(avx2)) <= 64
    assert max(np.abs(w).max() for w in weight_codes(vnni)) == 127


@pytest.mark.parametrize("act,dtype", [("uint8", np.uint8), ("int8", np.int8)])
def test_activation_type_follows_the_profile(tmp_path, mlp_onnx, mlp_data, act, dtype):
    """u8 activations on the CPU entries (what ORT's CPU kernels are fastest with), s8 where a profile says
    so (the CUDA entries): the profile's activation_dtype decides, never a default."""
    profile = profile_from_dict({"name": "cpu-test", "description": "test", "device": "cpu", "backends": [
        {"backend": "onnxruntime", "fast": ["int8", "fp32"], "activation_dtype": act}]})
    art, proto = _graph(_deploy(tmp_path, mlp_onnx, mlp_data, profile))
    inits = _inits(proto)
    acts = [n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
    assert art["precision"] == "int8" and acts
    assert {inits[n.input[2]].dtype for n in acts} == {np.dtype(dtype)}


def test_fp16_build_keeps_float32_io(tmp_path, mlp_onnx, mlp_data):
    b = _deploy(tmp_path, mlp_onnx, mlp_data, _cpu_profile(["fp16", "fp32"]), spec={"precision": "fp16"})
    art, proto = _graph(b)
    assert art["precision"] == "fp16" and art["meta"]["format"] == "fp16"
    assert {t.data_type for t in proto.graph.initializer if t.name in ("w1", "w2")} == {onnx.TensorProto.FLOAT16}
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # callers keep float32
    assert art["metrics"]["cosine"] >= 0.999


def test_dynamic_int8_quantizes_the_matmuls_at_run_time(tmp_path, mlp_onnx, mlp_data):
    b = _deploy(tmp_path, mlp_onnx, mlp_data, "x86-avx512-vnni", spec={"activations": {"mode": "dynamic"}})
    art, proto = _graph(b)
    ops = {n.op_type for n in proto.graph.node}
    assert art["meta"]["format"] == "dynamic" and "DynamicQuantizeLinear" in ops
    assert art["layer_precisions"] == {"fc1": "int8", "fc2": "int8"}  # MatMul/Gemm: nothing moved
    assert not [e for e in b.manifest["events"] if e["code"] == "PRECISION_UNSUPPORTED"]
    assert art["metrics"]["cosine"] >= 0.99


def test_an_override_keeps_that_layer_out_of_quantization(tmp_path, mlp_onnx, mlp_data):
    spec = {"overrides": [{"match": "fc2", "precision": "fp32"}]}
    bundle = _deploy(tmp_path, mlp_onnx, mlp_data, "x86-avx512-vnni", spec=spec)
    art, proto = _graph(bundle)
    producer = {o: n for n in proto.graph.node for o in n.output}
    fc2 = next(n for n in proto.graph.node if n.name == "fc2")
    assert art["layer_precisions"] == {"fc1": "int8", "fc2": "fp32"}
    assert fc2.input[1] in _inits(proto) and _inits(proto)[fc2.input[1]].dtype == np.float32  # float weights
    fc1 = next(n for n in proto.graph.node if n.name == "fc1")
    assert producer[fc1.input[1]].op_type == "DequantizeLinear"
    # fc2 reads the ReLU the quantizer folded into a Q/DQ pair's range: the ReLU runs again, in float, for it
    relu = producer[fc2.input[0]]
    assert relu.op_type == "Relu" and producer[relu.input[0]].name == "fc1_bias"
    assert art["meta"]["qdq"]["float_inputs_of_float_layers"] == 1
    import onnxruntime as ort  # and the graph computes the model: fc1 INT8, then ReLU, fc2 in float

    x = np.load(mlp_data)["x"][:16]
    ref = ort.InferenceSession(str(mlp_onnx)).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(bundle.path / art["path"])).run(None, {"x": x})[0]
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.99


def test_a_float_layer_reads_float_input(tmp_path, mlp_data):
    """Promoting a layer takes its input out of INT8 too where the reference's tensor still exists: here fc2
    reads a residual-style Add that stays quantized, and gets the Add's float output, not its Q/DQ pair, as the
    sensitivity measured it."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in
             ((rng.standard_normal((16, 16)) * 0.3, "w1"), (rng.standard_normal(16) * 0.1, "b1"),
              (rng.standard_normal((4, 16)) * 0.3, "w2"), (np.zeros(4), "b2"))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
             helper.make_node("Add", ["h0", "x"], ["h1"], name="residual"),
             helper.make_node("Gemm", ["h1", "w2", "b2"], ["y"], name="fc2", transB=1)]
    graph = helper.make_graph(nodes, "res", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "res.onnx"))
    spec = {"overrides": [{"match": "fc2", "precision": "fp32"}], "fallback": {"max_trials": 0},
            "budget": {"metric": "cosine", "threshold": 0.9}}
    art, proto = _graph(_deploy(tmp_path, tmp_path / "res.onnx", mlp_data, "x86-avx512-vnni", spec=spec))
    fc2 = next(n for n in proto.graph.node if n.name == "fc2")
    assert art["layer_precisions"] == {"fc1": "int8", "residual": "int8", "fc2": "fp32"} and art["budget"]["passed"]
    assert fc2.input[0] == "h1" and art["meta"]["qdq"]["float_inputs_of_float_layers"] == 1
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == "h1" for n in proto.graph.node)  # pair removed

    # the residual Add is a layer of its own (kind tensor): kept float alone, it reads the float tensors while
    # both MatMuls stay INT8
    spec["overrides"] = [{"match": "residual", "precision": "fp32"}]
    art, proto = _graph(_deploy(tmp_path / "add", tmp_path / "res.onnx", mlp_data, "x86-avx512-vnni", spec=spec))
    add = next(n for n in proto.graph.node if n.name == "residual")
    assert art["layer_precisions"] == {"fc1": "int8", "residual": "fp32", "fc2": "int8"}
    assert list(add.input) == ["h0", "x"], "a float Add reads the reference's float tensors"
    writers = {o: n.op_type for n in proto.graph.node for o in n.output}
    for name in ("fc1", "fc2"):  # both still read Q/DQ pairs, activation and weight
        node = next(n for n in proto.graph.node if n.name == name)
        assert [writers.get(x) for x in node.input[:2]] == ["DequantizeLinear"] * 2, name

def test_a_model_with_external_weights_deploys(tmp_path, mlp_data):
    src = tmp_path / "src"
    src.mkdir()
    proto = onnx.load(str(make_mlp_onnx(src / "plain.onnx")))
    onnx.save(proto, str(src / "mlp.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="mlp.onnx.data", size_threshold=0)
    assert (src / "mlp.onnx.data").is_file() and (src / "mlp.onnx").stat().st_size < 1024
    b = _deploy(tmp_path, str(src / "mlp.onnx"), mlp_data, "x86-avx512-vnni")
    assert b.artifacts[0]["precision"] == "int8" and b.artifacts[0]["metrics"]["cosine"] >= 0.99
    # the bundle is self-contained: its reference carries the weights
    ref = onnx.load(str(b.path / "reference.onnx"))
    assert {"w1", "w2"} <= {t.name for t in ref.graph.initializer}


def test_a_torchscript_model_deploys_through_onnx(tmp_path):
    """A TorchScript archive goes through torch's TorchScript ONNX exporter; backends that must re-trace an
    nn.Module (torch, TFLite) say MODEL_FORMAT_UNSUPPORTED and the chain moves on."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(144, 3)).eval()
    torch.jit.script(net).save(str(tmp_path / "net.pt"))
    x = np.random.default_rng(0).standard_normal((64, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "data.npz", input=x)
    b = qdeploy.deploy(str(tmp_path / "net.pt"), target="x86-avx512-vnni", calib=tmp_path / "data.npz",
                       input_shape="1x1x8x8", output=tmp_path / "b")
    assert b.manifest["model"]["format"] == "torchscript"
    assert [a["backend"] for a in b.artifacts] == ["onnxruntime"]
    assert b.artifacts[0]["precision"] == "int8" and b.artifacts[0]["metrics"]["cosine"] >= 0.99
    skipped = {e["target"] for e in b.manifest["events"] if e["code"] == "MODEL_FORMAT_UNSUPPORTED"}
    assert {"torch:x86", "tflite:xnnpack"} <= skipped
    with torch.no_grad():  # the reference is the TorchScript model's own function
        want = net(torch.from_numpy(x[:4])).numpy()
    ref = b.reference_runner()
    np.testing.assert_allclose(ref.infer({"input": x[:4]})["output"], want, rtol=1e-4, atol=1e-5)
    ref.close()
