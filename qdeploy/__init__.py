"""qdeploy: one FP32 model -> verified, quantized deployments for many target devices.

``import qdeploy`` stays light: frameworks (torch, onnxruntime, TensorRT, LiteRT) are imported only by the code
that uses them.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["deploy", "check", "load_spec", "QuantSpec", "Bundle", "__version__"]


def __getattr__(name: str) -> Any:  # lazy: keep `import qdeploy` cheap
    if name in ("deploy", "check"):
        from . import pipeline
        return getattr(pipeline, name)
    if name in ("load_spec", "QuantSpec"):
        from . import spec
        return getattr(spec, name)
    if name == "Bundle":
        from .bundle import Bundle
        return Bundle
    raise AttributeError(f"module 'qdeploy' has no attribute {name!r}")
