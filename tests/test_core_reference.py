"""The core on its own: every backend plugin disabled, the built-in ``reference`` backend (the spec's numerics as
fake quantization) carries the fallback run, the accuracy transforms, the policies and ``check``. These tests
need no plugin installed."""
from __future__ import annotations

import importlib.util

import pytest

import qdeploy
from qdeploy.errors import BudgetNotMet
from qdeploy.plugins import get_registry, reset_registry

from conftest import ROOT

SENSITIVE = f"{ROOT / 'examples' / 'digits.py'}:build_sensitive_model"
THRESHOLD = 0.99
TIGHT = {"weights": {"granularity": "per_tensor"}, "budget": {"metric": "top1_agreement", "threshold": THRESHOLD},
         "transforms": {"cross_layer_equalization": False, "bias_correction": False, "adaround": False}}


@pytest.fixture(autouse=True)
def no_plugins(monkeypatch):
    monkeypatch.setenv("QDEPLOY_DISABLED_PLUGINS", "onnxruntime,torch,tflite,tensorrt")
    reset_registry()
    yield
    monkeypatch.delenv("QDEPLOY_DISABLED_PLUGINS")
    reset_registry()


def _deploy(tmp_path, digits_data, spec, name="b", **kw):
    return qdeploy.deploy(SENSITIVE, target="reference", spec=spec, calib=digits_data / "calib.npz",
                          val=digits_data / "val.npz", output=tmp_path / name, input_shape="1x1x8x8", **kw)


def test_only_the_reference_backend_is_there():
    assert set(get_registry().backends) == {"reference"}


def test_the_search_promotes_until_the_budget_holds(tmp_path, digits_data):
    b = _deploy(tmp_path, digits_data, TIGHT)
    art = b.artifacts[0]
    promotions = [e for e in b.manifest["events"] if e.get("action") == "promote"]
    assert art["backend"] == "reference" and art["verified_on"] == "simulated"
    assert promotions and art["budget"]["passed"] and art["metrics"]["top1_agreement"] >= THRESHOLD
    assert "fp32" in art["layer_precisions"].values() and "int8" in art["layer_precisions"].values()
    assert art["trials"] == len(promotions) + 1 <= 4


def test_the_transforms_recover_the_outlier_channel_without_promoting(tmp_path, digits_data):
    """Transforms on "auto" (the default): after the plain build misses, CLE + bias correction are tried on the
    reference and kept because they help; no layer goes above INT8."""
    spec = {k: v for k, v in TIGHT.items() if k != "transforms"}
    b = _deploy(tmp_path, digits_data, spec)
    art = b.artifacts[0]
    assert art["budget"]["passed"] and set(art["layer_precisions"].values()) == {"int8"}
    kept = [e for e in b.manifest["events"] if e.get("action") == "transform"]
    assert kept and kept[0]["value"] > kept[0]["before"]


def test_strict_refuses_and_trial_budgets_stop(tmp_path, digits_data):
    with pytest.raises(BudgetNotMet, match="policy is strict"):
        _deploy(tmp_path, digits_data, TIGHT, name="strict", policy="strict")
    assert not (tmp_path / "strict").exists()
    b = _deploy(tmp_path, digits_data, dict(TIGHT, fallback={"max_trials": 0}), name="one")
    art = b.artifacts[0]
    assert art["trials"] == 1 and not art["budget"]["passed"]
    assert any(e.get("action") == "stop" for e in b.manifest["events"])


def test_check_needs_no_plugin():
    report = qdeploy.check(SENSITIVE, target="reference", input_shape="1x1x8x8")
    (entry,) = report["entries"]
    assert entry["target"] == "reference" and entry["verified_on"] == "simulated"
    assert set(entry["layers"].values()) == {"int8"}
    # simulating is what the oracle is for: not reported as a missing runtime
    assert not [e for e in entry["events"] if e["code"] == "BACKEND_UNAVAILABLE"], entry["events"]


def test_check_says_which_transforms_a_deploy_would_apply():
    """Per-tensor weights (what NNAPI-class devices need) make CLE worth trying; `check` says so per entry, with
    the mode and the reason, without building anything."""
    per_tensor = {"weights": {"granularity": "per_tensor"}}
    (entry,) = qdeploy.check(SENSITIVE, target="reference", spec=per_tensor, input_shape="1x1x8x8")["entries"]
    t = entry["transforms"]
    assert t["mode"] == "auto" and "after a plain build misses" in t["reason"]
    assert t["transforms"]["cross_layer_equalization"] == {"apply": True, "why": "auto: per-tensor weights"}
    assert t["transforms"]["bias_correction"]["apply"] == "empirical"
    assert t["transforms"]["smoothquant"]["apply"] is False
    torch_here = importlib.util.find_spec("torch") is not None  # AdaRound runs in PyTorch
    assert t["transforms"]["adaround"]["apply"] is torch_here, t["transforms"]["adaround"]
    (entry,) = qdeploy.check(SENSITIVE, target="reference", input_shape="1x1x8x8")["entries"]
    assert entry["transforms"]["transforms"]["cross_layer_equalization"]["apply"] is False  # per channel, no dw
    ada = entry["transforms"]["transforms"]["adaround"]  # per channel: the last technique after a miss
    assert ada["apply"] is torch_here and (not torch_here or "after a missed budget" in ada["why"]), ada
    explicit = {"transforms": {"cross_layer_equalization": True, "bias_correction": False}}
    (entry,) = qdeploy.check(SENSITIVE, target="reference", spec=explicit, input_shape="1x1x8x8")["entries"]
    assert entry["transforms"]["mode"] == "on" and "before the first build" in entry["transforms"]["reason"]
    off = {"transforms": {"cross_layer_equalization": False, "bias_correction": False, "adaround": False}}
    (entry,) = qdeploy.check(SENSITIVE, target="reference", spec=off, input_shape="1x1x8x8")["entries"]
    assert entry["transforms"]["mode"] == "off"
