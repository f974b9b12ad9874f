"""One spec, one numerics (issue 11, part 3): the accuracy transforms' weights and the core's calibrated activation
ranges reach the backends that build from the PyTorch module (torch, LiteRT), so the same spec gives the same
INT8 model on onnxruntime, torch and LiteRT."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchao")

import qdeploy  # noqa: E402
from qdeploy.spec import QuantSpec  # noqa: E402
from qdeploy.verify import output_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SENSITIVE = f"{ROOT / 'examples' / 'digits.py'}:build_sensitive_model"


class SeparableNet(torch.nn.Module):
    """Conv-BN-ReLU6, depthwise Conv-BN-ReLU6, pointwise Conv-BN-ReLU, pooling, Linear: a mobile block, with one
    output channel of the first convolution 40x larger than the rest (per-tensor INT8 needs CLE)."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.dw, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16)
        self.pw, self.bn3 = nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.nn.functional.relu6(self.bn1(self.conv1(x)))
        x = torch.nn.functional.relu6(self.bn2(self.dw(x)))
        x = torch.relu(self.bn3(self.pw(x)))
        return self.fc(x.mean((2, 3)))


def build_model():
    torch.manual_seed(3)
    m = SeparableNet()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for bn in (m.bn1, m.bn2, m.bn3):
            c = bn.num_features
            bn.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(c, generator=g) * 0.5 + 0.5)
            bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(c, generator=g) * 0.2 + 0.5)
        m.conv1.weight[0] *= 40.0
    return m.eval()


@pytest.fixture(scope="module")
def digits_data(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "examples"))
    import digits

    out = digits.prepare(tmp_path_factory.mktemp("digits"))
    return out / "calib.npz", out / "val.npz"


SPEC = {"precision": "int8", "weights": {"bits": 8, "symmetric": True, "granularity": "per_tensor"},
        "activations": {"mode": "static", "method": "minmax"},
        "transforms": {"cross_layer_equalization": True, "bias_correction": "empirical", "adaround": False},
        "budget": {"metric": "cosine", "mode": "absolute", "threshold": 0.5}}


def test_carried_weights_compute_the_transformed_reference(tmp_path, digits_data):
    """CLE (through the depthwise conv and the ReLU6s) and bias correction on the ONNX reference, written into the
    module: its BatchNorms pass their input through plus the folded bias, and it computes what the transformed
    ONNX computes; a module that does not fit is refused with the reason."""
    import onnx

    from qdeploy.backend import OrtRunner
    from qdeploy.model import load_model
    from qdeploy.torch_bridge import CarryError, carry_weights
    from qdeploy.transforms import transform_model

    module = build_model()
    handle = load_model(module, tmp_path / "ref.onnx", "1x1x8x8")
    calib = dict(np.load(digits_data[0]))["input"][:64]
    x = dict(np.load(digits_data[1]))["input"][:32]
    proto, events = transform_model(onnx.load(str(handle.onnx_path)), QuantSpec.from_dict(SPEC),
                                    [{"input": calib[i:i + 16]} for i in range(0, 64, 16)])
    assert {e["transform"] for e in events if e.get("applied")} >= {"cross_layer_equalization", "bias_correction"}
    path = tmp_path / "transformed.onnx"
    onnx.save(proto, str(path))
    carried, changed = carry_weights(module, onnx.load(str(handle.onnx_path)), proto, handle.layers,
                                     {"input": x}, path)
    assert {"conv1", "dw", "pw", "fc"} <= set(changed)
    assert float(carried.bn1.running_mean.abs().max()) == 0.0 and float(carried.bn1.weight.detach().min()) == 1.0
    want = OrtRunner(path).infer({"input": x})["output"]
    with torch.no_grad():
        got = carried(torch.from_numpy(x)).numpy()
        before = module(torch.from_numpy(x)).numpy()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
    assert np.linalg.norm(before - want) / np.linalg.norm(want) > 1e-4  # bias correction changed the function
    assert float(module.bn1.running_mean.abs().max()) > 0  # the user's module is left as it was

    other = build_model()
    other.dw = torch.nn.Conv2d(16, 16, 3, padding=1, bias=False)  # not depthwise: the weight cannot fit
    with pytest.raises(CarryError, match="does not fit module dw"):
        carry_weights(other, onnx.load(str(handle.onnx_path)), proto, handle.layers, {"input": x}, path)


