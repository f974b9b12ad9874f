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
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import DataError

if TYPE_CHECKING:
    from .calibration import ActivationRanges, Dataset
    from .model import ModelHandle
    from .profiles import BackendTarget
    from .spec import QuantSpec


TENSOR_OPS = {"Add": 2, "Mul": 2, "Concat": 1, "Softmax": 1}
"""Weightless ops whose float activation inputs some backend quantizes (a residual Add, an SE gate's Mul, a
Concat, attention's Softmax), with how many float activation inputs make one a layer: an Add of a bias or a Mul
by a constant is part of its producer, not a tensor of its own. Each becomes a layer of kind ``tensor``, so the
sensitivity ranks it and a fallback can keep it float, on the backends that say they can
(:meth:`Backend.quantized_tensors`)."""


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do for one profile entry, on this host, right now.

    ``available`` is False (with ``reason``) when the runtime is not importable or the device is missing.
    ``precisions`` and ``granularities`` are what the backend can build at all; the profile entry narrows
    them to what the device runs. ``model_formats`` lists ``"onnx"`` and/or ``"torch"``. ``verified_on`` says
    how artifacts are verified here: ``runtime`` (the real runtime on this CPU), ``gpu`` or ``simulated``.
    ``activation_modes`` lists ``static``/``dynamic``/``none`` support; ``weight_bits`` the weight widths;
    ``weight_symmetric_only`` makes the core translate asymmetric weights to symmetric (with an event) or refuse
    them under ``strict``, whatever the device allows. ``oracle`` marks a backend that only ever simulates (the
    built-in ``reference``): its ``simulated`` verification is what it is for, not a missing runtime.
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
    oracle: bool = False


@dataclass
class Plan:
    """A backend's translation of the spec for one model and profile entry.

    ``layer_precisions`` maps every layer of the model's layer map to its precision; ``ranges`` holds the
    calibrated activation ranges once :meth:`Backend.calibrate` ran; ``reasons`` says, for each layer the plan
    builds in another precision than it was asked, why (the core turns each into a ``PRECISION_UNSUPPORTED``
    event and a ``moved_layers`` entry of the manifest); ``state`` is the backend's own data, never read by the
    core.
    """

    backend: str
    model: ModelHandle
    spec: QuantSpec
    target: BackendTarget
    layer_precisions: dict[str, str]
    ranges: ActivationRanges | None = None
    state: dict[str, Any] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)


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

    def calibrate(self, plan: Plan, ranges: ActivationRanges | None, data: Dataset | None) -> Plan:
        """Put calibrated activation ranges into the plan. ``ranges`` come from the core's observers run on
        the FP32 reference; ``data`` is the same calibration data, for backends that observe by themselves.
        Both are None when the spec needs no activation ranges (FP16, dynamic INT8) and no data was given."""
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

    def quantized_tensors(self, model: ModelHandle, spec: QuantSpec, target: BackendTarget) -> Collection[str]:
        """The model's tensor layers (kind ``tensor``: an Add, Mul, Concat or Softmax of :data:`TENSOR_OPS`) whose
        input tensors this backend quantizes under ``spec`` *and* can keep float one at a time. They join the
        entry's plan: ranked by the sensitivity, promotable by the fallback, each precision in the manifest.
        Tensor layers not named stay as the backend's recipe has them. Optional."""
        return ()

    def exact_runner(self, path: Path, meta: Mapping[str, Any]) -> Runner | None:
        """A runner of the artifact at ``path`` whose INT8 arithmetic accumulates exactly (its quantize/dequantize
        program run as float arithmetic), or None when the artifact has no such form. A deploy to a profile whose
        CPU accumulates INT8 products exactly (VNNI, ARM) judges accuracy with it on a host whose kernels do not
        (AVX2 saturates u8 x s8 pair sums in int16). Optional."""
        return None

    def has_exact_form(self, plan: Plan) -> bool:
        """Whether the artifact ``plan`` would build has an :meth:`exact_runner` (for ``check``, which says how a
        deploy would judge it before anything is built). Optional; implement it with :meth:`exact_runner`."""
        return False

    def release(self) -> None:
        """Drop what the backend kept between the builds of one profile entry's fallback run (a model's exported
        or calibrated graphs, say). The core calls it when the entry's run ends, kept artifact or not. Optional."""


