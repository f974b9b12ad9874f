"""`qdeploy verify BUNDLE --profiles a,b,c`: one artifact verified under several hardware profiles' numerics, one row
per artifact x profile saying where it ran (runtime here, or simulated exact int32 accumulation), and the spread
of the budget metric between profiles flagged above one point."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from qdeploy import cli
from qdeploy.profile_numerics import (INT16_PAIRS, ExactInt32Runner, detect_host, exact_integer_graph,
                                      flag_spread, inspect_onnx, plan_row, spread_threshold)

from conftest import DIGITS_FACTORY, DIGITS_SPEC

PROFILES = "x86-avx2,x86-avx512-vnni,arm64-neon"
HOST = detect_host()
SATURATING_HOST = HOST.accumulation.kind == INT16_PAIRS


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def profile(name: str):
    from qdeploy.plugins import get_registry
    return get_registry().profile(name)


@pytest.fixture(scope="module")
def avx2_bundle(tmp_path_factory, digits_data) -> Path:
    """The digits example deployed to x86-avx2 (7-bit weights: reduce_range), onnxruntime only."""
    import qdeploy

    out = tmp_path_factory.mktemp("profiles") / "digits-avx2"
    qdeploy.deploy(DIGITS_FACTORY, target="x86-avx2", spec=DIGITS_SPEC, calib=digits_data / "calib.npz",
                   val=digits_data / "val.npz", output=out, input_shape="1x1x8x8", backends=["onnxruntime"])
    return out


SAT_SPEC = """version = 1
precision = "int8"
[weights]
bits = 8
symmetric = true
granularity = { type = "per_channel", axis = 0 }
[activations]
mode = "static"
symmetric = false
method = "minmax"
[budget]
metric = "top1_accuracy"
mode = "absolute"
threshold = 0.5
[fallback]
policy = "warn"
"""


@pytest.fixture(scope="module")
def saturating(tmp_path_factory) -> SimpleNamespace:
    """A classifier built to saturate AVX2's u8 x s8 int16 pair sums, deployed with full 8-bit weights (the
    x86-avx512-vnni profile: no reduce_range): logit 0 is the sum of 8 inputs in [0.2, 1] (all weights 1.0, so
    every int8 weight is 127 and two bright inputs give 2 * 255 * 127 > 32767), logit 1 a constant 4.5."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    import qdeploy

    root = tmp_path_factory.mktemp("saturating")
    k = 8
    w = np.zeros((k, 2), np.float32)
    w[:, 0] = 1.0
    w[:, 1] = np.tile([1.0, -1.0], k // 2)
    b = np.array([0.0, 4.5], np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
             helper.make_node("Add", ["h", "b"], ["y"], name="bias")]
    graph = helper.make_graph(nodes, "saturating", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(root / "sat.onnx"))
    rng = np.random.default_rng(0)
    for name in ("calib", "val"):
        x = rng.uniform(0.2, 1.0, (600, k)).astype(np.float32)
        np.savez(root / f"{name}.npz", x=x, y=(x @ w + b).argmax(1))
    (root / "spec.toml").write_text(SAT_SPEC)
    out = root / "bundle"
    qdeploy.deploy(root / "sat.onnx", target="x86-avx512-vnni", spec=root / "spec.toml", calib=root / "calib.npz",
                   val=root / "val.npz", output=out, backends=["onnxruntime"])
    return SimpleNamespace(bundle=out, val=root / "val.npz", root=root)


def expected_where(name: str, safe: bool) -> str:
    """Where a row of an onnxruntime INT8 artifact runs on this host: its runtime when the host matches the
    profile; else simulated exact int32 accumulation, except x86-avx2 numerics with 8-bit weights on a host that
    does not saturate (not emulated)."""
    prof = profile(name)
    if HOST.matches(prof):
        return "runtime"
    if prof.name == "x86-avx2" and not safe:
        return "not emulated"
    return "simulated"


def test_digits_bundle_one_row_per_artifact_and_profile(capsys, tmp_path, avx2_bundle, digits_data):
    out_json = tmp_path / "profiles.json"
    code, out, err = run(capsys, "verify", avx2_bundle, "--profiles", PROFILES, "--val", digits_data / "val.npz",
                         "--json", out_json)
    assert code == 0, out + err
    table = json.loads(out_json.read_text())
    manifest = json.loads((avx2_bundle / "manifest.json").read_text())
    ids = [a["id"] for a in manifest["artifacts"]]
    assert [(r["artifact"], r["profile"]) for r in table["rows"]] == [(i, p) for i in ids for p in PROFILES.split(",")]
    assert table["host"]["profile"] == HOST.profile and "spread_rule" in table
    ref_acc = manifest["reference"]["metrics"]["top1_accuracy"]
    for row in table["rows"]:
        info = inspect_onnx(avx2_bundle / manifest["artifacts"][ids.index(row["artifact"])]["path"])
        assert info.s8_weight_max is not None and info.s8_weight_max <= 64  # reduce_range: 7-bit weights
        assert row["where"] == expected_where(row["profile"], info.saturation_safe)
        if row["where"] == "simulated":
            assert "exact int32 accumulation" in row["numerics"]
        assert row["passed"] is True and row["basis"] == "measured"
        assert row["budget"]["metric"] == "top1_accuracy"
        assert row["metrics"]["top1_accuracy"] >= ref_acc - 0.01 and 0.9 < row["metrics"]["cosine"] <= 1.0
        # each row is printed: artifact, profile and where on one line
        assert any(row["artifact"] in line and row["profile"] in line and row["where"] in line
                   for line in out.splitlines())
    spread = table["spreads"][ids[0]]
    assert spread["metric"] == "top1_accuracy" and spread["threshold"] == 0.01 and not spread["flagged"]
    assert set(spread["values"]) == set(PROFILES.split(","))
    assert not table["failed"] and f"wrote {out_json}" in out

    # no --val: the stored samples, no labels: verdicts on the recorded outputs, the spread on top1_agreement
    code, out, err = run(capsys, "verify", avx2_bundle, "--profiles", PROFILES)
    assert code == 0, out + err
    assert "(recorded)" in out and "spread on top1_agreement" in out


def test_a_typo_in_profiles_is_exit_2_with_a_suggestion(capsys, avx2_bundle):
    code, out, err = run(capsys, "verify", avx2_bundle, "--profiles", "x86-avx2,x86-avx512-vni")
    assert code == 2 and "did you mean 'x86-avx512-vnni'" in err and not out
    code, _, err = run(capsys, "verify", avx2_bundle, "--json", "t.json")
    assert code == 2 and "--profiles" in err
    code, _, err = run(capsys, "verify", avx2_bundle, "--profiles", " , ")
    assert code == 2 and "at least one profile" in err


def test_saturating_model_spread_is_flagged(capsys, tmp_path, saturating):
    """Full 8-bit weights on an AVX2 host: the fused u8 x s8 kernels saturate, exact int32 accumulation does not;
    the spread between x86-avx2 and the VNNI/ARM profiles is far above one point, and the check fails (exit 1)."""
    out_json = tmp_path / "sat.json"
    code, out, err = run(capsys, "verify", saturating.bundle, "--profiles", PROFILES, "--val", saturating.val,
                         "--json", out_json)
    table = json.loads(out_json.read_text())
    rows = {r["profile"]: r for r in table["rows"]}
    assert rows["x86-avx512-vnni"]["where"] in ("runtime", "simulated")
    assert rows["x86-avx512-vnni"]["metrics"]["top1_accuracy"] > 0.98  # exact accumulation: as good as FP32
    if not SATURATING_HOST:  # a VNNI/ARM host cannot reproduce AVX2's saturation: said, not invented
        assert rows["x86-avx2"]["where"] == "not emulated" and "saturate" in rows["x86-avx2"]["reason"]
        return
    assert rows["x86-avx2"]["where"] == "runtime" and "can saturate" in rows["x86-avx2"]["note"]
    assert rows["x86-avx2"]["metrics"]["top1_accuracy"] < 0.8  # measured 0.565 on an AMD EPYC (AVX2, no VNNI)
    spread = table["spreads"][rows["x86-avx2"]["artifact"]]
    assert spread["flagged"] and spread["spread"] > 0.1 and spread["threshold"] == 0.01
    assert code == 1 and table["failed"] and "FLAG" in out

    # no labels: every row is judged on the outputs the deploy recorded, with the target's (VNNI's) exact
    # accumulation: the emulated rows match them, this host's saturating kernels do not, and the table says so
    code, out, _ = run(capsys, "verify", saturating.bundle, "--profiles", PROFILES)
    assert code == 1 and "x86-avx2: outputs differ from the verified ones" in out and "does not carry over" in out
    assert "x86-avx512-vnni: outputs match the verified ones" in out and "pass --val" in out


def test_exact_emulation_is_the_float_arithmetic_of_the_qdq_graph(saturating):
    """The emulation (basic optimisations) gives what onnxruntime gives with every optimisation off: the Q/DQ
    pairs as float arithmetic, no integer kernel of this CPU."""
    import onnxruntime as ort

    manifest = json.loads((saturating.bundle / "manifest.json").read_text())
    path = saturating.bundle / manifest["artifacts"][0]["path"]
    x = np.load(saturating.val)["x"]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    runner = ExactInt32Runner(path, threads=1)
    assert runner.simulated
    np.testing.assert_allclose(runner.infer({"x": x})["y"], plain, rtol=1e-5, atol=1e-5)


def test_matmulinteger_is_rewritten_to_exact_arithmetic(tmp_path):
    """MatMulInteger runs this CPU's integer kernels at every optimisation level (on AVX2: saturating pair sums);
    the rewrite computes the same integers in float64: bit-exact int32."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from qdeploy.backend import OrtRunner

    rng = np.random.default_rng(3)
    b = rng.integers(-127, 128, (64, 4)).astype(np.int8)
    b[:, 0] = 127  # two bright activations against two 127s: 2 * 255 * 127 > 32767
    nodes = [helper.make_node("MatMulInteger", ["a", "b", "azp", "bzp"], ["y"], name="mmi")]
    graph = helper.make_graph(nodes, "mmi", [helper.make_tensor_value_info("a", TensorProto.UINT8, ["N", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, ["N", 4])],
                              [numpy_helper.from_array(b, "b"), numpy_helper.from_array(np.array(3, np.uint8), "azp"),
                               numpy_helper.from_array(np.zeros(4, np.int8), "bzp")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path / "mmi.onnx"
    onnx.save(model, str(path))
    a = rng.integers(200, 256, (16, 64)).astype(np.uint8)
    want = (a.astype(np.int64) - 3) @ b.astype(np.int64)
    onnx.checker.check_model(exact_integer_graph(model))
    got = ExactInt32Runner(path).infer({"a": a})["y"]
    assert got.dtype == np.int32 and np.array_equal(got, want)
    fused = OrtRunner(path, basic_only=True).infer({"a": a})["y"]
    if SATURATING_HOST:  # what the rewrite is for: this CPU's kernel clamps the pair sums
        assert not np.array_equal(fused, want)
    info = inspect_onnx(path)
    assert info.integer_ops == ("MatMulInteger",) and info.s8_weight_max == 127 and not info.blocking_ops


def test_spread_rule():
    assert spread_threshold("top1_accuracy") == 0.01 and spread_threshold("cosine") == 0.01
    assert spread_threshold("sqnr_db") == 1.0 and spread_threshold("max_abs", [0.1, 0.2]) == 1.0
    assert spread_threshold("my_f1", [0.8, 0.9]) == 0.01 and spread_threshold("my_psnr", [30.0, 31.5]) == 1.0
    ok = flag_spread("a", "top1_accuracy", {"x86-avx2": 0.980, "arm64-neon": 0.990})
    assert not ok.flagged and ok.spread == pytest.approx(0.01)
    bad = flag_spread("a", "top1_accuracy", {"x86-avx2": 0.690, "x86-avx512-vnni": 0.748, "arm64-neon": 0.75})
    assert bad.flagged and bad.spread == pytest.approx(0.06)
    assert flag_spread("a", "sqnr_db", {"p": 30.0, "q": 31.5}).flagged
    assert not flag_spread("a", "sqnr_db", {"p": 30.0, "q": 30.9}).flagged


def _fake_bundle(root: Path) -> SimpleNamespace:
    def runner(key, threads=None):
        raise AssertionError("plan_row only plans")
    return SimpleNamespace(path=root, runner=runner)


def test_planning_per_host_and_backend(tmp_path, saturating, avx2_bundle):
    vnni_host = detect_host({"avx2", "avx512f", "avx512_vnni"}, "x86_64", None)
    avx2_host = detect_host({"avx2", "fma"}, "x86_64", None)
    avx_vnni_host = detect_host({"avx2", "avx_vnni"}, "x86_64", None)  # Alder Lake: x86-avx2 flags, exact sums
    arm_host = detect_host({"asimd", "asimddp"}, "aarch64", None)
    assert avx2_host.profile == "x86-avx2" and vnni_host.profile == "x86-avx512-vnni"
    assert not avx_vnni_host.matches(profile("x86-avx2")) and arm_host.matches(profile("arm64-neon"))

    def plan(bundle_dir: Path, name: str, host):
        from qdeploy.bundle import Bundle

        b = Bundle.load(bundle_dir)
        return plan_row(b, b.artifacts[0], profile(name), host, 1)

    assert plan(saturating.bundle, "x86-avx2", avx2_host).where == "runtime"
    assert plan(saturating.bundle, "x86-avx512-vnni", avx2_host).where == "simulated"
    assert plan(saturating.bundle, "x86-avx512-vnni", vnni_host).where == "runtime"
    reverse = plan(saturating.bundle, "x86-avx2", vnni_host)  # 8-bit weights: AVX2 saturation not reproduced
    assert reverse.where == "not emulated" and "|127|" in reverse.reason and reverse.make is None
    seven = plan(avx2_bundle, "x86-avx2", arm_host)  # 7-bit weights cannot saturate: exact is AVX2's arithmetic
    assert seven.where == "simulated" and "cannot saturate" in seven.numerics
    assert plan(avx2_bundle, "arm64-neon", arm_host).where == "runtime"
    assert plan(saturating.bundle, "x86-avx2", avx_vnni_host).where == "not emulated"

    fake = _fake_bundle(tmp_path)
    torch_art = {"id": "torch-fbgemm-int8", "backend": "torch", "target": "torch:fbgemm", "precision": "int8",
                 "path": "artifacts/torch-fbgemm-int8.ts"}
    row = plan_row(fake, torch_art, profile("arm64-neon"), avx2_host, 1)
    assert row.where == "not emulated" and "torch:fbgemm kernels for arm64-neon" in row.reason
    assert plan_row(fake, torch_art, profile("x86-avx2"), avx2_host, 1).where == "runtime"
    trt_art = {"id": "tensorrt-int8", "backend": "tensorrt", "target": "tensorrt", "precision": "int8",
               "path": "artifacts/tensorrt-int8"}
    row = plan_row(fake, trt_art, profile("x86-avx2"), avx2_host, 1)
    assert row.where == "not applicable" and "no tensorrt entry" in row.reason
    ort_cpu = {"id": "onnxruntime-cpu-int8", "backend": "onnxruntime", "target": "onnxruntime:cpu",
               "precision": "int8", "path": "artifacts/missing.onnx"}
    row = plan_row(fake, ort_cpu, profile("nvidia-t4"), avx2_host, 1)
    assert row.where == "not emulated" and "host_fallback" in row.reason


def test_deploy_verifies_with_the_targets_numerics(capsys, saturating, tmp_path):
    """A deploy to x86-avx512-vnni judges accuracy with VNNI's exact int32 accumulation: on a host whose kernels
    saturate (AVX2) it is emulated and says so (verified_on simulated, the numerics in the record); on a host that
    accumulates exactly it is the runtime. Plain `qdeploy verify` re-checks the same way."""
    from qdeploy.bundle import Bundle
    from qdeploy.profile_numerics import target_emulation

    art = Bundle.load(saturating.bundle).artifacts[0]
    assert art["precision"] == "int8" and art["metrics"]["top1_accuracy"] > 0.98  # VNNI's arithmetic: exact
    if SATURATING_HOST:
        assert art["verified_on"] == "simulated" and "exact int32" in art["verification"]["numerics"]
    else:
        assert art["verified_on"] == "runtime" and "numerics" not in art["verification"]
    code, out, _ = run(capsys, "verify", saturating.bundle, "--val", saturating.val)
    assert code == 0 and ("numerics: exact int32" in out) == SATURATING_HOST, out

    path = saturating.bundle / art["path"]
    avx2_host = detect_host({"avx2", "fma"}, "x86_64", None)
    vnni_host = detect_host({"avx2", "avx512f", "avx512_vnni"}, "x86_64", None)
    assert "emulated" in target_emulation(profile("x86-avx512-vnni"), "onnxruntime", path, avx2_host)
    assert target_emulation(profile("arm64-neon"), "onnxruntime", path, avx2_host)
    assert target_emulation(profile("x86-avx512-vnni"), "onnxruntime", path, vnni_host) == ""
    assert target_emulation(profile("x86-avx2"), "onnxruntime", path, vnni_host) == ""  # nothing exact to emulate
    assert target_emulation(profile("x86-avx512-vnni"), "tflite", path, avx2_host) == ""  # not its kernels
    fp32 = tmp_path / "fp32.onnx"
    fp32.write_bytes((saturating.root / "sat.onnx").read_bytes())
    assert target_emulation(profile("x86-avx512-vnni"), "onnxruntime", fp32, avx2_host) == ""  # no INT8 at all
    if SATURATING_HOST:  # served here, the warm-up meets this host's kernels, not the verified numerics: said
        from qdeploy.serve.core import FallbackModel

        served = FallbackModel(saturating.bundle).start()
        try:
            slot = served.slots[0]
            assert slot.state == "failed" and "emulated" in slot.detail and "--target detect" in slot.detail
        finally:
            served.close()
    # check says so before anything is built
    from qdeploy.pipeline import check

    entry = check(saturating.root / "sat.onnx", target="x86-avx512-vnni", spec=saturating.root / "spec.toml",
                  backends=["onnxruntime"])["entries"][0]
    assert bool(entry["int8_accuracy_numerics"]) == SATURATING_HOST
