"""Fan-out: one model to many targets, the export and calibration shared, every bundle in DIR/<target>/ and
listed in DIR/index.json; on a local Ray when it is installed, one after another otherwise."""
from __future__ import annotations

import json

import pytest

from conftest import DIGITS_FACTORY
from qdeploy.cli import main

TARGETS = "x86-avx2,x86-avx512-vnni,arm64-neon,nvidia-t4"


def _fan(capsys, tmp_path, monkeypatch, digits_data, *extra):
    monkeypatch.setenv("QDEPLOY_CACHE", str(tmp_path / "cache"))
    code = main(["deploy", DIGITS_FACTORY, "--input-shape", "1x1x8x8", "--target", TARGETS, "--backend",
                 "onnxruntime", "--backend", "tensorrt", "--calib", str(digits_data / "calib.npz"), "--val",
                 str(digits_data / "val.npz"), "-o", str(tmp_path / "fan"), *extra])
    out, err = capsys.readouterr()
    return code, out, err


def _check_index(tmp_path, mode):
    index = json.loads((tmp_path / "fan" / "index.json").read_text())
    assert index["mode"] == mode
    assert [t["target"] for t in index["targets"]] == TARGETS.split(",")
    for t in index["targets"]:
        assert t["exit_code"] == 0 and t["bundle"] == f"{t['target']}/", t
        m = json.loads((tmp_path / "fan" / t["target"] / "manifest.json").read_text())
        assert m["profile"]["name"] == t["target"]
        # the driver exported and calibrated once: every target took both from the cache
        assert any("export reused from the cache" in n for n in m["model"]["intake"]), m["model"]["intake"]
        assert m["calibration"]["from_cache"] is True
        assert m["model"]["source"] == DIGITS_FACTORY
    return index


def test_fanout_one_after_another_shares_export_and_calibration(capsys, tmp_path, monkeypatch, digits_data):
    code, _, err = _fan(capsys, tmp_path, monkeypatch, digits_data, "--no-ray")
    assert code == 0, err
    assert err.count("model exported once") == 1 and "calibrated once" in err
    index = _check_index(tmp_path, "sequential")
    t4 = next(t for t in index["targets"] if t["target"] == "nvidia-t4")
    assert {a["verified_on"] for a in t4["artifacts"]} == {"simulated", "runtime"}


@pytest.mark.slow
def test_fanout_on_a_local_ray(capsys, tmp_path, monkeypatch, digits_data):
    pytest.importorskip("ray")
    code, _, err = _fan(capsys, tmp_path, monkeypatch, digits_data)
    assert code == 0, err
    assert "Ray tasks on a local Ray" in err
    _check_index(tmp_path, "ray")


def test_fanout_bad_targets_are_one_clear_error(capsys, tmp_path, monkeypatch, digits_data):
    monkeypatch.setenv("QDEPLOY_CACHE", str(tmp_path / "cache"))
    code = main(["deploy", DIGITS_FACTORY, "--input-shape", "1x1x8x8", "--target", "x86-avx2,x86-avx2",
                 "--calib", str(digits_data / "calib.npz"), "-o", str(tmp_path / "fan")])
    err = capsys.readouterr().err
    assert code == 2 and "given twice" in err and len(err.strip().splitlines()) == 1
    code = main(["deploy", DIGITS_FACTORY, "--input-shape", "1x1x8x8", "--target", "x86-avx2,jetson-nano",
                 "--calib", str(digits_data / "calib.npz"), "-o", str(tmp_path / "fan2"), "--no-ray"])
    err = capsys.readouterr().err
    assert code == 2 and "jetson-nano" in err