def threads_of(meta: Mapping[str, Any]) -> int:
    """The intra-op thread count the core asked a runner for (``meta["threads"]``); 0 leaves the runtime's
    own default (every core), which only code outside a deploy or a server should do."""
    try:
        return max(0, int(meta.get("threads", 0) or 0))
    except (TypeError, ValueError):
        return 0


ORT_SIMULATION_DISABLED_OPTIMIZERS = ("WeightBiasQuantization",)
"""onnxruntime (1.32) rewrites a Conv/Gemm that reads a DequantizeLinear output and has float weights into one
with int8 per-tensor weights and an int32 bias (``WeightBiasQuantization``, on from the BASIC level): in a float
fake-quant simulation that re-quantizes the already fake-quantized weights per tensor. Measured on EfficientNet-
Lite0, weights fake-quantized per channel and Q/DQ on every layer input: cosine to FP32 0.850 with it (0.896 at
BASIC), 0.993 without it. Every ``basic_only`` session (simulation, sensitivity, the reference backend) is
without it."""


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
        if basic_only:  # and no re-quantization of fake-quantized float weights (see the constant's doc)
            disabled_optimizers = tuple(dict.fromkeys((*disabled_optimizers, *ORT_SIMULATION_DISABLED_OPTIMIZERS)))
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


# --- the public helpers plugins may use --------------------------------------------------------------------------
# A plugin imports ``qdeploy.backend``, ``qdeploy.errors`` and ``qdeploy.spec`` and nothing else of the core
# (tests/test_boundary.py). What more of the core a backend needs is exported here, deliberately and under
# public names; each helper imports its core module when it is called (and each type on first access, through
# the module ``__getattr__`` below), so ``import qdeploy.backend`` stays as light as it was.

if TYPE_CHECKING:
    from .bundle import Bundle
    from .calibration import Observer
    from .spec import ActivationSpec, Budget
    from .verify import Recorded, Reference, Verification

_PUBLIC_TYPES = {
    "ActivationRanges": "calibration",  # calibrated (lo, hi) per activation tensor: Plan.ranges
    "BackendTarget": "profiles",        # one entry of a profile's backend chain: the ``target`` of every step
    "Bundle": "bundle",                 # a loaded, integrity-checked bundle (see load_bundle)
    "Reference": "verify",              # the FP32 reference run on the verification data
    "Recorded": "verify",               # what an artifact was verified with: inputs, outputs, budget verdict
    "Verification": "verify",           # what verify_artifact found
}


def __getattr__(name: str) -> Any:
    """The contract's types that live in core modules, imported on first use."""
    module = _PUBLIC_TYPES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(f"qdeploy.{module}"), name)


def calibrate_observers(prepared: Any, batches: Any, input_names: list[str], onnx_path: Any,
                        ranges: Mapping[str, tuple[float, float]] | None) -> tuple[int, dict[str, Any]]:
    """Calibrate the activation observers of a prepared PT2E or FX graph (torch): each takes the core's range of
    the reference tensor it watches, matched by value on the first sample; the rest observe ``batches``. Returns
    the samples run and a report for the artifact's meta (:func:`qdeploy.torch_bridge.calibrate`)."""
    from .torch_bridge import calibrate

    return calibrate(prepared, batches, input_names, onnx_path, ranges)


def make_observer(activations: ActivationSpec) -> Observer:
    """A fresh calibration observer for the spec's activation settings (its ``method``, ``percentile``,
    ``momentum``, ``symmetric``): ``update(batch)`` with numpy arrays, then ``range()`` is ``(lo, hi)``. For a
    backend that observes inside its own framework with the same numbers as the core's calibration."""
    from .calibration import make_observer as make
    return make(activations)


