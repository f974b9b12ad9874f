import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qdeploy import hookspecs
from qdeploy.backend import Backend, Capabilities
from qdeploy.errors import PluginError
from qdeploy.plugins import DISABLED_ENV, Registry, get_registry, hookimpl, make_plugin_manager

TESTS = Path(__file__).parent


class _Named(Backend):
    """A minimal backend used only to exercise registration."""

    def __init__(self, name):
        self.name = name

    def capabilities(self, target):
        return Capabilities(False, "registration test backend")

    def translate(self, *a):
        raise NotImplementedError

    def build(self, *a):
        raise NotImplementedError

    def runner(self, *a):
        raise NotImplementedError


class _Plugin:
    def __init__(self, *names):
        self.names = names

    @hookimpl
    def qdeploy_register_backends(self, register):
        for n in self.names:
            register(_Named(n))


def test_entry_point_backends_are_registered():
    reg = get_registry()
    assert "onnxruntime" in reg.backends
    assert reg.pm.has_plugin("onnxruntime")
    assert reg.pm.has_plugin("qdeploy.builtin")


def test_a_plugin_registered_by_hand(fresh_registry):
    pm = make_plugin_manager()
    pm.register(_Plugin("extra"))
    reg = Registry.from_plugin_manager(pm)
    assert isinstance(reg.backends["extra"], _Named)


def test_duplicate_backend_name_raises():
    pm = make_plugin_manager()
    pm.register(_Plugin("onnxruntime"))
    with pytest.raises(PluginError, match="two plugins registered the backend 'onnxruntime'"):
        Registry.from_plugin_manager(pm)


def test_disabled_plugins_are_not_loaded():
    code = "from qdeploy.plugins import get_registry; print(sorted(get_registry().backends))"
    env = dict(os.environ, **{DISABLED_ENV: "onnxruntime"})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "onnxruntime" not in out


def test_hook_calls_can_be_traced():
    code = "from qdeploy.plugins import get_registry; get_registry()"
    env = dict(os.environ, QDEPLOY_TRACE_PLUGINS="1")
    err = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stderr
    assert "qdeploy_register_backends" in err


def test_events_and_reports_reach_observers(fresh_registry, digits_data, tmp_path, monkeypatch):
    """qdeploy_on_event and qdeploy_on_report see what goes into the manifest."""
    import qdeploy
    from qdeploy import plugins

    seen = {"events": [], "reports": []}

    class Observer:
        @hookimpl
        def qdeploy_on_event(self, event):
            seen["events"].append(event)

        @hookimpl
        def qdeploy_on_report(self, manifest, bundle_dir):
            seen["reports"].append((manifest, bundle_dir))

    pm = make_plugin_manager()
    pm.register(Observer())
    plugins.reset_registry(Registry.from_plugin_manager(pm))
    from conftest import DIGITS_FACTORY, DIGITS_SPEC
    qdeploy.deploy(DIGITS_FACTORY, target="x86-avx512-vnni", spec=DIGITS_SPEC, calib=digits_data / "calib.npz",
                   val=digits_data / "val.npz", output=tmp_path / "b", input_shape="1x1x8x8")
    manifest, bundle_dir = seen["reports"][0]
    assert bundle_dir == tmp_path / "b"
    assert [e["code"] for e in seen["events"]] == [e["code"] for e in manifest["events"]]


def test_metric_registered_by_a_plugin_is_a_budget_metric(fresh_registry, mlp_onnx, mlp_data, tmp_path):
    import numpy as np

    import qdeploy
    from qdeploy import plugins

    class Metric:
        @hookimpl
        def qdeploy_register_metrics(self, register):
            register("neg_rmse", lambda ref, out, labels: -float(np.sqrt(np.mean((ref - out) ** 2))))

    pm = make_plugin_manager()
    pm.register(Metric())
    plugins.reset_registry(Registry.from_plugin_manager(pm))
    spec = {"budget": {"metric": "neg_rmse", "threshold": -0.5}}
    b = qdeploy.deploy(mlp_onnx, target="x86-avx512-vnni", spec=spec, calib=mlp_data, output=tmp_path / "b",
                       backends=["onnxruntime"])
    art = b.artifacts[0]
    assert "neg_rmse" in art["metrics"] and art["budget"]["metric"] == "neg_rmse" and art["budget"]["passed"]


