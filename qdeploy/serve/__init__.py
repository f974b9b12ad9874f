"""Fallback-aware serving of a qdeploy bundle.

In process::

    model = qdeploy.serve.load("build/demo")        # verifies, loads and warms up the fallback chain
    out = model.infer({"input": x})                 # a dict of outputs; out.artifact says who answered

Over HTTP (Open Inference Protocol v2): ``qdeploy serve build/demo`` or :func:`serve`/:func:`start_server`.
The core (:mod:`.core`, :mod:`.drift`, :mod:`.protocol`) imports no web framework; FastAPI, uvicorn and
prometheus_client are imported only by :mod:`.http`, when a server is created.
"""
from __future__ import annotations

from typing import Any

from .core import (BACKEND_UNAVAILABLE, DRIFT_DETECTED, LOAD_FAILED, POLICIES, RUNTIME_ERROR, Event,
                   FallbackModel, Prediction, load)
from .errors import (BodyTooLarge, InferenceFailed, ModelNotFound, NothingServes, NotReady, RequestError,
                     ServeError)

__all__ = ["load", "FallbackModel", "Prediction", "Event", "create_app", "serve", "start_server", "POLICIES",
           "LOAD_FAILED", "BACKEND_UNAVAILABLE", "RUNTIME_ERROR", "DRIFT_DETECTED", "ServeError", "RequestError",
           "ModelNotFound", "BodyTooLarge", "NotReady", "InferenceFailed", "NothingServes"]


def __getattr__(name: str) -> Any:  # the HTTP layer (fastapi, uvicorn, prometheus_client) loads on first use
    if name in ("create_app", "serve", "start_server"):
        try:
            from . import http
        except ImportError as exc:  # `pip install qdeploy` without the serving extra
            from ..errors import QDeployError

            raise QDeployError(f"serving over HTTP needs the serving extra ({exc.name or exc} is not installed): "
                               f"pip install 'qdeploy[serve]'") from None
        return getattr(http, name)
    raise AttributeError(f"module 'qdeploy.serve' has no attribute {name!r}")