def cpu_flags() -> set[str]:
    """This host's CPU feature flags (``/proc/cpuinfo``; empty where it cannot be read)."""
    from .profiles import cpu_flags as flags
    return flags()


def gpu_compute_capability() -> tuple[str, str] | None:
    """``(GPU name, compute capability like "8.9")`` of the first visible NVIDIA GPU (nvidia-smi), or None."""
    from .profiles import gpu_compute_capability as cc
    return cc()


def parse_input_shape(text: str | tuple | list | None) -> tuple[int, ...] | None:
    """``"1x3x32x32"`` (an ``--input-shape``) as a tuple; a ModelError names the problem."""
    from .model import parse_shape
    return parse_shape(text)


def load_torch_module(source: str | Path) -> Any:
    """The PyTorch module a model argument names, as ``qdeploy deploy`` loads it: a ``.pt2`` torch.export
    program (its ``module()``), or a factory ``file.py:function`` / ``package.module:attr``. ModelError if not."""
    from .model import _load_factory, _load_pt2

    text = str(source)
    return _load_pt2(Path(text)) if text.endswith(".pt2") else _load_factory(text)


# ONNX Q/DQ graph helpers: the ones the core's fake-quantization simulator writes its graphs with
def insert_qdq(proto: Any, node: Any, index: int, scale: np.ndarray, zero_point: np.ndarray, tag: str) -> None:
    """Put a QuantizeLinear/DequantizeLinear pair in front of input ``index`` of ``node`` (scale and zero
    point become initializers named after ``tag``; only this consumer sees the quantized tensor)."""
    from .simulate import insert_qdq as insert
    insert(proto, node, index, scale, zero_point, tag)


def ensure_opset(proto: Any, version: int) -> Any:
    """``proto`` converted to at least opset ``version`` of the default domain (unchanged when it is there)."""
    from .simulate import ensure_opset as ensure
    return ensure(proto, version)


def output_channel_axis(node: Any, weight_rank: int) -> int:
    """The output-channel axis of a weighted ONNX node's weight: 0 for Conv and Gemm with transB=1, 1 for
    ConvTranspose and Gemm with transB=0, the last axis for MatMul."""
    from .simulate import output_channel_axis as axis
    return axis(node, weight_rank)


def fp8_scale(amax: float | np.ndarray) -> np.ndarray:
    """FP8 E4M3 scale for a symmetric range of ±amax (amax / 448)."""
    from .simulate import fp8_scale as scale
    return scale(amax)


def fp8_zero_point() -> np.ndarray:
    """The zero point of an FP8 Q/DQ pair: a ``float8_e4m3fn`` zero."""
    from .simulate import fp8_zero_point as zero
    return zero()


def ort_disabled_optimizers(proto: Any) -> tuple[str, ...]:
    """The onnxruntime graph rewrites to disable for a Q/DQ graph (``OrtRunner(disabled_optimizers=...)``): the
    ones that are wrong for FP8 pairs when the graph holds any, else none."""
    from .simulate import ORT_FP8_DISABLED_OPTIMIZERS, has_fp8_qdq
    return tuple(ORT_FP8_DISABLED_OPTIMIZERS) if has_fp8_qdq(proto) else ()


# bundles and verification: for a plugin's own command that re-verifies a bundle's artifact (build-engine)
def load_bundle(path: str | Path) -> Bundle:
    """The bundle at ``path``, integrity-checked (BundleError / IntegrityError otherwise). It reads its
    verification data and reference run, and it is the only writer of its manifest (``replace_artifact``)."""
    from .bundle import Bundle
    return Bundle.load(path)


def verify_artifact(runner: Runner, reference: Reference, budget: Budget, output: str | None = None,
                    where: Mapping[str, Any] | None = None, recorded: Recorded | None = None) -> Verification:
    """Run ``runner`` on the reference's inputs and judge it: :func:`qdeploy.verify.verify_artifact`."""
    from .verify import verify_artifact as verify
    return verify(runner, reference, budget, output=output, where=where, recorded=recorded)