def test_every_hook_is_documented_prefixed_and_tested():
    """Meta-test: each hookspec has a docstring with :param: lines and appears in some test."""
    hooks = [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("qdeploy_")]
    assert hooks
    test_text = "".join(p.read_text() for p in TESTS.glob("test_*.py"))
    for name in hooks:
        doc = getattr(hookspecs, name).__doc__ or ""
        assert ":param" in doc, f"{name} has no :param: documentation"
        assert name in test_text or name.replace("qdeploy_", "") in test_text, f"{name} has no test"


def test_cli_commands_can_come_from_plugins(fresh_registry, capsys):
    from qdeploy import cli, plugins

    class Cmd:
        @hookimpl
        def qdeploy_add_commands(self, subparsers):
            p = subparsers.add_parser("hello")
            p.set_defaults(func=lambda args: print("hello from a plugin") or 0)

    pm = make_plugin_manager()
    pm.register(Cmd())
    plugins.reset_registry(Registry.from_plugin_manager(pm))
    assert cli.main(["hello"]) == 0
    assert "hello from a plugin" in capsys.readouterr().out


def test_profiles_registered_by_a_plugin(fresh_registry, tmp_path):
    """qdeploy_register_profiles takes a folder, a file or a Profile; a duplicate name raises."""
    from qdeploy.profiles import builtin_profile_dir, load_profile_file

    src = (builtin_profile_dir() / "x86-avx2.toml").read_text().replace('name = "x86-avx2"', 'name = "my-board"')
    (tmp_path / "my-board.toml").write_text(src)

    class Profiles:
        @hookimpl
        def qdeploy_register_profiles(self, register):
            register(tmp_path / "my-board.toml")

    pm = make_plugin_manager()
    pm.register(Profiles())
    reg = Registry.from_plugin_manager(pm)
    assert reg.profile("my-board").backends[0].backend == "onnxruntime"

    class Dup:
        @hookimpl
        def qdeploy_register_profiles(self, register):
            register(load_profile_file(builtin_profile_dir() / "edge-tpu.toml"))

    pm2 = make_plugin_manager()
    pm2.register(Dup())
    with pytest.raises(PluginError, match="hardware profile 'edge-tpu'"):
        Registry.from_plugin_manager(pm2)


def test_every_plugin_disabled_still_deploys_through_the_reference_backend(tmp_path, digits_data):
    """QDEPLOY_DISABLED_PLUGINS naming every backend plugin: the built-in reference backend still deploys the
    digits example (its artifact is simulated: it says what the spec means, and never serves)."""
    import json

    from conftest import DIGITS_FACTORY, DIGITS_SPEC

    env = {**os.environ, "QDEPLOY_DISABLED_PLUGINS": "onnxruntime,torch,tflite,tensorrt"}
    res = subprocess.run([str(Path(sys.executable).parent / "qdeploy"), "deploy", DIGITS_FACTORY, "--input-shape",
                          "1x1x8x8", "--target", "reference", "--spec", str(DIGITS_SPEC), "--calib",
                          str(digits_data / "calib.npz"), "--val", str(digits_data / "val.npz"), "-o",
                          str(tmp_path / "b")], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    (art,) = manifest["artifacts"]
    assert art["backend"] == "reference" and art["precision"] == "int8" and art["verified_on"] == "simulated"
    assert art["budget"]["passed"]


def test_tflite_artifacts_say_where_they_were_verified():
    """Edge TPU and NNAPI artifacts are verified on LiteRT's CPU kernels (XNNPACK), not on the accelerator: the
    artifact's meta says which runtime and device ran it, and which device it is meant for."""
    tflite = pytest.importorskip("qdeploy_tflite")
    if tflite.interpreter_class()[0] is None:
        pytest.skip(f"no LiteRT interpreter here: {tflite.interpreter_class()[2]}")
    reg = get_registry()
    runtime = {"ai-edge-litert": "litert"}.get(tflite.interpreter_class()[1], tflite.interpreter_class()[1])
    seen = {}
    for profile in ("edge-tpu", "android-nnapi", "x86-avx2"):
        (target,) = [t for t in reg.profile(profile).backends if t.backend == "tflite"]
        seen[profile] = tflite.verified_on(target)
    assert seen["edge-tpu"]["target_device"] == "edge-tpu" and seen["android-nnapi"]["target_device"] == "nnapi"
    for profile, where in seen.items():
        assert where["runtime"] == runtime and where["device"] == "cpu-xnnpack", (profile, where)
    assert "not on the edge-tpu" in seen["edge-tpu"]["note"] and "note" not in seen["x86-avx2"]
