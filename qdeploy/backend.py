"""The contracts between the core and every backend: :class:`Backend`, :class:`Runner` and their data.

The core never branches on a backend's name. It asks a backend what it can do on a profile entry
(:meth:`Backend.capabilities`), then drives the same four steps for all of them::

    plan = backend.translate(model, spec, target, layer_precisions)   # spec -> the backend's own plan
    plan = backend.calibrate(plan, ranges, data)                      # activation ranges into the plan
    artifact = backend.build(plan, workdir)                           # files on disk
    runner = backend.runner(artifact.path, artifact.meta)             # named numpy in, named numpy out

Backends raise :class:`~qdeploy.errors.BackendError` with a reason code when a step cannot be done; the core
turns it into a fallback event. Heavy frameworks are imported inside the methods, never at module import.
"""
from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import DataError

if TYPE_CHECKING:
    from .calibration import ActivationRanges, CalibrationData
    from .model import ModelHandle
    from .profiles import BackendTarget
    from .spec import QuantSpec


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do for one profile entry, on this host, right now.

    ``available`` is False (with ``reason``) when the runtime is not importable or the device is missing.
    ``precisions`` and ``granularities`` are what the backend can build at all; the profile entry narrows
    them to what the device runs. ``model_formats`` lists ``"onnx"`` and/or ``"torch"``. ``verified_on`` says
    how artifacts are verified here: ``runtime`` (the real runtime on this CPU), ``gpu`` or ``simulated``.
    ``activation_modes`` lists ``static``/``dynamic``/``none`` support; ``weight_bits`` the weight widths;
    ``weight_symmetric_only`` makes the core translate asymmetric weights to symmetric (with an event) or refuse
    them under ``strict``, whatever the device allows.
    """

    available: bool
    reason: str = ""
    precisions: tuple[str, ...] = ("int8", "fp32")
    granularities: tuple[str, ...] = ("per_tensor", "per_channel")
    model_formats: tuple[str, ...] = ("onnx",)
    activation_modes: tuple[str, ...] = ("static",)
    weight_bits: tuple[int, ...] = (8,)
    verified_on: str = "runtime"
    weight_symmetric_only: bool = False


@dataclass
class Plan:
    """A backend's translation of the spec for one model and profile entry.

    ``layer_precisions`` maps every layer of the model's layer map to its precision; ``ranges`` holds the
    calibrated activation ranges once :meth:`Backend.calibrate` ran; ``state`` is the backend's own data.
    """

    backend: str
    model: ModelHandle
    spec: QuantSpec
    target: BackendTarget
    layer_precisions: dict[str, str]
    ranges: ActivationRanges | None = None
    state: dict[str, Any] = field(default_factory=dict)


@dataclass
class Artifact:
    """A built artifact: ``path`` (a file or folder), the precision summary, and the metadata its runner
    needs (``meta`` must be JSON-serialisable; it is stored in the manifest). ``events`` are
    ``(reason code, message)`` pairs the core records for this build (e.g. ``BACKEND_UNAVAILABLE`` for an
    engine build that must happen on the target)."""

    path: Path
    precision: str
    layer_precisions: dict[str, str]
    meta: dict[str, Any] = field(default_factory=dict)
    events: list[tuple[str, str]] = field(default_factory=list)


class Runner(ABC):
    """Runs one artifact: named numpy arrays in, named numpy arrays out.

    Subclasses set ``input_names``/``output_names`` (and ``max_batch`` when the artifact has a fixed batch
    size) and implement :meth:`infer_impl`; :meth:`infer` checks the feed, splits batches and times the call.
    ``simulated`` is True when the runner stands in for a runtime that is not here (an equivalent graph run in
    onnxruntime): good for verification, never for serving.
    """

    input_names: list[str]
    output_names: list[str]
    max_batch: int | None = None
    simulated: bool = False
    last_latency_s: float = 0.0

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise DataError(f"missing model input(s) {missing}; this model takes {self.input_names}")
        start = time.perf_counter()
        n = len(next(iter(feed.values())))
        if self.max_batch is None or n <= self.max_batch:
            out = self.infer_impl({k: feed[k] for k in self.input_names})
        else:
            parts = [self.infer_impl({k: feed[k][i:i + self.max_batch] for k in self.input_names})
                     for i in range(0, n, self.max_batch)]
            out = {k: np.concatenate([p[k] for p in parts]) for k in self.output_names}
        self.last_latency_s = time.perf_counter() - start
        return out

    @abstractmethod
    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch (at most ``max_batch`` samples)."""

    def close(self) -> None:
        """Release the runtime's resources."""


