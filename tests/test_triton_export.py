"""``qdeploy export triton``: the repository layout, every config.pbtxt parsed into Triton's own ModelConfig
message (from tritonclient), every model file loaded in its runtime with the config's inputs and outputs, the
fallback order and budgets for the operator, the skip reasons, and the CLI's exit codes (nothing half-written)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import text_format

from qdeploy import cli
from qdeploy import export_triton as et
from qdeploy.bundle import Bundle, path_sha256, path_size, write_manifest

pb2 = et.model_config_pb2()
ORT_TO_TRITON = et.ORT_TYPES


def run(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def read_config(folder: Path):
    """The model's config.pbtxt as Triton's ModelConfig; text_format.Parse fails on any unknown field."""
    return text_format.Parse((folder / "config.pbtxt").read_text(), pb2.ModelConfig())


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".staging-" in p.name or ".old-" in p.name)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, digits_bundle):
    out = tmp_path_factory.mktemp("triton") / "repo"
    return et.export_triton(digits_bundle, out)


# --- the demo bundle --------------------------------------------------------------------------------------------
def test_layout_and_configs(exported, digits_bundle):
    repo, manifest = exported.path, Bundle.load(digits_bundle).manifest
    art = manifest["artifacts"][0]
    prefix = digits_bundle.resolve().name
    names = [f"{prefix}-{art['id']}", f"{prefix}-reference"]
    assert sorted(p.name for p in repo.iterdir()) == sorted(names + ["README.md", "qdeploy_fallback.json"])
    assert [m.name for m in exported.models] == names and exported.skipped == []
    batch = manifest["latency_measured_on"]["batch"]
    for name in names:
        assert sorted(str(p.relative_to(repo / name)) for p in (repo / name).rglob("*")) == \
            ["1", "1/model.onnx", "config.pbtxt"]
        cfg = read_config(repo / name)
        assert cfg.name == name and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == batch
        assert [(i.name, pb2.DataType.Name(i.data_type), list(i.dims)) for i in cfg.input] == \
            [("input", "TYPE_FP32", [1, 8, 8])]  # no batch dimension: max_batch_size > 0
        assert [(o.name, pb2.DataType.Name(o.data_type), list(o.dims)) for o in cfg.output] == \
            [("output", "TYPE_FP32", [10])]
        assert cfg.WhichOneof("scheduling_choice") == "dynamic_batching"
        assert [(g.count, pb2.ModelInstanceGroup.Kind.Name(g.kind)) for g in cfg.instance_group] == [(1, "KIND_CPU")]
    # the artifact is the bundle's file, byte for byte
    assert (repo / names[0] / "1" / "model.onnx").read_bytes() == (digits_bundle / art["path"]).read_bytes()
    assert (repo / names[1] / "1" / "model.onnx").read_bytes() == (digits_bundle / "reference.onnx").read_bytes()
    assert leftovers(repo.parent) == []


def test_every_onnx_model_loads_with_the_config_io(exported):
    for folder in (p for p in exported.path.iterdir() if p.is_dir()):
        cfg = read_config(folder)
        sess = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        for declared, found in ((cfg.input, sess.get_inputs()), (cfg.output, sess.get_outputs())):
            assert [t.name for t in declared] == [t.name for t in found]
            assert [pb2.DataType.Name(t.data_type) for t in declared] == [ORT_TO_TRITON[t.type] for t in found]
            assert [list(t.dims) for t in declared] == [list(t.shape[1:]) for t in found]
            assert all(isinstance(t.shape[0], str) or t.shape[0] is None for t in found)  # batchable
        x = np.random.default_rng(0).standard_normal((3, *cfg.input[0].dims)).astype(np.float32)
        (y,) = sess.run(None, {cfg.input[0].name: x})
        assert y.shape == (3, *cfg.output[0].dims)


def test_fallback_file_lists_the_chain_with_budgets(exported, digits_bundle):
    manifest = Bundle.load(digits_bundle).manifest
    fb = json.loads((exported.path / "qdeploy_fallback.json").read_text())
    assert fb == exported.fallback
    ids = [a["id"] for a in manifest["artifacts"]]
    assert [e["artifact"] for e in fb["chain"]] == ids + ["reference"]
    assert [e["position"] for e in fb["chain"]] == list(range(1, len(ids) + 2))
    for entry, art in zip(fb["chain"], manifest["artifacts"]):
        assert entry["budget"]["passed"] == art["budget"]["passed"]
        assert (entry["budget"]["value"], entry["budget"]["bound"]) == (art["budget"]["value"], art["budget"]["budget"])
        assert entry["budget"]["metric"] == manifest["spec"]["budget"]["metric"]
        assert entry["chain_reason"] == art.get("chain_reason")
        assert entry["triton"]["model"].endswith(art["id"]) and "onnxruntime" in entry["triton"]["validated"]
    ref = fb["chain"][-1]
    assert ref["final_fallback"] and ref["triton"]["model"].endswith("-reference")
    assert ref["budget"]["value"] == manifest["reference"]["metrics"][manifest["spec"]["budget"]["metric"]]
    assert fb["serving_order"] == [m.name for m in exported.models]
    readme = (exported.path / "README.md").read_text()
    assert all(m.name in readme for m in exported.models) and "| pass |" in readme and "does not fall back" in readme


def test_config_schema_refuses_unknown_fields_and_bad_values(exported):
    text = (next(p for p in exported.path.iterdir() if p.is_dir()) / "config.pbtxt").read_text()
    assert et.parse_config(text).max_batch_size > 0
    for bad in (text + "preferred_batch: 4\n", text.replace("TYPE_FP32", "TYPE_FLOAT32", 1),
                text.replace("KIND_CPU", "KIND_NPU")):
        with pytest.raises(et.TritonValidationError, match="not a valid Triton model config"):
            et.parse_config(bad)


def test_no_batching_declares_the_full_shapes(tmp_path, digits_bundle):
    done = et.export_triton(digits_bundle, tmp_path / "repo", max_batch_size=0, instances=2, name="digits")
    assert [m.name for m in done.models][-1] == "digits-reference"
    for model in done.models:
        cfg = read_config(tmp_path / "repo" / model.name)
        assert cfg.max_batch_size == 0 and cfg.WhichOneof("scheduling_choice") is None
        assert list(cfg.input[0].dims) == [-1, 1, 8, 8] and list(cfg.output[0].dims) == [-1, 10]
        assert cfg.instance_group[0].count == 2


def test_libtorch_binding_rules():
    """What Triton's PyTorch backend does with config tensor names (its GetNamingConvention)."""
    assert et._libtorch_binding(["input"], ["x"]) == ("the config's order", [0])
    assert et._libtorch_binding(["a", "b"], ["a", "b"]) == ("forward-argument names", [0, 1])
    assert et._libtorch_binding(["b", "a"], ["a", "b"]) == ("forward-argument names", [1, 0])  # refused
    assert et._libtorch_binding(["x__1", "y__0"], ["p", "q"]) == ("<name>__<index>", [1, 0])  # refused
    assert et._libtorch_binding(["logits", "probs"], None) == ("the config's order", [0, 1])
    assert et._libtorch_binding(["a__b"], None) == ("the config's order", [0])


