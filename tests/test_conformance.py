"""One conformance suite, parametrized over every registered backend.

Each backend deploys the digits example on a profile entry it can serve on this host; a backend whose
runtime is missing here is skipped with its own reason, never silently passed.
"""
from __future__ import annotations

import numpy as np
import pytest

import qdeploy
from qdeploy.bundle import Bundle
from qdeploy.plugins import get_registry
from qdeploy.profiles import detect_profile_name
from qdeploy.verify import run_all

from conftest import DIGITS_FACTORY, DIGITS_SPEC

BACKENDS = sorted(get_registry().backends)


def _target_for(name: str):
    """(profile name, entry label) of the first profile entry where backend ``name`` is available here."""
    reg = get_registry()
    host = detect_profile_name()
    reasons = []
    for prof in sorted(reg.profiles.values(), key=lambda p: (p.name != host, p.name)):
        for entry in prof.backends:
            if entry.backend != name:
                continue
            caps = reg.backends[name].capabilities(entry)
            if caps.available:
                return prof.name, entry.label
            reasons.append(f"{prof.name}/{entry.label}: {caps.reason}")
    pytest.skip(f"backend {name} is not available on this host: {'; '.join(reasons) or 'no profile uses it'}")


@pytest.fixture(scope="module", params=BACKENDS)
def deployed(request, tmp_path_factory, digits_data):
    name = request.param
    profile, label = _target_for(name)
    out = tmp_path_factory.mktemp(f"conf-{name}") / "bundle"
    bundle = qdeploy.deploy(DIGITS_FACTORY, target=profile, spec=DIGITS_SPEC, calib=digits_data / "calib.npz",
                            val=digits_data / "val.npz", output=out, input_shape="1x1x8x8", backends=[label])
    return name, bundle


def test_artifact_is_built_and_listed(deployed):
    name, bundle = deployed
    arts = [a for a in bundle.artifacts if a["backend"] == name]
    assert arts, f"{name} built no artifact: {bundle.manifest['events']}"
    art = arts[0]
    assert (bundle.path / art["path"]).exists()
    assert art["verified_on"] in ("runtime", "gpu", "simulated")
    for key in ("max_abs", "mean_abs", "cosine", "sqnr_db", "top1_agreement", "top1_accuracy"):
        assert key in art["metrics"]
    assert set(art["layer_precisions"]) == set(bundle.manifest["model"]["layers"])


def test_int8_keeps_accuracy_and_shrinks(deployed):
    name, bundle = deployed
    art = next(a for a in bundle.artifacts if a["backend"] == name)
    ref_acc = bundle.manifest["reference"]["metrics"]["top1_accuracy"]
    assert art["metrics"]["top1_accuracy"] >= ref_acc - 0.01
    assert art["budget"]["passed"]
    if art["precision"] == "int8" and art["verified_on"] != "simulated":
        # a simulated artifact is an engine recipe (TensorRT's Q/DQ ONNX keeps FP32 weights until the target
        # builds the INT8 engine), so its file size says nothing about the deployed size
        assert art["size_vs_fp32"] <= 0.30, art["size_vs_fp32"]


def test_runner_speaks_named_numpy(deployed):
    name, bundle = deployed
    loaded = Bundle.load(bundle.path)
    art = next(a for a in loaded.artifacts if a["backend"] == name)
    samples = loaded.samples()
    x = {k.split(":", 1)[1]: v for k, v in samples.items() if k.startswith("input:")}
    runner = loaded.runner(art["id"])
    out = run_all(runner, x)
    ref = {k.split(":", 1)[1]: v for k, v in samples.items() if k.startswith("reference:")}
    assert set(out) == set(ref)
    for k in ref:
        assert out[k].shape == ref[k].shape and out[k].dtype == np.float32
        assert np.mean(out[k].argmax(-1) == ref[k].argmax(-1)) >= 0.75
        np.testing.assert_allclose(out[k], samples[f"{art['id']}:{k}"], rtol=1e-4, atol=1e-4)  # deterministic
    runner.close()


def test_one_sample_and_odd_batches(deployed):
    name, bundle = deployed
    art = next(a for a in bundle.artifacts if a["backend"] == name)
    runner = bundle.runner(art["id"])
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    five = runner.infer({runner.input_names[0]: x})
    one = runner.infer({runner.input_names[0]: x[:1]})
    key = runner.output_names[0]
    assert five[key].shape[0] == 5 and one[key].shape[0] == 1
    np.testing.assert_allclose(five[key][:1], one[key], rtol=1e-3, atol=1e-3)
    runner.close()


@pytest.fixture(scope="module")
def reference_bundle(tmp_path_factory, digits_data):
    """The same deploy through the built-in `reference` backend: the spec's numerics as fake quantization."""
    return qdeploy.deploy(DIGITS_FACTORY, target="reference", spec=DIGITS_SPEC, calib=digits_data / "calib.npz",
                          val=digits_data / "val.npz", output=tmp_path_factory.mktemp("conf-ref") / "bundle",
                          input_shape="1x1x8x8")


def test_agrees_with_the_reference_numerics(deployed, reference_bundle, digits_data):
    """Every backend's INT8 artifact against the spec's exact numerics (the reference backend), on the
    validation set: each runtime's kernels, rounding and fusions may differ a little, never by much."""
    name, bundle = deployed
    art = next(a for a in bundle.artifacts if a["backend"] == name)
    x = {"input": dict(np.load(digits_data / "val.npz"))["input"]}
    ref_art = reference_bundle.artifacts[0]
    assert ref_art["backend"] == "reference" and ref_art["verified_on"] == "simulated"
    want = run_all(reference_bundle.runner(ref_art["id"]), x)["output"]
    got = run_all(bundle.runner(art["id"]), x)["output"]
    agree = float(np.mean(want.argmax(1) == got.argmax(1)))
    cos = float(np.mean(np.sum(want * got, 1) / (np.linalg.norm(want, axis=1) * np.linalg.norm(got, axis=1))))
    assert agree >= 0.97 and cos >= 0.99, (name, agree, cos)