class Backend(ABC):
    """A quantization backend. Register an instance through ``qdeploy_register_backends``.

    ``name`` is the key profiles use (``backend = "onnxruntime"``). Every method documented here is the whole
    contract: the core calls nothing else.
    """

    name: str
    artifact_suffix: str = ""

    @abstractmethod
    def capabilities(self, target: BackendTarget) -> Capabilities:
        """What this backend can do for ``target`` on this host (cheap: no model work; lazy imports only)."""

    @abstractmethod
    def translate(self, model: ModelHandle, spec: QuantSpec, target: BackendTarget,
                  layer_precisions: dict[str, str]) -> Plan:
        """Turn the (already resolved) spec into this backend's plan; raise BackendError if impossible."""

    def calibrate(self, plan: Plan, ranges: ActivationRanges, data: CalibrationData) -> Plan:
        """Put calibrated activation ranges into the plan. ``ranges`` come from the core's observers run on
        the FP32 reference; ``data`` is the same calibration data, for backends that observe by themselves."""
        plan.ranges = ranges
        return plan

    @abstractmethod
    def build(self, plan: Plan, workdir: Path) -> Artifact:
        """Write the artifact under ``workdir`` and describe it."""

    @abstractmethod
    def runner(self, path: Path, meta: Mapping[str, Any]) -> Runner:
        """A runner for an artifact this backend built (``meta`` is the artifact's stored metadata). The core
        adds ``meta["threads"]``: the intra-op thread count the runner must use (:func:`threads_of`), set on
        the runner's own session, never as process-wide state that other runners would inherit."""

    def advise(self, model: ModelHandle, spec: QuantSpec, target: BackendTarget) -> list[str]:
        """Warnings for ``qdeploy check`` and ``deploy`` about a combination that works but is a bad idea here
        (measured slow paths, for instance). Optional."""
        return []


def threads_of(meta: Mapping[str, Any]) -> int:
    """The intra-op thread count the core asked a runner for (``meta["threads"]``); 0 leaves the runtime's
    own default (every core), which only code outside a deploy or a server should do."""
    try:
        return max(0, int(meta.get("threads", 0) or 0))
    except (TypeError, ValueError):
        return 0


class OrtRunner(Runner):
    """An onnxruntime session: the FP32 reference runner, and the runner of every ONNX artifact."""

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int = 0,
                 disabled_optimizers: tuple[str, ...] = (), basic_only: bool = False) -> None:
        """``basic_only`` keeps onnxruntime to its basic graph optimisations: Q/DQ pairs then run as the float
        arithmetic the ONNX standard defines instead of being fused into this CPU's integer kernels (on AVX2
        without VNNI those saturate u8 x s8 pairs in int16), which is what simulating another runtime needs."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if basic_only:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        kw = {"disabled_optimizers": list(disabled_optimizers)} if disabled_optimizers else {}
        self.session = ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"], **kw)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        first = self.session.get_inputs()[0].shape
        self.max_batch = first[0] if first and isinstance(first[0], int) and first[0] > 0 else None

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, feed)))


@contextlib.contextmanager
def quiet(*loggers: str) -> Iterator[None]:
    """Run a framework call without its console noise: the named loggers (the root logger for ``""``) at
    ERROR, Python warnings off, stdout captured. Errors still raise; backends report them as events."""
    objs = [logging.getLogger(n or None) for n in loggers]
    levels = [lg.level for lg in objs]
    for lg in objs:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(objs, levels):
            lg.setLevel(lv)
