"""Accuracy fallback (promote the most sensitive layers), backend resolution and reason codes."""
from __future__ import annotations

import dataclasses

import pytest

import qdeploy
from qdeploy.errors import BudgetNotMet
from qdeploy.fallback import REASON_CODES, resolve
from qdeploy.plugins import get_registry
from qdeploy.profiles import BackendTarget
from qdeploy.spec import ActivationSpec, FallbackSpec, LayerOverride, PerGroup, QuantSpec, WeightSpec

from conftest import ROOT

SENSITIVE = f"{ROOT / 'examples' / 'digits.py'}:build_sensitive_model"
DIGITS = f"{ROOT / 'examples' / 'digits.py'}:build_model"
# 0.99 on the 597 validation images allows 5 flips: enough slack that the ordinary INT8 noise of whatever model
# this machine trained passes, while the outlier channel (about 0.93 agreement) cannot.
THRESHOLD = 0.99
# the promotion tests switch the accuracy transforms off: with them (the default, "auto") CLE and bias correction
# recover the outlier channel before any layer is promoted (tested below)
TIGHT = {"weights": {"granularity": "per_tensor"}, "budget": {"metric": "top1_agreement", "threshold": THRESHOLD},
         "transforms": {"cross_layer_equalization": False, "bias_correction": False, "adaround": False}}


@pytest.fixture(scope="module")
def sensitive_bundle(tmp_path_factory, digits_data):
    out = tmp_path_factory.mktemp("sens") / "bundle"
    return qdeploy.deploy(SENSITIVE, target="x86-avx512-vnni", spec=TIGHT, calib=digits_data / "calib.npz",
                          val=digits_data / "val.npz", output=out, input_shape="1x1x8x8", backends=["onnxruntime"],
                          per_layer=True)


def test_fallback_promotes_named_layers_until_the_budget_holds(sensitive_bundle):
    m = sensitive_bundle.manifest
    promotions = [e for e in m["events"] if e["code"] == "ACCURACY_BELOW_BUDGET" and e["action"] == "promote"]
    assert promotions, m["events"]
    for e in promotions:
        assert e["metric"] == "top1_agreement" and e["budget"] == pytest.approx(THRESHOLD)
        assert e["value"] < THRESHOLD and set(e["layers"]) <= set(m["model"]["layers"])
        assert e["from"] == "int8" and set(e["to"].values()) == {"fp32"}  # x86 onnxruntime: the ladder skips fp16
    art = m["artifacts"][0]
    assert art["budget"]["passed"] and art["metrics"]["top1_agreement"] >= THRESHOLD
    kept = art["front"]["points"][art["front"]["chosen"]]
    assert {n for n, p in art["layer_precisions"].items() if p == "fp32"} == set(kept["promoted"])
    sens = art["sensitivity"]
    # the search promotes sets (predicted gain per cost) and bisects back down: the artifact kept is the
    # smallest passing set, which holds the most sensitive layer
    assert art["layer_precisions"][min(sens, key=sens.get)] == "fp32"
    assert "int8" in art["layer_precisions"].values()  # only what had to be promoted was
    assert art["trials"] == len(promotions) + 1 <= 4  # every verification counted (one event each); few of them
    assert {e["phase"] for e in promotions} <= {"grow", "bisect"}
    # the sensitivity ranking is in the manifest and the report; the outlier-scaled layers rank first
    sens = art["sensitivity"]
    worst = sorted(sens, key=sens.get)[:2]
    assert set(worst) == {"conv1", "conv2"}
    assert "Per-layer sensitivity" in (sensitive_bundle.path / "report.md").read_text()


