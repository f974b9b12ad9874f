"""The type checker: mypy, pinned in requirements.txt, over ``qdeploy/`` and every plugin (``plugins/``).

What it checks and how is the ``[tool.mypy]`` section of pyproject.toml (files, the plugins' import roots, the
framework packages that ship no types); this test runs exactly that, ``python -m mypy``, from the repository root.
Its incremental cache lives under ``build/mypy_cache``: a warm run takes seconds, a cold one under a minute.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _pinned_mypy() -> str:
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        m = re.fullmatch(r"mypy==(\S+)", line.split("#", 1)[0].strip())
        if m:
            return m.group(1)
    raise AssertionError("requirements.txt pins no mypy version (mypy==X.Y.Z)")


def test_mypy_is_the_pinned_version():
    import mypy.version

    assert mypy.version.__version__ == _pinned_mypy(), (
        f"mypy {mypy.version.__version__} is installed, requirements.txt pins {_pinned_mypy()}: "
        f"pip install -r requirements.txt")


def test_core_and_plugins_type_check():
    proc = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"mypy found problems (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}", pytrace=False)
