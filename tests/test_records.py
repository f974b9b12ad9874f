"""The manifest as typed records: written only by the bundle, parsed on load, older schema still read."""
from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest

import qdeploy
from qdeploy.bundle import Bundle
from qdeploy.errors import BundleError, IntegrityError
from qdeploy.records import SCHEMA_VERSION, ArtifactRecord, LayerMove, Manifest

from conftest import DIGITS_FACTORY

ROOT = Path(__file__).resolve().parent.parent


def _copy(src: Path, dst: Path) -> tuple[Path, dict]:
    shutil.copytree(src, dst)
    return dst, json.loads((dst / "manifest.json").read_text())


def test_a_bundle_round_trips_through_its_records(digits_bundle):
    raw = json.loads((digits_bundle / "manifest.json").read_text())
    assert raw["schema_version"] == SCHEMA_VERSION == 2
    record = Manifest.from_json(raw)
    assert isinstance(record.artifacts[0], ArtifactRecord)
    assert record.to_json() == raw  # lossless: nothing dropped, nothing invented
    assert all("moved_layers" in a for a in raw["artifacts"])


def test_layers_a_backend_moved_are_typed_records_that_match_the_events(tmp_path, digits_data):
    """Dynamic INT8 on onnxruntime quantizes MatMul/Gemm only: the digits CNN's convolutions stay FP32. Each is
    a ``moved_layers`` entry of the artifact (asked, built, the backend's reason) and a PRECISION_UNSUPPORTED
    event with the same layer."""
    b = qdeploy.deploy(DIGITS_FACTORY, target="x86-avx512-vnni", spec={"activations": {"mode": "dynamic"}},
                       calib=digits_data / "calib.npz", val=digits_data / "val.npz", output=tmp_path / "dyn",
                       input_shape="1x1x8x8", backends=["onnxruntime"])
    art = b.record.artifacts[0]
    moved = {m.layer: m for m in art.moved_layers}
    assert moved and all(isinstance(m, LayerMove) for m in moved.values())
    for m in moved.values():
        assert (m.requested, m.built) == ("int8", "fp32") and "dynamic" in m.reason
        assert art.layer_precisions[m.layer] == "fp32"
    evented = {e["layer"] for e in b.manifest["events"] if e["code"] == "PRECISION_UNSUPPORTED"}
    assert set(moved) == evented


def test_a_version_1_bundle_is_still_read_and_its_moves_recovered(tmp_path, digits_data):
    b = qdeploy.deploy(DIGITS_FACTORY, target="x86-avx512-vnni", spec={"activations": {"mode": "dynamic"}},
                       calib=digits_data / "calib.npz", val=digits_data / "val.npz", output=tmp_path / "v2",
                       input_shape="1x1x8x8", backends=["onnxruntime"])
    old, raw = _copy(b.path, tmp_path / "v1")
    raw["schema_version"] = 1
    for a in raw["artifacts"]:
        del a["moved_layers"]
    (old / "manifest.json").write_text(json.dumps(raw))
    loaded = Bundle.load(old)
    assert [m.layer for m in loaded.record.artifacts[0].moved_layers] == \
        [m.layer for m in b.record.artifacts[0].moved_layers]
    assert loaded.manifest["schema_version"] == SCHEMA_VERSION  # readers see the current shape


@pytest.mark.parametrize("damage", ["no budget", "size as text", "moves not a list", "artifacts not a list"])
def test_a_manifest_of_the_wrong_shape_is_refused_as_damaged(tmp_path, digits_bundle, damage):
    bad, raw = _copy(digits_bundle, tmp_path / "bad")
    art = raw["artifacts"][0]
    if damage == "no budget":
        del art["budget"]
    elif damage == "size as text":
        art["size_bytes"] = "big"
    elif damage == "moves not a list":
        art["moved_layers"] = {"conv": "fp32"}
    else:
        raw["artifacts"] = {"a": art}
    (bad / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(IntegrityError, match="damaged"):
        Bundle.load(bad)


def test_an_unknown_schema_is_another_version_not_damage(tmp_path, digits_bundle):
    bad, raw = _copy(digits_bundle, tmp_path / "future")
    raw["schema_version"] = 99
    (bad / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="schema version 99") as err:
        Bundle.load(bad)
    assert not isinstance(err.value, IntegrityError)


def test_a_replacement_record_is_validated_and_keys_of_its_own_are_kept(tmp_path, digits_bundle):
    folder, _ = _copy(digits_bundle, tmp_path / "b")
    bundle = Bundle.load(folder)
    art = dict(bundle.artifacts[0])
    with pytest.raises(IntegrityError):
        bundle.replace_artifact({k: v for k, v in art.items() if k != "metrics"})
    bundle.replace_artifact({**art, "engine": {"built": "now"}})  # a plugin's own key (TensorRT's engine)
    again = Bundle.load(folder)
    assert again.artifacts[0]["engine"] == {"built": "now"}
    assert again.record.artifacts[0].extra == {"engine": {"built": "now"}}


def _writes_bundle_files(tree: ast.AST) -> list[int]:
    """Lines that save numpy archives or name manifest.json/samples.npz as a file to write."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            if name in ("savez", "savez_compressed"):
                lines.append(node.lineno)
            if name in ("write_text", "write_bytes") and isinstance(fn, ast.Attribute) \
                    and "manifest" in ast.unparse(fn.value).lower():
                lines.append(node.lineno)
    return lines


def test_only_the_bundle_writes_manifests_and_samples():
    offenders = []
    for f in sorted(list((ROOT / "qdeploy").rglob("*.py")) + list((ROOT / "plugins").glob("*/qdeploy_*/**/*.py"))):
        if f.name == "bundle.py" and f.parent.name == "qdeploy":
            continue
        offenders += [f"{f.relative_to(ROOT)}:{n}" for n in _writes_bundle_files(ast.parse(f.read_text()))]
    assert not offenders, f"write manifest.json / samples.npz through qdeploy.bundle: {offenders}"