# --- a bundle with every kind of artifact -----------------------------------------------------------------------
def _add(bundle_dir: Path, manifest: dict, art_id: str, backend: str, rel: str, meta: dict,
         verified_on: str = "runtime", passed: bool = True) -> None:
    base = dict(manifest["artifacts"][0])
    path = bundle_dir / rel
    manifest["artifacts"].append({
        **base, "id": art_id, "backend": backend, "target": backend, "path": rel, "meta": meta,
        "verified_on": verified_on, "sha256": path_sha256(path), "size_bytes": path_size(path),
        "budget": {**base["budget"], "passed": passed, "value": base["budget"]["value"] - (0 if passed else 0.5)},
        "chain_reason": f"{art_id}: added by the test"})


@pytest.fixture(scope="module")
def mixed_bundle(tmp_path_factory, digits_bundle) -> Path:
    """The demo bundle plus a built TensorRT engine (a stand-in file), a simulated TensorRT artifact without one,
    a CUDA-provider ONNX, a TorchScript (when torch is installed), TFLite, .pt2, the reference backend's oracle
    and an ONNX whose inputs are not the bundle's; on a GPU profile."""
    from conftest import make_mlp_onnx

    out = tmp_path_factory.mktemp("mixed") / "mixed"
    shutil.copytree(digits_bundle, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["profile"]["data"]["device"] = "gpu"
    arts = out / "artifacts"
    src = out / manifest["artifacts"][0]["path"]
    for name in ("trt-engine", "trt-sim"):
        (arts / name).mkdir()
        shutil.copyfile(src, arts / name / "model_qdq.onnx")
        (arts / name / "build_config.json").write_text(json.dumps(
            {"onnx": "model_qdq.onnx", "shapes": {"input": {"min": [1, 1, 8, 8], "opt": [8, 1, 8, 8],
                                                            "max": [16, 1, 8, 8]}}}))
    (arts / "trt-engine" / "engine.plan").write_bytes(b"a stand-in for a serialized TensorRT engine")
    trt_meta = {"onnx": "model_qdq.onnx", "build_config": "build_config.json"}
    _add(out, manifest, "tensorrt-int8", "tensorrt", "artifacts/trt-engine",
         {**trt_meta, "engine": "engine.plan", "tensorrt_version": "10.9.0", "gpu": "Tesla T4 (sm_75)"}, "gpu")
    _add(out, manifest, "tensorrt-fp16", "tensorrt", "artifacts/trt-sim", {**trt_meta, "engine": None}, "simulated")
    shutil.copyfile(src, arts / "cuda.onnx")
    _add(out, manifest, "onnxruntime-cuda-int8", "onnxruntime", "artifacts/cuda.onnx", {"provider": "cuda"},
         "simulated", passed=False)
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(64, 10)

            def forward(self, x):
                return self.fc(x.flatten(1))

        torch.manual_seed(0)
        torch.jit.save(torch.jit.trace(Net().eval(), torch.zeros(2, 1, 8, 8)), str(arts / "torch.ts"))
        _add(out, manifest, "torch-fbgemm-int8", "torch", "artifacts/torch.ts",
             {"format": "torchscript", "device": "cpu", "input_names": ["input"], "output_names": ["output"]})
    (arts / "m.tflite").write_bytes(b"TFL3")
    _add(out, manifest, "tflite-xnnpack-int8", "tflite", "artifacts/m.tflite", {})
    (arts / "p.pt2").write_bytes(b"PK")
    _add(out, manifest, "torch-inductor-int8", "torch", "artifacts/p.pt2", {"format": "pt2"})
    shutil.copyfile(src, arts / "oracle.onnx")
    _add(out, manifest, "reference-int8", "reference", "artifacts/oracle.onnx", {}, "simulated")
    make_mlp_onnx(arts / "other.onnx")
    _add(out, manifest, "onnxruntime-other", "onnxruntime", "artifacts/other.onnx", {"provider": "cpu"})
    write_manifest(out, manifest)
    Bundle.load(out)  # a valid bundle
    return out


def test_mixed_bundle(tmp_path, mixed_bundle):
    done = et.export_triton(mixed_bundle, tmp_path / "repo", name="m")
    repo = tmp_path / "repo"
    models = {m.artifact["id"] if m.artifact else "reference": m for m in done.models}
    has_torch = "torch-fbgemm-int8" in [a["id"] for a in Bundle.load(mixed_bundle).artifacts]
    assert list(models) == ["onnxruntime-cpu-int8", "tensorrt-int8", "onnxruntime-cuda-int8"] + \
        (["torch-fbgemm-int8"] if has_torch else []) + ["reference"]
    kinds = {k: (read_config(repo / m.name).platform, pb2.ModelInstanceGroup.Kind.Name(
        read_config(repo / m.name).instance_group[0].kind)) for k, m in models.items()}
    assert kinds["onnxruntime-cpu-int8"] == ("onnxruntime_onnx", "KIND_CPU")  # built for the CPU provider
    assert kinds["tensorrt-int8"] == ("tensorrt_plan", "KIND_GPU")
    assert kinds["onnxruntime-cuda-int8"] == ("onnxruntime_onnx", "KIND_GPU")
    assert kinds["reference"] == ("onnxruntime_onnx", "KIND_GPU")  # the profile's device
    # the engine: copied as model.plan, batch within its optimization profile, its I/O checked on the Q/DQ ONNX
    trt = repo / "m-tensorrt-int8"
    assert (trt / "1" / "model.plan").read_bytes() == (mixed_bundle / "artifacts/trt-engine/engine.plan").read_bytes()
    assert sorted(p.name for p in (trt / "1").iterdir()) == ["model.plan"]
    cfg = read_config(trt)
    assert cfg.max_batch_size == 16 and list(cfg.input[0].dims) == [1, 8, 8]
    assert "Q/DQ ONNX it was built from" in models["tensorrt-int8"].checked
    assert any("TensorRT 10.9.0" in n for n in models["tensorrt-int8"].notes)
    if has_torch:
        ts = read_config(repo / "m-torch-fbgemm-int8")
        assert ts.platform == "pytorch_libtorch" and (repo / "m-torch-fbgemm-int8" / "1" / "model.pt").is_file()
        assert [i.name for i in ts.input] == ["input"] and [o.name for o in ts.output] == ["output"]
        assert "the config's order" in models["torch-fbgemm-int8"].checked
        assert "ran batches of 1 and 3" in models["torch-fbgemm-int8"].checked
    reasons = {s.artifact: s.reason for s in done.skipped}
    assert list(reasons) == ["tensorrt-fp16", "tflite-xnnpack-int8", "torch-inductor-int8", "reference-int8",
                             "onnxruntime-other"]
    assert "no TensorRT engine" in reasons["tensorrt-fp16"] and "qdeploy build-engine" in reasons["tensorrt-fp16"]
    assert "TensorFlow Lite" in reasons["tflite-xnnpack-int8"]
    assert "torch.export program" in reasons["torch-inductor-int8"]
    assert "never serves" in reasons["reference-int8"]
    assert "its inputs in onnxruntime are x TYPE_FP32 [-1, 16]" in reasons["onnxruntime-other"]
    # the operator's view: every artifact, in order, with its verdict and why it is skipped
    fb = json.loads((repo / "qdeploy_fallback.json").read_text())
    ids = [a["id"] for a in Bundle.load(mixed_bundle).artifacts]
    assert [e["artifact"] for e in fb["chain"]] == ids + ["reference"]
    assert {e["artifact"]: e["skipped"] for e in fb["chain"] if e["skipped"]} == reasons
    assert [e["budget"]["passed"] for e in fb["chain"] if e["artifact"] == "onnxruntime-cuda-int8"] == [False]
    assert fb["serving_order"] == [m.name for m in done.models]
    readme = (repo / "README.md").read_text()
    assert "## Skipped artifacts" in readme and all(f"`{a}`" in readme for a in reasons)
    assert "| FAIL (simulated) |" in readme
    for folder in (p for p in repo.iterdir() if p.is_dir()):
        read_config(folder)  # every config parses


# --- the command line -------------------------------------------------------------------------------------------
def test_cli_exports_and_prints_the_chain(capsys, tmp_path, digits_bundle):
    code, out, err = run(capsys, "export", "triton", digits_bundle, "-o", tmp_path / "repo")
    assert code == 0, err
    assert "onnxruntime_onnx, KIND_CPU x1, max_batch_size 32" in out and "-reference" in out
    assert (tmp_path / "repo" / "qdeploy_fallback.json").is_file()
    # a second export over it: refused without --force, replaced with it
    code, _, err = run(capsys, "export", "triton", digits_bundle, "-o", tmp_path / "repo")
    assert code == 2 and "not empty" in err and "--force" in err
    code, _, err = run(capsys, "export", "triton", digits_bundle, "-o", tmp_path / "repo", "--force",
                       "--max-batch-size", "4")
    assert code == 0, err
    assert read_config(next(p for p in (tmp_path / "repo").iterdir() if p.is_dir())).max_batch_size == 4
    assert leftovers(tmp_path) == []


def test_cli_refuses_a_non_empty_output_and_writes_nothing(capsys, tmp_path, digits_bundle):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    for extra in ((), ("--force",)):
        code, stdout, err = run(capsys, "export", "triton", digits_bundle, "-o", out, *extra)
        assert code == 2 and err.startswith("qdeploy: error: output folder") and "not empty" in err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and stdout == ""
        assert [p.name for p in out.iterdir()] == ["notes.txt"] and leftovers(tmp_path) == []
    (tmp_path / "file").write_text("x")
    code, _, err = run(capsys, "export", "triton", digits_bundle, "-o", tmp_path / "file")
    assert code == 2 and "is a file" in err


def test_cli_bad_bundles_and_arguments(capsys, tmp_path, digits_bundle):
    code, _, err = run(capsys, "export", "triton", tmp_path / "nope", "-o", tmp_path / "r")
    assert code == 2 and "not a qdeploy bundle" in err
    tampered = tmp_path / "tampered"
    shutil.copytree(digits_bundle, tampered)
    (tampered / "reference.onnx").write_bytes(b"changed")
    code, _, err = run(capsys, "export", "triton", tampered, "-o", tmp_path / "r")
    assert code == 1 and "modified after the bundle was written" in err
    for argv in (("--max-batch-size", "-1"), ("--instances", "0")):
        code, _, err = run(capsys, "export", "triton", digits_bundle, "-o", tmp_path / "r", *argv)
        assert code == 2 and "must be >=" in err
    code, _, err = run(capsys, "export", "onnx", digits_bundle)
    assert code == 2 and "invalid choice" in err
    code, _, err = run(capsys, "export", "triton", digits_bundle)
    assert code == 2 and "-o" in err
    shutil.copyfile(digits_bundle / "reference.onnx", tampered / "reference.onnx")
    code, _, err = run(capsys, "export", "triton", tampered, "-o", tampered / "triton")
    assert code == 2 and "inside the bundle" in err and not (tampered / "triton").exists()
    assert not (tmp_path / "r").exists() and leftovers(tmp_path) == []


def test_an_invalid_repository_is_never_moved_into_place(capsys, tmp_path, digits_bundle, monkeypatch):
    """A config that Triton's schema refuses, found before or after writing: exit 1, no repository, no staging."""
    real = et._config_text
    monkeypatch.setattr(et, "_config_text", lambda model, bundle: real(model, bundle) + "bogus_field: 1\n")
    code, _, err = run(capsys, "export", "triton", digits_bundle, "-o", tmp_path / "repo")
    assert code == 1 and "not a valid Triton model config" in err and "bogus_field" in err
    assert not (tmp_path / "repo").exists() and leftovers(tmp_path) == []
    monkeypatch.setattr(et, "_config_text", real)
    real_write = et._write

    def corrupting_write(staging, *args):
        result = real_write(staging, *args)
        cfg = next(p for p in staging.iterdir() if p.is_dir()) / "config.pbtxt"
        cfg.write_text(cfg.read_text().replace("dims: [ 10 ]", "dims: [ 11 ]"))
        return result

    monkeypatch.setattr(et, "_write", corrupting_write)
    code, _, err = run(capsys, "export", "triton", digits_bundle, "-o", tmp_path / "repo")
    assert code == 1 and "does not match model.onnx" in err
    assert not (tmp_path / "repo").exists() and leftovers(tmp_path) == []


def test_a_scalar_per_sample_is_declared_as_triton_spells_it(tmp_path):
    """An output of shape [batch] has no dims after the batch: Triton wants dims [1] with an empty reshape."""
    import types

    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["score"], keepdims=0)], "scalar",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"])],
        [helper.make_tensor("axes", TensorProto.INT64, [1], [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    path = tmp_path / "scalar.onnx"
    onnx.save(model, str(path))
    tm = et.TritonModel("s", "onnxruntime_onnx", path, [et.Tensor("x", "TYPE_FP32", (-1, 4))],
                        [et.Tensor("score", "TYPE_FP32", (-1,))], 8, "KIND_CPU", 1, 1, None, path)
    text = et._config_text(tm, types.SimpleNamespace(path=tmp_path))
    cfg = et.parse_config(text)
    out = cfg.output[0]
    assert list(out.dims) == [1] and out.HasField("reshape") and list(out.reshape.shape) == []
    samples = {"x": np.ones((5, 4), np.float32)}
    assert et._check_model(tm, text, path, samples) is None and "ran a batch of 2" in tm.checked
    wrong = text.replace("dims: [ 4 ]", "dims: [ 5 ]")
    assert "the config declares x TYPE_FP32 [-1, 5]" in et._check_model(tm, wrong, path, samples)


def test_onnx_graph_io_reads_what_onnxruntime_reports(digits_bundle):
    """The TensorRT check's fallback when onnxruntime cannot load a Q/DQ graph (FP8, say): the graph's own I/O."""
    bundle = Bundle.load(digits_bundle)
    for path in (bundle.reference_path, digits_bundle / bundle.artifacts[0]["path"]):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        want = {k: [(t.name, ORT_TO_TRITON[t.type], tuple(d if isinstance(d, int) else -1 for d in t.shape))
                    for t in found] for k, found in (("input", sess.get_inputs()), ("output", sess.get_outputs()))}
        assert et._onnx_graph_io(path) == want
