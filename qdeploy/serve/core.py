"""The fallback core: one bundle served through a chain of artifacts, plain Python (no web framework).

Start-up verifies every sha256 of the bundle, then loads the manifest's artifacts in their fallback order and,
unless told otherwise, the FP32 reference as the final fallback. An artifact is *ready* only after a warm-up
inference on the bundle's stored samples succeeds and matches the outputs recorded when it was verified.

While serving, a request runs on the active artifact. A runtime error is retried at once on the next ready
artifact, so the client still gets an answer; a per-artifact circuit breaker demotes an artifact after
``breaker_errors`` errors among its last ``breaker_window`` calls. The drift guard (:mod:`.drift`)
shadow-runs a sample of live requests through the FP32 reference on its own thread and demotes an artifact
whose disagreement exceeds the budget recorded in the manifest. Every demotion is an :class:`Event` with a
reason code (``LOAD_FAILED``, ``BACKEND_UNAVAILABLE``, ``RUNTIME_ERROR``, ``DRIFT_DETECTED``), logged on the
``qdeploy.serve`` logger and passed to listeners (the HTTP server's metrics). The ``strict`` policy never
demotes: it serves the first artifact only, and a failure makes the model unready with the reason instead.
"""
from __future__ import annotations

import contextlib

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import Bundle
from ..errors import QDeployError
from ..spec import POLICIES
from ..verify import recorded_gap
from .drift import DriftGuard, DriftRule, drift_rule
from .errors import InferenceFailed, NotReady, NothingServes, RequestError

log = logging.getLogger("qdeploy.serve")

# the serving subset of qdeploy.fallback.REASON_CODES (tests/test_serve.py checks they stay in it)
BACKEND_UNAVAILABLE = "BACKEND_UNAVAILABLE"
LOAD_FAILED = "LOAD_FAILED"
RUNTIME_ERROR = "RUNTIME_ERROR"
DRIFT_DETECTED = "DRIFT_DETECTED"
REFERENCE_ID = "reference-fp32"
MAX_EVENTS = 200


@dataclass(frozen=True)
class Event:
    """One fallback event: ``artifact`` left the chain for ``code``; ``active`` answers from now on."""

    time: float
    code: str
    artifact: str
    message: str
    active: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.time)), "code": self.code,
                "artifact": self.artifact, "message": self.message, "active": self.active}


class Prediction(dict):
    """The named outputs of one inference (a plain dict), plus ``artifact``: the id of the one that answered."""

    def __init__(self, outputs: Mapping[str, np.ndarray], artifact: str) -> None:
        super().__init__(outputs)
        self.artifact = artifact


@dataclass(eq=False)
class Slot:
    """One link of the chain: an artifact of the manifest, or the FP32 reference at the end."""

    id: str
    backend: str
    precision: str
    sample_key: str  # the prefix of its verified outputs in samples.npz
    manifest_index: int | None  # None for the reference
    drift: DriftRule | None = None
    runner: Any = None
    state: str = "pending"  # pending -> ready -> failed, or pending -> failed
    reason: str | None = None
    detail: str = ""
    served: int = 0
    errors: int = 0
    outcomes: deque = field(default_factory=deque)  # True = error, for the breaker
    last_drift: dict[str, Any] | None = None
    budget_passed: bool = True  # False: the deploy kept it although it missed the accuracy budget
    pending: tuple[str, str] | None = None  # a demotion waiting for the next link's warm-up (code, message)

    @property
    def is_reference(self) -> bool:
        return self.manifest_index is None

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "backend": self.backend, "precision": self.precision, "state": self.state,
             "reason": self.reason, "detail": self.detail, "served": self.served, "errors": self.errors,
             "final_fallback": self.is_reference, "budget_passed": self.budget_passed}
        if self.drift is not None:
            d["drift_rule"] = self.drift.describe()
        if self.last_drift is not None:
            d["last_drift_check"] = self.last_drift
        return d