def test_strict_policy_fails_instead_of_falling_back(tmp_path, digits_data):
    with pytest.raises(BudgetNotMet, match="policy is strict") as err:
        qdeploy.deploy(SENSITIVE, target="x86-avx512-vnni", spec=TIGHT, calib=digits_data / "calib.npz",
                       val=digits_data / "val.npz", output=tmp_path / "b", input_shape="1x1x8x8",
                       backends=["onnxruntime"], policy="strict")
    assert err.value.exit_code == 1
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("bound", [{"max_trials": 0}, {"time_budget_s": 0.001}], ids=["trials", "time"])
def test_trial_and_time_budgets_bound_the_loop_and_keep_the_best(tmp_path, digits_data, bound):
    """No promotion allowed (0 trials, or a 1 ms time budget): the plain INT8 build (agreement about 0.93, far below the
    budget whatever the trained weights) is kept, marked as failing, with a stop event saying why."""
    spec = dict(TIGHT, fallback=bound)
    b = qdeploy.deploy(SENSITIVE, target="x86-avx512-vnni", spec=spec, calib=digits_data / "calib.npz",
                       val=digits_data / "val.npz", output=tmp_path / "b", input_shape="1x1x8x8",
                       backends=["onnxruntime"])
    art = b.artifacts[0]
    assert art["trials"] == 1 and set(art["layer_precisions"].values()) == {"int8"}
    stop = [e for e in b.manifest["events"] if e.get("action") == "stop"]
    assert stop and "trial/time budget spent" in stop[0]["message"]
    assert stop[0]["metric"] == "top1_agreement" and stop[0]["budget"] == pytest.approx(THRESHOLD)
    assert not art["budget"]["passed"]  # kept, and marked as failing: never silently passed
    keep = [e for e in b.manifest["events"] if e.get("action") == "keep"]
    assert keep and keep[0]["code"] == "ACCURACY_BELOW_BUDGET" and keep[0]["value"] < keep[0]["budget"]


def test_a_layer_the_backend_builds_higher_than_asked_is_an_event_or_refused(tmp_path, digits_data):
    """Dynamic INT8 in onnxruntime quantizes MatMul/Gemm only: each convolution kept in FP32 is a
    PRECISION_UNSUPPORTED event with the layer (manifest and `check` agree); strict refuses it."""
    spec = {"activations": {"mode": "dynamic"}}
    kw = dict(target="x86-avx512-vnni", spec=spec, calib=digits_data / "calib.npz", val=digits_data / "val.npz",
              input_shape="1x1x8x8", backends=["onnxruntime"])
    b = qdeploy.deploy(DIGITS, output=tmp_path / "b", **kw)
    moved = {e["layer"]: e for e in b.manifest["events"] if e["code"] == "PRECISION_UNSUPPORTED"}
    assert set(moved) == {"conv1", "conv2", "conv3"}
    assert all((e["requested"], e["resolved"]) == ("int8", "fp32") for e in moved.values())
    assert b.artifacts[0]["layer_precisions"] == {"conv1": "fp32", "conv2": "fp32", "conv3": "fp32",
                                                  "fc1": "int8", "fc2": "int8"}
    report = qdeploy.check(DIGITS, target="x86-avx512-vnni", spec=spec, input_shape="1x1x8x8",
                           backends=["onnxruntime"])
    entry = report["entries"][0]
    assert entry["layers"] == b.artifacts[0]["layer_precisions"]
    assert {e["layer"] for e in entry["events"] if e["code"] == "PRECISION_UNSUPPORTED"} == set(moved)
    from qdeploy.errors import StrictPolicyError
    with pytest.raises(StrictPolicyError, match="refused: policy is strict"):
        qdeploy.deploy(DIGITS, output=tmp_path / "strict", policy="strict", **kw)
    assert not (tmp_path / "strict").exists()


def test_a_rung_the_backend_cannot_build_is_skipped_not_a_dead_end(tmp_path, digits_data):
    """A profile where onnxruntime runs FP16 fast: the ladder says int8 -> fp16, but one ONNX Runtime model
    cannot mix INT8 and FP16 layers, so promoted layers are built in FP32 (an event each) and the loop goes
    on until the budget holds, instead of stopping at the first FP16 promotion."""
    from qdeploy.profiles import profile_from_dict

    prof = profile_from_dict({"name": "cpu-fp16", "description": "test", "device": "cpu",
                              "backends": [{"backend": "onnxruntime", "fast": ["int8", "fp16", "fp32"]}]})
    b = qdeploy.deploy(SENSITIVE, target=prof, spec=TIGHT, calib=digits_data / "calib.npz",
                       val=digits_data / "val.npz", output=tmp_path / "b", input_shape="1x1x8x8")
    art = b.artifacts[0]
    assert art["budget"]["passed"]
    promoted = [e for e in b.manifest["events"] if e.get("action") == "promote"]
    assert promoted and all(set(e["to"].values()) == {"fp16"} for e in promoted)
    moved = [e for e in b.manifest["events"] if e["code"] == "PRECISION_UNSUPPORTED"]
    assert {e["layer"] for e in moved} <= {n for e in promoted for n in e["layers"]}
    assert {n for n, p in art["layer_precisions"].items() if p != "int8"} <= {e["layer"] for e in moved}
    assert all(art["layer_precisions"][e["layer"]] == "fp32" for e in moved)


