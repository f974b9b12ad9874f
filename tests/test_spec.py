import json

import pytest

from qdeploy.errors import SpecError
from qdeploy.spec import (FORMATS, ActivationSpec, Budget, CalibrationSpec, FallbackSpec, LayerOverride, PerChannel,
                          PerGroup, PerTensor, QuantSpec, WeightSpec, dumps_spec, load_spec, save_spec)

SPECS = [
    QuantSpec(),
    QuantSpec(precision="fp16", fallback=FallbackSpec(ladder=("fp16", "fp32"), policy="strict", max_trials=2)),
    QuantSpec(weights=WeightSpec(bits=4, symmetric=False, granularity=PerGroup(64)),
              activations=ActivationSpec(mode="dynamic", symmetric=True, method="percentile", percentile=99.9)),
    QuantSpec(weights=WeightSpec(granularity=PerTensor()), activations=ActivationSpec(method="moving_average",
                                                                                      momentum=0.8),
              overrides=(LayerOverride(precision="fp32", match="fc*"), LayerOverride(precision="bf16", op_type="MatMul")),
              budget=Budget(metric="top1_accuracy", threshold=0.01, mode="relative", output="logits"),
              calibration=CalibrationSpec(samples=1000, seed=7, batch_size=8, balanced=False)),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("spec", SPECS, ids=range(len(SPECS)))
def test_round_trip_is_lossless(tmp_path, spec, fmt):
    path = save_spec(spec, tmp_path / f"spec{fmt}")
    assert load_spec(path) == spec
    assert QuantSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_defaults_and_overrides():
    spec = QuantSpec(overrides=(LayerOverride(precision="fp32", match="fc*"),
                                LayerOverride(precision="fp16", match="fc2", op_type="Gemm")))
    assert spec.calibration.samples == 300
    assert spec.weights.granularity == PerChannel(0)
    assert spec.precision_for("conv1", "Conv") == "int8"
    assert spec.precision_for("fc1", "Gemm") == "fp32"
    assert spec.precision_for("fc2", "Gemm") == "fp16"   # the later override wins
    assert spec.precision_for("fc2", "MatMul") == "fp32"  # op_type must match too


@pytest.mark.parametrize("data, field, value", [
    ({"precison": "int8"}, "precison", "did you mean 'precision'"),
    ({"precision": "int4"}, "precision", "'int4'"),
    ({"activations": {"method": "entropi"}}, "activations.method", "did you mean 'entropy'"),
    ({"activations": {"methd": "mse"}}, "activations.methd", "did you mean 'method'"),
    ({"weights": {"granularity": "per_chanel"}}, "weights.granularity.type", "did you mean 'per_channel'"),
    ({"weights": {"bits": 9}}, "weights.bits", "9"),
    ({"weights": {"symmetric": "yes"}}, "weights.symmetric", "true or false"),
    ({"fallback": {"policy": "lenient"}}, "fallback.policy", "'strict', 'warn', 'auto'"),
    ({"fallback": {"ladder": ["fp32", "int8"]}}, "fallback.ladder", "climb"),
    ({"overrides": [{"precision": "fp64"}]}, "overrides[0].precision", "fp64"),
    ({"calibration": {"samples": 0}}, "calibration.samples", "0"),
    ({"budget": {"mode": "percent"}}, "budget.mode", "absolute"),
    ({"version": 99}, "version", "99"),
])
def test_bad_values_name_field_value_and_allowed(data, field, value):
    with pytest.raises(SpecError) as err:
        QuantSpec.from_dict(data)
    assert field in str(err.value) and value in str(err.value)


def test_spec_file_errors(tmp_path):
    bad = tmp_path / "s.toml"
    bad.write_text("precision = \n")
    with pytest.raises(SpecError, match="not valid TOML"):
        load_spec(bad)
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "missing.yaml")
    with pytest.raises(SpecError, match="unknown format"):
        load_spec(tmp_path / "spec.ini")


def test_dumped_toml_is_readable_by_users():
    text = dumps_spec(QuantSpec())
    assert 'precision = "int8"' in text and "[activations]" in text and "[budget]" in text


def test_specs_are_frozen():
    with pytest.raises(Exception):
        QuantSpec().precision = "fp16"  # type: ignore[misc]


def test_an_override_that_matches_no_layer_is_named_with_a_hint():
    spec = QuantSpec(overrides=(LayerOverride(precision="fp32", match="*", op_type="conv"),
                                LayerOverride(precision="fp32", match="fc*")))
    layers = {"conv1": "Conv", "fc1": "Gemm"}
    [text] = spec.unmatched_overrides(layers)
    assert text.startswith("overrides[0]") and "did you mean 'Conv'" in text
    assert [t[:12] for t in spec.unmatched_overrides({"conv1": "Conv"})] == ["overrides[0]", "overrides[1]"]
    assert QuantSpec(overrides=(LayerOverride(match="conv*"),)).unmatched_overrides(layers) == []
