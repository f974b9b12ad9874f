"""The CLI end to end, and every bad input: one clear line, exit code 2, nothing left behind."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qdeploy import cli

from conftest import DIGITS_FACTORY, DIGITS_SPEC

BIN = Path(sys.executable).parent / "qdeploy"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_deploy_check_verify_end_to_end(capsys, tmp_path, digits_data):
    out_dir = tmp_path / "demo"
    code, out, err = run(capsys, "deploy", DIGITS_FACTORY, "--input-shape", "1x1x8x8", "--target", "x86-avx512-vnni",
                         "--spec", DIGITS_SPEC, "--calib", digits_data / "calib.npz", "--val",
                         digits_data / "val.npz", "-o", out_dir)
    assert code == 0, err
    assert "onnxruntime-cpu-int8" in out and "pass (top1_accuracy" in out
    assert (out_dir / "manifest.json").is_file() and (out_dir / "report.md").is_file()
    manifest = json.loads((out_dir / "manifest.json").read_text())
    art = manifest["artifacts"][0]
    assert art["precision"] == "int8" and art["size_vs_fp32"] <= 0.30
    assert art["metrics"]["top1_accuracy"] >= manifest["reference"]["metrics"]["top1_accuracy"] - 0.01
    assert "[BACKEND_UNAVAILABLE]" in err or all(e["code"] != "BACKEND_UNAVAILABLE" for e in manifest["events"])

    code, out, _ = run(capsys, "verify", out_dir, "--val", digits_data / "val.npz")
    assert code == 0 and "integrity ok" in out and "pass" in out

    # deploying again over an existing bundle replaces it atomically: the new manifest, only the new artifacts
    before = {a["backend"] for a in manifest["artifacts"]}
    code, _, _ = run(capsys, "deploy", DIGITS_FACTORY, "--input-shape", "1x1x8x8", "--target", "x86-avx512-vnni",
                     "--spec", DIGITS_SPEC, "--calib", digits_data / "calib.npz", "--val", digits_data / "val.npz",
                     "-o", out_dir, "-b", "onnxruntime")
    assert code == 0
    again = json.loads((out_dir / "manifest.json").read_text())
    assert [a["backend"] for a in again["artifacts"]] == ["onnxruntime"]
    assert sorted(p.name for p in (out_dir / "artifacts").iterdir()) == [again["artifacts"][0]["path"].split("/")[-1]]
    assert before - {"onnxruntime"}, "the first bundle had other backends, gone after the replacement"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    from qdeploy.bundle import Bundle
    Bundle.load(out_dir)  # every sha256 of the replaced bundle holds


def test_check_nvidia_t4_on_a_cpu_host_says_what_falls_back(capsys, digits_onnx):
    code, out, _ = run(capsys, "check", digits_onnx, "--target", "nvidia-t4")
    assert code == 0
    assert "onnxruntime:cuda" in out and "BACKEND_UNAVAILABLE" in out
    assert "onnxruntime:cpu" in out and "runs int8" in out
    code, out, _ = run(capsys, "check", digits_onnx, "--target", "nvidia-t4", "--json")
    entries = {e["target"]: e for e in json.loads(out)["entries"]}
    assert not entries["onnxruntime:cuda"]["runnable"]
    assert entries["onnxruntime:cuda"]["events"][0]["code"] == "BACKEND_UNAVAILABLE"
    assert entries["onnxruntime:cpu"]["runnable"]
    for label, entry in entries.items():  # every GPU backend of the chain says it cannot run its runtime here
        if label != "onnxruntime:cpu":
            assert "BACKEND_UNAVAILABLE" in [e["code"] for e in entry["events"]], label


def test_deploy_nvidia_t4_falls_back_to_what_runs_here(capsys, tmp_path, digits_onnx, digits_data):
    code, out, err = run(capsys, "deploy", digits_onnx, "--target", "nvidia-t4", "--calib", digits_data / "calib.npz",
                         "--val", digits_data / "val.npz", "-o", tmp_path / "t4")
    assert code == 0, err
    manifest = json.loads((tmp_path / "t4" / "manifest.json").read_text())
    unavailable = {e["target"] for e in manifest["events"] if e["code"] == "BACKEND_UNAVAILABLE"}
    assert "onnxruntime:cuda" in unavailable and "torch:cuda" in unavailable
    assert "onnxruntime:cpu" in [a["target"] for a in manifest["artifacts"]]
    for target in unavailable:
        assert f"[BACKEND_UNAVAILABLE] {target}" in err  # said on the console too, never silent


def test_backends_and_profiles_commands(capsys):
    code, out, _ = run(capsys, "backends")
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert code == 0 and set(rows) >= {"onnxruntime", "torch", "tflite", "tensorrt"}
    assert " available: " in rows["onnxruntime"]  # the core's own backend runs here, always
    code, out, _ = run(capsys, "backends", "--target", "nvidia-t4")
    cuda = next(line for line in out.splitlines() if "onnxruntime:cuda" in line)
    assert code == 0 and " unavailable: " in cuda and "CUDAExecutionProvider" in cuda
    code, out, _ = run(capsys, "profiles", "list")
    assert code == 0 and "edge-tpu" in out and "nvidia-jetson-orin" in out
    code, out, _ = run(capsys, "profiles", "show", "android-nnapi")
    assert code == 0 and json.loads(out)["backends"][0]["activation_symmetric_only"] is True
    code, out, _ = run(capsys, "profiles", "detect")
    assert code == 0 and out.startswith("detected: ")


def test_spec_command_writes_and_validates(capsys, tmp_path):
    code, _, _ = run(capsys, "spec", "-o", tmp_path / "s.toml")
    assert code == 0
    code, out, _ = run(capsys, "spec", tmp_path / "s.toml")
    assert code == 0 and out.strip().endswith(": valid (spec version 1)")
    from qdeploy.spec import QuantSpec, load_spec
    assert load_spec(tmp_path / "s.toml") == QuantSpec()  # the written default is the default


def test_strict_policy_exits_1_when_the_budget_is_not_met(capsys, tmp_path, mlp_onnx, mlp_data):
    spec = tmp_path / "tight.toml"
    spec.write_text('[budget]\nmetric = "sqnr_db"\nthreshold = 200.0\n')
    code, _, err = run(capsys, "deploy", mlp_onnx, "--target", "x86-avx512-vnni", "--spec", spec, "--calib",
                       mlp_data, "-o", tmp_path / "out", "--policy", "strict", "-b", "onnxruntime")
    assert code == 1
    assert "policy is strict" in err and err.strip().splitlines()[-1].startswith("qdeploy: error:")
    assert not (tmp_path / "out").exists()


# --- bad inputs ----------------------------------------------------------------------------------------------
def _bad_inputs(tmp: Path, digits_onnx: Path, digits_data: Path, bundle: Path) -> dict[str, tuple[list, str]]:
    corrupt = tmp / "corrupt.onnx"
    corrupt.write_bytes(b"this is not a protobuf" * 10)
    typo = tmp / "typo.toml"
    typo.write_text('[activations]\nmethod = "entropi"\n')
    wrong = tmp / "wrong.npz"
    np.savez(wrong, x=np.zeros((10, 1, 8, 9), np.float32))
    nan = tmp / "nan.npz"
    arr = np.zeros((10, 1, 8, 8), np.float32)
    arr[3, 0, 2, 2] = np.nan
    np.savez(nan, x=arr)
    empty = tmp / "empty"
    empty.mkdir()
    val = np.load(digits_data / "val.npz")
    np.savez(tmp / "foreign_labels.npz", input=val["input"], y=val["y"] + 100)  # labels of another task
    float_labels = tmp / "float_labels"
    float_labels.mkdir()
    np.save(float_labels / "x.npy", val["input"])
    np.save(float_labels / "y.npy", val["y"].astype(np.float32))
    bad_label_file = tmp / "bad_label_file"
    bad_label_file.mkdir()
    np.save(bad_label_file / "x.npy", val["input"])
    (bad_label_file / "y.npy").write_bytes(b"not numpy")
    np.savez(tmp / "scalar.npz", input=np.float32(1.0))
    np.savez(tmp / "unlabelled.npz", input=val["input"])
    impossible = tmp / "impossible.toml"
    impossible.write_text('[budget]\nmetric = "cosine"\nthreshold = 1.5\n')
    above_fp32 = tmp / "above_fp32.toml"
    above_fp32.write_text('[budget]\nmetric = "top1_accuracy"\nthreshold = 0.9999\n')
    metric_typo = tmp / "metric_typo.toml"
    metric_typo.write_text('[budget]\nmetric = "accuracy"\n')
    profile = tmp / "my-device.toml"
    profile.write_text('name = "my-device"\ndescription = "x"\ndevice = "cpu"\n[[backends]]\nbackend = '
                       '"onnxruntime"\nfast = "int8"\n')
    (tmp / "weights.pt").write_bytes(b"a pickled state_dict, not a TorchScript archive")
    calib = ["--calib", digits_data / "calib.npz"]
    deploy = ["deploy", digits_onnx, "--target", "x86-avx512-vnni"]
    return {
        "not torchscript": (["deploy", tmp / "weights.pt", "--input-shape", "1x1x8x8", *calib],
                            "is not a TorchScript archive"),
        "labels of another task": ([*deploy, *calib, "--val", tmp / "foreign_labels.npz"], "label 109 is out of range"),
        "float labels": ([*deploy, *calib, "--val", float_labels], "must be integer class indices"),
        "unreadable labels": ([*deploy, *calib, "--val", bad_label_file], "labels file y.npy cannot be read"),
        "scalar data": ([*deploy, *calib, "--val", tmp / "scalar.npz"], "holds a single number"),
        "impossible budget": ([*deploy, *calib, "--spec", impossible], "outside the range of cosine"),
        "budget above fp32": ([*deploy, *calib, "--val", digits_data / "val.npz", "--spec", above_fp32],
                              "the FP32 reference itself misses the budget"),
        "metric typo": (["spec", metric_typo], "did you mean 'top1_accuracy'"),
        "bad profile file": (["deploy", digits_onnx, "--target", profile, *calib], "must be a list of names"),
        "verify unlabelled": (["verify", bundle, "--val", tmp / "unlabelled.npz"], "has no labels"),
        "port out of range": (["serve", bundle, "--port", "70000"], "is not a TCP port"),
        "unknown flag": (["deploy", digits_onnx, "--calibration", "x"], "unrecognized arguments"),
        "missing model": (["deploy", tmp / "nope.onnx", *calib], "does not exist"),
        "corrupt onnx": (["deploy", corrupt, *calib], "not a valid ONNX model"),
        "spec typo": ([*deploy, "--spec", typo, *calib], "did you mean 'entropy'"),
        "unknown profile": (["deploy", digits_onnx, "--target", "jetson-nano", *calib], "unknown hardware profile"),
        "wrong shape": ([*deploy, "--calib", wrong], "has samples of shape 1x8x9"),
        "nan": ([*deploy, "--calib", nan], "NaN or Inf in 1 of its 10 samples (the first is sample 3"),
        "empty folder": ([*deploy, "--calib", empty], "holds no .npy or .npz files"),
        "no calibration": ([*deploy], "needs calibration data"),
        "missing input shape": (["deploy", DIGITS_FACTORY, *calib], "needs --input-shape"),
        "bad input shape": (["deploy", DIGITS_FACTORY, "--input-shape", "1x1x9", *calib], "check --input-shape"),
        "not a bundle": (["verify", empty], "is not a qdeploy bundle"),
    }


CASES = ["missing model", "corrupt onnx", "spec typo", "unknown profile", "wrong shape", "nan", "empty folder",
         "no calibration", "missing input shape", "bad input shape", "not a bundle",
         "labels of another task", "float labels", "unreadable labels", "scalar data", "impossible budget",
         "budget above fp32", "metric typo", "bad profile file", "verify unlabelled", "port out of range",
         "unknown flag", "not torchscript"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_one_line_exit_2_nothing_written(capsys, tmp_path, digits_onnx, digits_data, digits_bundle, case):
    argv, message = _bad_inputs(tmp_path, digits_onnx, digits_data, digits_bundle)[case]
    out_dir = tmp_path / "out"
    if argv[0] == "deploy":
        argv = [*argv, "-o", out_dir]
    before = set(tmp_path.iterdir())
    try:
        code, out, err = run(capsys, *argv)
    except SystemExit as exc:  # argparse's own errors (one line, exit 2, from the project's parser)
        code, (out, err) = exc.code, capsys.readouterr()
    lines = [l for l in err.strip().splitlines() if l]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("qdeploy: error:"), err
    assert message in lines[0]
    assert "Traceback" not in err + out
    assert not out_dir.exists()
    assert set(tmp_path.iterdir()) == before  # no staging folder left behind


def test_an_output_folder_that_cannot_exist_is_one_error(capsys, tmp_path, digits_onnx, digits_data):
    (tmp_path / "afile").write_text("x")
    code, _, err = run(capsys, "deploy", digits_onnx, "--target", "x86-avx512-vnni", "--calib",
                       digits_data / "calib.npz", "-o", tmp_path / "afile" / "sub")
    assert code == 2 and "cannot write a bundle" in err and len(err.strip().splitlines()) == 1


def test_the_installed_command_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([str(BIN), "deploy", str(tmp_path / "missing.onnx")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"qdeploy: error: model file {tmp_path / 'missing.onnx'} does not exist"


def test_spec_command_refuses_a_missing_file(capsys, tmp_path):
    code, _, err = run(capsys, "spec", tmp_path / "missing.toml")
    assert code == 2 and "does not exist" in err


def test_a_manifest_without_its_integrity_map_is_refused(capsys, tmp_path, digits_bundle):
    bad = tmp_path / "bad"
    shutil.copytree(digits_bundle, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    del manifest["files"]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run(capsys, "verify", bad)
    assert code == 1 and "no integrity map" in err  # a failed integrity check, not bad input
    manifest["files"] = {"../outside.txt": "0" * 64}
    (bad / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run(capsys, "verify", bad)
    assert code == 1 and "outside the bundle" in err


def test_a_bundle_of_an_unknown_schema_version_is_refused(capsys, tmp_path, digits_bundle):
    bad = tmp_path / "future"
    shutil.copytree(digits_bundle, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (bad / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run(capsys, "verify", bad)
    assert code == 2 and "schema" in err and "deploy again" in err
    assert len(err.strip().splitlines()) == 1