def test_promotion_order_is_gain_per_cost_and_prefixes_carry_the_noise():
    from qdeploy.fallback import prefix_for, promotion_order

    scores = {"big": (0.5, 100_000.0), "small": (0.3, 2_000.0), "tiny": (0.01, 1_000.0), "free": (0.19, 0.0)}
    order = promotion_order(scores)
    assert order == ["free", "small", "tiny", "big"]  # noise removed per byte added back (cost at least 1 KiB)
    assert [prefix_for(order, scores, f) for f in (0.1, 0.49, 0.5, 0.75)] == [1, 2, 3, 4]



# --- resolution: spec x profile entry x capabilities -----------------------------------------------------------
def _ort_target(**kw):
    base = BackendTarget("onnxruntime", ("int8", "fp32"), ("fp16",), options=(("provider", "cpu"),))
    return dataclasses.replace(base, **kw)


def test_resolution_of_a_plain_spec_is_silent():
    res = resolve(_ort_target(), get_registry().backends, ("onnx",), QuantSpec())
    assert res.runnable and not res.events and res.ladder == ("int8", "fp32")


def test_symmetric_only_devices_translate_with_an_event_or_refuse_under_strict():
    spec = QuantSpec(weights=WeightSpec(symmetric=False), activations=ActivationSpec(symmetric=False))
    t = _ort_target(weight_symmetric_only=True, activation_symmetric_only=True)
    res = resolve(t, get_registry().backends, ("onnx",), spec)
    assert res.runnable and res.spec.weights.symmetric and res.spec.activations.symmetric
    assert [c for c, _, _ in res.events] == ["GRANULARITY_UNSUPPORTED", "GRANULARITY_UNSUPPORTED"]
    strict = spec.replace(fallback=FallbackSpec(policy="strict"))
    res = resolve(t, get_registry().backends, ("onnx",), strict)
    assert not res.runnable and "refused" in res.events[-1][1]


def test_unsupported_granularity_and_precision_resolve_upward():
    res = resolve(_ort_target(), get_registry().backends, ("onnx",),
                  QuantSpec(weights=WeightSpec(granularity=PerGroup(32))))
    assert res.spec.weights.granularity.type == "per_channel" and res.events[0][0] == "GRANULARITY_UNSUPPORTED"
    gpu_only_fp = BackendTarget("onnxruntime", ("fp16", "fp32"), options=(("provider", "cpu"),))
    res = resolve(gpu_only_fp, get_registry().backends, ("onnx",), QuantSpec())
    assert res.spec.precision == "fp16" and res.events[0][0] == "PRECISION_UNSUPPORTED"


def test_missing_plugin_and_unavailable_runtime_are_reason_coded():
    res = resolve(BackendTarget("no-such-backend", ("int8",)), get_registry().backends, ("onnx",), QuantSpec())
    assert res.events[0][0] == "BACKEND_UNAVAILABLE" and "no plugin registered" in res.events[0][1]
    cuda = _ort_target(options=(("provider", "cuda"),))
    res = resolve(cuda, get_registry().backends, ("onnx",), QuantSpec())
    assert not res.runnable and "CUDAExecutionProvider" in res.events[0][1]


def test_reason_codes_are_the_documented_set():
    design = (ROOT / "README.md").read_text()
    for code in REASON_CODES:
        assert code in design, f"{code} is not documented in README.md"


# --- failures during the loop, and strict about them ------------------------------------------------------------
def _ort_failing_when(predicate):
    """The real onnxruntime backend under another name, made to fail a build when ``predicate(layers)``."""
    from qdeploy.errors import BackendError
    from qdeploy_onnxruntime import OnnxRuntimeBackend

    class Flaky(OnnxRuntimeBackend):
        name = "flaky"

        def build(self, plan, workdir):
            if predicate(plan.layer_precisions):
                raise BackendError("this build cannot keep a layer in fp32", "BUILD_FAILED")
            return super().build(plan, workdir)

    return Flaky()