class FallbackModel:
    """A bundle served through its fallback chain; thread-safe. Build it, :meth:`start` it, call :meth:`infer`.

    ``breaker_errors``/``breaker_window``: demote after that many runtime errors among an artifact's last
    calls. ``drift_sample``: the fraction of live requests shadowed through the FP32 reference (0 turns the
    guard off); ``drift_window``: how many shadowed samples one drift decision looks at. ``warmup_rtol``: how
    far (relative to the largest verified value) a warm-up output may be from the verified one.
    """

    def __init__(self, bundle: Bundle | str | Path, *, name: str | None = None, policy: str = "auto",
                 reference_fallback: bool = True, breaker_errors: int = 3, breaker_window: int = 20,
                 drift_sample: float = 0.05, drift_window: int = 64, warmup_rtol: float = 0.05,
                 on_event: Callable[[Event], None] | None = None, threads: int | None = None,
                 allow_nonfinite: bool = False) -> None:
        if policy not in POLICIES:
            raise QDeployError(f"serve policy {policy!r} is not one of {', '.join(POLICIES)}")
        if not 1 <= breaker_errors <= breaker_window:
            raise QDeployError(f"breaker_errors ({breaker_errors}) must be between 1 and breaker_window "
                               f"({breaker_window})")
        if not 0.0 <= drift_sample <= 1.0:
            raise QDeployError(f"drift_sample {drift_sample} must be a fraction between 0 and 1")
        if drift_window < 1:
            raise QDeployError(f"drift_window {drift_window} must be at least 1 sample")
        if not warmup_rtol >= 0:
            raise QDeployError(f"warmup_rtol {warmup_rtol} must be >= 0")
        if isinstance(bundle, Bundle):
            bundle.check_integrity()
        else:
            bundle = Bundle.load(bundle)  # verifies every sha256; a tampered bundle raises BundleError
        self.bundle = bundle
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise QDeployError(f"threads {threads!r} must be a whole number >= 1 (intra-op threads per runner)")
        self.threads = threads or bundle.threads  # default: what the deploy measured the chain's order with
        self.allow_nonfinite = allow_nonfinite
        m = bundle.manifest
        self.name = name or bundle.path.resolve().name
        self.policy = policy
        self.inputs = [(i["name"], tuple(i["shape"]), np.dtype(i.get("dtype", "float32")))
                       for i in m["model"]["inputs"]]
        self.outputs = [(o["name"], tuple(o["shape"]), np.dtype(o.get("dtype", "float32")))
                        for o in m["model"]["outputs"]]
        self.input_names = [n for n, _, _ in self.inputs]
        self.output_names = [n for n, _, _ in self.outputs]
        self.breaker_errors, self.breaker_window = breaker_errors, breaker_window
        self.drift_sample, self.drift_window, self.warmup_rtol = drift_sample, drift_window, warmup_rtol
        arts = bundle.artifacts[:1] if policy == "strict" else bundle.artifacts
        self.slots = [Slot(a["id"], a["backend"], a["precision"], a["id"], i, drift_rule(a, m),
                           outcomes=deque(maxlen=breaker_window),
                           budget_passed=bool((a.get("budget") or {}).get("passed", True)))
                      for i, a in enumerate(arts)]
        if reference_fallback and policy != "strict":
            ref_id = REFERENCE_ID if REFERENCE_ID not in {s.id for s in self.slots} else "reference"
            self.slots.append(Slot(ref_id, "onnxruntime", "fp32", "reference", None,
                                   outcomes=deque(maxlen=breaker_window)))
        if not self.slots:
            raise QDeployError(f"bundle {bundle.path} has no artifacts and the reference fallback is off")
        self.events: list[Event] = []
        self.event_counts: Counter[tuple[str, str]] = Counter()
        self.failure: str | None = None
        self._active: Slot | None = None
        self._lock = threading.RLock()
        self._listeners: list[Callable[[Event], None]] = [on_event] if on_event else []
        self._loaded = threading.Event()
        self._loader: threading.Thread | None = None
        self._guard: DriftGuard | None = None
        self._closed = False

    # ------------------------------------------------------------------ lifecycle
    def start(self, wait: bool = True, timeout: float | None = None) -> FallbackModel:
        """Load and warm up the chain (in a background thread when ``wait`` is False). With ``wait``, raise
        :class:`NothingServes` when no artifact became ready."""
        if self._loader is None:
            self._loader = threading.Thread(target=self._load_all, name="qdeploy-load", daemon=True)
            self._loader.start()
        if wait:
            self.wait_loaded(timeout)
            if self._active is None:
                raise NothingServes(self.failure or f"model {self.name} is not ready")
        return self

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Block until every link was tried (ready or failed); True when that happened within ``timeout``."""
        return self._loaded.wait(timeout)

    def add_listener(self, fn: Callable[[Event], None]) -> None:
        self._listeners.append(fn)

    @property
    def ready(self) -> bool:
        return self._active is not None

    @property
    def active(self) -> str | None:
        slot = self._active
        return slot.id if slot else None

    def close(self) -> None:
        self._closed = True
        if self._guard is not None:
            self._guard.close()
        for slot in self.slots:
            if slot.runner is not None:
                try:
                    slot.runner.close()
                except Exception:  # closing is best effort
                    pass

    def __enter__(self) -> FallbackModel:
        return self.start() if self._loader is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _load_all(self) -> None:
        try:
            samples = self.bundle.samples()
            # the guard watches from the first request on, while the rest of the chain is still loading
            if self.drift_sample > 0 and any(s.drift for s in self.slots):
                self._guard = DriftGuard(self.bundle.reference_path, self.drift_sample, self.drift_window,
                                         self._on_drift)
            for slot in self.slots:
                if self._closed or (self.policy == "strict" and self.failure):
                    break
                self._load(slot, samples)
            if self._active is None and not self.failure:
                self.failure = "no artifact of bundle {} is ready on this host: {}".format(
                    self.bundle.path, "; ".join(f"{s.id}: [{s.reason}] {s.detail}" for s in self.slots))
            self._loaded.set()
            self._apply_pending()  # a drift found while loading, with nothing after it that became ready
        except Exception as exc:  # the bundle's samples could not be read: nothing can be warmed up
            self.failure = f"cannot load bundle {self.bundle.path}: {type(exc).__name__}: {exc}"
            log.error(self.failure)
        finally:
            self._loaded.set()
        if self._active is None:
            log.error("%s: %s", self.name, self.failure)

    def _load(self, slot: Slot, samples: dict[str, np.ndarray]) -> None:
        code = LOAD_FAILED
        runner = None
        try:
            try:
                runner = (self.bundle.reference_runner(self.threads) if slot.is_reference
                          else self.bundle.runner(slot.id, self.threads))
            except QDeployError as exc:  # the backend is not installed here
                code = BACKEND_UNAVAILABLE
                raise exc
            if getattr(runner, "simulated", False):
                code = BACKEND_UNAVAILABLE
                raise QDeployError("its runner is simulated on this host (the real runtime is not here); a "
                                   "simulated runner verifies but never serves")
            self._warm_up(slot, runner, samples)
        except Exception as exc:
            if runner is not None:  # a runner that failed its warm-up must not keep its memory (or GPU)
                with contextlib.suppress(Exception):
                    runner.close()
            self._fail(slot, code, f"{type(exc).__name__}: {exc}" if not isinstance(exc, QDeployError) else str(exc))
            return
        with self._lock:
            slot.runner, slot.state = runner, "ready"
            current = self._active
            if self.failure:
                return
            if current is None:
                self._active = slot
                log.info("%s: serving with %s (%s, %s)", self.name, slot.id, slot.backend, slot.precision)
                if not slot.budget_passed:
                    log.warning("%s: %s missed its accuracy budget at deploy time (the bundle kept it as the best "
                                "it found); see GET /v2/models/%s", self.name, slot.id, self.name)
            elif self.slots.index(slot) < self.slots.index(current):
                # a demotion happened while this earlier link was still loading: the chain's order wins
                self._active = slot
                log.info("%s: %s is ready and comes before %s in the chain: now serving it", self.name, slot.id,
                         current.id)
        self._apply_pending()

    def _warm_up(self, slot: Slot, runner: Any, samples: dict[str, np.ndarray]) -> None:
        feed = {}
        for name in self.input_names:
            if f"input:{name}" not in samples:
                raise QDeployError(f"the bundle's samples have no warm-up input {name!r}")
            feed[name] = samples[f"input:{name}"]
        out = runner.infer(feed)
        for name in self.output_names:
            key = f"{slot.sample_key}:{name}"
            if key not in samples:
                raise QDeployError(f"the bundle's samples have no verified output {key!r} to warm up against")
            want = np.asarray(samples[key], dtype=np.float64)
            got = np.asarray(out.get(name), dtype=np.float64)
            if got.shape != want.shape:
                raise QDeployError(f"warm-up output {name!r} has shape {got.shape}; verified {want.shape}")
            if not np.all(np.isfinite(got)):
                raise QDeployError(f"warm-up output {name!r} is not finite")
            err, tol = recorded_gap(got, want, self.warmup_rtol)
            if err > tol:
                numerics = ""
                if slot.manifest_index is not None:
                    numerics = ((self.bundle.artifacts[slot.manifest_index].get("verification") or {})
                                .get("numerics") or "")
                raise QDeployError(f"warm-up output {name!r} differs from the verified outputs by {err:.4g} "
                                   f"(tolerance {tol:.4g})" + (
                                       f"; it was verified with {numerics.split(', emulated')[0]}, emulated, and "
                                       f"this host's INT8 kernels differ: serve it on the target CPU, or deploy to "
                                       f"this host's profile (--target detect)" if numerics else ""))

    # ------------------------------------------------------------------ serving
    def infer(self, feed: Mapping[str, Any], check: bool = True) -> Prediction:
        """Run one request (named arrays with a batch dimension) and say which artifact answered.

        Raises :class:`RequestError` for inputs that do not match the model, :class:`NotReady` before a warm-up
        succeeded (or after a ``strict`` failure), :class:`InferenceFailed` when no artifact could answer.
        """
        if check:
            feed = self.check_feed(feed)
        slot = self._active
        if slot is None:
            raise NotReady(self.not_ready_reason())
        while True:
            try:
                out = slot.runner.infer(feed)
                missing = [n for n in self.output_names if n not in out]
                if missing:
                    raise RuntimeError(f"the runner returned no output(s) {missing}")
            except Exception as exc:
                nxt = self._runtime_error(slot, exc)
                if nxt is None:
                    raise InferenceFailed(f"model {self.name}: artifact {slot.id} failed ({type(exc).__name__}: "
                                          f"{exc}) and no other artifact can answer"
                                          + (" (policy strict: no fallback)" if self.policy == "strict" else ""))
                slot = nxt
                continue
            slot.outcomes.append(False)
            slot.served += 1
            guard = self._guard
            if guard is not None and slot.drift is not None:
                guard.offer(slot, feed, out)
            return Prediction(out, slot.id)

    def check_feed(self, feed: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Validate named inputs against the model: names, dtypes, ranks, fixed dimensions, one batch size."""
        if not isinstance(feed, Mapping):
            raise RequestError(f"inputs must be a mapping of input name to array; got {type(feed).__name__}")
        unknown = [k for k in feed if k not in self.input_names]
        if unknown:
            raise RequestError(f"unknown input(s) {unknown}; model {self.name} takes {self.input_names}")
        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise RequestError(f"missing input(s) {missing}; model {self.name} takes {self.input_names}")
        out, batch = {}, None
        for name, shape, dtype in self.inputs:
            arr = feed[name]
            if not isinstance(arr, np.ndarray):
                arr = np.asarray(arr)
            if arr.dtype != dtype:
                raise RequestError(f"input {name!r} has dtype {arr.dtype}; model {self.name} takes {dtype}")
            check_shape(name, arr.shape, shape)
            if not self.allow_nonfinite and arr.dtype.kind == "f" and not np.isfinite(arr).all():
                bad = np.argwhere(~np.isfinite(arr).reshape(len(arr), -1).all(axis=1)).ravel()
                raise RequestError(f"input {name!r} holds NaN or Infinity (sample {int(bad[0])} of the batch); a "
                                   f"quantized model would answer with finite but meaningless outputs. Clean the "
                                   f"input, or start the server with --allow-nonfinite")
            if batch is not None and arr.shape[0] != batch:
                raise RequestError(f"input {name!r} has batch size {arr.shape[0]}; other inputs have {batch}")
            batch = arr.shape[0]
            out[name] = arr
        return out

    def not_ready_reason(self) -> str:
        if self.failure:
            return f"model {self.name} is not ready: {self.failure}"
        return f"model {self.name} is not ready: warming up"

    def _runtime_error(self, slot: Slot, exc: Exception) -> Slot | None:
        """Record an error of ``slot``; demote it when its breaker trips; return the next link to try."""
        with self._lock:
            slot.errors += 1
            slot.outcomes.append(True)
            recent = sum(slot.outcomes)
            log.debug("%s: %s runtime error: %s", self.name, slot.id, exc)
            tripped = recent >= self.breaker_errors and slot.state == "ready"
            msg = (f"{recent} runtime errors in its last {len(slot.outcomes)} calls; last: "
                   f"{type(exc).__name__}: {exc}")
            if self.policy == "strict":
                if tripped:
                    self._fail(slot, RUNTIME_ERROR, msg)
                return None
            if tripped:
                self._fail(slot, RUNTIME_ERROR, msg)
            return self._next_ready(slot)

    def _on_drift(self, slot: Slot, message: str) -> None:
        with self._lock:
            if slot.state != "ready":
                return
            if (self.policy != "strict" and self._active is slot and self._next_ready(slot) is None
                    and not self._loaded.is_set()):
                # the rest of the chain is still warming up: keep answering, demote as soon as a link is ready
                if slot.pending is None:
                    slot.pending = (DRIFT_DETECTED, message)
                    log.warning("%s: [%s] %s: %s; the next link is still warming up: demoting once it is ready",
                                self.name, DRIFT_DETECTED, slot.id, message)
                return
            self._fail(slot, DRIFT_DETECTED, message)

    def _apply_pending(self) -> None:
        """Carry out a demotion that waited for a link to become ready (or for loading to end)."""
        with self._lock:
            slot = self._active
            if slot is not None and slot.pending is not None and slot.state == "ready" and \
                    (self._next_ready(slot) is not None or self._loaded.is_set()):
                code, message = slot.pending
                slot.pending = None
                self._fail(slot, code, message)

    def _next_ready(self, after: Slot) -> Slot | None:
        i = self.slots.index(after)
        return next((s for s in self.slots[i + 1:] if s.state == "ready"), None)

    def _fail(self, slot: Slot, code: str, message: str) -> None:
        """Take ``slot`` out of the chain (a demotion when it was active) and record the event."""
        with self._lock:
            was_active = self._active is slot
            slot.state, slot.reason, slot.detail = "failed", code, message
            if self.policy == "strict":
                if was_active or self._active is None:
                    self._active = None
                    self.failure = f"[{code}] {slot.id}: {message} (policy strict: no fallback)"
            elif was_active:
                self._active = self._next_ready(slot)
            nxt = self._active
            if nxt is not None and was_active:
                tail = " (the FP32 reference, the final fallback)" if nxt.is_reference else ""
                text = f"{message}; demoted, now serving {nxt.id}{tail}"
            elif was_active:
                text = f"{message}; nothing left to serve" if self.policy != "strict" else \
                    f"{message}; policy strict: not demoting, the model is not ready"
            else:
                text = f"{message}; out of the chain"
            event = Event(time.time(), code, slot.id, text, nxt.id if nxt else None)
            self.events.append(event)
            del self.events[:-MAX_EVENTS]
            if self.policy != "strict":  # strict never demotes: the failure is in `failure`, not a demotion
                self.event_counts[(slot.id, code)] += 1
            listeners = list(self._listeners)
        log.warning("%s: [%s] %s: %s", self.name, code, slot.id, text)
        for fn in listeners:
            try:
                fn(event)
            except Exception:  # a broken listener must not stop serving
                log.exception("event listener failed")

    # ------------------------------------------------------------------ introspection
    def drift_status(self) -> dict[str, Any] | None:
        """The drift guard's counters, or None while it is off."""
        guard = self._guard
        return guard.describe() if guard else None

    def status(self) -> dict[str, Any]:
        """The active artifact, the chain with each link's state and reason, the events and the drift guard."""
        active = self._active
        guard = self._guard
        return {"name": self.name, "policy": self.policy, "ready": active is not None,
                "active_artifact": active.id if active else None,
                "active_precision": active.precision if active else None,
                "active_budget_passed": active.budget_passed if active else None,
                "failure": self.failure, "loading": not self._loaded.is_set(),
                "chain": [s.describe() for s in self.slots],
                "events": [e.as_dict() for e in self.events],
                "drift_guard": guard.describe() if guard else {"enabled": False}}


def check_shape(name: str, got: tuple[int, ...], declared: tuple[Any, ...]) -> None:
    if len(got) != len(declared):
        raise RequestError(f"input {name!r} has shape {list(got)}; the model takes {len(declared)} dimensions "
                           f"{dims_text(declared)}")
    for i, (g, d) in enumerate(zip(got, declared)):
        if isinstance(d, int) and d > 0 and g != d:
            raise RequestError(f"input {name!r} has shape {list(got)}; dimension {i} must be {d} "
                               f"(model shape {dims_text(declared)})")
    if got and got[0] == 0:
        raise RequestError(f"input {name!r} has an empty batch (shape {list(got)})")


def dims_text(shape: tuple[Any, ...]) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) and d > 0 else "-1" for d in shape) + "]"


def load(bundle: Bundle | str | Path, wait: bool = True, **options: Any) -> FallbackModel:
    """Load ``bundle`` for in-process serving: ``qdeploy.serve.load("build/demo").infer({"input": x})``.

    ``options`` are :class:`FallbackModel`'s (``policy``, ``drift_sample``, ``breaker_errors``, ...).
    """
    return FallbackModel(bundle, **options).start(wait=wait)