@pytest.mark.slow
def test_one_spec_one_numerics_on_onnxruntime_torch_and_litert(tmp_path, digits_data):
    """The same transformed spec through onnxruntime, torch (x86, PT2E) and LiteRT, on the trained digits model
    with a 256x outlier channel (per-tensor INT8 cosine 0.939 to FP32 on every backend without the transforms):
    each torch-built artifact takes the transformed weights and every activation range from the core, so all
    three reach the transforms' accuracy and agree with each other. The stated tolerance: cosine >= 0.9999 and
    top-1 agreement >= 0.99 between any two backends (measured: onnxruntime and LiteRT bit-identical, torch at
    1 - cosine 4.5e-5 and top-1 agreement 0.998 from both, as close as each is to FP32; without the transforms
    each was at 1 - cosine 0.061 from FP32). onnxruntime's artifact runs as float Q/DQ
    (exact int32 accumulation: what the x86-avx512-vnni target computes, not this host's AVX2 kernels)."""
    pytest.importorskip("litert_torch")
    from qdeploy.backend import OrtRunner
    from qdeploy.profile_numerics import ExactInt32Runner
    from qdeploy_tflite import LiteRTRunner
    from qdeploy_torch.runner import TorchRunner

    calib, val = digits_data
    lines: list[str] = []
    b = qdeploy.deploy(SENSITIVE, target="x86-avx512-vnni", spec=SPEC, calib=calib, val=val, input_shape="1x1x8x8",
                       backends=["onnxruntime", "torch", "tflite"], output=tmp_path / "three", echo=lines.append)
    # the reference is transformed once for the deploy; the other two entries take the same transformed weights
    assert sum("accuracy transforms on the reference: cross_layer_equalization" in x for x in lines) == 1, lines
    assert sum("the same as an earlier entry's" in x for x in lines) == 2, lines
    arts = {a["backend"]: a for a in b.manifest["artifacts"]}
    assert set(arts) == {"onnxruntime", "torch", "tflite"}
    for name, art in arts.items():
        assert art["precision"] == "int8", (name, art["precision"])
        assert art["transforms"]["applied"], (name, art["transforms"])
    t_meta, l_meta = arts["torch"]["meta"], arts["tflite"]["meta"]["calibration"]
    assert t_meta["activation_ranges_from_core"] == t_meta["activation_observers"] > 0, t_meta
    assert l_meta["activation_ranges_from_core"] == l_meta["activation_observers"] > 0, l_meta
    assert arts["tflite"]["meta"]["float_ops"] == []  # every op INT8 with the adopted ranges
    x = dict(np.load(val))["input"]
    fp32 = OrtRunner(b.path / "reference.onnx").infer({"input": x})["output"]
    outs = {"onnxruntime": ExactInt32Runner(b.path / arts["onnxruntime"]["path"], 1).infer({"input": x})["output"],
            "torch": TorchRunner(b.path / arts["torch"]["path"], arts["torch"]["meta"]).infer({"input": x})["output"],
            "tflite": LiteRTRunner(b.path / arts["tflite"]["path"], arts["tflite"]["meta"]).infer({"input": x})
            ["output"]}
    for name, out in outs.items():
        assert output_metrics(fp32, out)["cosine"] >= 0.999, name  # the transforms reached every backend
    for a, c in (("onnxruntime", "torch"), ("onnxruntime", "tflite"), ("torch", "tflite")):
        m = output_metrics(outs[a], outs[c])
        assert m["cosine"] >= 0.9999 and m["top1_agreement"] >= 0.99, (a, c, m)


def test_an_observer_of_a_padding_is_matched_to_the_unpadded_tensor():
    """A same-padding convolution's input is a padded tensor in torch, while the ONNX exporter puts the padding into
    the Conv: the observer is matched to the unpadded tensor (its range widened to hold the zeros); other values
    are not matched to it."""
    from qdeploy.torch_bridge import _match

    v = np.random.default_rng(0).normal(size=(1, 4, 5, 5)).astype(np.float32)
    seen = {"right": np.pad(v, ((0, 0), (0, 0), (0, 1), (0, 1))), "both": np.pad(v, ((0, 0), (0, 0), (1, 1), (1, 1))),
            "same": v, "shifted": np.pad(v, ((0, 0), (0, 0), (0, 1), (0, 1))) + 1}
    assert _match(seen, {"t": v, "twice": 2 * v}) == {"right": ("t", True), "both": ("t", True), "same": ("t", False)}


def test_the_reference_values_are_computed_once_per_model_and_sample(tmp_path, monkeypatch):
    """Each trial of a torch search calibrates again: the reference tensors of the same model on the same sample
    come from the last answer, not from a new session; another sample, or a rewritten model, runs again."""
    import onnx
    from onnx import TensorProto, helper

    from qdeploy import torch_bridge, transforms

    path = tmp_path / "m.onnx"
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["r"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    made = []
    real = transforms._session
    monkeypatch.setattr(transforms, "_session", lambda *a, **k: made.append(1) or real(*a, **k))
    x = np.array([[-1, 2, -3, 4]], np.float32)
    first = torch_bridge._tensor_values(path, ["r", "y"], {"x": x})
    np.testing.assert_array_equal(first["r"], [[0, 2, 0, 4]])
    again = torch_bridge._tensor_values(path, ["y", "r"], {"x": x.copy()})
    assert len(made) == 1 and again.keys() == first.keys()
    torch_bridge._tensor_values(path, ["r", "y"], {"x": -x})
    assert len(made) == 2
    torch_bridge.forget()  # what a deploy does once its work folder is gone: nothing held, the next call runs
    assert not torch_bridge._LAST_VALUES
    torch_bridge._tensor_values(path, ["r", "y"], {"x": -x})
    assert len(made) == 3