def _profile_with(backend_name):
    from qdeploy.profiles import Profile
    return Profile("test-cpu", "test", "cpu", (BackendTarget(backend_name, ("int8", "fp32")),
                                                BackendTarget("onnxruntime", ("int8", "fp32"))))


def _registry_with(backend):
    from qdeploy import plugins
    from qdeploy.plugins import Registry, hookimpl, make_plugin_manager

    class P:
        @hookimpl
        def qdeploy_register_backends(self, register):
            register(backend)

    pm = make_plugin_manager()
    pm.register(P())
    plugins.reset_registry(Registry.from_plugin_manager(pm))


def test_a_promotion_that_fails_to_build_keeps_the_verified_artifact(fresh_registry, tmp_path, digits_data):
    _registry_with(_ort_failing_when(lambda lp: "fp32" in lp.values()))
    b = qdeploy.deploy(SENSITIVE, target=_profile_with("flaky"), spec=TIGHT, calib=digits_data / "calib.npz",
                       val=digits_data / "val.npz", output=tmp_path / "b", input_shape="1x1x8x8",
                       backends=["flaky"])
    art = b.artifacts[0]
    assert art["backend"] == "flaky" and art["trials"] == 1 and not art["budget"]["passed"]
    failed = [e for e in b.manifest["events"] if e["code"] == "BUILD_FAILED"]
    assert failed and "keeping the best artifact built so far" in failed[0]["message"]


def test_strict_fails_instead_of_moving_to_the_next_backend(fresh_registry, tmp_path, digits_data):
    from qdeploy.errors import StrictPolicyError

    _registry_with(_ort_failing_when(lambda lp: True))
    with pytest.raises(StrictPolicyError, match="policy is strict") as err:
        qdeploy.deploy(SENSITIVE, target=_profile_with("flaky"), calib=digits_data / "calib.npz",
                       val=digits_data / "val.npz", output=tmp_path / "b", input_shape="1x1x8x8", policy="strict")
    assert err.value.exit_code == 1 and not (tmp_path / "b").exists()
    b = qdeploy.deploy(SENSITIVE, target=_profile_with("flaky"), calib=digits_data / "calib.npz",
                       val=digits_data / "val.npz", output=tmp_path / "b", input_shape="1x1x8x8")
    assert [a["backend"] for a in b.artifacts] == ["onnxruntime"]  # auto: the chain moves on, with the event
    assert any(e["code"] == "BUILD_FAILED" and e["target"] == "flaky" for e in b.manifest["events"])


def test_strict_refuses_a_layer_override_the_device_cannot_run():
    spec = QuantSpec(overrides=(LayerOverride(precision="bf16", match="fc1"),), fallback=FallbackSpec(policy="strict"))
    res = resolve(_ort_target(), get_registry().backends, ("onnx",), spec)
    from qdeploy.fallback import initial_layer_precisions
    from qdeploy.model import LayerInfo
    initial_layer_precisions(res, {"fc1": LayerInfo("fc1", "Gemm", "n", "w", "x", "y")})
    assert not res.runnable and "refused" in res.events[-1][1]


def test_an_unknown_reason_code_from_a_plugin_is_recorded_not_fatal():
    from qdeploy.fallback import Events
    ev = Events().emit("WEIRD", "x", "boom")
    assert ev["code"] == "BUILD_FAILED" and "WEIRD" in ev["message"]


def test_warn_policy_issues_python_warnings_auto_does_not(tmp_path, digits_data, recwarn):
    from qdeploy.fallback import FallbackWarning

    kw = dict(target="x86-avx512-vnni", spec=TIGHT, calib=digits_data / "calib.npz", val=digits_data / "val.npz",
              input_shape="1x1x8x8", backends=["onnxruntime"])
    qdeploy.deploy(SENSITIVE, output=tmp_path / "auto", policy="auto", **kw)
    assert not [w for w in recwarn if issubclass(w.category, FallbackWarning)]
    with pytest.warns(FallbackWarning, match="ACCURACY_BELOW_BUDGET"):
        qdeploy.deploy(SENSITIVE, output=tmp_path / "warn", policy="warn", **kw)


