"""The plugin boundary: a plugin sees only the public contract of the core.

Every ``.py`` file of every plugin package (``plugins/*/qdeploy_*/``; a plugin's own tests are not the plugin)
may import from ``qdeploy`` only the modules in :data:`ALLOWED`. What else of the core a backend needs is
exported deliberately from :mod:`qdeploy.backend` under a public name (``make_observer``, ``load_bundle``,
``verify_artifact``, ...). A plugin never imports another plugin either: each one installs and is disabled alone.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ALLOWED = frozenset({"qdeploy.backend", "qdeploy.errors", "qdeploy.spec"})
"""The public contract. ``qdeploy.backend`` carries the helpers and types plugins may use; ``qdeploy.errors`` the
errors they raise; ``qdeploy.spec`` the spec they translate."""


def _plugin_files() -> list[Path]:
    files = []
    for pkg in sorted(ROOT.glob("plugins/*/qdeploy_*")):
        for f in sorted(pkg.rglob("*.py")):
            parts = f.relative_to(pkg).parts
            if "tests" in parts or f.name.startswith("test_") or f.name == "conftest.py":
                continue
            files.append(f)
    return files


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, module)`` for every absolute import in the file, whatever its form: ``import a.b``, ``from a.b
    import c`` (``from qdeploy import x`` counts as module ``qdeploy.x``) and ``importlib.import_module("a.b")``
    / ``__import__("a.b")`` with a literal name."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "qdeploy":
                found += [(node.lineno, f"qdeploy.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            if name in ("import_module", "__import__"):
                found.append((node.lineno, node.args[0].value))
    return found


def _allowed(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in ALLOWED)


def test_the_plugins_are_found():
    names = {f.relative_to(ROOT).parts[1] for f in _plugin_files()}
    assert {"onnxruntime", "tensorrt", "tflite", "torch"} <= names, names


def test_plugins_import_only_the_public_contract():
    bad = []
    for f in _plugin_files():
        own = f.relative_to(ROOT).parts[2]  # the plugin's package: qdeploy_<name>
        for line, module in _imports(ast.parse(f.read_text(), str(f))):
            top = module.split(".")[0]
            if top == "qdeploy" and not _allowed(module):
                bad.append(f"{f.relative_to(ROOT)}:{line}: imports {module} (core internal; allowed: "
                           f"{', '.join(sorted(ALLOWED))}; export a public helper from qdeploy.backend instead)")
            elif top.startswith("qdeploy_") and top != own:
                bad.append(f"{f.relative_to(ROOT)}:{line}: imports {module} (another plugin)")
    assert not bad, "plugins reach past the contract:\n" + "\n".join(bad)


@pytest.mark.parametrize("src, want", [
    ("from qdeploy.calibration import make_observer", ["qdeploy.calibration"]),
    ("import qdeploy.model as m", ["qdeploy.model"]),
    ("from qdeploy import bundle, errors", ["qdeploy.bundle"]),
    ("import importlib\nimportlib.import_module('qdeploy.simulate')", ["qdeploy.simulate"]),
    ("def f():\n    from qdeploy.profiles import cpu_flags", ["qdeploy.profiles"]),
    ("from qdeploy.backend import quiet\nfrom qdeploy.spec import QuantSpec\nfrom . import engine", []),
])
def test_the_check_sees_every_import_form(src, want):
    assert [m for _, m in _imports(ast.parse(src)) if m.split(".")[0] == "qdeploy" and not _allowed(m)] == want


def test_the_contracts_helpers_keep_import_qdeploy_backend_light():
    """The helpers exported for plugins import their core modules when called, not when the contract loads."""
    import subprocess
    import sys

    code = ("import sys, qdeploy.backend as b; "
            "print(' '.join(m for m in ('qdeploy.simulate', 'qdeploy.calibration', 'qdeploy.bundle', "
            "'qdeploy.verify', 'qdeploy.model', 'qdeploy.profiles', 'onnxruntime', 'onnx') if m in sys.modules)); "
            "b.BackendTarget; b.ActivationRanges; b.Verification")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.split() == []


def test_the_contract_exports_resolve():
    import qdeploy.backend as b

    for name in ("ActivationRanges", "BackendTarget", "Bundle", "Reference", "Recorded", "Verification"):
        assert getattr(b, name).__name__ == name
    with pytest.raises(AttributeError):
        b.NoSuchThing  # noqa: B018
    from qdeploy.spec import ActivationSpec

    obs = b.make_observer(ActivationSpec(method="minmax"))
    import numpy as np

    obs.update(np.array([-1.0, 2.0]))
    assert obs.range() == (-1.0, 2.0)
    assert b.parse_input_shape("1x3x8x8") == (1, 3, 8, 8)
