"""Shared fixtures: the digits example (data, FP32 ONNX), small hand-built ONNX models, a clean registry."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

DIGITS_FACTORY = f"{ROOT / 'examples' / 'digits.py'}:build_model"
DIGITS_SPEC = ROOT / "examples" / "digits_spec.toml"


@pytest.fixture(scope="session")
def digits_data(tmp_path_factory) -> Path:
    """calib.npz and val.npz of the digits example (labels under 'y')."""
    import digits

    return digits.prepare(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="session")
def digits_onnx(tmp_path_factory) -> Path:
    """The trained digits CNN as a plain FP32 ONNX file (exported once per session)."""
    from qdeploy.model import load_model

    path = tmp_path_factory.mktemp("digits_onnx") / "digits.onnx"
    load_model(DIGITS_FACTORY, path, "1x1x8x8")
    return path


def host_x86_profile() -> str:
    """This host's own x86 profile (x86-avx512-vnni elsewhere): what a bundle must be deployed to for this host to
    *serve* what was verified. A deploy to a VNNI profile from an AVX2 host is verified with VNNI's exact
    accumulation (emulated), which this host's saturating kernels do not reproduce, so its serve warm-up fails."""
    from qdeploy.profiles import detect_profile_name

    name = detect_profile_name(gpu=None)
    return name if name.startswith("x86") else "x86-avx512-vnni"


@pytest.fixture(scope="session")
def digits_bundle(tmp_path_factory, digits_data) -> Path:
    """The demo deployment (onnxruntime backend) of the digits example to this host's x86 profile."""
    import qdeploy

    out = tmp_path_factory.mktemp("bundles") / "demo"
    qdeploy.deploy(DIGITS_FACTORY, target=host_x86_profile(), spec=DIGITS_SPEC, calib=digits_data / "calib.npz",
                   val=digits_data / "val.npz", output=out, input_shape="1x1x8x8", backends=["onnxruntime"])
    return out


def make_mlp_onnx(path: Path, seed: int = 0, hidden: int = 32) -> Path:
    """A two-layer MLP (MatMul+Add, Relu, Gemm) on a 16-feature input, built with onnx.helper (no torch)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((16, hidden)).astype(np.float32) * 0.3
    b1 = rng.standard_normal(hidden).astype(np.float32) * 0.1
    w2 = rng.standard_normal((4, hidden)).astype(np.float32) * 0.3
    b2 = np.zeros(4, np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
             helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
             helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
             helper.make_node("Gemm", ["h2", "w2", "b2"], ["y"], name="fc2", transB=1)]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                              [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def mlp_onnx(tmp_path) -> Path:
    return make_mlp_onnx(tmp_path / "mlp.onnx")


@pytest.fixture
def mlp_data(tmp_path) -> Path:
    rng = np.random.default_rng(1)
    path = tmp_path / "mlp_data.npz"
    np.savez(path, x=rng.standard_normal((200, 16)).astype(np.float32))
    return path


@pytest.fixture
def fresh_registry():
    """Reset the process-wide registry before and after a test that registers plugins by hand."""
    from qdeploy.plugins import reset_registry

    reset_registry()
    try:
        yield
    finally:
        reset_registry()