@pytest.mark.slow
def test_artifacts_that_met_the_budget_come_first(tmp_path, digits_data):
    """The chain's first entry cannot climb (its profile runs INT8 only) and keeps a failing artifact; the
    second meets the budget. The manifest lists the passing one first, so a server loads it first."""
    from qdeploy.profiles import profile_from_dict

    prof = profile_from_dict({"name": "two-entries", "description": "test", "device": "cpu", "backends": [
        {"backend": "onnxruntime", "fast": ["int8"]},
        {"backend": "torch", "fast": ["int8", "fp32"], "options": {"engine": "x86"}}]})
    b = qdeploy.deploy(SENSITIVE, target=prof, spec=TIGHT, calib=digits_data / "calib.npz",
                       val=digits_data / "val.npz", output=tmp_path / "b", input_shape="1x1x8x8")
    arts = b.artifacts
    assert [a["backend"] for a in arts] == ["torch", "onnxruntime"]
    assert arts[0]["budget"]["passed"] and not arts[1]["budget"]["passed"]
    stop = [e for e in b.manifest["events"] if e["target"] == "onnxruntime" and e.get("action") == "stop"]
    assert stop and "top of the ladder" in stop[0]["message"]


def test_techniques_before_precision_recover_the_outlier_model_with_no_layer_above_int8(tmp_path, digits_data):
    """The default transforms ("auto"): the plain per-tensor INT8 build misses the budget; cross-layer
    equalization and bias correction on the reference recover it, an event says so with the metric before and
    after, and no layer is promoted."""
    spec = {k: v for k, v in TIGHT.items() if k != "transforms"}
    b = qdeploy.deploy(SENSITIVE, target="x86-avx512-vnni", spec=spec, calib=digits_data / "calib.npz",
                       val=digits_data / "val.npz", output=tmp_path / "b", input_shape="1x1x8x8",
                       backends=["onnxruntime"])
    art = b.artifacts[0]
    assert art["budget"]["passed"] and set(art["layer_precisions"].values()) == {"int8"}
    assert art["trials"] <= 3  # the plain build, the transformed one (and nothing promoted)
    [t] = [e for e in b.manifest["events"] if e.get("action") == "transform"]
    assert t["kept"] and t["value"] > t["before"] and "cross_layer_equalization" in t["transforms"]
    assert art["transforms"]["applied"] and art["transforms"]["kept"]
    assert not [e for e in b.manifest["events"] if e.get("action") == "promote"]
    # every artifact is still verified against the original reference
    assert b.manifest["reference"]["sha256"] == b.manifest["model"]["sha256"]


def test_adaround_is_tried_on_per_channel_weights_before_any_layer_is_promoted(tmp_path, digits_data):
    """Per-channel weights: "auto" leaves AdaRound off before the first build (minutes of CPU on a large model),
    but once the plain build and bias correction have missed, it is the last technique tried before precision is
    spent -- measured, an event with the metric before and after, kept only if it verifies better."""
    pytest.importorskip("torch")
    spec = {"weights": {"bits": 4}, "budget": {"metric": "top1_agreement", "threshold": 0.9995}}
    b = qdeploy.deploy(SENSITIVE, target="reference", spec=spec, calib=digits_data / "calib.npz",
                       val=digits_data / "val.npz", output=tmp_path / "b", input_shape="1x1x8x8")
    art = b.artifacts[0]
    steps = art["transforms"]["steps"]
    assert [s["technique"] for s in steps][-1] == "adaround", steps
    [ada] = [e for e in b.manifest["events"] if e.get("action") == "transform" and e["technique"] == "adaround"]
    assert ada["before"] == steps[-1]["before"] and ada["value"] == steps[-1]["value"]
    promoted = [e for e in b.manifest["events"] if e.get("action") == "promote"]
    assert all(e["trial"] > ada["trial"] for e in promoted)  # precision only after the techniques
    if promoted:  # the first promotion starts from the best so far, and says so (not the technique just undone)
        assert promoted[0]["value"] == (ada["value"] if ada["kept"] else ada["before"]), promoted[0]
