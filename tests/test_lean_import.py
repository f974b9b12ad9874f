import subprocess
import sys

HEAVY = ("torch", "tensorflow", "tensorrt", "ai_edge_litert", "litert_torch", "jax", "onnxruntime", "fastapi",
         "uvicorn", "torchao")


def _imported_after(stmt: str) -> list[str]:
    code = f"import sys; {stmt}; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()


def test_import_qdeploy_is_light():
    assert _imported_after("import qdeploy") == []


def test_cli_parser_and_registry_do_not_import_frameworks():
    """Building the registry (all plugins loaded) and the CLI parser stays free of backend frameworks."""
    assert _imported_after("import qdeploy.cli as c; c.build_parser(); c._registry()") == []
