"""The zoo of real public models (examples/zoo.py), each through every backend that takes its format, from the
command line a user types: no internal error (exit 3) on any of them, ever; an INT8 artifact that runs and
is verified against the FP32 reference on real data, or one line that says why not.

Slow (minutes): CI runs it; locally `make test-fast` skips it. The full zoo x backend matrix with speed and
size is benchmarks/bench_zoo.py (README's zoo table)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import zoo
from conftest import host_x86_profile

pytestmark = pytest.mark.slow
QDEPLOY = str(Path(sys.executable).parent / "qdeploy")
N_CALIB, N_VAL = 32, 16


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """name -> folder with calib.npz and val.npz (prepared once per module)."""
    root = tmp_path_factory.mktemp("zoo")
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            done[name] = zoo.get(name).prepare(root / name, N_CALIB, N_VAL)
        return done[name]
    return get


def _deploy(model: zoo.ZooModel, data: Path, out: Path, *args: str, spec: dict | None = None):
    cmd = [QDEPLOY, "deploy", model.model_path(), "--calib", str(data / "calib.npz"), "--val",
           str(data / "val.npz"), "-o", str(out), *args]
    if model.input_shape:
        cmd += ["--input-shape", model.input_shape]
    if spec is not None:
        (out.parent / "spec.json").write_text(json.dumps(spec))
        cmd += ["--spec", str(out.parent / "spec.json")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    text = res.stdout + res.stderr
    assert res.returncode != 3 and "internal error" not in text and "Traceback" not in text, text[-3000:]
    return res.returncode, text


def _spec(model: zoo.ZooModel) -> dict:
    """The model's own metric, a floor every INT8 artifact must clear, no fallback trials (the search is
    benchmarked, not tested here)."""
    return {"budget": {"metric": model.metric, "threshold": 0.5}, "fallback": {"max_trials": 0}}


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_zoo_model_deploys_to_x86_cpu(name, prepared, tmp_path):
    """Every CPU backend of the host's x86 profile, on each zoo model: a verified artifact from each backend that
    takes the format, a one-line reason from each that does not."""
    model = zoo.get(name)
    data = prepared(name)
    rc, text = _deploy(model, data, tmp_path / "b", "--target", host_x86_profile(), spec=_spec(model))
    if model.fmt == "tflite":  # no backend takes a .tflite as input: one line saying what to give instead
        assert rc == 2 and "tflite" in text.lower() and len(text.strip().splitlines()) == 1, text
        return
    assert rc == 0, text[-3000:]
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    arts = {a["backend"]: a for a in manifest["artifacts"]}
    assert "onnxruntime" in arts, manifest["events"]
    ort = arts["onnxruntime"]
    assert ort["precision"] == "int8" or ort["precision"].startswith("mixed"), ort["precision"]
    assert ort["budget"]["passed"], ort["metrics"]  # the other backends' accuracy is the PTQ toolkit's work
    for art in arts.values():
        assert art["verified_on"] == "runtime" and model.metric in art["metrics"]
    if model.fmt == "torch":  # a PyTorch module: every CPU backend takes it
        assert {"torch", "tflite"} <= set(arts), manifest["events"]
    else:  # an ONNX file: the torch and TFLite backends take PyTorch modules and say so
        refused = {e["target"].split(":")[0] for e in manifest["events"] if e["code"] == "MODEL_FORMAT_UNSUPPORTED"}
        assert {"torch", "tflite"} <= refused, manifest["events"]


@pytest.mark.parametrize("name", sorted(n for n, m in zoo.ZOO.items() if m.fmt == "onnx"))
def test_zoo_onnx_model_through_tensorrt_simulated(name, prepared, tmp_path):
    """The TensorRT INT8 recipe (explicit Q/DQ) on a T4, verified by simulation in onnxruntime here; an
    already-INT8 graph without Q/DQ pairs is refused in one line (exit 1: nothing could be built)."""
    model = zoo.get(name)
    rc, text = _deploy(model, prepared(name), tmp_path / "b", "--target", "nvidia-t4", "--backend", "tensorrt",
                       spec=_spec(model))
    if model.already_quantized:
        assert rc == 1 and "OP_UNSUPPORTED" in text and "TensorRT does not run" in text, text
        return
    assert rc == 0, text[-3000:]
    art = json.loads((tmp_path / "b" / "manifest.json").read_text())["artifacts"][0]
    assert art["verified_on"] == "simulated" and art["budget"]["passed"], art["metrics"]


@pytest.mark.parametrize("name", ["bert-encoder", "bert-encoder-dynamo"])
def test_transformer_default_deploy_meets_cosine_099(name, prepared, tmp_path):
    """No spec at all: the transformer is deployed with dynamic per-channel INT8 MatMuls on the x86 profile's
    onnxruntime entry and keeps cosine >= 0.99 to FP32 on real text."""
    model = zoo.get(name)
    rc, text = _deploy(model, prepared(name), tmp_path / "b", "--target", host_x86_profile(), "--backend",
                       "onnxruntime")
    assert rc == 0, text[-3000:]
    assert "activations.mode auto -> dynamic" in text
    art = json.loads((tmp_path / "b" / "manifest.json").read_text())["artifacts"][0]
    assert art["precision"] != "fp32" and art["metrics"]["cosine"] >= 0.99, art["metrics"]
    assert "top1_agreement" not in art["metrics"]  # an L2-normalised embedding is not a classifier
